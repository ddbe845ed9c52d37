"""`quality`: brightness, blur, motion and length checks on one streamed pass over the clip.

- brightness: mean luma (ITU-R 601 grey, 0–255) of frames sampled at `sample_fps`; `too_dark` below
  `min_luma`, `too_bright` above `max_luma` (no peer publishes values; 40 / 220 as the reference notes suggest).
- blur: variance of the Laplacian of the grey frame at native resolution (OpenCV), median over samples;
  `blurry` below `min_sharpness` (100.0, NeMo Curator's blur filter).
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


@dataclass
class QualityStage(Stage):
    name = "quality"

    min_luma: float = 40.0
    max_luma: float = 220.0
    min_sharpness: float = 100.0  # variance of the Laplacian; NeMo Curator blur filter default
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
                sharp.append(float(cv2.Laplacian(grey, cv2.CV_64F).var()))
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
