"""The release's flow-matching objective (kaleido-official.md §4.1).

σ₀ = sigmoid(n), n ~ N(0, 1) (logit-normal); resolution shift μ(n_img) = 0.5 + 0.65·(n_img − 256)/3840 with
n_img = (latent h / 2)·(latent w / 2); σ = e^μ·σ₀ / (1 + (e^μ − 1)·σ₀); x_σ = (1 − σ)·x₀ + σ·ε; the model
sees 1000·σ and predicts ε − x₀; loss = MSE over the video latents (references are clean and not scored).
MAGREF (whose training recipe is not released) is trained with the same objective; its clean conditioning is
channel-concatenated to x_σ (`condition`, y) and its CLIP features go in as `encoder_hidden_states_image`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def shift_mu(n_img: int | float) -> float:
    """μ of the Flux-style resolution shift for n_img image tokens per latent frame."""
    return 0.5 + (1.15 - 0.5) * (n_img - 256) / (4096 - 256)


def resolution_shift(latent_height: int, latent_width: int, patch_size: int = 2) -> float:
    """e^μ for a latent grid, e.g. 2.0559 at 480x832 (latents 60x104) and 2.1383 at 512x896."""
    n_img = (latent_height // patch_size) * (latent_width // patch_size)
    return math.exp(shift_mu(n_img))


def shift_sigmas(sigma0: torch.Tensor, shift: float) -> torch.Tensor:
    """σ = s·σ₀ / (1 + (s − 1)·σ₀)."""
    return shift * sigma0 / (1 + (shift - 1) * sigma0)


def sample_sigmas(shape, shift: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shifted logit-normal σ (mean 0, std 1 before the sigmoid)."""
    n = torch.randn(shape, generator=generator)
    return shift_sigmas(torch.sigmoid(n), shift)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x₀ + σ·ε, σ per sample."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def sample_noise_and_sigma(x0: torch.Tensor, shift: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ε (shape of one sample's x₀, (C, T, H, W)) and σ (scalar tensor) from one per-sample generator."""
    sigma = sample_sigmas((1,), shift, generator)[0]
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    return noise, sigma


def flow_matching_loss(
    transformer,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    text: torch.Tensor,
    references: list[torch.Tensor] | None = None,
    *,
    condition: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over all video-latent elements of (v̂ − (ε − x₀))². x0/noise (B, C, T, H, W); sigma (B,).

    Kaleido: `references` (clean latent frames, as reference tokens). MAGREF: `condition` (B, 20, T, H, W) and
    `image_embeds` (B, tokens, D)."""
    x0, noise = x0.float(), noise.float().to(x0.device)
    sigma = sigma.float().to(x0.device)
    x_t = add_noise(x0, noise, sigma)
    if condition is not None:
        inputs = dict(hidden_states=torch.cat([x_t, condition.to(x_t.dtype)], dim=1),
                      encoder_hidden_states_image=image_embeds)
    else:
        inputs = dict(hidden_states=x_t, reference_latents=references or None)
    pred = transformer(
        **inputs,
        timestep=1000.0 * sigma,
        encoder_hidden_states=text,
        return_dict=False,
    )[0]
    return F.mse_loss(pred.float(), flow_target(x0, noise))
