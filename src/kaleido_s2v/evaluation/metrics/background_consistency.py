"""VBench background consistency: CLIP (ViT-B/32) image embeddings of every frame, first/previous formula."""

from __future__ import annotations

from .base import MetricResult, consistency_result, vbench_pair_weighted_mean

PARAMS = {"frames": "all", "preprocess": "VBench clip_transform: resize short side (bicubic, antialias=False), "
          "center crop, CLIP mean/std", "feature": "normalised image_embeds"}

aggregate = vbench_pair_weighted_mean


def score(data, models, params) -> MetricResult:
    clip = models.get("clip")
    feats = clip.embed_images(data.frames, batch_size=models.batch_size, preprocess="vbench")
    return consistency_result(feats, f"CLIP ({models.paths['clip'].name})")
