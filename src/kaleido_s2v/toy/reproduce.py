"""`python -m kaleido_s2v.toy reproduce`: the built-in weights from a recipe in one call, stage by stage.

The stages are the commands of docs/toy.md ("Training the built-in model"), each leaving a folder in the work
directory: `data` (make-data), `model` (init-model + train-vae + train-text), `cache` (the trainer's latent
cache), `run` (the transformer, with the project's trainer), `weights` (assemble; the recipe's optional
`assemble.transformer_dtype`), `eval` (make-eval, generate,
evaluate -> `report.json`). A call runs the stages whose output is missing and every stage after the first one
it runs (their inputs changed), so a second call only finishes what the first left: an unfinished transformer
run resumes from its latest checkpoint. Each stage uses the GPU when torch sees one (`CUDA_VISIBLE_DEVICES=`
keeps everything on the CPU).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..fileio import claim_folder, output_folder, write_text_atomic
from .model import MADE_BY

STAGES = ("data", "model", "cache", "run", "weights", "eval")


def _train_cfg(recipe: dict, work: Path):
    from ..training.config import load_config
    from .model import train_config

    path = work / "train.yaml"
    write_text_atomic(path, train_config(recipe, model=str(work / "model"), data=str(work / "data"),
                                         output=str(work / "run")))
    cfg = load_config(path)
    cfg.data.cache_dir = str(work / "cache")
    return cfg


def _run_finished(run: Path, max_steps: int) -> bool:
    from ..training.checkpointing import find_latest_checkpoint

    latest = find_latest_checkpoint(run) if run.is_dir() else None
    return latest is not None and int(latest.name.split("-")[-1]) >= max_steps and (run / "final").is_dir()


def reproduce(work, recipe: dict, *, progress: bool = True, log: Callable[[str], None] = print,
              overwrite: bool = False) -> dict:
    """Run the missing stages of the recipe in `work` (see the module docstring); returns the evaluation summary
    and which stages ran. `work` must be new, empty or made by an earlier call (stage folders in it are replaced),
    or `overwrite`."""
    work = Path(work)
    claim_folder(work, "--work", MADE_BY["reproduce"], overwrite=overwrite)
    with output_folder(work, MADE_BY["reproduce"]):
        return _reproduce(work, recipe, progress, log)


def _reproduce(work: Path, recipe: dict, progress: bool, log: Callable[[str], None]) -> dict:
    from ..distributed import shutdown
    from ..training import build_cache, train
    from .evaluator import evaluate_folder
    from .model import assemble, default_device, generate_cases, init_model, train_text, train_vae, world_config
    from .world import make_dataset, make_eval_cases, parse_mix

    device = default_device()
    d, e = recipe["data"], recipe["eval"]
    max_steps = recipe["train"]["run"]["max_steps"]
    done = {
        "data": (work / "data" / "manifest.jsonl").is_file(),
        "model": (work / "model" / "model_index.json").is_file(),
        "cache": (work / "cache" / "cache.json").is_file(),
        "run": _run_finished(work / "run", max_steps),
        "weights": (work / "weights" / "model_index.json").is_file(),
        "eval": (work / "report.json").is_file(),
    }
    ran: list[str] = []
    t_all = time.time()
    for stage in STAGES:
        if done[stage] and not ran:
            log(f"reproduce: {stage}: done (skipped)")
            continue
        if ran and stage != "eval":  # an earlier stage ran: this one's output is stale
            shutil.rmtree(work / stage, ignore_errors=True)
        t0 = time.time()
        log(f"reproduce: {stage}: running on {device}")
        if stage == "data":
            mix = parse_mix(d["mix"]) if isinstance(d["mix"], str) else tuple(d["mix"])
            make_dataset(work / "data", d["num"], d["seed"], world_config(recipe, d.get("caption_style", "full")), mix,
                         progress=progress)
        elif stage == "model":
            partial = work / "model.partial"  # init + VAE + text encoder become `model` together, or not at all
            shutil.rmtree(partial, ignore_errors=True)
            init_model(partial, recipe)
            train_vae(partial, recipe, progress=progress, device=device)
            train_text(partial, work / "data", recipe, progress=progress, device=device)
            partial.rename(work / "model")
        elif stage == "cache":
            try:
                build_cache(_train_cfg(recipe, work).validate(), progress=progress)
            finally:
                shutdown(barrier=False)
        elif stage == "run":
            cfg = _train_cfg(recipe, work)
            cfg.run.resume = "latest"  # a run stopped by an earlier call continues (none yet: from step 0)
            try:
                train(cfg, progress=progress)
            finally:
                shutdown(barrier=False)
        elif stage == "weights":
            final = work / "run" / "final"
            source = final / "transformer_ema" if (final / "transformer_ema").is_dir() else final / "transformer"
            assemble(work / "model", source, work / "weights",
                     transformer_dtype=recipe.get("assemble", {}).get("transformer_dtype", "fp32"))
        else:
            (work / "report.json").unlink(missing_ok=True)
            if not (work / "eval" / "scenes.jsonl").is_file():
                make_eval_cases(work / "eval", e["num"], e["seed"], world_config(recipe, e.get("caption_style", "full")),
                                progress=progress)
            generate_cases(work / "weights", work / "eval", work / "videos", progress=progress, device=device)
            report = evaluate_folder(work / "eval", work / "videos")
            write_text_atomic(work / "report.json", json.dumps(report, indent=1) + "\n")
        ran.append(stage)
        log(f"reproduce: {stage}: {time.time() - t0:.0f} s")
    report = json.loads((work / "report.json").read_text())
    return {"work": str(work), "ran": ran, "seconds": time.time() - t_all, "weights": str(work / "weights"),
            "matched": report["matched"], "control": report["control"]}
