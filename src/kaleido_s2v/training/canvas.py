"""MAGREF's training inputs: each sample's references composited onto one canvas at a random layout, encoded as
the release's sampler conditions the network (`magref.conditioning`): y = cat(first-frame region mask, canvas
latents) and the canvas's CLIP features.

The layout is drawn per sample slot (so any process layout draws the same): with probability 1/2 the release's
three columns with the references in a random order, else the grid with a random `layout_seed` (HEAD's shuffle of
references and blocks) — the paper shuffles reference positions in training, and inference may use either layout.
A sample whose references were dropped (`reference_dropout`) gets the empty canvas: white, mask all zero.
"""

from __future__ import annotations

import numpy as np
import torch

from ..magref.canvas import compose_references, latent_mask
from ..magref.conditioning import canvas_condition, canvas_tensor, clip_features
from .data import slot_seed

LAYOUT_STREAM = 2  # `slot_seed` stream of the layout draw (0: data decisions, 1: noise and σ)


def random_layout(seed: int, step: int, slot: int, num_references: int) -> tuple[str, int | None, list[int]]:
    """(layout, layout_seed, reference order) of one sample slot."""
    rng = np.random.default_rng(slot_seed(seed, step, slot, LAYOUT_STREAM))
    if rng.random() < 0.5:
        return "release", None, [int(i) for i in rng.permutation(num_references)]
    return "grid", int(rng.integers(2**31)), list(range(num_references))


def compose_sample(references: list, slot, height: int, width: int, stride: int):
    """(canvas (3, H, W) in [−1, 1], latent region mask (H/stride, W/stride)) of one sample at its random layout."""
    if not references:
        return torch.ones(3, height, width), torch.zeros(height // stride, width // stride)
    layout, layout_seed, order = random_layout(slot.seed, slot.step, slot.slot, len(references))
    canvas, mask = compose_references([references[i] for i in order], layout, layout_seed, height, width)
    return canvas_tensor(canvas), latent_mask(mask, stride)


@torch.no_grad()
def encode_canvases(items: list[dict], frozen: dict, height: int, width: int, num_frames: int, device
                    ) -> list[dict[str, torch.Tensor]]:
    """Per sample: dict(condition=y (20, T, h, w), image_embeds (tokens, width)) in fp32."""
    vae, image_encoder = frozen["vae"], frozen["image_encoder"]
    stride = vae.config.scale_factor_spatial
    composed = [compose_sample(it["references"], it["slot"], height, width, stride) for it in items]
    canvases = torch.stack([c for c, _ in composed]).to(device)
    regions = torch.stack([m for _, m in composed]).to(device)
    condition = canvas_condition(vae, canvases, regions, num_frames).float()
    embeds = clip_features(image_encoder, canvases, device).float()
    return [dict(condition=condition[i], image_embeds=embeds[i]) for i in range(len(items))]
