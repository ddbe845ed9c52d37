"""Image conversion, local-folder checks and the VBench-style tensor resizes shared by the wrappers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserInputError

Images = Sequence[Image.Image] | np.ndarray  # list of PIL images or (N, H, W, 3) uint8


def load_folder_check(path: str | os.PathLike, role: str, needs: Sequence[str] = ("config.json",)) -> Path:
    """The folder as a Path, or a one-line `UserInputError` naming the role and the files expected there."""
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"model folder for role '{role}' not found: '{path}' (give a local folder)")
    missing = [n for n in needs if not (path / n).exists()]
    if missing:
        raise UserInputError(f"model folder '{path}' for role '{role}' lacks {', '.join(missing)}: "
                             f"give a transformers folder saved with save_pretrained")
    return path


def to_pil_list(images: Images | Image.Image) -> list[Image.Image]:
    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        return [Image.fromarray(np.ascontiguousarray(a), "RGB") for a in images]
    return [im if isinstance(im, Image.Image) and im.mode == "RGB" else
            (im.convert("RGB") if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im), "RGB"))
            for im in images]


def to_uint8_array(images: Images | Image.Image) -> np.ndarray:
    """(N, H, W, 3) uint8; all images must share one size."""
    if isinstance(images, np.ndarray):
        return images[None] if images.ndim == 3 else images
    return np.stack([np.asarray(im.convert("RGB")) for im in to_pil_list(images)])


def to_float_nchw(frames: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in 0..255, as VBench's `load_video` yields."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()


def resize_short_side(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """torchvision `Resize(size, antialias=False)` on float tensors: short side -> size, long side truncated."""
    h, w = x.shape[-2:]
    if h <= w:
        nh, nw = size, int(size * w / h)
    else:
        nh, nw = int(size * h / w), size
    if (nh, nw) == (h, w):
        return x
    return F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False, antialias=False)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision `CenterCrop(size)` for inputs at least `size` on both sides."""
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def batches(n: int, batch_size: int):
    batch_size = max(1, int(batch_size))
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
                "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 elsewhere; otherwise bf16/fp16/fp32 or the torch names."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, _DTYPE_NAMES[name])
