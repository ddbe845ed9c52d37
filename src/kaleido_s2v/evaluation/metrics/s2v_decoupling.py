"""Kaleido S2V Decoupling: mean over frames of 1 - max_k cos(CLIP(frame background), CLIP(reference k
background)), subjects masked with the same grey fill on both sides (Grounding DINO boxes -> SAM masks)."""

from __future__ import annotations

from .base import MetricResult
from .s2v_common import PARAMS, analyse

PARAMS = PARAMS


def score(data, models, params) -> MetricResult:
    r = analyse(data, models, params)
    impl = f"Grounding DINO + SAM + CLIP ({r['clip_role']})"
    if "skipped" in r:
        return MetricResult(None, {"skipped": r["skipped"]}, impl)
    vals = r["decoupling"]
    details = {k: r[k] for k in ("detection_rate", "detected_frames", "reference_detected")}
    details["frames"] = len(vals)
    return MetricResult(sum(vals) / len(vals), details, impl)
