"""Tiny components of the real classes (random weights, no download), for tests, benchmarks and demos.

Every model here is the class the real model uses — `UMT5EncoderModel`, `AutoencoderKLWan`,
`KaleidoTransformer3DModel`, `FlowMatchEulerDiscreteScheduler` — at a size that runs in milliseconds.
The tokenizer is `ByT5Tokenizer()`, which is byte-level and needs no vocabulary file.
"""

from __future__ import annotations

from typing import Any

import torch

from .release import REF_ROPE, REF_ROPE_OFFSET, SHIFT

TINY_TEXT_DIM = 32


def tiny_transformer_config(**overrides: Any) -> dict[str, Any]:
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=TINY_TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=32,
        ref_rope=REF_ROPE,
        ref_rope_offset=REF_ROPE_OFFSET,
    )
    config.update(overrides)
    return config


def tiny_transformer(seed: int = 0, **overrides: Any):
    from .transformer import KaleidoTransformer3DModel

    torch.manual_seed(seed)
    return KaleidoTransformer3DModel(**tiny_transformer_config(**overrides))


def tiny_vae(seed: int = 0, base_dim: int = 3):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    # z_dim 16 keeps Wan's 16 latents_mean/std; spatial stride 8, temporal stride 4 as the real VAE.
    return AutoencoderKLWan(
        base_dim=base_dim, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def tiny_text_encoder(seed: int = 0, d_model: int = TINY_TEXT_DIM):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=384,  # ByT5Tokenizer's size
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
    )
    return UMT5EncoderModel(config).eval()


def tiny_tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def tiny_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=SHIFT)


def tiny_components(seed: int = 0, **transformer_overrides: Any) -> dict[str, Any]:
    """Components for `KaleidoPipeline(**tiny_components())`."""
    return dict(
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_text_encoder(seed),
        vae=tiny_vae(seed),
        transformer=tiny_transformer(seed, **transformer_overrides),
        scheduler=tiny_scheduler(),
    )


# ---------------------------------------------------------------------------------------------------- MAGREF
TINY_IMAGE_DIM = 24


def tiny_wan_i2v_transformer_config(**overrides: Any) -> dict[str, Any]:
    """diffusers `WanTransformer3DModel` in the image-to-video configuration MAGREF uses (36 input channels:
    noise 16 + mask 4 + canvas latent 16; CLIP features through `image_dim`; added K/V of the inner width)."""
    heads, head_dim = 2, 12
    config = dict(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=36,
        out_channels=16, text_dim=TINY_TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=TINY_IMAGE_DIM, added_kv_proj_dim=heads * head_dim,
        rope_max_seq_len=32,
    )
    config.update(overrides)
    return config


def tiny_wan_i2v_transformer(seed: int = 0, **overrides: Any):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**tiny_wan_i2v_transformer_config(**overrides))


def tiny_image_encoder(seed: int = 0, hidden_size: int = TINY_IMAGE_DIM):
    """transformers `CLIPVisionModel` (the ViT-H/14 class) at 28 px / patch 14: 5 tokens of `hidden_size`."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=16)
    return CLIPVisionModel(config).eval()


def tiny_magref_components(seed: int = 0, **transformer_overrides: Any) -> dict[str, Any]:
    """Components for `MagrefPipeline(**tiny_magref_components())`."""
    from .magref.release import magref_scheduler

    return dict(
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_text_encoder(seed),
        vae=tiny_vae(seed),
        transformer=tiny_wan_i2v_transformer(seed, **transformer_overrides),
        image_encoder=tiny_image_encoder(seed),
        scheduler=magref_scheduler(),
    )
