"""`scenes`: split a source video into single-shot clips.

The detector is PySceneDetect's content score re-implemented on streamed frames: for consecutive frames
(downscaled to ~256 px wide) the mean absolute difference of the H, S and V channels, averaged
(`ContentDetector`'s default weights). `detector="adaptive"` (default) cuts where that score is
`adaptive_threshold` times the mean of the `window_width` scores on each side and at least `min_content_val`
(`AdaptiveDetector`: 3.0, 2, 15.0); `detector="content"` cuts where the score alone passes `threshold` (27.0).
Running our own loop over `kaleido_s2v.video_io.iter_frames` keeps decoding in one place (PyAV, streaming,
one frame in memory) and avoids PySceneDetect's `opencv-python` dependency, which clashes with the headless
build; `tests/curation/test_scenes.py` checks the cuts against PySceneDetect itself when it is installed.

Shots shorter than `min_clip_s` are recorded as rejected (`too_short`); shots longer than `max_clip_s` are cut
into consecutive `max_clip_s` pieces (NeMo Curator's stride mode), a short tail being recorded as `too_short`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import UserInputError
from ...video_io import iter_frames
from ..stage import SplitStage
from ..tasks import Clip, Video, clip_id_for


def content_score(prev_hsv: np.ndarray, hsv: np.ndarray) -> float:
    """PySceneDetect's `content_val`: mean |ΔH|, |ΔS|, |ΔV| over pixels, averaged over the three channels."""
    d = np.abs(hsv.astype(np.int32) - prev_hsv.astype(np.int32))
    return float(d.reshape(-1, 3).mean(axis=0).mean())


def adaptive_cuts(scores: np.ndarray, ratio: float, window: int, min_content: float, min_len: int) -> list[int]:
    """Frame indices that start a new shot (`AdaptiveDetector`'s rule) from the per-frame content scores."""
    cuts: list[int] = []
    last = 0
    n = len(scores)
    for i in range(1, n):
        lo, hi = max(1, i - window), min(n, i + window + 1)
        neighbours = np.concatenate([scores[lo:i], scores[i + 1 : hi]])
        avg = float(neighbours.mean()) if neighbours.size else 0.0
        r = scores[i] / avg if avg > 1e-6 else (255.0 if scores[i] >= min_content else 0.0)
        if r >= ratio and scores[i] >= min_content and i - last >= min_len:
            cuts.append(i)
            last = i
    return cuts


def threshold_cuts(scores: np.ndarray, threshold: float, min_len: int) -> list[int]:
    cuts: list[int] = []
    last = 0
    for i in range(1, len(scores)):
        if scores[i] >= threshold and i - last >= min_len:
            cuts.append(i)
            last = i
    return cuts


@dataclass
class SceneStage(SplitStage):
    name = "scenes"

    detector: str = "adaptive"  # adaptive | content
    adaptive_threshold: float = 3.0  # PySceneDetect AdaptiveDetector default
    window_width: int = 2
    min_content_val: float = 15.0
    threshold: float = 27.0  # PySceneDetect ContentDetector default
    min_scene_len: int = 15  # frames, PySceneDetect default
    min_clip_s: float = 2.0  # NeMo Curator TransNetV2 stage: 2 s
    max_clip_s: float = 10.0  # NeMo Curator TransNetV2 stage: 10 s
    downscale_width: int = 256

    def outputs(self) -> list[str]:
        return ["scenes"]

    def check(self) -> None:
        if self.detector not in ("adaptive", "content"):
            raise UserInputError(f"scenes.detector is '{self.detector}': use 'adaptive' or 'content'")
        if not 0 < self.min_clip_s <= self.max_clip_s:
            raise UserInputError(f"scenes: need 0 < min_clip_s <= max_clip_s, got {self.min_clip_s}, {self.max_clip_s}")

    def detect(self, source: str) -> tuple[list[float], np.ndarray, float]:
        """Stream the video once: (frame times, content scores, fps)."""
        import cv2

        times: list[float] = []
        scores: list[float] = []
        prev = None
        for t, frame in iter_frames(source):
            h, w = frame.shape[:2]
            if w > self.downscale_width:
                frame = cv2.resize(frame, (self.downscale_width, max(1, round(h * self.downscale_width / w))),
                                   interpolation=cv2.INTER_AREA)
            hsv = cv2.cvtColor(frame, cv2.COLOR_RGB2HSV)
            scores.append(0.0 if prev is None else content_score(prev, hsv))
            times.append(t)
            prev = hsv
        fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        return times, np.asarray(scores, dtype=np.float64), fps

    def cuts(self, scores: np.ndarray) -> list[int]:
        if self.detector == "adaptive":
            return adaptive_cuts(scores, self.adaptive_threshold, self.window_width, self.min_content_val,
                                 self.min_scene_len)
        return threshold_cuts(scores, self.threshold, self.min_scene_len)

    def split(self, video: Video) -> list[Clip]:
        from ...video_io import video_info

        try:
            info = video_info(video.source)
            times, scores, fps = self.detect(video.source)
        except UserInputError as e:
            clip = Clip(clip_id=clip_id_for(video.source, 0), source=video.source, start_s=0.0, end_s=0.0)
            clip.reject("unreadable")
            clip.fields["scenes"] = {"error": str(e)}
            return [clip]
        if not times:
            clip = Clip(clip_id=clip_id_for(video.source, 0), source=video.source, start_s=0.0, end_s=0.0)
            clip.reject("no_frames")
            return [clip]
        fps = fps or info.fps or 16.0
        end_of_video = times[-1] + 1.0 / fps
        bounds = [0, *self.cuts(scores), len(times)]
        clips: list[Clip] = []
        for shot, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            start, end = times[a], (times[b] if b < len(times) else end_of_video)
            pieces = []
            while end - start > self.max_clip_s + 1e-6:
                pieces.append((start, start + self.max_clip_s))
                start += self.max_clip_s
            pieces.append((start, end))
            for s, e in pieces:
                clip = Clip(clip_id=clip_id_for(video.source, len(clips)), source=video.source,
                            start_s=round(s, 4), end_s=round(e, 4), fps=round(fps, 4), width=info.width,
                            height=info.height)
                clip.fields["scenes"] = {"shot": shot, "cut_score": round(float(scores[a]), 3),
                                         "detector": self.detector}
                if e - s < self.min_clip_s - 1e-6:
                    clip.reject("too_short")
                clips.append(clip)
        return clips
