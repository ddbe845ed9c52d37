"""The shared result type and the VBench first/previous-frame consistency formula."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MetricResult:
    """`value` is None when the case cannot be scored (the reason goes to `details['skipped']`)."""

    value: float | None
    details: dict = field(default_factory=dict)
    implementation: str = ""  # the model/method actually used, named in scores.json (substitutes included)


def consistency_from_features(f: torch.Tensor) -> tuple[float, int]:
    """VBench: s_t = (max(0, cos(f_{t-1}, f_t)) + max(0, cos(f_1, f_t))) / 2 for t >= 2.

    `f` is (T, D) L2-normalised; returns (sum of s_t, T - 1) so that callers can aggregate like VBench.
    """
    if len(f) < 2:
        return 0.0, 0
    prev = (f[1:] * f[:-1]).sum(-1).clamp_min(0)
    first = (f[1:] * f[:1]).sum(-1).clamp_min(0)
    s = 0.5 * (prev + first)
    return float(s.sum()), len(s)


def consistency_result(f: torch.Tensor, implementation: str) -> MetricResult:
    total, pairs = consistency_from_features(f)
    if pairs == 0:
        return MetricResult(None, {"skipped": "video has fewer than 2 frames"}, implementation)
    return MetricResult(total / pairs, {"sum": total, "pairs": pairs, "frames": pairs + 1}, implementation)


def vbench_pair_weighted_mean(details: list[dict]) -> float | None:
    """VBench single-GPU aggregation: sum of s_t over all videos / sum of (T_i - 1)."""
    pairs = sum(d.get("pairs", 0) for d in details)
    return sum(d.get("sum", 0.0) for d in details) / pairs if pairs else None
