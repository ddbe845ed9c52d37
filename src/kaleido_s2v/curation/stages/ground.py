"""`ground`: Grounding DINO boxes for the candidate subjects on a few key frames of each clip.

The key frames (evenly spread, `num_frames`) are saved as `subjects/<clip_id>/frame_<k>.png` so that later
stages (segment, filter, face, crosspair, inpaint) work on exactly these pixels without decoding again.
The prompt is the caption's own words for each candidate ("puppies. red dress."), as the reference notes
advise; each box is assigned to the candidate whose phrase its label matches. Thresholds 0.25 / 0.25 are
OpenS2V's and transformers' defaults.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ...errors import UserInputError
from ..frames import sample_frames
from ..stage import Stage
from ..tasks import Clip


def assign_phrase(label: str, phrases: list[str]) -> int | None:
    """Index of the candidate phrase a Grounding DINO label belongs to (labels are sub-token spans)."""
    words = set(re.findall(r"[a-z0-9'-]+", label.lower())) - {"sep", "cls", "pad"}
    label = " ".join(sorted(words))
    if not words:
        return None
    for i, p in enumerate(phrases):
        if label == p:
            return i
    best, best_overlap = None, 0
    for i, p in enumerate(phrases):
        overlap = len(words & set(p.split()))
        if overlap > best_overlap or (overlap == 0 and best is None and (label in p or p in label)):
            best, best_overlap = i, overlap
    return best


def save_png(path, array: np.ndarray) -> None:
    from PIL import Image

    from ...fileio import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


@dataclass
class GroundStage(Stage):
    name = "ground"
    uses_model = True

    model: str = ""
    num_frames: int = 3
    box_threshold: float = 0.25  # OpenS2V step5-2 / transformers default
    text_threshold: float = 0.25
    max_per_subject: int = 3  # boxes kept per candidate per frame (best first)
    device: str = "auto"
    batch_size: int = 4

    def inputs(self) -> list[str]:
        return ["subjects"]

    def outputs(self) -> list[str]:
        return ["frames", "detections"]

    def check(self) -> None:
        self.require_model(self.model)
        if self.num_frames < 1:
            raise UserInputError(f"ground.num_frames must be >= 1, got {self.num_frames}")

    def setup(self) -> None:
        if getattr(self, "_model", None) is None:
            from ...vision import GroundingDINO

            self._model = GroundingDINO(self.model, device=self.device, role="ground.model")

    def process(self, clip: Clip) -> Clip:
        subjects = clip.fields.get("subjects") or []
        phrases = [s["phrase"] for s in subjects]
        if not phrases:
            clip.fields.update(frames=[], detections=[])
            clip.reject("no_subjects")
            return clip
        try:
            frames = sample_frames(clip.source, clip.start_s, clip.end_s, self.num_frames)
        except UserInputError as e:
            clip.fields.update(frames=[], detections=[], ground_error=str(e))
            clip.reject("unreadable")
            return clip
        d = self.subjects_dir(clip)
        frame_paths = []
        for k, (_, f) in enumerate(frames):
            save_png(d / f"frame_{k}.png", f)
            frame_paths.append(f"subjects/{clip.clip_id}/frame_{k}.png")
        results = self._model.detect(np.stack([f for _, f in frames]), phrases, box_threshold=self.box_threshold,
                                     text_threshold=self.text_threshold, batch_size=self.batch_size)
        detections = []
        for k, ((t, _), dets) in enumerate(zip(frames, results)):
            per_subject: dict[int, int] = {}
            for det in dets:  # best first
                i = assign_phrase(det.phrase, phrases)
                if i is None or per_subject.get(i, 0) >= self.max_per_subject:
                    continue
                per_subject[i] = per_subject.get(i, 0) + 1
                detections.append({"frame": k, "t": round(t, 4), "subject": i, "label": det.phrase,
                                   "box": [round(v, 2) for v in det.box], "score": round(det.score, 4)})
        clip.fields["frames"] = frame_paths
        clip.fields["detections"] = detections
        if not detections:
            clip.reject("no_detections")
        return clip
