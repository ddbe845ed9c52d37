"""Open-vocabulary detection with Grounding DINO (`AutoModelForZeroShotObjectDetection`, local folder)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .common import Images, batches, load_folder_check, resolve_device, to_pil_list


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the input image
    score: float
    phrase: str


def grounding_text(phrases: str | Sequence[str]) -> str:
    """Grounding DINO's prompt format: lower-case phrases, each ending in '.', e.g. 'a cat. a dog.'."""
    if isinstance(phrases, str):
        phrases = [phrases]
    parts = [p.strip().lower().rstrip(".").strip() for p in phrases]
    return " ".join(f"{p}." for p in parts if p)


class GroundingDINO:
    """Grounding DINO (e.g. IDEA-Research/grounding-dino-tiny) from a local folder.

    `detect` returns, for each image, the boxes whose best token probability exceeds `box_threshold`, labelled
    with the phrase tokens above `text_threshold` (transformers' `post_process_grounded_object_detection`),
    sorted by score (best first).
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device | None = "cpu",
                 dtype: torch.dtype = torch.float32, role: str = "grounding_dino"):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        path = load_folder_check(path, role)
        self.device = resolve_device(device)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(path)
        self.dtype = dtype

    @torch.no_grad()
    def detect(self, images: Images, phrases: str | Sequence[str], box_threshold: float = 0.35,
               text_threshold: float = 0.25, batch_size: int = 8) -> list[list[Detection]]:
        """Detect `phrases` (one string or a list, same for every image) in each image."""
        pils = to_pil_list(images)
        text = grounding_text(phrases)
        if not text:
            raise ValueError("detect() needs at least one non-empty phrase")
        results: list[list[Detection]] = []
        for sl in batches(len(pils), batch_size):
            chunk = pils[sl]
            inputs = self.processor(images=chunk, text=[text] * len(chunk), padding=True, return_tensors="pt")
            inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                      for k, v in inputs.items()}
            outputs = self.model(**inputs)
            post = self.processor.post_process_grounded_object_detection(
                outputs, inputs["input_ids"], threshold=box_threshold, text_threshold=text_threshold,
                target_sizes=[im.size[::-1] for im in chunk])
            for im, res in zip(chunk, post):
                w, h = im.size
                dets = []
                for box, score, label in zip(res["boxes"].tolist(), res["scores"].tolist(), res["text_labels"]):
                    x0, y0, x1, y1 = (min(max(v, 0.0), lim) for v, lim in zip(box, (w, h, w, h)))
                    if x1 - x0 >= 1 and y1 - y0 >= 1:
                        dets.append(Detection((x0, y0, x1, y1), float(score), str(label)))
                results.append(sorted(dets, key=lambda d: -d.score))
        return results
