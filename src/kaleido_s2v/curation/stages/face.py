"""`face`: frontal-face check for human subjects, with OpenCV's bundled Haar cascades (opencv-python-headless).

A human subject (taxonomy `human: true`) passes when the frontal cascade finds a face of at least `min_face_px`
inside its reference box. If only the profile cascade (either side) finds one, it fails as `profile_face`;
with neither, `no_face`. The cascades ship inside the OpenCV wheel (`cv2.data.haarcascades`), so this works
offline and needs no weights; InsightFace (the reference notes' pick) has non-commercial weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..frames import crop_box
from ..stage import Stage
from ..tasks import Clip
from .segment import load_rgb


class HaarFaces:
    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_face_px: int = 24):
        import cv2

        root = cv2.data.haarcascades
        self.frontal = cv2.CascadeClassifier(root + "haarcascade_frontalface_default.xml")
        self.profile = cv2.CascadeClassifier(root + "haarcascade_profileface.xml")
        if self.frontal.empty() or self.profile.empty():
            raise RuntimeError(f"OpenCV Haar cascades not found under {root}")
        self.kw = dict(scaleFactor=scale_factor, minNeighbors=min_neighbors, minSize=(min_face_px, min_face_px))

    def detect(self, rgb: np.ndarray) -> dict:
        """{'frontal': [[x0,y0,x1,y1], ...], 'profile': [...]} in pixels of `rgb`."""
        import cv2

        grey = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))

        def boxes(found):
            return [[int(x), int(y), int(x + w), int(y + h)] for x, y, w, h in (found if len(found) else [])]

        frontal = boxes(self.frontal.detectMultiScale(grey, **self.kw))
        profile = boxes(self.profile.detectMultiScale(grey, **self.kw))
        flipped = grey[:, ::-1].copy()  # the profile cascade sees one side only
        w = grey.shape[1]
        profile += [[w - b[2], b[1], w - b[0], b[3]] for b in boxes(self.profile.detectMultiScale(flipped, **self.kw))]
        return {"frontal": frontal, "profile": profile}


@dataclass
class FaceStage(Stage):
    name = "face"

    min_face_px: int = 24
    min_neighbors: int = 5
    scale_factor: float = 1.1
    margin: float = 0.1  # grow the subject box by this fraction before searching
    require_frontal: bool = True

    def inputs(self) -> list[str]:
        return ["subjects", "frames", "detections"]

    def outputs(self) -> list[str]:
        return ["subjects"]

    def setup(self) -> None:
        if getattr(self, "_faces", None) is None:
            self._faces = HaarFaces(self.scale_factor, self.min_neighbors, self.min_face_px)

    def check_image(self, rgb: np.ndarray) -> dict:
        self.setup()
        found = self._faces.detect(rgb)
        frontal = max(found["frontal"], key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), default=None)
        return {"frontal": frontal is not None, "box": frontal, "profiles": len(found["profile"]),
                "reason": None if frontal else ("profile_face" if found["profile"] else "no_face")}

    def process(self, clip: Clip) -> Clip:
        subjects = clip.fields.get("subjects") or []
        dets = clip.fields.get("detections") or []
        frames = clip.fields.get("frames") or []
        for s in subjects:
            if not s.get("human") or s.get("status") == "dropped":
                continue
            det = dets[s["ref_detection"]] if "ref_detection" in s else None
            if det is None:
                continue
            frame = load_rgb(self.output_dir, frames[det["frame"]])
            x0, y0, x1, y1 = det["box"]
            mx, my = self.margin * (x1 - x0), self.margin * (y1 - y0)
            result = self.check_image(crop_box(frame, [x0 - mx, y0 - my, x1 + mx, y1 + my]))
            s["face"] = result
            if self.require_frontal and not result["frontal"]:
                s.update(status="dropped", reason=result["reason"])
        if subjects and not any(s.get("status", "kept") == "kept" for s in subjects):
            clip.reject("no_frontal_face" if any(s.get("face") for s in subjects) else "no_consistent_subject")
        return clip
