"""VBench aesthetic quality: the LAION aesthetic predictor v1 (a linear head) on CLIP ViT-L/14 embeddings.

The `aesthetic` folder holds the head: `head.safetensors` with `weight` (1, D) and `bias` (1,) — D is the CLIP
projection dim (768 for ViT-L/14) — or LAION's original `sa_0_4_vit_l_14_linear.pth` (the same two tensors).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import UserInputError
from .base import MetricResult

PARAMS = {"frames": "all", "preprocess": "VBench clip_transform (as background consistency)",
          "formula": "mean_t Linear(normalize(CLIP_L(x_t))) / 10"}


class AestheticHead(torch.nn.Module):
    FILES = ("head.safetensors", "sa_0_4_vit_l_14_linear.pth")

    def __init__(self, dim: int = 768):
        super().__init__()
        self.linear = torch.nn.Linear(dim, 1)

    def forward(self, normalized_embeds: torch.Tensor) -> torch.Tensor:
        return self.linear(normalized_embeds).squeeze(-1)

    @classmethod
    def load(cls, folder: str | Path, device="cpu") -> AestheticHead:
        folder = Path(folder)
        files = [folder / f for f in cls.FILES if (folder / f).is_file()] if folder.is_dir() else []
        if not files:
            raise UserInputError(f"aesthetic head not found in '{folder}': expected {' or '.join(cls.FILES)}")
        if files[0].suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(files[0])
        else:
            state = torch.load(files[0], map_location="cpu", weights_only=True)
        if set(state) != {"weight", "bias"} or state["weight"].ndim != 2 or state["weight"].shape[0] != 1:
            raise UserInputError(f"aesthetic head '{files[0]}' must hold exactly weight (1, D) and bias (1,)")
        head = cls(state["weight"].shape[1])
        head.linear.load_state_dict(state)
        return head.to(device).eval()

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.linear.state_dict().items()}, folder / "head.safetensors")
        return folder


@torch.no_grad()
def score(data, models, params) -> MetricResult:
    clip, head = models.get("clip_large"), models.get("aesthetic")
    emb = clip.embed_images(data.frames, batch_size=models.batch_size, preprocess="vbench")
    if emb.shape[1] != head.linear.in_features:
        raise UserInputError(f"aesthetic head expects {head.linear.in_features}-d embeddings but clip_large gives "
                             f"{emb.shape[1]}: pair the LAION ViT-L/14 head with CLIP ViT-L/14")
    a = head(emb.to(head.linear.weight.device)).float().cpu()
    return MetricResult(float(a.mean()) / 10.0, {"frames": len(a), "raw_mean": float(a.mean())},
                        f"LAION aesthetic v1 linear head on CLIP ({models.paths['clip_large'].name})")
