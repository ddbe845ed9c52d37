"""A run's state on disk: sharded checkpoints (torch.distributed.checkpoint: model + optimizer [+ EMA], config,
trainer_state.json) saved atomically, found and checked for --resume, loaded; the final export
(final/transformer/ in diffusers format [+ transformer_ema/], or the LoRA weights)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from ..distributed import Runtime
from ..errors import UserInputError
from .config import TrainConfig

logger = logging.getLogger(__name__)


def find_latest_checkpoint(output: Path) -> Path | None:
    ckpts = [p for p in output.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1]), default=None)


def read_trainer_state(path: Path) -> dict:
    """trainer_state.json of a checkpoint folder, checked: a `UserInputError` naming --resume otherwise."""
    where = f"--resume '{path}'"
    if path.is_dir() and not (path / "trainer_state.json").exists() and find_latest_checkpoint(path) is not None:
        raise UserInputError(f"{where} is a run folder, not a checkpoint: give {find_latest_checkpoint(path)}, "
                             f"or --resume latest with --output {path}")
    if not (path / "trainer_state.json").is_file() or not (path / ".metadata").is_file():
        raise UserInputError(f"{where} is not a checkpoint folder (trainer_state.json and .metadata): give "
                             "OUTPUT/checkpoint-<step>, or 'latest'")
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        int(state["step"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise UserInputError(f"{where}: its trainer_state.json is damaged (no step): resume from another "
                             "checkpoint") from None
    return state


def resume_checkpoint(cfg: TrainConfig, output: Path) -> Path | None:
    """The checked checkpoint folder `run.resume` names (`latest`: the newest in `output`, None if there is none)."""
    if not cfg.run.resume:
        return None
    ckpt = find_latest_checkpoint(output) if cfg.run.resume == "latest" else Path(cfg.run.resume)
    if ckpt is not None:
        read_trainer_state(ckpt)
    return ckpt


def _state_dicts(model, optimizer, lora: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=lora))


def save_checkpoint(path: Path, model, optimizer, cfg: TrainConfig, step: int, rt: Runtime, ema=None) -> None:
    """Sharded model + optimizer (+ EMA) state (torch.distributed.checkpoint), config and step; renamed into place."""
    import torch.distributed.checkpoint as dcp

    tmp = path.with_name(f".{path.name}.tmp")
    if rt.is_main and tmp.exists():
        shutil.rmtree(tmp)
    rt.barrier()
    model_sd, optim_sd = _state_dicts(model, optimizer, cfg.lora.rank > 0)
    state = {"model": model_sd, "optim": optim_sd} | ({"ema": ema.state_dict()} if ema is not None else {})
    with warnings.catch_warnings():  # one process: dcp says it assumes a single process, which is right
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(tmp))
    rt.barrier()
    if rt.is_main:
        (tmp / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        (tmp / "trainer_state.json").write_text(json.dumps(dict(step=step, world_size=rt.dims.world_size, ema=ema is not None)))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    rt.barrier()


def load_checkpoint(path: Path, model, optimizer, cfg: TrainConfig, ema=None) -> int:
    """Restore model and optimizer (and the EMA: from the checkpoint when it has one, else the loaded weights)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    trainer_state = read_trainer_state(path)
    model_sd, optim_sd = _state_dicts(model, optimizer, cfg.lora.rank > 0)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None and trainer_state.get("ema"):
        state["ema"] = ema.state_dict()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # dcp wraps per-rank errors in CheckpointException (a BaseException)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise UserInputError(
            f"--resume '{path}' does not match this model/optimizer ({lines[-1][:200] if lines else type(e).__name__}): "
            "resume with the settings it was saved with (its config.yaml)"
        ) from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    step = int(trainer_state["step"])
    if ema is not None:
        if "ema" in state:
            ema.resumed_at(step)
        else:  # a checkpoint saved without EMA: average from its weights on
            logger.info("%s has no EMA weights: the EMA starts from its model weights", path)
            ema.restart_from_weights(step)
    return step


def _transformer_config(model) -> dict:
    import diffusers

    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")}
    name = type(model).__name__.removeprefix("FSDP")  # fully_shard swaps in a subclass named FSDP<class>
    return {"_class_name": name, "_diffusers_version": diffusers.__version__, **cfg}


def export_final(output: Path, model, cfg: TrainConfig, rt: Runtime, peft_config=None, ema=None) -> Path:
    """final/transformer/ (full fine-tune, diffusers format; with EMA also final/transformer_ema/) or
    final/pytorch_lora_weights.safetensors (LoRA)."""
    from huggingface_hub import save_torch_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..fileio import atomic_path
    from .lora import lora_state_dict, save_lora

    lora = cfg.lora.rank > 0
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)

    def gathered() -> dict[str, torch.Tensor]:
        """The full state dict in its own storage: FSDP gathers into padded buffers, and on one process the
        tensors alias the parameters (which the EMA swap restores afterwards)."""
        return {k: v.detach().clone() for k, v in get_model_state_dict(model, options=options).items()}  # collective

    full = gathered()
    full_ema = None
    if ema is not None:
        with ema.swapped_in():
            full_ema = gathered()
    final = output / "final"

    def save_transformer(folder: Path, state: dict) -> None:
        folder.mkdir()
        save_torch_state_dict(
            state, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB"
        )
        (folder / "config.json").write_text(json.dumps(_transformer_config(model), indent=2))

    if rt.is_main:
        with atomic_path(final, is_dir=True) as tmp:
            if lora:
                save_lora(tmp, lora_state_dict(model, full), peft_config)
            else:
                save_transformer(tmp / "transformer", full)
                if full_ema is not None:
                    save_transformer(tmp / "transformer_ema", full_ema)
            (tmp / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    rt.barrier()
    return final
