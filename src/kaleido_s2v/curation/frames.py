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


def stream_clip(source: str, start_s: float, end_s: float, dst, fps: float | None = None, native_fps: float = 16.0,
                crf: int = 18) -> int:
    """Cut [start_s, end_s) of `source` into an H.264 mp4 at `dst`, one frame in memory at a time, atomically.

    With `fps`, frames are resampled by timestamp exactly as `video_io.read_video(fps=...)` does; otherwise the
    native frames are kept (written at `native_fps`). Returns the number of frames written.
    """
    from ..video_io import iter_frames, iter_resampled, write_video

    if fps is None:
        frames = (f for _, f in iter_frames(source, start_s, end_s))
    else:
        frames = iter_resampled(source, fps, start_s, end_s)
    n = 0

    def counted():
        nonlocal n
        for f in frames:
            n += 1
            yield f

    try:
        write_video(dst, counted(), fps=fps or native_fps, crf=crf)
    except ValueError as e:
        if n == 0:
            raise ValueError(f"no frames in [{start_s}, {end_s}) of {source}") from e
        raise
    return n
