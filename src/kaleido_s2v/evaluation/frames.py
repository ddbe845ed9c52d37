"""Decode each video once and share its frames (and the case's reference images) among all metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import UserInputError
from ..references import load_reference
from ..video_io import read_video
from .cases import Case, Reference


def uniform_indices(num_frames: int, n: int) -> np.ndarray:
    """`np.linspace(0, T-1, n).astype(int)` (OpenS2V / ConsisID sampling); all frames when T <= n."""
    if num_frames <= n:
        return np.arange(num_frames)
    return np.linspace(0, num_frames - 1, n).astype(int)


def middle_indices(num_frames: int, n: int) -> np.ndarray:
    """VBench / ViCLIP 'middle' sampling: the midpoint of each of n equal intervals of [0, T)."""
    edges = np.linspace(0, num_frames, n + 1).astype(int)
    return np.array([(a + b - 1) // 2 for a, b in zip(edges[:-1], edges[1:])])


@dataclass
class CaseData:
    """Everything a metric reads for one case; `cache` lets metrics share intermediate results."""

    case: Case
    frames: np.ndarray  # (T, H, W, 3) uint8, every frame of the video
    references: list[Image.Image]  # RGB, in the case's order
    cache: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.case.id

    @property
    def prompt(self) -> str:
        return self.case.prompt

    @property
    def reference_info(self) -> tuple[Reference, ...]:
        return self.case.references


def load_case(case: Case) -> CaseData:
    frames = read_video(case.video)
    if len(frames) == 0:
        raise UserInputError(f"video '{case.video}' of case '{case.id}' has no frames: give a valid video")
    refs = [load_reference(r.path, f"reference image of case '{case.id}'") for r in case.references]
    return CaseData(case, frames, refs)
