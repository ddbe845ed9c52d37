"""VBench subject consistency: DINO ViT-B/16 CLS features of every frame, first/previous-frame formula."""

from __future__ import annotations

from .base import MetricResult, consistency_result, vbench_pair_weighted_mean

PARAMS = {"frames": "all", "preprocess": "resize short side to 224 (bilinear, antialias=False), no crop, "
          "ImageNet mean/std, DINO v1 position interpolation", "feature": "CLS of last_hidden_state"}

aggregate = vbench_pair_weighted_mean


def score(data, models, params) -> MetricResult:
    dino = models.get("dino")
    feats = dino.embed_frames(data.frames, batch_size=models.batch_size)
    return consistency_result(feats, f"DINO ViTModel ({models.paths['dino'].name})")
