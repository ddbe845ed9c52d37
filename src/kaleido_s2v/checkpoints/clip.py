"""Wan's open-clip XLM-RoBERTa ViT-H/14 (`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`) -> the
visual tower as transformers `CLIPVisionModel`.

Wan2.1 / MAGREF use only the visual tower (`wan/modules/clip.py`, `VisionTransformer`: pre-norm, fused q|k|v,
exact GELU, LayerNorm eps 1e-5, class token, no patch bias) and read the states after the second-to-last block
(`use_31_block=True`), which is `CLIPVisionModel(...).hidden_states[-2]`. The text tower (`textual.*`), the
contrastive `log_scale` and the visual projection `visual.head` (only used for the pooled CLIP embedding) are
skipped and counted; any other key is an error.

The config is read from the tensor shapes, except the number of attention heads, which the weights do not store:
width / `head_dim` (80: ViT-H/14 has width 1280 and 16 heads).

Names are written as `vision_model.*`, the layout every transformers version loads (transformers >= 5 names the
module's own keys without that prefix and strips it on load).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import UserInputError
from .plan import SourceTensor, check_against_model, key_names, lazy_from_mapping

HEAD_DIM = 80  # ViT-H/14: width 1280, 16 heads (`clip_xlm_roberta_vit_h_14`: vision_heads=16)
LAYER_NORM_EPS = 1e-5  # Wan's CLIP LayerNorm (norm_eps default)
HIDDEN_ACT = "gelu"  # `activation='gelu'`: nn.GELU(), the exact erf GELU (transformers' "gelu")
TARGET_PREFIX = "vision_model."

# ---- source (Wan open-clip names) -> transformers CLIPVisionModel names (under TARGET_PREFIX); a tuple of several
# targets splits the source evenly along dim 0 in that order (the fused q|k|v projection)
CLIP_GLOBAL: dict[str, tuple[str, ...]] = {
    "visual.patch_embedding.weight": ("embeddings.patch_embedding.weight",),  # conv, no bias (pre_norm=True)
    "visual.cls_embedding": ("embeddings.class_embedding",),  # (1, 1, D) -> (D,)
    "visual.pos_embedding": ("embeddings.position_embedding.weight",),  # (1, 1 + grid², D) -> (1 + grid², D)
    "visual.pre_norm.weight": ("pre_layrnorm.weight",),  # (sic: transformers' spelling)
    "visual.pre_norm.bias": ("pre_layrnorm.bias",),
    "visual.post_norm.weight": ("post_layernorm.weight",),
    "visual.post_norm.bias": ("post_layernorm.bias",),
}
_BLOCK = "visual.transformer.{i}"
_LAYER = "encoder.layers.{i}"
CLIP_LAYER: dict[str, tuple[str, ...]] = {
    f"{_BLOCK}.norm1.weight": (f"{_LAYER}.layer_norm1.weight",),
    f"{_BLOCK}.norm1.bias": (f"{_LAYER}.layer_norm1.bias",),
    f"{_BLOCK}.attn.to_qkv.weight": tuple(f"{_LAYER}.self_attn.{p}_proj.weight" for p in "qkv"),
    f"{_BLOCK}.attn.to_qkv.bias": tuple(f"{_LAYER}.self_attn.{p}_proj.bias" for p in "qkv"),
    f"{_BLOCK}.attn.proj.weight": (f"{_LAYER}.self_attn.out_proj.weight",),
    f"{_BLOCK}.attn.proj.bias": (f"{_LAYER}.self_attn.out_proj.bias",),
    f"{_BLOCK}.norm2.weight": (f"{_LAYER}.layer_norm2.weight",),
    f"{_BLOCK}.norm2.bias": (f"{_LAYER}.layer_norm2.bias",),
    f"{_BLOCK}.mlp.0.weight": (f"{_LAYER}.mlp.fc1.weight",),
    f"{_BLOCK}.mlp.0.bias": (f"{_LAYER}.mlp.fc1.bias",),
    f"{_BLOCK}.mlp.2.weight": (f"{_LAYER}.mlp.fc2.weight",),
    f"{_BLOCK}.mlp.2.bias": (f"{_LAYER}.mlp.fc2.bias",),
}
# source keys stored with leading size-1 dims that the target drops: key -> (number of dims dropped, expected form)
CLIP_SQUEEZE: dict[str, tuple[int, str]] = {
    "visual.cls_embedding": (2, "(1, 1, D)"),
    "visual.pos_embedding": (1, "(1, N, D)"),
}
# keys of the file that the visual tower does not use: skipped and counted (exact keys, and prefixes)
CLIP_SKIPPED_KEYS = ("visual.head", "log_scale")
CLIP_SKIPPED_PREFIXES = ("textual.",)


def clip_num_layers(keys) -> int:
    """1 + the largest block index of any `visual.transformer.{i}.` key (0 if none)."""
    n = 0
    for key in keys:
        parts = key.split(".")
        if len(parts) > 3 and parts[:2] == ["visual", "transformer"] and parts[2].isdigit():
            n = max(n, int(parts[2]) + 1)
    return n


def clip_wan_to_hf_table(num_layers: int) -> dict[str, tuple[str, ...]]:
    """The full explicit table: Wan visual key -> transformers key(s) (with TARGET_PREFIX)."""
    table = {src: tuple(TARGET_PREFIX + d for d in dsts) for src, dsts in CLIP_GLOBAL.items()}
    for i in range(num_layers):
        for src, dsts in CLIP_LAYER.items():
            table[src.format(i=i)] = tuple(TARGET_PREFIX + d.format(i=i) for d in dsts)
    return table


def _prefixed(key: str) -> str:
    return key if key.startswith(TARGET_PREFIX) else TARGET_PREFIX + key


def clip_hf_to_wan(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`CLIPVisionModel` state dict (keys with or without `vision_model.`) -> Wan's visual names (the inverse)."""
    sd = {_prefixed(k): v for k, v in state_dict.items()}
    num_layers = clip_num_layers(
        f"visual.transformer.{k.split('.')[3]}.x" for k in sd if k.startswith(TARGET_PREFIX + "encoder.layers.")
    )
    out = {}
    for src, dsts in clip_wan_to_hf_table(num_layers).items():
        parts = [sd[d] for d in dsts]
        value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if src in CLIP_SQUEEZE:
            value = value.reshape((1,) * CLIP_SQUEEZE[src][0] + tuple(value.shape))
        out[src] = value
    return out


def infer_clip_config(shapes: Mapping[str, tuple[int, ...]], num_layers: int, head_dim: int = HEAD_DIM,
                      projection_dim: int | None = None, what: str = "CLIP"):
    """`CLIPVisionConfig` from transformers-named shapes (without TARGET_PREFIX); heads = width / `head_dim`."""
    from transformers import CLIPVisionConfig

    patch = shapes["embeddings.patch_embedding.weight"]
    if len(patch) != 4 or patch[2] != patch[3]:
        raise UserInputError(f"{what}: visual.patch_embedding.weight has shape {patch}, expected (D, 3, p, p)")
    width, channels, patch_size = patch[0], patch[1], patch[2]
    positions = shapes["embeddings.position_embedding.weight"][0]
    grid = math.isqrt(max(positions - 1, 0))
    if grid * grid != positions - 1 or grid == 0:
        raise UserInputError(
            f"{what}: visual.pos_embedding has {positions} positions, expected 1 + a square number (class token + grid)"
        )
    if head_dim <= 0 or width % head_dim:
        raise UserInputError(f"--image-encoder-head-dim {head_dim}: does not divide the CLIP width {width}")
    extra = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=shapes[f"{_LAYER.format(i=0)}.mlp.fc1.weight"][0],
        num_hidden_layers=num_layers,
        num_attention_heads=width // head_dim,
        num_channels=channels,
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_act=HIDDEN_ACT,
        layer_norm_eps=LAYER_NORM_EPS,
        architectures=["CLIPVisionModel"],
        **extra,
    )


def plan_image_encoder(path: Path, dtype: torch.dtype | None = None, trust_pickle: bool = False,
                       head_dim: int = HEAD_DIM):
    """Returns (LazyTensors in transformers names, CLIPVisionConfig, skipped-key counts)."""
    from transformers import CLIPVisionModel

    from .safe_load import load_torch_file

    sd = load_torch_file(path, trust_pickle=trust_pickle)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UserInputError(f"{path}: expected a state dict of tensors (Wan's open-clip XLM-RoBERTa ViT-H/14)")
    skipped: Counter = Counter()
    sources: dict[str, SourceTensor] = {}
    for key, value in sd.items():
        if key in CLIP_SKIPPED_KEYS:
            skipped[key] += 1
        elif key.startswith(CLIP_SKIPPED_PREFIXES):
            skipped[key.split(".")[0]] += 1
        else:
            sources[key] = SourceTensor(value.shape, value.dtype, lambda v=value: v)
    num_layers = clip_num_layers(sources)
    table = clip_wan_to_hf_table(num_layers)
    unexpected = [k for k in sources if k not in table]
    if unexpected:
        raise UserInputError(f"{path}: unexpected CLIP keys {key_names(unexpected)} (not part of Wan's CLIP ViT)")
    missing = [k for k in table if k not in sources]
    if missing or not num_layers:
        raise UserInputError(f"{path}: missing CLIP keys {key_names(missing or ['visual.transformer.0'])}")

    targets: dict[str, tuple] = {}
    for src, dsts in table.items():
        shape = sources[src].shape
        if not shape or shape[0] % len(dsts):
            raise UserInputError(f"{path}: {src} has shape {shape}, not {len(dsts)} equal parts along dim 0")
        view = ()
        if src in CLIP_SQUEEZE:
            n, form = CLIP_SQUEEZE[src]
            if len(shape) <= n or shape[:n] != (1,) * n:
                raise UserInputError(f"{path}: {src} has shape {shape}, expected {form}")
            view = (shape[n:],)
        for part, dst in enumerate(dsts):
            targets[dst] = (src, part, len(dsts), *view)
    tensors = lazy_from_mapping(sources, targets, dtype)
    shapes = {t.name: t.shape for t in tensors}
    head = sd.get("visual.head")
    projection_dim = head.shape[1] if head is not None and head.dim() == 2 else None
    config = infer_clip_config(
        {k.removeprefix(TARGET_PREFIX): v for k, v in shapes.items()}, num_layers, head_dim, projection_dim, str(path)
    )
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    expected = {_prefixed(k): tuple(v.shape) for k, v in model.state_dict().items()}
    check_against_model(shapes, expected, f"{path} (CLIP visual)", source_name=lambda k: targets[k][0] if k in targets else k)
    return tensors, config, skipped
