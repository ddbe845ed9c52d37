"""VAE latents: per-channel normalisation and encoding of videos and reference images (Wan2.1 VAE)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers.utils.torch_utils import get_module_execution_device

from .references import ReferenceImage, fit_reference


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=torch.float32).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=torch.float32).view(shape)
    return mean, std


def normalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """(z − latents_mean) / latents_std, per channel (what the transformer sees)."""
    mean, std = _stats(vae, z)
    return ((z.float() - mean) / std).to(z.dtype)


def denormalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    mean, std = _stats(vae, z)
    return (z.float() * std + mean).to(z.dtype)


def pil_to_tensor(images: Sequence) -> torch.Tensor:
    """PIL images / uint8 (H, W, 3) arrays -> (N, 3, H, W) float in [−1, 1] ((x − 127.5) / 127.5)."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


@torch.no_grad()
def encode_video(vae, video: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, F, H, W) in [−1, 1] -> normalised posterior-mean latents (B, z, 1 + (F−1)/4, H/8, W/8)."""
    # the execution device, not the weights': under model/group offload the weights sit on the CPU
    z = vae.encode(video.to(get_module_execution_device(vae), vae.dtype)).latent_dist.mode()
    return normalize_latents(vae, z)


@torch.no_grad()
def encode_references(
    vae, images: Sequence[ReferenceImage], height: int, width: int
) -> list[torch.Tensor]:
    """Fit each reference into (height, width), encode it ALONE as a 1-frame video; list of (1, z, 1, h, w).

    One encode per reference, as the release's inference does (its training code encoded the stacked
    references as one clip, so only the first reached the model — a bug not repeated here).
    """
    out = []
    for image in images:
        pixels = pil_to_tensor([fit_reference(image, height, width)])  # (1, 3, H, W)
        out.append(encode_video(vae, pixels[:, :, None]))
    return out
