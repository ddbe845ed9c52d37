"""`crosspair`: composite each kept, segmented subject onto a frame of an unrelated clip.

Cross-paired references break the copy-paste of reference backgrounds (Kaleido §3; Phantom, OpenS2V). The
background is a key frame of another kept clip, preferably from another source video, chosen by a stable hash
of the clip id (reruns pick the same one). The subject (its mask, cut to its box) is scaled to
`subject_height` of the background height and pasted at a hash-chosen horizontal position on the lower part;
the composite is `subjects/<clip_id>/crosspair_<i>.png`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..stage import Stage
from ..tasks import Clip
from .ground import save_png
from .segment import load_mask, load_rgb


def _h(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)


def composite(fg: np.ndarray, alpha: np.ndarray, bg: np.ndarray, height_frac: float, x_frac: float) -> np.ndarray:
    """Paste `fg` (h, w, 3) with binary `alpha` (h, w) onto `bg`, scaled to height_frac of bg, bottom-aligned."""
    from PIL import Image

    H, W = bg.shape[:2]
    scale = min(height_frac * H / fg.shape[0], 0.9 * W / fg.shape[1])
    w, h = max(1, round(fg.shape[1] * scale)), max(1, round(fg.shape[0] * scale))
    fg_im = Image.fromarray(fg).resize((w, h), Image.LANCZOS)
    a_im = Image.fromarray(alpha.astype(np.uint8) * 255).resize((w, h), Image.BILINEAR)
    out = Image.fromarray(bg).copy()
    x = round(x_frac * (W - w))
    y = H - h - round(0.03 * H)
    out.paste(fg_im, (x, max(0, y)), a_im)
    return np.asarray(out)


@dataclass
class CrossPairStage(Stage):
    name = "crosspair"
    needs_pool = True

    subject_height: float = 0.6
    prefer_other_source: bool = True

    def inputs(self) -> list[str]:
        return ["subjects", "frames", "detections"]

    def outputs(self) -> list[str]:
        return ["subjects"]

    def set_pool(self, records: list[Clip]) -> None:
        self._pool = sorted(((c.clip_id, c.source, c.fields["frames"][len(c.fields["frames"]) // 2])
                             for c in records if c.fields.get("frames")), key=lambda r: r[0])

    def _background(self, clip: Clip) -> tuple[str, str] | None:
        pool = [p for p in getattr(self, "_pool", []) if p[0] != clip.clip_id]
        if self.prefer_other_source and any(p[1] != clip.source for p in pool):
            pool = [p for p in pool if p[1] != clip.source]
        if not pool:
            return None
        cid, _, frame = pool[_h(clip.clip_id) % len(pool)]
        return cid, frame

    def process(self, clip: Clip) -> Clip:
        subjects = clip.fields.get("subjects") or []
        dets = clip.fields.get("detections") or []
        frames = clip.fields.get("frames") or []
        bg_choice = self._background(clip)
        for i, s in enumerate(subjects):
            s.pop("crosspair", None)
            if s.get("status") != "kept" or bg_choice is None:
                continue
            det = dets[s["ref_detection"]]
            if not det.get("mask"):
                continue
            frame = load_rgb(self.output_dir, frames[det["frame"]])
            mask = load_mask(self.output_dir, det["mask"])
            x0, y0, x1, y1 = (int(round(v)) for v in det["box"])
            fg, alpha = frame[y0:y1, x0:x1], mask[y0:y1, x0:x1]
            if fg.size == 0 or not alpha.any():
                continue
            bg = load_rgb(self.output_dir, bg_choice[1])
            out = composite(fg, alpha, bg, self.subject_height, (_h(f"{clip.clip_id}/{i}") % 1000) / 999)
            name = f"crosspair_{i}.png"
            save_png(self.subjects_dir(clip) / name, out)
            s["crosspair"] = {"path": f"subjects/{clip.clip_id}/{name}", "background_clip": bg_choice[0]}
        return clip
