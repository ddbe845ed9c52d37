"""Metric name -> the model roles it needs and the module that computes it. Light: no torch import here.

`requires` is a tuple of role groups; each group lists alternative roles in order of preference and the first
one configured is used (e.g. text alignment uses `clip_large` when given, else `clip`). `optional` roles are
used when configured. Every metric module defines `score(case, models, params) -> MetricResult` and `PARAMS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module

ROLES: dict[str, str] = {
    "dino": "DINO ViT-B/16 as transformers ViTModel (facebook/dino-vitb16)",
    "clip": "CLIP ViT-B/32 (openai/clip-vit-base-patch32), CLIPModel + CLIPProcessor",
    "clip_large": "CLIP ViT-L/14 (openai/clip-vit-large-patch14), CLIPModel + CLIPProcessor",
    "aesthetic": "LAION aesthetic v1 linear head: folder with head.safetensors (weight (1,768), bias (1,)) "
                 "or sa_0_4_vit_l_14_linear.pth",
    "grounding_dino": "Grounding DINO (IDEA-Research/grounding-dino-tiny), AutoModelForZeroShotObjectDetection",
    "sam": "SAM (facebook/sam-vit-*, SamModel) or SAM 2 (facebook/sam2.1-hiera-*, Sam2Model)",
    "musiq": "MUSIQ-SPAQ checkpoint folder (musiq_spaq_ckpt-*.pth), run with pyiqa's MUSIQ architecture",
    "viclip": "ViCLIP-L/14 (not a transformers class: recorded as unavailable, see docs/evaluate.md)",
    "face": "face embedder: folder with an ArcFace *.onnx (onnxruntime) or any transformers image model folder",
}


@dataclass(frozen=True)
class MetricSpec:
    name: str
    module: str
    requires: tuple[tuple[str, ...], ...]
    summary: str
    optional: tuple[str, ...] = field(default_factory=tuple)

    def load(self):
        return import_module(f"kaleido_s2v.evaluation.metrics.{self.module}")

    def resolve_roles(self, configured) -> tuple[dict[str, str], list[str]]:
        """(group label -> chosen role, missing group labels). A group label is its roles joined by '|'."""
        chosen, missing = {}, []
        for group in self.requires:
            hit = next((r for r in group if r in configured), None)
            label = "|".join(group)
            if hit is None:
                missing.append(" or ".join(group))
            else:
                chosen[label] = hit
        return chosen, missing

    def roles_text(self) -> str:
        req = ", ".join(" or ".join(g) for g in self.requires) or "none"
        return req + (f" (optional: {', '.join(self.optional)})" if self.optional else "")


METRICS: dict[str, MetricSpec] = {m.name: m for m in [
    MetricSpec("s2v_consistency", "s2v_consistency", (("grounding_dino",), ("sam",), ("clip_large", "clip")),
               "Kaleido S2V Consistency: CLIP sim. of segmented subjects to the references (max over refs)"),
    MetricSpec("s2v_decoupling", "s2v_decoupling", (("grounding_dino",), ("sam",), ("clip_large", "clip")),
               "Kaleido S2V Decoupling: 1 - CLIP sim. of subject-masked backgrounds of frames and references"),
    MetricSpec("subject_consistency", "subject_consistency", (("dino",),),
               "VBench subject consistency: DINO cos to previous and first frame"),
    MetricSpec("background_consistency", "background_consistency", (("clip",),),
               "VBench background consistency: CLIP cos to previous and first frame"),
    MetricSpec("motion_smoothness", "motion_smoothness", (),
               "VBench-style motion smoothness: 1 - error of re-interpolated odd frames (flow substitute for AMT)"),
    MetricSpec("aesthetic_quality", "aesthetic_quality", (("clip_large",), ("aesthetic",)),
               "VBench aesthetic quality: LAION linear head on CLIP ViT-L/14 embeddings / 10"),
    MetricSpec("imaging_quality", "imaging_quality", (("musiq", "clip"),),
               "VBench imaging quality: MUSIQ-SPAQ / 100 (substitute without musiq: CLIP-IQA on clip)"),
    MetricSpec("text_alignment", "text_alignment", (("clip_large", "clip"),),
               "CLIP text-frame cosine averaged over sampled frames", optional=("viclip",)),
    MetricSpec("face_similarity", "face_similarity", (("face",),),
               "ArcFace-style cosine of the largest face (OpenCV Haar detector) to the reference face"),
]}


def metrics_help() -> str:
    width = max(map(len, METRICS))
    lines = [f"  {n:<{width}}  needs: {m.roles_text()}" for n, m in METRICS.items()]
    return "metrics and the model roles each needs:\n" + "\n".join(lines) + "\n\nroles:\n" + "\n".join(
        f"  {r:<14} {d}" for r, d in ROLES.items())
