"""Tiny random-weight folders for every model role (tests and CPU benchmarks; real classes, real formats)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

TINY_ROLES = ("dino", "clip", "clip_large", "aesthetic", "grounding_dino", "sam", "face")


def save_tiny_models(root: str | os.PathLike, roles=TINY_ROLES, seed: int = 0) -> dict[str, Path]:
    """Write one folder per role under `root`; returns the role -> folder map `--models` expects.

    The `face` role is a tiny ViTModel folder (the transformers format of the face embedder); `aesthetic` is a
    linear head on the tiny `clip_large` projection dim (16).
    """
    from ..vision.tiny import save_tiny_clip, save_tiny_dino, save_tiny_grounding_dino, save_tiny_sam
    from .metrics.aesthetic_quality import AestheticHead

    root = Path(root)
    makers = {
        "dino": lambda p: save_tiny_dino(p, seed=seed),
        "clip": lambda p: save_tiny_clip(p, seed=seed),
        "clip_large": lambda p: save_tiny_clip(p, seed=seed + 1),
        "grounding_dino": lambda p: save_tiny_grounding_dino(p, seed=seed),
        "sam": lambda p: save_tiny_sam(p, seed=seed),
        "face": lambda p: save_tiny_dino(p, seed=seed + 2, add_pooling_layer=True),
    }
    out = {}
    for role in roles:
        path = root / role
        if role == "aesthetic":
            torch.manual_seed(seed)
            AestheticHead(16).save(path)
        else:
            makers[role](path)
        out[role] = path
    return out
