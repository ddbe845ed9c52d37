"""diffusers components -> the original formats (official SAT release, Wan2.1 shards, Wan `.pth` files).

The inverse of the converter, through the same `keymap` tables. Used to write test fixtures and benchmark
checkpoints in the exact on-disk layouts of the releases, and by training to export for the official stack.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from . import keymap
from .layout import OFFICIAL_LATEST, OFFICIAL_MODEL_STATES, OFFICIAL_T5_DIR, T5_FILE, VAE_FILE, WAN_TOKENIZER_DIR


def save_official_release(
    root: str | os.PathLike,
    transformer_state_dict=None,
    vae_state_dict=None,
    text_encoder_state_dict=None,
    tokenizer=None,
    iteration: str = "1",
    extra_module_keys: dict[str, torch.Tensor] | None = None,
    args: argparse.Namespace | None = None,
) -> Path:
    """Write a folder in the official Kaleido-14B-S2V layout (reference/kaleido-official.md §5.1).

    `extra_module_keys` are added to `module` as given (e.g. the frozen T5 under `conditioner.`, or a key the
    converter must reject); `args` is stored next to `module`, as SAT/DeepSpeed do.
    """
    root = Path(root)
    if transformer_state_dict is not None:
        module = keymap.diffusers_to_sat(transformer_state_dict)
        module.update(extra_module_keys or {})
        path = root / OFFICIAL_MODEL_STATES.format(iteration=iteration)
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint = {"module": module, "iteration": int(iteration) if iteration.isdigit() else iteration}
        if args is not None:
            checkpoint["args"] = args
        torch.save(checkpoint, path)
        (root / OFFICIAL_LATEST).write_text(f"{iteration}\n")
    _save_vae_t5_tokenizer(
        root, root / OFFICIAL_T5_DIR, root / OFFICIAL_T5_DIR, vae_state_dict, text_encoder_state_dict, tokenizer
    )
    return root


def save_wan_release(
    root: str | os.PathLike,
    transformer_state_dict=None,
    vae_state_dict=None,
    text_encoder_state_dict=None,
    tokenizer=None,
    num_shards: int = 2,
    prefix: str = "",
) -> Path:
    """Write a folder in the original Wan2.1-T2V layout: DiT safetensors shards (+ index), VAE/T5 `.pth`."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if transformer_state_dict is not None:
        sd = {k: v.contiguous() for k, v in keymap.diffusers_to_wan(transformer_state_dict, prefix=prefix).items()}
        keys = list(sd)
        n = max(1, min(num_shards, len(keys)))
        weight_map = {}
        for i in range(n):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
            part = {k: sd[k] for k in keys[i::n]}
            save_file(part, str(root / name))
            weight_map.update(dict.fromkeys(part, name))
        index = {"metadata": {"total_size": sum(v.nbytes for v in sd.values())}, "weight_map": weight_map}
        (root / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    _save_vae_t5_tokenizer(root, root, root / WAN_TOKENIZER_DIR, vae_state_dict, text_encoder_state_dict, tokenizer)
    return root


def _save_vae_t5_tokenizer(root: Path, t5_dir: Path, tokenizer_dir: Path, vae_sd, t5_sd, tokenizer) -> None:
    from .vae import vae_diffusers_to_wan

    root.mkdir(parents=True, exist_ok=True)
    if vae_sd is not None:
        torch.save(vae_diffusers_to_wan(vae_sd), root / VAE_FILE)
    if t5_sd is not None:
        t5_dir.mkdir(parents=True, exist_ok=True)
        torch.save(keymap.t5_hf_to_wan(t5_sd), t5_dir / T5_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tokenizer_dir))
