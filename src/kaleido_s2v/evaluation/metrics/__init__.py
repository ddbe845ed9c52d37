"""One metric per module. Each defines `PARAMS` (defaults, all reported) and
`score(data: CaseData, models: ModelStore, params: dict) -> MetricResult`; see `..registry`."""

from .base import MetricResult, consistency_from_features

__all__ = ["MetricResult", "consistency_from_features"]
