"""`filter`: per-detection size / overlap / CLIP category checks, then PolyVivid's clique consolidation.

1. size: box area ratio in [`min_area_ratio`, `max_area_ratio`] and shorter side >= `min_side_px`.
2. overlap: two boxes of *different* subjects in one frame overlapping with IoU > `max_iou` (mask IoU when both
   have masks) are ambiguous: the lower-scoring one is dropped (0.7: ConsisID's box-association IoU).
3. CLIP category check: the masked crop on white must score cosine >= `min_clip_score` with "a photo of a
   {category}" (0.15: NeMo Curator's CLIP filter) and, with several candidates, rank its own category first.
4. consistency (PolyVivid): per subject, detections across frames are nodes; an edge joins two detections in
   different frames whose CLIP image embeddings have cosine >= `clique_threshold`. The largest clique is one
   identity; cliques are taken greedily. A subject whose best clique covers fewer than `min_frame_fraction` of
   the key frames is `inconsistent`; one with two such identities (two different dogs) is `ambiguous`.

Kept subjects get their references written: `crop_<i>.png` (the box) and `segment_<i>.png` (mask on white).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...errors import UserInputError
from ..frames import crop_box, on_white
from ..stage import Stage
from ..tasks import Clip
from .ground import save_png
from .segment import load_mask, load_rgb


def box_area(b) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def size_reason(box, width: int, height: int, min_area: float, max_area: float, min_side: float) -> str | None:
    ratio = box_area(box) / float(width * height)
    if ratio < min_area or min(box[2] - box[0], box[3] - box[1]) < min_side:
        return "too_small"
    if ratio > max_area:
        return "too_large"
    return None


def maximal_cliques(adj: dict[int, set[int]]) -> list[set[int]]:
    """Bron–Kerbosch with pivoting over an undirected graph given as adjacency sets."""
    out: list[set[int]] = []

    def expand(r: set[int], p: set[int], x: set[int]) -> None:
        if not p and not x:
            out.append(r)
            return
        pivot = max(p | x, key=lambda u: len(adj[u] & p))
        for v in sorted(p - adj[pivot]):
            expand(r | {v}, p & adj[v], x & adj[v])
            p = p - {v}
            x = x | {v}

    expand(set(), set(adj), set())
    return out


def consolidate(nodes: list[int], frames: dict[int, int], sim: np.ndarray, threshold: float,
                min_size: int) -> list[list[int]]:
    """PolyVivid's clique consolidation: identities (lists of node ids, largest first), each >= min_size.

    `sim[i, j]` is the similarity of nodes i and j; nodes in the same frame are never joined.
    """
    remaining = set(nodes)
    identities: list[list[int]] = []
    while remaining:
        adj = {u: {v for v in remaining if v != u and frames[v] != frames[u] and sim[u, v] >= threshold}
               for u in remaining}
        best = max(maximal_cliques(adj), key=lambda c: (len(c), [-v for v in sorted(c)]))
        if len(best) < min_size:
            break
        identities.append(sorted(best))
        remaining -= best
    return identities


@dataclass
class FilterStage(Stage):
    name = "filter"
    uses_model = True

    model: str = ""  # CLIP folder
    min_area_ratio: float = 0.01
    max_area_ratio: float = 0.9
    min_side_px: float = 32.0
    max_iou: float = 0.7  # ConsisID box association IoU
    min_clip_score: float = 0.15  # NeMo Curator CLIP image-text filter
    require_top1: bool = True
    clique_threshold: float = 0.8  # not published by PolyVivid; calibrate (see docs/curate.md)
    min_frame_fraction: float = 0.6  # 2 of 3 key frames
    drop_ambiguous: bool = True
    text_template: str = "a photo of a {}"
    device: str = "auto"
    batch_size: int = 4

    def inputs(self) -> list[str]:
        return ["subjects", "frames", "detections"]

    def outputs(self) -> list[str]:
        return ["subjects", "detections"]

    def check(self) -> None:
        self.require_model(self.model)
        if not 0 < self.min_frame_fraction <= 1:
            raise UserInputError(f"filter.min_frame_fraction must be in (0, 1], got {self.min_frame_fraction}")

    def setup(self) -> None:
        if getattr(self, "_model", None) is None:
            from ...vision import CLIP

            self._model = CLIP(self.model, device=self.device, role="filter.model")

    def process(self, clip: Clip) -> Clip:
        subjects = clip.fields.get("subjects") or []
        dets = clip.fields.get("detections") or []
        frame_paths = clip.fields.get("frames") or []
        frames = [load_rgb(self.output_dir, p) for p in frame_paths]
        masks = {j: load_mask(self.output_dir, d["mask"]) for j, d in enumerate(dets) if d.get("mask")}
        # 1. size
        for d in dets:
            h, w = frames[d["frame"]].shape[:2]
            r = size_reason(d["box"], w, h, self.min_area_ratio, self.max_area_ratio, self.min_side_px)
            d.pop("drop", None)
            if r:
                d["drop"] = r
        # 2. overlap between different subjects in one frame
        alive = [j for j, d in enumerate(dets) if "drop" not in d]
        for a in alive:
            for b in alive:
                da, db = dets[a], dets[b]
                if a >= b or da["frame"] != db["frame"] or da["subject"] == db["subject"]:
                    continue
                iou = mask_iou(masks[a], masks[b]) if a in masks and b in masks else box_iou(da["box"], db["box"])
                if iou > self.max_iou:
                    loser = a if da["score"] < db["score"] else b
                    dets[loser].setdefault("drop", "overlap")
        # 3. CLIP category check
        alive = [j for j, d in enumerate(dets) if "drop" not in d]
        crops = {j: self._crop(frames[dets[j]["frame"]], dets[j]["box"], masks.get(j)) for j in alive}
        emb = np.zeros((len(dets), 1), np.float32)
        if alive:
            img = self._model.embed_images([crops[j] for j in alive], batch_size=self.batch_size).numpy()
            txt = self._model.embed_texts([self.text_template.format(s["category"]) for s in subjects]).numpy()
            emb = np.zeros((len(dets), img.shape[1]), np.float32)
            emb[alive] = img
            scores = img @ txt.T  # (alive, subjects)
            for row, j in enumerate(alive):
                i = dets[j]["subject"]
                dets[j]["clip_score"] = round(float(scores[row, i]), 4)
                top1 = int(np.argmax(scores[row])) == i
                if scores[row, i] < self.min_clip_score or (self.require_top1 and len(subjects) > 1 and not top1):
                    dets[j]["drop"] = "clip_mismatch"
        # 4. clique consolidation per subject
        sim = emb @ emb.T
        n_frames = max(1, len(frames))
        min_size = max(1, math.ceil(self.min_frame_fraction * n_frames - 1e-9))
        frame_of = {j: d["frame"] for j, d in enumerate(dets)}
        d_out = self.subjects_dir(clip) if subjects else None
        for i, s in enumerate(subjects):
            nodes = [j for j, d in enumerate(dets) if d["subject"] == i and "drop" not in d]
            ids = consolidate(nodes, frame_of, sim, self.clique_threshold, min_size)
            s.pop("refs", None)
            if not nodes:
                s.update(status="dropped", reason="no_valid_detection", identity=[])
            elif not ids:
                s.update(status="dropped", reason="inconsistent", identity=[])
            elif len(ids) > 1 and self.drop_ambiguous:
                s.update(status="dropped", reason="ambiguous", identity=ids[0])
            else:
                ref = max(ids[0], key=lambda j: dets[j]["score"] * dets[j].get("sam_iou", 1.0))
                s.update(status="kept", reason=None, identity=ids[0], ref_detection=ref)
                f = frames[dets[ref]["frame"]]
                save_png(d_out / f"crop_{i}.png", crop_box(f, dets[ref]["box"]))
                save_png(d_out / f"segment_{i}.png", crops[ref])
                s["refs"] = {"crop": f"subjects/{clip.clip_id}/crop_{i}.png",
                             "segment": f"subjects/{clip.clip_id}/segment_{i}.png"}
        if not any(s.get("status") == "kept" for s in subjects):
            clip.reject("no_consistent_subject")
        return clip

    @staticmethod
    def _crop(frame: np.ndarray, box, mask: np.ndarray | None) -> np.ndarray:
        return on_white(frame, mask, box) if mask is not None else crop_box(frame, box)
