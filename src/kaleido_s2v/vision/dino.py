"""DINO ViT features as VBench's subject consistency uses them (facebook/dino-vitb16 as a `ViTModel`)."""

from __future__ import annotations

import os
import types

import numpy as np
import torch
import torch.nn.functional as F

from .common import batches, load_folder_check, resize_short_side, resolve_device, to_float_nchw, to_uint8_array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _dino_v1_interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """DINO v1's `interpolate_pos_encoding`: bicubic with scale_factor ((gh+0.1)/n, (gw+0.1)/n), not size=."""
    n_pos = self.position_embeddings.shape[1] - 1
    n = int(round(n_pos**0.5))
    gh, gw = height // self.patch_size, width // self.patch_size
    if gh == n and gw == n:
        return self.position_embeddings
    cls_pos, patch_pos = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
    dim = embeddings.shape[-1]
    patch_pos = patch_pos.reshape(1, n, n, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic",
                              align_corners=False)
    assert patch_pos.shape[-2:] == (gh, gw), (patch_pos.shape, gh, gw)
    return torch.cat((cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


class DINO:
    """DINO ViT (transformers `ViTModel`, CLS token of the last hidden state after the final LayerNorm).

    Preprocessing is VBench's `dino_transform`: Resize(short side -> model image size (224), bilinear,
    antialias=False) on float 0..255 frames, no crop, /255, ImageNet mean/std; non-square inputs use DINO v1's
    position-embedding interpolation (patched onto the HF embeddings), as `torch.hub` DINO does.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device | None = "cpu",
                 dtype: torch.dtype = torch.float32, role: str = "dino"):
        from transformers import ViTModel

        path = load_folder_check(path, role)
        self.device = resolve_device(device)
        self.model = ViTModel.from_pretrained(path, add_pooling_layer=False, dtype=dtype).to(self.device).eval()
        self.model.embeddings.interpolate_pos_encoding = types.MethodType(
            _dino_v1_interpolate_pos_encoding, self.model.embeddings)
        self.dtype = dtype
        self.image_size = int(self.model.config.image_size)

    def pixels(self, frames: np.ndarray) -> torch.Tensor:
        x = resize_short_side(to_float_nchw(frames), self.image_size, mode="bilinear") / 255.0
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def embed_frames(self, frames, batch_size: int = 32) -> torch.Tensor:
        """(N, H, W, 3) uint8 frames of one size (or PIL images of one size) -> (N, D) L2-normalised CLS."""
        frames = to_uint8_array(frames)
        out = []
        for sl in batches(len(frames), batch_size):
            px = self.pixels(frames[sl]).to(self.device, self.dtype)
            hidden = self.model(pixel_values=px, interpolate_pos_encoding=True).last_hidden_state
            out.append(F.normalize(hidden[:, 0].float(), dim=-1).cpu())
        return torch.cat(out)
