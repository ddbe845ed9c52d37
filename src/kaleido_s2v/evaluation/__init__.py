"""Scoring generated videos: Kaleido's S2V metrics, VBench-style quality, text alignment, face identity.

`evaluate(cases, model_paths, output)` decodes each video once, loads each model role once, runs the selected
metrics (`registry.METRICS`) and writes scores.json, scores.csv and report.html. See docs/evaluate.md.
"""

from .cases import Case, Reference, read_cases, read_models
from .registry import METRICS, ROLES
from .runner import evaluate, select_metrics

__all__ = ["METRICS", "ROLES", "Case", "Reference", "evaluate", "read_cases", "read_models", "select_metrics"]
