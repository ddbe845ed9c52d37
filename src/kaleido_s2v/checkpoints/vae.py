"""Wan2.1 VAE (`Wan2.1_VAE.pth`, Wan's own key names) -> diffusers `AutoencoderKLWan`.

The renaming is diffusers' own `convert_wan_vae_to_diffusers` (the function behind
`AutoencoderKLWan.from_single_file`); we add the safe memory-mapped load, a strict key/shape check against
`AutoencoderKLWan` built on the meta device, and the streaming writer. That renaming is written for
Wan2.1's layout (dim_mult [1,2,4,4], 2 residual blocks, temporal downsampling [False, True, True]), so the
config is Wan2.1's with `base_dim` and `z_dim` read from the weights; any other layout fails the strict check.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import UserInputError
from .plan import check_against_model
from .shards import LazyTensor


def plan_vae(path: Path, dtype: torch.dtype | None = None, trust_pickle: bool = False):
    """Returns (LazyTensors in diffusers names, AutoencoderKLWan on the meta device carrying the config)."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from .safe_load import load_torch_file

    sd = load_torch_file(path, trust_pickle=trust_pickle)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserInputError(f"{path}: expected a state dict of tensors (the Wan2.1 VAE)")
    converted = convert_wan_vae_to_diffusers(dict(sd))
    for key in ("encoder.conv_in.weight", "post_quant_conv.weight"):
        if key not in converted:
            raise UserInputError(f"{path}: not a Wan2.1 VAE (no {key} after renaming)")
    base_dim = converted["encoder.conv_in.weight"].shape[0]
    z_dim = converted["post_quant_conv.weight"].shape[0]
    if z_dim != 16:
        raise UserInputError(f"{path}: latent channels {z_dim}, expected 16 (the Wan2.1 VAE)")
    with torch.device("meta"):
        model = AutoencoderKLWan(base_dim=base_dim, z_dim=z_dim)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_against_model({k: tuple(v.shape) for k, v in converted.items()}, expected, f"{path} (Wan2.1 VAE)")
    tensors = [
        LazyTensor(k, tuple(v.shape), dtype or v.dtype, lambda v=v, d=dtype or v.dtype: v.to(d))
        for k, v in converted.items()
    ]
    return tensors, model


def wan_vae_keys(dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2, temperal_downsample=(False, True, True)) -> list[str]:
    """Every key of Wan2.1's `WanVAE_` state dict (`wan/modules/vae.py`), generated from its module structure."""

    def res(prefix, in_dim, out_dim):
        keys = [
            f"{prefix}.residual.{i}.{p}"
            for i, p in ((0, "gamma"), (2, "weight"), (2, "bias"), (3, "gamma"), (6, "weight"), (6, "bias"))
        ]
        return keys + ([f"{prefix}.shortcut.weight", f"{prefix}.shortcut.bias"] if in_dim != out_dim else [])

    def resample(prefix, temporal):
        keys = [f"{prefix}.resample.1.weight", f"{prefix}.resample.1.bias"]
        return keys + ([f"{prefix}.time_conv.weight", f"{prefix}.time_conv.bias"] if temporal else [])

    def middle(prefix):
        attn = [f"{prefix}.1.norm.gamma"] + [
            f"{prefix}.1.{m}.{p}" for m in ("to_qkv", "proj") for p in ("weight", "bias")
        ]
        return res(f"{prefix}.0", 1, 1) + attn + res(f"{prefix}.2", 1, 1)

    conv = ("weight", "bias")
    keys = [f"encoder.conv1.{p}" for p in conv]
    dims = [1, *dim_mult]
    k = 0
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(num_res_blocks):
            keys += res(f"encoder.downsamples.{k}", in_dim, out_dim)
            in_dim, k = out_dim, k + 1
        if i != len(dim_mult) - 1:
            keys += resample(f"encoder.downsamples.{k}", temperal_downsample[i])
            k += 1
    keys += middle("encoder.middle") + ["encoder.head.0.gamma"] + [f"encoder.head.2.{p}" for p in conv]
    keys += [f"conv1.{p}" for p in conv] + [f"conv2.{p}" for p in conv]
    keys += [f"decoder.conv1.{p}" for p in conv] + middle("decoder.middle")
    dims = [dim_mult[-1], *dim_mult[::-1]]
    temperal_upsample = temperal_downsample[::-1]
    k = 0
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        in_dim = in_dim / 2 if i in (1, 2, 3) else in_dim
        for _ in range(num_res_blocks + 1):
            keys += res(f"decoder.upsamples.{k}", in_dim, out_dim)
            in_dim, k = out_dim, k + 1
        if i != len(dim_mult) - 1:
            keys += resample(f"decoder.upsamples.{k}", temperal_upsample[i])
            k += 1
    keys += ["decoder.head.0.gamma"] + [f"decoder.head.2.{p}" for p in conv]
    return keys


def vae_diffusers_to_wan(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoencoderKLWan state dict -> Wan2.1 `WanVAE_` names: the exact inverse of diffusers' renaming."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    wan_to_dif = convert_wan_vae_to_diffusers({k: k for k in wan_vae_keys()})  # diffusers name -> Wan name
    if set(wan_to_dif) != set(state_dict):
        raise ValueError(f"not a Wan2.1-layout AutoencoderKLWan: {sorted(set(wan_to_dif) ^ set(state_dict))[:6]}")
    return {wan: state_dict[dif] for dif, wan in wan_to_dif.items()}
