"""A synthetic MAGREF release (MAGREF-Video/MAGREF on Hugging Face, reference/magref-official.md §1) in the
official file layout, written from tiny components of the real classes by the inverse of the converter's mappings.

    config.json                                                WanModel, model_type "i2v"
    diffusion_pytorch_model-0000{1..3}-of-00003.safetensors    the DiT in Wan's original names, fp32
    diffusion_pytorch_model.safetensors.index.json
    Wan2.1_VAE.pth                                             Wan's VAE names
    models_t5_umt5-xxl-enc-bf16.pth                            Wan's T5 names, bf16
    models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth    Wan's open-clip names (visual.*, textual.*,
                                                               log_scale), fp16
    google/umt5-xxl/, xlm-roberta-large/                       tokenizer folders

The CLIP is 320 wide with 4 heads, so the converter's default head dim (80, ViT-H/14's) applies and the folder
converts with default options (as `generate --convert` does); the DiT's `image_dim` is that width.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kaleido_s2v.checkpoints import keymap
from kaleido_s2v.checkpoints.clip import clip_hf_to_wan
from kaleido_s2v.checkpoints.layout import CLIP_FILE, T5_FILE, VAE_FILE, WAN_INDEX, WAN_TOKENIZER_DIR
from kaleido_s2v.checkpoints.vae import vae_diffusers_to_wan
from kaleido_s2v.tiny import tiny_image_encoder, tiny_text_encoder, tiny_tokenizer, tiny_wan_i2v_transformer

CLIP_WIDTH = 320  # 4 heads (tiny_image_encoder) of 80: the ViT-H/14 head dim, the converter's default
NUM_SHARDS = 3
# how the release stores each component (the returned modules are fp32 with weights rounded to these)
STORED_DTYPES = {"transformer": torch.float32, "text_encoder": torch.bfloat16, "image_encoder": torch.float16,
                 "vae": torch.float32}


def _rounded(model, dtype):
    """The module with its weights rounded to `dtype` (kept fp32, so its values are exactly what is stored)."""
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(t.to(dtype).float())
    return model


def _umt5_like_wan(seed: int):
    """`tiny_text_encoder` with Wan's relative_attention_max_distance (128), which Wan's `.pth` does not store."""
    from transformers import UMT5EncoderModel

    tiny = tiny_text_encoder(seed)
    config = tiny.config
    config.relative_attention_max_distance = 128
    model = UMT5EncoderModel(config).eval()
    model.load_state_dict(tiny.state_dict())
    return model


def _wan_layout_vae(seed: int):
    """AutoencoderKLWan in Wan2.1's own layout (dim_mult, 2 residual blocks) at width 4: `tiny_vae`'s 1-block layout
    has no Wan2.1 `.pth` form."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=4, z_dim=16).eval()


def fake_clip_extras(seed: int = 0) -> dict[str, torch.Tensor]:
    """Stand-ins for what the converter skips: the text tower, the contrastive scale, the visual projection."""
    g = torch.Generator().manual_seed(seed)
    return {
        "textual.token_embedding.weight": torch.randn(11, 8, generator=g),
        "textual.blocks.0.attn.q.weight": torch.randn(8, 8, generator=g),
        "textual.head.0.weight": torch.randn(6, 8, generator=g),
        "log_scale": torch.tensor(4.6052),
        "visual.head": torch.randn(CLIP_WIDTH, 16, generator=g),
    }


def write_dit_shards(root: Path, wan_state_dict: dict[str, torch.Tensor], num_shards: int = NUM_SHARDS) -> None:
    """The DiT as `num_shards` safetensors files (keys dealt round-robin) + the diffusers-style index."""
    from safetensors.torch import save_file

    keys = list(wan_state_dict)
    weight_map = {}
    for i in range(num_shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: wan_state_dict[k].contiguous() for k in keys[i::num_shards]}
        save_file(part, str(root / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.nbytes for v in wan_state_dict.values())
    (root / WAN_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_magref_release(root: Path, seed: int = 0) -> dict:
    """Write the release into `root`; returns its tiny source components (fp32 modules holding exactly the stored
    values; see STORED_DTYPES) plus the release's scheduler: `MagrefPipeline(**components)` runs."""
    from kaleido_s2v.magref.release import magref_scheduler

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    transformer = tiny_wan_i2v_transformer(seed, image_dim=CLIP_WIDTH).eval()
    image_encoder = _rounded(tiny_image_encoder(seed, hidden_size=CLIP_WIDTH), torch.float16)
    text_encoder = _rounded(_umt5_like_wan(seed), torch.bfloat16)
    vae = _wan_layout_vae(seed)
    tokenizer = tiny_tokenizer()

    c = transformer.config
    config = {  # the release's config.json fields (WanModel's arguments)
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "i2v",
        "dim": c.num_attention_heads * c.attention_head_dim, "eps": c.eps, "ffn_dim": c.ffn_dim,
        "freq_dim": c.freq_dim, "in_dim": c.in_channels, "num_heads": c.num_attention_heads,
        "num_layers": c.num_layers, "out_dim": c.out_channels, "text_len": 512, "use_cfg_emb": False,
    }  # fmt: skip
    (root / "config.json").write_text(json.dumps(config, indent=2))
    write_dit_shards(root, keymap.diffusers_to_wan_i2v(transformer.state_dict()))
    torch.save(vae_diffusers_to_wan(vae.state_dict()), root / VAE_FILE)
    t5 = {k: v.to(torch.bfloat16) for k, v in keymap.t5_hf_to_wan(text_encoder.state_dict()).items()}
    torch.save(t5, root / T5_FILE)
    clip = {k: v.to(torch.float16) for k, v in clip_hf_to_wan(image_encoder.state_dict()).items()}
    torch.save({**clip, **{k: v.to(torch.float16) for k, v in fake_clip_extras(seed).items()}}, root / CLIP_FILE)
    tokenizer.save_pretrained(str(root / WAN_TOKENIZER_DIR))
    tokenizer.save_pretrained(str(root / "xlm-roberta-large"))  # the CLIP text tower's tokenizer: not converted
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                image_encoder=image_encoder, scheduler=magref_scheduler())
