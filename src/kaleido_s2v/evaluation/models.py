"""Load each model role once per run, lazily, from the local folders of `--models`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..errors import UserInputError


def _load(role: str, path: Path, device, dtype):
    if role == "dino":
        from ..vision import DINO

        return DINO(path, device, dtype, role=role)
    if role in ("clip", "clip_large"):
        from ..vision import CLIP

        return CLIP(path, device, dtype, role=role)
    if role == "grounding_dino":
        from ..vision import GroundingDINO

        return GroundingDINO(path, device, dtype, role=role)
    if role == "sam":
        from ..vision import SAM

        return SAM(path, device, dtype, role=role)
    if role == "aesthetic":
        from .metrics.aesthetic_quality import AestheticHead

        return AestheticHead.load(path, device)
    if role == "musiq":
        from .metrics.imaging_quality import load_musiq

        return load_musiq(path, device)
    if role == "face":
        from .face import FaceEmbedder

        return FaceEmbedder(path, device)
    raise UserInputError(f"role '{role}' has no loader in this build: remove it from --models")


class ModelStore:
    """role -> loaded model, each loaded at most once; `paths` is the `--models` map."""

    def __init__(self, paths: dict[str, str | os.PathLike], device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 32):
        self.paths = {k: Path(v) for k, v in paths.items()}
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self._models: dict[str, object] = {}
        self.load_seconds: dict[str, float] = {}

    def __contains__(self, role: str) -> bool:
        return role in self.paths

    def first(self, *roles: str) -> str:
        """The first configured role among `roles` (the metric registry's preference order)."""
        for r in roles:
            if r in self.paths:
                return r
        raise UserInputError(f"no model configured for role {' or '.join(roles)}: add it to --models")

    def get(self, role: str):
        if role not in self._models:
            if role not in self.paths:
                raise UserInputError(f"no model configured for role '{role}': add it to --models")
            t0 = time.perf_counter()
            self._models[role] = _load(role, self.paths[role], self.device, self.dtype)
            self.load_seconds[role] = time.perf_counter() - t0
        return self._models[role]

    def loaded(self) -> list[str]:
        return list(self._models)
