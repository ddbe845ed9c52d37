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
