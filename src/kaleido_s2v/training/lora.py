"""LoRA through peft on the attention and FFN projections, exported in diffusers' LoRA format.

The export is `pytorch_lora_weights.safetensors` with keys `transformer.blocks.0.attn1.to_q.lora_A.weight`
(written by `WanLoraLoaderMixin.save_lora_weights`), so `KaleidoPipeline.load_lora_weights(folder)` and
`transformer.load_lora_adapter(folder, prefix="transformer")` read it.
"""

from __future__ import annotations

import os

import torch

ADAPTER_NAME = "default"


def add_lora(transformer, rank: int, alpha: float | None, target_modules: list[str]):
    """Freeze the base weights and add a LoRA adapter (trainable, fp32) to `target_modules`."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, target_modules=list(target_modules), init_lora_weights=True
    )
    transformer.requires_grad_(False)
    transformer.add_adapter(config, adapter_name=ADAPTER_NAME)  # diffusers PeftAdapterMixin
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
            p.data = p.data.float()
    return config


def lora_state_dict(transformer, full_state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """peft-format LoRA weights (`blocks.0.attn1.to_q.lora_A.weight`), from the model or a gathered state dict."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, state_dict=full_state_dict, adapter_name=ADAPTER_NAME)


def save_lora(directory: str | os.PathLike, lora_weights: dict[str, torch.Tensor], peft_config) -> None:
    """Write diffusers-format LoRA weights (+ the adapter's metadata) into `directory`."""
    from diffusers.loaders import WanLoraLoaderMixin

    metadata = peft_config.to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    WanLoraLoaderMixin.save_lora_weights(
        directory,
        transformer_lora_layers={k: v.detach().cpu().contiguous() for k, v in lora_weights.items()},
        transformer_lora_adapter_metadata=metadata,
    )
