"""`segment`: SAM / SAM 2 masks from the grounded boxes (`multimask_output=False`, as OpenS2V).

Masks are written as `subjects/<clip_id>/mask_<frame>_<n>.png` (0/255); each detection gets `mask`, `sam_iou`
(the model's predicted IoU) and `mask_area` (fraction of the frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..stage import Stage
from ..tasks import Clip
from .ground import save_png


def load_rgb(output_dir: str, rel: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(Path(output_dir) / rel).convert("RGB"))


def load_mask(output_dir: str, rel: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(Path(output_dir) / rel).convert("L")) > 127


@dataclass
class SegmentStage(Stage):
    name = "segment"
    uses_model = True

    model: str = ""
    device: str = "auto"
    batch_size: int = 4

    def inputs(self) -> list[str]:
        return ["frames", "detections"]

    def outputs(self) -> list[str]:
        return ["detections"]

    def check(self) -> None:
        self.require_model(self.model)

    def setup(self) -> None:
        if getattr(self, "_model", None) is None:
            from ...vision import SAM

            self._model = SAM(self.model, device=self.device, role="segment.model")

    def process(self, clip: Clip) -> Clip:
        frames = clip.fields.get("frames") or []
        dets = clip.fields.get("detections") or []
        if not dets:
            clip.reject("no_detections")
            return clip
        images = [load_rgb(self.output_dir, p) for p in frames]
        by_frame = [[j for j, d in enumerate(dets) if d["frame"] == k] for k in range(len(frames))]
        results = self._model.segment(images, [[dets[j]["box"] for j in idx] for idx in by_frame],
                                      batch_size=self.batch_size)
        d = self.subjects_dir(clip)
        for k, (idx, (masks, ious)) in enumerate(zip(by_frame, results)):
            for n, j in enumerate(idx):
                name = f"mask_{k}_{n}.png"
                save_png(d / name, masks[n].astype(np.uint8) * 255)
                dets[j].update(mask=f"subjects/{clip.clip_id}/{name}", sam_iou=round(float(ious[n]), 4),
                               mask_area=round(float(masks[n].mean()), 5))
        return clip
