"""`inpaint`: the subject kept, its background replaced, with FLUX.1 Fill (`diffusers.FluxFillPipeline`).

For each kept subject the reference frame is sent with a mask that is white everywhere except the (dilated)
subject, and a prompt naming the subject in a new setting (picked by a stable hash from `scenes`). The result,
cropped around the subject box grown by `context`, is `subjects/<clip_id>/inpaint_<i>.png`. Defaults follow the
FLUX.1-Fill-dev card (guidance 30, 50 steps); the frame is resized so its sides are multiples of 16 and the
longer side is at most `max_side`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..frames import crop_box
from ..stage import Stage
from ..tasks import Clip
from .ground import save_png
from .segment import load_mask, load_rgb

SCENES = ["a sunny park", "a modern kitchen", "a snowy street", "a beach at sunset", "a library", "a city square at night",
          "a forest path", "a plain studio backdrop", "a cosy living room", "a mountain meadow"]


def fill_mask(mask: np.ndarray, dilate_px: int) -> np.ndarray:
    """FLUX Fill mask: 255 where the model repaints (the background), 0 on the (dilated) subject."""
    import cv2

    m = mask.astype(np.uint8)
    if dilate_px > 0:
        m = cv2.dilate(m, np.ones((2 * dilate_px + 1, 2 * dilate_px + 1), np.uint8))
    return np.where(m > 0, 0, 255).astype(np.uint8)


def fit16(w: int, h: int, max_side: int) -> tuple[int, int]:
    s = min(1.0, max_side / max(w, h))
    return max(16, int(w * s) // 16 * 16), max(16, int(h * s) // 16 * 16)


def grow(box, frac: float, w: int, h: int) -> list[float]:
    x0, y0, x1, y1 = box
    dx, dy = frac * (x1 - x0), frac * (y1 - y0)
    return [max(0.0, x0 - dx), max(0.0, y0 - dy), min(float(w), x1 + dx), min(float(h), y1 + dy)]


@dataclass
class InpaintStage(Stage):
    name = "inpaint"
    uses_model = True

    model: str = ""  # a FLUX.1-Fill-dev diffusers folder
    prompt: str = "{phrase} in {scene}, photo, natural light"
    scenes: list = field(default_factory=lambda: list(SCENES))
    guidance_scale: float = 30.0  # FLUX.1-Fill-dev card
    num_inference_steps: int = 50
    max_side: int = 1024
    max_sequence_length: int = 512
    dilate_px: int = 8
    context: float = 0.5
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"

    def inputs(self) -> list[str]:
        return ["subjects", "frames", "detections"]

    def outputs(self) -> list[str]:
        return ["subjects"]

    def check(self) -> None:
        self.require_model(self.model)

    def setup(self) -> None:
        if getattr(self, "_pipe", None) is not None:
            return
        from diffusers import FluxFillPipeline

        from ...vision.common import resolve_device, resolve_dtype

        self._device = resolve_device(self.device)
        self._pipe = FluxFillPipeline.from_pretrained(self.model, dtype=resolve_dtype(self.dtype, self._device))
        self._pipe.to(self._device)
        self._pipe.set_progress_bar_config(disable=True)

    def process(self, clip: Clip) -> Clip:
        import torch
        from PIL import Image

        subjects = clip.fields.get("subjects") or []
        dets = clip.fields.get("detections") or []
        frames = clip.fields.get("frames") or []
        for i, s in enumerate(subjects):
            s.pop("inpaint", None)
            if s.get("status") != "kept":
                continue
            det = dets[s["ref_detection"]]
            if not det.get("mask"):
                continue
            frame = load_rgb(self.output_dir, frames[det["frame"]])
            h, w = frame.shape[:2]
            W, H = fit16(w, h, self.max_side)
            key = int(hashlib.sha1(f"{clip.clip_id}/{i}".encode()).hexdigest()[:8], 16)
            prompt = self.prompt.format(phrase=s["phrase"], category=s["category"],
                                        scene=self.scenes[key % len(self.scenes)])
            mask = fill_mask(load_mask(self.output_dir, det["mask"]), self.dilate_px)
            gen = torch.Generator("cpu").manual_seed(self.seed + key % 100000)
            image = self._pipe(prompt=prompt, image=Image.fromarray(frame).resize((W, H), Image.LANCZOS),
                               mask_image=Image.fromarray(mask).resize((W, H), Image.NEAREST), height=H, width=W,
                               guidance_scale=self.guidance_scale, num_inference_steps=self.num_inference_steps,
                               max_sequence_length=self.max_sequence_length, generator=gen).images[0]
            out = np.asarray(image.convert("RGB").resize((w, h), Image.LANCZOS))
            name = f"inpaint_{i}.png"
            save_png(self.subjects_dir(clip) / name, crop_box(out, grow(det["box"], self.context, w, h)))
            s["inpaint"] = {"path": f"subjects/{clip.clip_id}/{name}", "prompt": prompt}
        return clip
