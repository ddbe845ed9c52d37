"""Text alignment: CLIP cosine between the prompt and sampled frames (ViCLIP recorded as unavailable)."""

from __future__ import annotations

from ..frames import uniform_indices
from .base import MetricResult

PARAMS = {"frames": 16, "sampling": "np.linspace(0, T-1, 16).astype(int)", "preprocess": "CLIPImageProcessor",
          "prompt_truncation": "truncated to the CLIP text context (77 tokens); truncation is reported per case",
          "viclip": "not computed: ViCLIP is not a transformers class (see docs/evaluate.md)"}


def score(data, models, params) -> MetricResult:
    role = models.first("clip_large", "clip")
    impl = f"CLIP text-image cosine ({role}: {models.paths[role].name})"
    if not data.prompt.strip():
        return MetricResult(None, {"skipped": "case has no prompt"}, impl)
    clip = models.get(role)
    idx = uniform_indices(len(data.frames), int(params.get("frames", 16)))
    img = clip.embed_images(data.frames[idx], batch_size=models.batch_size)
    txt = clip.embed_texts([data.prompt])
    cos = (img @ txt.T).squeeze(-1)
    n_tok = clip.count_text_tokens(data.prompt)
    details = {"frames": len(idx), "prompt_tokens": n_tok, "truncated": n_tok > clip.max_text_tokens}
    if "viclip" in models:
        details["viclip"] = "skipped: the viclip role is not supported in this build (no transformers class)"
    return MetricResult(float(cos.mean()), details, impl)
