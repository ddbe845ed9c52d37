"""T5 prompt encoding as Wan does it: prompt cleaning, pad/truncate to a fixed length, zeros after each prompt."""

from __future__ import annotations

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean  # ftfy + double HTML unescape + whitespace collapse

__all__ = ["encode_text", "prompt_clean"]


@torch.no_grad()
def encode_text(
    tokenizer,
    text_encoder,
    prompts: str | list[str],
    max_sequence_length: int = 512,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(B, max_sequence_length, D) encoder states; rows past each prompt's true length are exact zeros.

    Same result as diffusers `WanPipeline._get_t5_prompt_embeds` and the official encoder (states × mask).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    prompts = [prompt_clean(p) for p in prompts]
    inputs = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    enc_device = next(text_encoder.parameters()).device
    states = text_encoder(inputs.input_ids.to(enc_device), inputs.attention_mask.to(enc_device)).last_hidden_state
    mask = inputs.attention_mask.to(states.device, states.dtype)[..., None]
    states = states * mask  # zero the padding rows (what Wan's trim-and-zero-pad does)
    return states.to(device=device or states.device, dtype=dtype or states.dtype)
