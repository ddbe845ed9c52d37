"""Real footage helpers for the curation tests: cut/darken/blur copies of the official example videos."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kaleido_s2v.video_io import read_video, write_video

_CACHE: dict[tuple, Path] = {}


def case_video(examples_dir: Path, case: str) -> Path:
    return next(iter(sorted((examples_dir / case).glob("*.mp4"))))


def frames_of(examples_dir: Path, case: str, n: int) -> np.ndarray:
    return read_video(case_video(examples_dir, case), max_frames=n)


def concatenation(examples_dir: Path, tmp_dir: Path, cases: tuple[str, ...], n: int) -> Path:
    """`n` frames of each case, back to back: true cuts at frames n, 2n, ... (16 fps)."""
    key = ("concat", cases, n)
    if key not in _CACHE or not _CACHE[key].exists():
        frames = np.concatenate([frames_of(examples_dir, c, n) for c in cases])
        _CACHE[key] = write_video(tmp_dir / f"concat_{'_'.join(cases)}_{n}.mp4", frames, fps=16)
    return _CACHE[key]


def variant(examples_dir: Path, tmp_dir: Path, case: str, n: int, kind: str) -> Path:
    """A copy of the first `n` frames: original | dark | blur | static."""
    import cv2

    key = ("variant", case, n, kind)
    if key not in _CACHE or not _CACHE[key].exists():
        f = frames_of(examples_dir, case, n)
        if kind == "dark":
            f = (f.astype(np.float32) * 0.2).astype(np.uint8)
        elif kind == "blur":
            f = np.stack([cv2.GaussianBlur(x, (0, 0), 4.0) for x in f])
        elif kind == "static":
            f = np.repeat(f[:1], n, axis=0)
        _CACHE[key] = write_video(tmp_dir / f"{case}_{kind}_{n}.mp4", f, fps=16)
    return _CACHE[key]
