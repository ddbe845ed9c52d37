"""MAGREF's conditioning from a canvas, shared by `MagrefPipeline` and the trainer (reference/magref-official.md
§2): the canvas in [−1, 1], the 4-channel first-frame mask holding the region mask, `y = cat(mask4, latent16)`
and the CLIP features of the whole canvas."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import get_module_execution_device
from PIL import Image

from ..latents import encode_video
from .release import CLIP_MEAN, CLIP_STD


def canvas_tensor(canvas: Image.Image) -> torch.Tensor:
    """(3, H, W) in [−1, 1] as the release computes it: `to_tensor(canvas).sub_(0.5).div_(0.5)`."""
    x = torch.from_numpy(np.asarray(canvas, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    return x.sub_(0.5).div_(0.5)


def first_frame_mask(region: torch.Tensor, num_frames: int, temporal_stride: int = 4) -> torch.Tensor:
    """The 4-channel temporal mask (stride, T, h, w): only latent frame 0 is non-zero and holds the region mask
    (h, w) in every channel — the release's `msk` (frame 0 repeated `stride` times, then (T, stride) reshaped)."""
    h, w = region.shape
    msk = torch.zeros(1, num_frames, h, w, dtype=region.dtype, device=region.device)
    msk[:, :1] = region
    msk = torch.cat([msk[:, :1].repeat_interleave(temporal_stride, dim=1), msk[:, 1:]], dim=1)
    return msk.view(1, msk.shape[1] // temporal_stride, temporal_stride, h, w).transpose(1, 2)[0]


@torch.no_grad()
def clip_features(image_encoder, canvas: torch.Tensor, device=None) -> torch.Tensor:
    """CLIP features of canvases (B, 3, H, W) in [−1, 1]: squashed to the encoder's size by bicubic
    interpolation (no antialias, no crop: side subjects stay), to [0, 1], CLIP-normalised; the states after
    the second-to-last block -> (B, tokens, width)."""
    device = device or get_module_execution_device(image_encoder)
    size = image_encoder.config.image_size
    x = F.interpolate(canvas.float(), size=(size, size), mode="bicubic", align_corners=False)
    x = x.mul(0.5).add(0.5)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = ((x - mean) / std).to(device=device, dtype=image_encoder.dtype)
    return image_encoder(pixel_values=x, output_hidden_states=True).hidden_states[-2]


@torch.no_grad()
def canvas_condition(vae, canvas: torch.Tensor, region: torch.Tensor, num_frames: int) -> torch.Tensor:
    """y = cat(mask4, latent16) (B, 20, T, h, w): the canvases (B, 3, H, W) as frame 0 of zero videos,
    VAE-encoded and normalised, after the first-frame masks of the latent region masks `region` (B, h, w)."""
    b, _, height, width = canvas.shape
    video = torch.cat([canvas[:, :, None], canvas.new_zeros(b, 3, num_frames - 1, height, width)], dim=2)
    latents = encode_video(vae, video).float()
    stride = vae.config.scale_factor_temporal
    masks = torch.stack([first_frame_mask(r.float(), num_frames, stride) for r in region])
    return torch.cat([masks.to(latents.device), latents], dim=1)
