"""Tiny random-weight model folders for the model stages (real transformers classes, built offline)."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT = ("{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}"
        "ASSISTANT:{% endif %}")
WORDS = "a the man woman dog shirt red walks on in with and street beach path video describe this".split()


def save_tiny_llava(path: Path, seed: int = 0) -> Path:
    """A tiny `LlavaForConditionalGeneration` + `LlavaProcessor` (word-level tokenizer built with `tokenizers`).

    Qwen2.5-VL's processor cannot be built here: its video processor needs torchvision, which this CPU
    environment cannot use. Llava goes through the same `AutoModelForImageTextToText` / `AutoProcessor` /
    chat-template / multi-image path as Qwen2.5-VL in the caption stage.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    special = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    vocab = {w: i for i, w in enumerate(special + WORDS + [".", ",", ":", "USER", "ASSISTANT"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8, chat_template=CHAT,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=512),
        image_token_index=vocab["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1,
        pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(path)
    proc.save_pretrained(path)
    return path


def _tiny_flux_parts(in_channels: int, joint_attention_dim: int, pooled_projection_dim: int):
    """Tiny FLUX pieces after diffusers' own Flux pipeline tests, with text encoders and tokenizers built offline."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from kaleido_s2v.vision.tiny import _clip_vocab

    torch.manual_seed(0)
    vocab, merges = _clip_vocab()
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                          latent_channels=2, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                          shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
            projection_dim=32, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                               num_heads=4)),
        tokenizer_2=ByT5Tokenizer(),
        transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=in_channels, out_channels=8, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim, axes_dims_rope=[4, 4, 8]),
    )


def save_tiny_flux_fill(path: Path) -> Path:
    """A tiny `FluxFillPipeline` folder (latents 2 ch packed to 8, + masked image 8 + mask 4 = 20 input channels)."""
    from diffusers import FluxFillPipeline

    FluxFillPipeline(**_tiny_flux_parts(20, 32, 32)).save_pretrained(path)
    return path


def save_tiny_flux_redux(flux_path: Path, prior_path: Path) -> tuple[Path, Path]:
    """Tiny `FluxPipeline` + `FluxPriorReduxPipeline` folders.

    Without text encoders the Redux prior emits zero T5/CLIP embeddings of the real sizes (512 x 4096, 768), so
    the tiny transformer keeps FLUX's joint_attention_dim 4096 and pooled_projection_dim 768.
    """
    from diffusers import FluxPipeline, FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    FluxPipeline(**_tiny_flux_parts(8, 4096, 768)).save_pretrained(flux_path)
    encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8))
    FluxPriorReduxPipeline(image_encoder=encoder, feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
                           image_embedder=ReduxImageEncoder(redux_dim=32, txt_in_features=4096)).save_pretrained(prior_path)
    return flux_path, prior_path
