"""Small frame helpers shared by stages: streamed sampling of a clip window, luma, crops."""

from __future__ import annotations

import numpy as np

from ..video_io import iter_frames


def sample_frames(source: str, start_s: float, end_s: float, n: int) -> list[tuple[float, np.ndarray]]:
    """`n` frames spread evenly over [start_s, end_s), decoded by streaming (only the chosen ones are kept)."""
    if n <= 0:
        return []
    dur = max(end_s - start_s, 1e-6)
    targets = [start_s + dur * (k + 0.5) / n for k in range(n)]
    out: list[tuple[float, np.ndarray]] = []
    prev = None
    k = 0
    for t, f in iter_frames(source, start_s, end_s):
        # keep the first frame at or after each target time (or the last frame before the end)
        while k < n and t >= targets[k] - 1e-6:
            out.append((t, f))
            k += 1
        prev = (t, f)
        if k >= n:
            break
    while k < n and prev is not None:
        out.append(prev)
        k += 1
    return out


def to_gray(frame: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def crop_box(frame: np.ndarray, box: list[float]) -> np.ndarray:
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0 = max(0, min(w - 1, x0)), max(0, min(h - 1, y0))
    x1, y1 = max(x0 + 1, min(w, x1)), max(y0 + 1, min(h, y1))
    return frame[y0:y1, x0:x1]


def on_white(frame: np.ndarray, mask: np.ndarray, box: list[float] | None = None) -> np.ndarray:
    """The masked subject pasted on white (the reference convention of Kaleido's loader), cropped to `box`."""
    out = np.where(mask[..., None] > 0, frame, 255).astype(np.uint8)
    return crop_box(out, box) if box is not None else out
