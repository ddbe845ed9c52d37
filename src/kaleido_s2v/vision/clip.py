"""CLIP image/text embeddings (`CLIPModel` + `CLIPProcessor` from a local folder)."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from .common import (
    Images,
    batches,
    center_crop,
    load_folder_check,
    resize_short_side,
    resolve_device,
    to_float_nchw,
    to_pil_list,
    to_uint8_array,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIP:
    """A CLIP model (e.g. openai/clip-vit-base-patch32 or -large-patch14) saved in a local folder.

    `embed_images(..., preprocess="hf")` uses the folder's CLIPImageProcessor (PIL resize + crop);
    `preprocess="vbench"` applies VBench's clip_transform on float tensors: Resize(short side, bicubic,
    antialias=False), CenterCrop, /255, CLIP mean/std — at the model's own input size (224 for real CLIP).
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device | None = "cpu",
                 dtype: torch.dtype = torch.float32, role: str = "clip"):
        from transformers import AutoProcessor, CLIPModel

        path = load_folder_check(path, role)
        self.device = resolve_device(device)
        self.model = CLIPModel.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(path)
        self.dtype = dtype
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_text_tokens = int(self.model.config.text_config.max_position_embeddings)

    def vbench_pixels(self, frames: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, S, S) CLIP pixels with VBench's transform (S = model input size)."""
        x = resize_short_side(to_float_nchw(frames), self.image_size, mode="bicubic")
        x = center_crop(x, self.image_size) / 255.0
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def hf_pixels(self, images: Images) -> torch.Tensor:
        return self.processor(images=to_pil_list(images), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def embed_pixels(self, pixel_values: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """(N, 3, S, S) -> (N, D) L2-normalised float32 image embeddings (projection of the CLS token)."""
        out = []
        for sl in batches(len(pixel_values), batch_size):
            px = pixel_values[sl].to(self.device, self.dtype)
            feats = self.model.get_image_features(pixel_values=px)
            feats = getattr(feats, "pooler_output", feats)
            out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    def embed_images(self, images: Images, batch_size: int = 32, preprocess: str = "hf") -> torch.Tensor:
        if preprocess == "vbench":
            frames = to_uint8_array(images)
            return torch.cat([self.embed_pixels(self.vbench_pixels(frames[sl]), batch_size)
                              for sl in batches(len(frames), batch_size)])
        if preprocess != "hf":
            raise ValueError(f"preprocess must be 'hf' or 'vbench', got {preprocess!r}")
        pils = to_pil_list(images)
        return torch.cat([self.embed_pixels(self.hf_pixels(pils[sl]), batch_size)
                          for sl in batches(len(pils), batch_size)])

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings; prompts longer than the model's context are truncated."""
        out = []
        for sl in batches(len(texts), batch_size):
            tok = self.processor.tokenizer(list(texts[sl]), padding=True, truncation=True,
                                           max_length=self.max_text_tokens, return_tensors="pt").to(self.device)
            feats = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            feats = getattr(feats, "pooler_output", feats)
            out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)

    def count_text_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text)["input_ids"])
