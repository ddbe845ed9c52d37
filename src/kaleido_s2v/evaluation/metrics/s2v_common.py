"""The detect -> segment -> embed analysis shared by S2V Consistency and S2V Decoupling (computed once per case).

Kaleido (arXiv 2510.18573) describes the metrics but released no code; every parameter it leaves open is fixed
in `PARAMS` (defaults from docs/evaluate.md), reported in scores.json, and overridable with `--params`.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..frames import uniform_indices

PARAMS = {
    "frames": 16,  # np.linspace(0, T-1, 16).astype(int)
    "default_label": "object",  # Grounding DINO phrase for references without a label
    "box_threshold": 0.35,
    "text_threshold": 0.25,
    "boxes_per_label": 1,  # top-scoring boxes kept per label and image
    "mask_min_iou": 0.9,  # SAM masks with predicted IoU below this are dropped (with their detection)
    "subject_fill": 255,  # pixels outside the subject mask in a box crop; the crop is padded to a square
    "background_fill": 128,  # subject pixels in backgrounds, same fill for frames and references
    "reference_reduce": "max",  # decoupling: 1 - max_k cos(frame background, reference background k)
    "no_detection_frame": "consistency skips the frame (detection_rate reports it); decoupling uses the whole "
                          "frame as background",
    "no_detection_reference": "the whole reference stands for its subject, and for its background",
    "scene_references": "excluded from both metrics",
}


def subject_crop(img: np.ndarray, box, mask: np.ndarray, fill: int = 255) -> Image.Image:
    """Box crop with pixels outside `mask` set to `fill`, padded with `fill` to a centred square."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
    x1, y1 = min(max(x1, x0 + 1), w), min(max(y1, y0 + 1), h)
    a = img[y0:y1, x0:x1].copy()
    a[~mask[y0:y1, x0:x1]] = fill
    crop = Image.fromarray(a)
    cw, ch = crop.size
    side = max(cw, ch)
    square = Image.new("RGB", (side, side), (fill,) * 3)
    square.paste(crop, ((side - cw) // 2, (side - ch) // 2))
    return square


def background(img: np.ndarray, masks: list[np.ndarray], fill: int = 128) -> Image.Image:
    a = img.copy()
    if masks:
        a[np.any(np.stack(masks), axis=0)] = fill
    return Image.fromarray(a)


def _segments(gd, sam, images: list[np.ndarray], labels: list[list[str]], p, batch_size: int):
    """For each image: [(box, mask)] over its labels (top boxes per label whose SAM mask is kept).

    Each label is detected in one batched Grounding DINO pass over the images that carry it; then every image
    is segmented once with all of its boxes.
    """
    boxes: list[list] = [[] for _ in images]
    for lab in dict.fromkeys(lab for labs in labels for lab in labs):
        ids = [i for i, labs in enumerate(labels) if lab in labs]
        dets = gd.detect([images[i] for i in ids], lab, p["box_threshold"], p["text_threshold"], batch_size)
        for i, d in zip(ids, dets):
            boxes[i].extend(x.box for x in d[: int(p["boxes_per_label"])])
    segs = sam.segment(images, boxes, batch_size)
    out = []
    for bxs, (masks, ious) in zip(boxes, segs):
        out.append([(b, m) for b, m, q in zip(bxs, masks, ious) if q >= p["mask_min_iou"] and m.any()])
    return out, sum(len(b) for b in boxes)


@torch.no_grad()
def analyse(data, models, params: dict) -> dict:
    """Per-frame consistency and decoupling values for one case (cached on `data`)."""
    p = {**PARAMS, **params}
    key = ("s2v", tuple(sorted((k, str(v)) for k, v in p.items())))
    if key in data.cache:
        return data.cache[key]
    clip_role = models.first("clip_large", "clip")
    subjects = [(img, ref.label or p["default_label"]) for img, ref in zip(data.references, data.reference_info)
                if ref.kind != "scene"]
    res = {"clip_role": clip_role, "params": p}
    if not subjects:
        res["skipped"] = "case has no subject references"
        data.cache[key] = res
        return res
    gd, sam, clip = models.get("grounding_dino"), models.get("sam"), models.get(clip_role)
    bs = models.batch_size

    refs = [np.asarray(img) for img, _ in subjects]
    ref_segs, _ = _segments(gd, sam, refs, [[lab] for _, lab in subjects], p, bs)
    ref_crops = [subject_crop(r, *s[0], fill=p["subject_fill"]) if s else Image.fromarray(r)
                 for r, s in zip(refs, ref_segs)]
    ref_bgs = [background(r, [m for _, m in s], p["background_fill"]) for r, s in zip(refs, ref_segs)]
    R = clip.embed_images(ref_crops, bs)  # (K, D)
    Rb = clip.embed_images(ref_bgs, bs)  # (K, D)

    idx = uniform_indices(len(data.frames), int(p["frames"]))
    frames = [data.frames[i] for i in idx]
    labels = list(dict.fromkeys(lab for _, lab in subjects))
    frame_segs, boxes_found = _segments(gd, sam, frames, [labels] * len(frames), p, bs)

    crops, owner = [], []
    for t, segs in enumerate(frame_segs):
        for b, m in segs:
            crops.append(subject_crop(frames[t], b, m, fill=p["subject_fill"]))
            owner.append(t)
    cons = [None] * len(frames)
    if crops:
        sims = (clip.embed_images(crops, bs) @ R.T).max(dim=1).values  # best reference per crop
        owner_t = torch.tensor(owner)
        for t in set(owner):
            cons[t] = float(sims[owner_t == t].mean())
    bgs = [background(f, [m for _, m in segs], p["background_fill"]) for f, segs in zip(frames, frame_segs)]
    bsim = clip.embed_images(bgs, bs) @ Rb.T  # (T, K)
    bsim = bsim.max(dim=1).values if p["reference_reduce"] == "max" else bsim.mean(dim=1)
    detected = sum(c is not None for c in cons)
    res.update(
        frame_indices=idx.tolist(),
        consistency=cons,
        decoupling=(1.0 - bsim).tolist(),
        detection_rate=detected / len(frames),
        detected_frames=detected,
        boxes_found=boxes_found,
        masks_kept=len(crops),
        reference_detected=[bool(s) for s in ref_segs],
    )
    data.cache[key] = res
    return res
