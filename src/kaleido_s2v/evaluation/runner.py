"""Run the selected metrics over all cases: decode each video once, load each model once, write the report."""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from .. import library_versions
from ..errors import UserInputError
from ..fileio import claim_folder, output_folder
from .cases import Case
from .frames import load_case, uniform_indices
from .registry import METRICS

if TYPE_CHECKING:
    from .models import ModelStore

MADE_BY = "kaleido-s2v evaluate"


def select_metrics(requested: list[str] | None, configured) -> list[str]:
    """The metrics to run: the requested ones (all models present) or every metric whose models are configured."""
    if requested:
        unknown = [m for m in requested if m not in METRICS]
        if unknown:
            raise UserInputError(f"unknown metric(s) {', '.join(unknown)}: choose from {', '.join(METRICS)}")
        for m in requested:
            _, missing = METRICS[m].resolve_roles(configured)
            if missing:
                raise UserInputError(f"metric '{m}' needs model role {', '.join(missing)}: add it to --models")
        return list(dict.fromkeys(requested))
    chosen = [m for m, spec in METRICS.items() if not spec.resolve_roles(configured)[1]]
    return chosen


def _params_for(name: str, params: dict) -> dict:
    module = METRICS[name].load()
    merged = dict(getattr(module, "PARAMS", {}))
    if name.startswith("s2v_"):
        merged.update(params.get("s2v", {}))
    merged.update(params.get(name, {}))
    return merged


def _mean(values):
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _thumbs(data, n_frames: int = 4) -> dict:
    from .report import thumbnail_uri

    idx = uniform_indices(len(data.frames), n_frames)
    return {"references": [thumbnail_uri(r, 96) for r in data.references],
            "frames": [thumbnail_uri(data.frames[i], 128) for i in idx], "prompt": data.prompt}


def evaluate(cases: list[Case], model_paths: dict[str, str | os.PathLike], output: str | os.PathLike | None,
             metrics: list[str] | None = None, device: str = "cpu", batch_size: int = 16,
             params: dict | None = None, keep_going: bool = False, progress: bool = True,
             models: ModelStore | None = None, dtype=None, overwrite: bool = False) -> dict:
    """Score every case with every selected metric; write scores.json/.csv and report.html to `output` (new, empty,
    a folder an earlier evaluate wrote, or any folder with `overwrite`)."""
    import torch

    from .models import ModelStore

    if output is not None:
        claim_folder(output, "--output", MADE_BY, overwrite=overwrite)
    t_start = time.perf_counter()
    params = params or {}
    unknown = [k for k in params if k not in METRICS and k != "s2v"]
    if unknown:
        raise UserInputError(f"--params has unknown metric(s) {', '.join(unknown)}: use metric names or 's2v'")
    names = select_metrics(metrics, model_paths)
    if not names:
        raise UserInputError("no metric has its models configured: add model roles to --models (see --help)")
    if models is None:
        models = ModelStore(model_paths, device=device, batch_size=batch_size, dtype=dtype or torch.float32)
    metric_params = {m: _params_for(m, params) for m in names}
    modules = {m: METRICS[m].load() for m in names}

    per_case, details, errors, thumbs = {}, {}, {}, {}
    impls: dict[str, list[str]] = {m: [] for m in names}
    seconds = {m: 0.0 for m in names}
    decode_seconds = 0.0
    for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress):
        t0 = time.perf_counter()
        try:
            data = load_case(case)
        except UserInputError as e:
            if not keep_going:
                raise
            errors[case.id] = str(e)
            per_case[case.id] = {m: None for m in names}
            continue
        decode_seconds += time.perf_counter() - t0
        if output is not None:
            thumbs[case.id] = _thumbs(data)
        row, det = {}, {}
        for m in names:
            t1 = time.perf_counter()
            try:
                with torch.inference_mode():
                    res = modules[m].score(data, models, metric_params[m])
            except UserInputError:
                raise
            except Exception as e:  # a per-case failure: recorded with --keep-going, raised otherwise
                if not keep_going:
                    raise
                errors.setdefault(case.id, f"{m}: {type(e).__name__}: {e}")
                row[m], det[m] = None, {"error": f"{type(e).__name__}: {e}"}
                continue
            finally:
                seconds[m] += time.perf_counter() - t1
            value = res.value if res.value is None or math.isfinite(res.value) else None
            row[m], det[m] = value, res.details
            if res.implementation and res.implementation not in impls[m]:
                impls[m].append(res.implementation)
        per_case[case.id], details[case.id] = row, det
        del data

    n_ok = max(1, len(cases) - len(errors))
    metric_info = {}
    for m in names:
        vals = [per_case[c].get(m) for c in per_case]
        info = {"implementation": impls[m], "roles": METRICS[m].roles_text(),
                "models": {r: str(models.paths[r]) for r in models.paths if any(r in g for g in METRICS[m].requires)},
                "params": metric_params[m], "n_scored": sum(v is not None for v in vals),
                "n_skipped": sum(v is None for v in vals), "seconds_per_case": seconds[m] / n_ok}
        rates = [d[m]["detection_rate"] for d in details.values() if m in d and "detection_rate" in d[m]]
        if rates:
            info["detection_rate_mean"] = sum(rates) / len(rates)
        agg = getattr(modules[m], "aggregate", None)
        if agg is not None:
            info["vbench_overall"] = agg([d[m] for d in details.values() if m in d])
        metric_info[m] = info
    elapsed = time.perf_counter() - t_start
    scores = {
        "per_case": per_case,
        "mean": {m: _mean(per_case[c].get(m) for c in per_case) for m in names},
        "metrics": metric_info,
        "details": details,
        "errors": errors,
        "run": {"device": str(models.device), "dtype": str(models.dtype).replace("torch.", ""),
                "batch_size": batch_size, "cases": len(cases), "seconds": elapsed, "seconds_per_case": elapsed / max(1, len(cases)),
                "decode_seconds": decode_seconds, "model_load_seconds": models.load_seconds,
                "versions": library_versions()},
    }
    if output is not None:
        from .report import write_csv, write_html, write_json

        with output_folder(output, MADE_BY) as out:
            write_json(out / "scores.json", scores)
            write_csv(out / "scores.csv", scores)
            write_html(out / "report.html", scores, thumbs)
    return scores
