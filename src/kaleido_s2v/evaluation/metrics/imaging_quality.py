"""VBench imaging quality: MUSIQ-SPAQ via pyiqa on local weights; CLIP-IQA as the named substitute.

With a `musiq` folder (holding pyiqa's `musiq_spaq_ckpt-*.pth`) and `pyiqa` importable, every frame is resized
so that its longer side is at most 512 (bilinear, antialias=False), divided by 255 and scored one at a time;
the case value is mean_t MUSIQ / 100, as VBench. pyiqa needs torchvision; where it is missing, configure only
`clip` and the metric runs the substitute CLIP-IQA (Wang et al., AAAI 2023, zero-shot): per frame
softmax(logit_scale * [cos(x, "Good photo."), cos(x, "Bad photo.")])[0], averaged over frames (0..1).
The implementation used is named in scores.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import UserInputError
from .base import MetricResult

PARAMS = {"frames": "all", "musiq_resize": "longer side <= 512, bilinear, antialias=False",
          "clip_iqa_prompts": ["Good photo.", "Bad photo."], "clip_iqa_preprocess": "CLIPImageProcessor"}


def load_musiq(folder: str | Path, device="cpu"):
    folder = Path(folder)
    ckpts = sorted(folder.glob("musiq*.pth")) if folder.is_dir() else []
    if not ckpts:
        raise UserInputError(f"MUSIQ checkpoint not found in '{folder}': expected musiq_spaq_ckpt-*.pth")
    try:
        from pyiqa.archs.musiq_arch import MUSIQ
    except Exception as e:  # pyiqa missing, or its torchvision dependency missing
        raise UserInputError(f"role 'musiq' needs the pyiqa package ({type(e).__name__}: {e}); install pyiqa "
                             f"or remove the musiq role to use the CLIP-IQA substitute") from e
    return MUSIQ(pretrained_model_path=str(ckpts[0])).to(device).eval()


@torch.no_grad()
def _musiq(model, frames: np.ndarray, device) -> np.ndarray:
    out = []
    for f in frames:
        x = torch.from_numpy(f).permute(2, 0, 1)[None].float()
        h, w = x.shape[-2:]
        if max(h, w) > 512:
            s = 512 / max(h, w)
            x = F.interpolate(x, size=(int(s * h), int(s * w)), mode="bilinear", align_corners=False,
                              antialias=False)
        out.append(float(model(x.to(device) / 255.0).flatten()[0]))
    return np.array(out)


@torch.no_grad()
def clip_iqa(clip, frames, prompts=("Good photo.", "Bad photo."), batch_size: int = 32) -> np.ndarray:
    img = clip.embed_images(frames, batch_size=batch_size)
    txt = clip.embed_texts(list(prompts))
    logits = clip.model.logit_scale.exp().float().cpu() * img @ txt.T
    return logits.softmax(-1)[:, 0].numpy()


def score(data, models, params) -> MetricResult:
    role = models.first("musiq", "clip")
    if role == "musiq":
        q = _musiq(models.get("musiq"), data.frames, models.device)
        return MetricResult(float(q.mean()) / 100.0, {"frames": len(q), "raw_mean": float(q.mean())},
                            "MUSIQ-SPAQ (pyiqa)")
    q = clip_iqa(models.get("clip"), data.frames, params.get("clip_iqa_prompts", PARAMS["clip_iqa_prompts"]),
                 models.batch_size)
    return MetricResult(float(q.mean()), {"frames": len(q)},
                        f"substitute for MUSIQ: CLIP-IQA zero-shot on CLIP ({models.paths['clip'].name})")
