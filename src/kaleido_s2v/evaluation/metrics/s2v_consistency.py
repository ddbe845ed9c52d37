"""Kaleido S2V Consistency: mean over frames with a detection of mean_j max_k cos(CLIP(subject crop j),
CLIP(segmented reference k)); Grounding DINO boxes -> SAM masks -> white-filled square crops."""

from __future__ import annotations

from .base import MetricResult
from .s2v_common import PARAMS, analyse

PARAMS = PARAMS  # shared with s2v_decoupling (one analysis per case)


def score(data, models, params) -> MetricResult:
    r = analyse(data, models, params)
    impl = f"Grounding DINO + SAM + CLIP ({r['clip_role']})"
    if "skipped" in r:
        return MetricResult(None, {"skipped": r["skipped"]}, impl)
    vals = [v for v in r["consistency"] if v is not None]
    details = {k: r[k] for k in ("detection_rate", "detected_frames", "boxes_found", "masks_kept",
                                 "reference_detected")}
    details["frames"] = len(r["frame_indices"])
    if not vals:
        details["skipped"] = "no subject detected in any sampled frame"
        return MetricResult(None, details, impl)
    return MetricResult(sum(vals) / len(vals), details, impl)
