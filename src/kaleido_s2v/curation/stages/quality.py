"""`quality`: brightness, blur, motion and length checks on one streamed pass over the clip.

- brightness: mean luma (ITU-R 601 grey, 0–255) of frames sampled at `sample_fps`; `too_dark` below
  `min_luma`, `too_bright` above `max_luma` (no peer publishes values; 40 / 220 as the reference notes suggest).
- blur: `sharpness(grey)`: the grey frame downscaled to 512 px on its short side (so the score of footage at 512p
  and above does not depend on its pixel size; smaller frames are not upscaled, which would call low resolution
  blurry), the variance of its Laplacian (OpenCV, 3x3) in tiles of 1/8 of the short side (64 px), 90th
  percentile over tiles: the sharpest tenth of the frame, so a sharp subject before an out-of-focus background is
  sharp (NeMo Curator's whole-frame variance at 100 rejects it). Median over samples; `blurry` below
  `min_sharpness` (50.0, calibrated on the official Kaleido examples: the clips score 206-1321, the same clips
  blurred with a Gaussian of sigma 3 px at 512p 9-18; the table is in docs/curate.md).
- motion: mean absolute difference of consecutive grey frames downscaled 4x, in [0, 1]; `static` below
  `min_motion`. (NeMo Curator thresholds codec motion vectors at 0.00098 — a different unit.)
- length: `too_short` / `too_long` outside [`min_clip_s`, `max_clip_s`].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import UserInputError
from ...video_io import iter_frames
from ..stage import Stage
from ..tasks import Clip

SHARP_SIDE, SHARP_PCT = 512, 90  # short side the score is taken at; percentile over tiles


def sharpness(grey: np.ndarray) -> float:
    """90th percentile over square tiles (1/8 of the short side: 64 px at 512p) of the Laplacian's variance, on
    `grey` (uint8) downscaled to 512 px on its short side when larger."""
    import cv2

    h, w = grey.shape
    s = SHARP_SIDE / min(h, w)
    if s < 1.0:
        grey = cv2.resize(grey, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    lap = cv2.Laplacian(grey, cv2.CV_64F)
    t = max(1, min(lap.shape) // 8)
    nh, nw = lap.shape[0] // t, lap.shape[1] // t
    return float(np.percentile(lap[: nh * t, : nw * t].reshape(nh, t, nw, t).var(axis=(1, 3)), SHARP_PCT))


@dataclass
class QualityStage(Stage):
    name = "quality"

    min_luma: float = 40.0
    max_luma: float = 220.0
    min_sharpness: float = 50.0  # `sharpness`: tile-wise Laplacian variance at 512p, 90th percentile
    min_motion: float = 0.002
    min_clip_s: float = 2.0
    max_clip_s: float = 60.0
    sample_fps: float = 2.0

    def outputs(self) -> list[str]:
        return ["quality"]

    def check(self) -> None:
        if self.min_luma >= self.max_luma:
            raise UserInputError(f"quality: min_luma ({self.min_luma}) must be below max_luma ({self.max_luma})")
        if self.sample_fps <= 0:
            raise UserInputError(f"quality.sample_fps must be > 0, got {self.sample_fps}")

    def measure(self, clip: Clip) -> dict[str, float]:
        import cv2

        lumas, sharp, motion = [], [], []
        prev = None
        next_sample = clip.start_s
        n = 0
        for t, frame in iter_frames(clip.source, clip.start_s, clip.end_s):
            grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
            if t >= next_sample - 1e-6:
                lumas.append(float(grey.mean()))
                sharp.append(sharpness(grey))
                next_sample = t + 1.0 / self.sample_fps
            small = cv2.resize(grey, (max(1, grey.shape[1] // 4), max(1, grey.shape[0] // 4)),
                               interpolation=cv2.INTER_AREA).astype(np.float32)
            if prev is not None:
                motion.append(float(np.abs(small - prev).mean() / 255.0))
            prev = small
            n += 1
        return {
            "frames": n,
            "mean_luma": round(float(np.mean(lumas)), 3) if lumas else 0.0,
            "sharpness": round(float(np.median(sharp)), 3) if sharp else 0.0,
            "motion": round(float(np.mean(motion)), 6) if motion else 0.0,
        }

    def process(self, clip: Clip) -> Clip:
        try:
            q = self.measure(clip)
        except UserInputError as e:
            clip.fields["quality"] = {"error": str(e)}
            clip.reject("unreadable")
            return clip
        q["duration_s"] = round(clip.duration, 4)
        clip.fields["quality"] = q
        if q["frames"] == 0:
            clip.reject("no_frames")
            return clip
        if q["mean_luma"] < self.min_luma:
            clip.reject("too_dark")
        if q["mean_luma"] > self.max_luma:
            clip.reject("too_bright")
        if q["sharpness"] < self.min_sharpness:
            clip.reject("blurry")
        if q["frames"] > 1 and q["motion"] < self.min_motion:
            clip.reject("static")
        if clip.duration < self.min_clip_s - 1e-6:
            clip.reject("too_short")
        if clip.duration > self.max_clip_s + 1e-6:
            clip.reject("too_long")
        return clip
