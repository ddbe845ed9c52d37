"""Fast modes on the built-in model, on CPU: what each one saves and what it costs in quality.

For every mode (the official sampler uncached = the baseline, measured in the same run; `--cache fbcache`,
`--cache taylorseer`, `--cache magcache` with the ratios the built-in model ships (`--calibrate N` re-measures them
on N other cases first); the distill grid with 4 and 8 steps, which without a distillation LoRA shows only what the grid
alone does to this model) the built-in pipeline generates the toy world's evaluation cases (`make-eval`, seeded),
and the table gives: transformer forwards computed / called, wall time of the denoising calls against the baseline,
PSNR of the video against the baseline's video of the same case and seed, and the toy evaluator's subject recall and
colour recall (docs/toy.md) against the baseline's. Expected: the cache modes skip >= 40 % of the forwards.

    .venv/bin/python benchmarks/bench_speed.py [--cases 24] [--threads 2] [--calibrate 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODES = {  # name -> (apply_speed_options kwargs, pipeline call overrides)
    "official": ({}, {}),
    "fbcache": ({"cache": "fbcache"}, {}),
    "taylorseer": ({"cache": "taylorseer"}, {}),
    "magcache": ({"cache": "magcache"}, {}),  # the ratios the built-in model ships (toy/weights/cache_calibration.json)
    "distill-4": ({}, {"num_inference_steps": 4, "guidance_scale": 1.0, "shift": 5.0}),
    "distill-8": ({}, {"num_inference_steps": 8, "guidance_scale": 1.0, "shift": 5.0}),
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 videos, in dB."""
    mse = float(np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def run_mode(name: str, records: list[dict], cases_dir: Path) -> tuple[list[np.ndarray], dict]:
    from kaleido_s2v.builtin import builtin_model_dir, load_builtin_pipeline
    from kaleido_s2v.model_folder import generation_defaults
    from kaleido_s2v.speed import ForwardCounter, apply_speed_options, read_magcache_ratios

    options, overrides = MODES[name]
    pipe = load_builtin_pipeline()
    pipe.set_progress_bar_config(disable=True)
    defaults = generation_defaults(builtin_model_dir())
    if options.get("cache") == "magcache":
        options = {**options, "num_inference_steps": defaults["num_inference_steps"],
                   "mag_ratios": read_magcache_ratios(builtin_model_dir(), "official", defaults["num_inference_steps"])}
    elif options.get("cache") == "magcache-calibrate":
        options = {**options, "num_inference_steps": defaults["num_inference_steps"]}
    apply_speed_options(pipe, **options)
    counter, videos, seconds, calls, computed = ForwardCounter(pipe.transformer), [], 0.0, 0, 0
    for k, r in enumerate(records):
        scene = r["scene"]
        call = dict(height=scene["height"], width=scene["width"], num_frames=scene["frames"],
                    num_inference_steps=defaults["num_inference_steps"], guidance_scale=defaults["guidance_scale"],
                    max_sequence_length=defaults["max_sequence_length"], negative_prompt=defaults["negative_prompt"])
        call.update(overrides)
        refs = [cases_dir / info["path"] for info in r["references"]]
        with counter.counting():
            t0 = time.perf_counter()
            video = pipe(prompt=r["caption"], reference_images=refs, generator=torch.Generator().manual_seed(k),
                         output_type="np", **call).frames[0]
            seconds += time.perf_counter() - t0
        calls, computed = calls + counter.calls, computed + counter.computed
        videos.append((video * 255.0).round().clip(0, 255).astype(np.uint8))  # as the evaluator reads an mp4
    return videos, {"seconds": seconds, "calls": calls, "computed": computed}


def calibrate_builtin(records: list[dict], cases_dir: Path) -> Path:
    """MagCache ratios of the built-in model on its 20-step official grid (mean over the cases and CFG branches),
    written to the package's toy/weights/cache_calibration.json: what `--cache magcache` reads for it."""
    from kaleido_s2v.builtin import builtin_model_dir
    from kaleido_s2v.model_folder import generation_defaults
    from kaleido_s2v.speed import capturing_magcache_ratios, write_magcache_ratios

    MODES["magcache-calibrate"] = ({"cache": "magcache-calibrate"}, {})
    with capturing_magcache_ratios() as lists:
        run_mode("magcache-calibrate", records, cases_dir)
    steps = generation_defaults(builtin_model_dir())["num_inference_steps"]
    lists = [r for r in lists if len(r) == steps]
    del MODES["magcache-calibrate"]
    return write_magcache_ratios(builtin_model_dir(), "official", steps, list(np.mean(lists, axis=0)), overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--calibrate", type=int, default=0, metavar="N",
                        help="first re-measure the built-in model's shipped MagCache ratios on N other cases")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from kaleido_s2v.toy.evaluator import evaluate
    from kaleido_s2v.toy.model import load_recipe, world_config
    from kaleido_s2v.toy.world import make_eval_cases, read_scenes

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases_dir = Path(tmp) / "cases"
        recipe = load_recipe()  # the world the built-in model was trained on (its size, frames, captions)
        make_eval_cases(cases_dir, args.cases, seed=7, cfg=world_config(recipe), progress=False)
        records = read_scenes(cases_dir)
        if args.calibrate:  # on other cases than the ones scored
            calibration_dir = Path(tmp) / "calibration"
            make_eval_cases(calibration_dir, args.calibrate, seed=8, cfg=world_config(recipe), progress=False)
            print(f"stored {calibrate_builtin(read_scenes(calibration_dir), calibration_dir)}")
        baseline_videos = None
        for name in MODES:
            videos, cost = run_mode(name, records, cases_dir)
            report = evaluate(records, videos)["matched"]
            if baseline_videos is None:
                baseline_videos = videos
            results[name] = {
                **cost,
                "time_ratio": cost["seconds"] / results["official"]["seconds"] if results else 1.0,
                "psnr_db": float(np.mean([psnr(v, b) for v, b in zip(videos, baseline_videos)])),
                "recall": report["recall"], "colour_recall": report["colour_recall"],
            }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{args.cases} toy evaluation cases, built-in model, {args.threads} threads")
    print(f"{'mode':12} {'computed/calls':>15} {'time':>8} {'ratio':>7} {'PSNR dB':>8} {'recall':>7} {'colour':>7}")
    for name, r in results.items():
        print(f"{name:12} {r['computed']:>7}/{r['calls']:<7} {r['seconds']:7.1f}s {r['time_ratio']:6.2f}x "
              f"{r['psnr_db']:8.1f} {r['recall']:7.3f} {r['colour_recall']:7.3f}")


if __name__ == "__main__":
    main()
