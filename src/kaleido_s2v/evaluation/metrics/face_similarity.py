"""Face identity: mean over sampled frames with a face of max(0, cos(embedding of the largest face, reference
face embedding)) — FaceSim-Arc's aggregation (zeros kept) with an offline Haar detector and unaligned crops."""

from __future__ import annotations

import numpy as np
import torch

from ..face import FaceDetector, crop_face
from ..frames import uniform_indices
from .base import MetricResult

PARAMS = {"frames": 32, "sampling": "np.linspace(0, T-1, 32).astype(int)",
          "detector": "OpenCV Haar haarcascade_frontalface_default (scaleFactor 1.1, minNeighbors 5, min size 8% "
                      "of the short side) on a copy downscaled to longer side <= 512, largest box; retry on a "
                      "25% grey-padded image",
          "crop_margin": 0.1, "alignment": "none (box crop resized to the embedder's input)",
          "reference": "first reference marked kind=face, else the first reference in which a face is found",
          "aggregation": "mean over frames with a face of max(0, cos); frames without a face are skipped"}

_DETECTOR: FaceDetector | None = None


def _detector() -> FaceDetector:
    global _DETECTOR
    if _DETECTOR is None:
        _DETECTOR = FaceDetector()
    return _DETECTOR


def score(data, models, params) -> MetricResult:
    emb = models.get("face")
    impl = f"Haar face detector + {emb.name}"
    det, margin = _detector(), float(params.get("crop_margin", 0.1))
    order = sorted(range(len(data.references)), key=lambda k: data.reference_info[k].kind != "face")
    ref_crop, ref_index = None, None
    for k in order:
        a = np.asarray(data.references[k])
        box = det.largest_face(a)
        if box is not None:
            ref_crop, ref_index = crop_face(a, box, margin), k
            break
    if ref_crop is None:
        return MetricResult(None, {"skipped": "no face found in any reference", "detection_rate": 0.0}, impl)
    idx = uniform_indices(len(data.frames), int(params.get("frames", 32)))
    crops = []
    for i in idx:
        box = det.largest_face(data.frames[i])
        if box is not None:
            crops.append(crop_face(data.frames[i], box, margin))
    details = {"reference_index": ref_index, "frames": len(idx), "face_frames": len(crops),
               "detection_rate": len(crops) / len(idx)}
    if not crops:
        details["skipped"] = "no face found in any sampled frame"
        return MetricResult(None, details, impl)
    e = emb.embed([ref_crop, *crops])
    sims = (e[1:] @ e[0]).clamp_min(0)
    return MetricResult(float(torch.as_tensor(sims).mean()), details, impl)
