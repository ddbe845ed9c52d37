"""Training configuration: nested kw-only dataclasses, named recipes, YAML load and flag overrides.

A config is `TrainConfig(model=..., data=..., optim=..., parallel=..., lora=..., run=...)`. Recipes are
functions returning a full config (derived from each other by mutation, as torchtitan does). YAML files
hold the same nesting; unknown keys are an error (the release silently dropped them).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserInputError


@dataclass(kw_only=True)
class ModelConfig:
    path: str = ""  # diffusers pipeline folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/)
    ref_rope: str | None = None  # train an R-RoPE variant other than the folder's (None = keep)
    ref_rope_offset: int | None = None


@dataclass(kw_only=True)
class DataConfig:
    path: str = ""  # official folder layout (videos/ labels/ references/) or a manifest.jsonl (or its folder)
    height: int = 480
    width: int = 832
    num_frames: int = 81  # 4k + 1
    fps: float = 16.0
    max_references: int = 3
    text_dropout: float = 0.1  # caption -> "" (the release's ucg_rate)
    reference_dropout: float = 0.0  # all references dropped (the release never did this)
    bucket_by_references: bool = False  # each global batch: samples with one reference count (one forward)
    max_sequence_length: int = 512
    cache_dir: str | None = None  # latent cache (see `kaleido-s2v train --build-cache`)
    num_workers: int = 0


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 5e-6  # the release's 14B value
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    warmup_steps: int = 50  # linear warmup from 0, then constant
    decay_steps: int = 0  # > 0: linear decay to 0 over the last decay_steps of run.max_steps (WSD); 0: constant
    ema_decay: float = 0.0  # > 0: also keep an EMA of the weights (final/transformer_ema/); 0: off, as the release


@dataclass(kw_only=True)
class ParallelConfig:
    cp_degree: int = 1  # context-parallel (Ulysses) group size; the rest of the world is data parallel
    gradient_checkpointing: bool = False
    mixed_precision: str = "bf16"  # bf16 | fp32
    compile: bool = False  # torch.compile each transformer block (torchtitan's per-block compile)


@dataclass(kw_only=True)
class LoraConfig:
    rank: int = 0  # 0 = full fine-tune
    alpha: float | None = None  # None = rank (scale 1)
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    )


@dataclass(kw_only=True)
class RunConfig:
    output: str = ""
    max_steps: int = 1000
    batch_size: int = 1  # per data-parallel rank
    grad_accum: int = 1
    seed: int = 0
    save_every: int = 100
    resume: str | None = None  # a checkpoint-<step> folder, or "latest" (the newest in `output`)
    tensorboard: bool = True  # when the tensorboard package is installed


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> TrainConfig:
        d, r = self.data, self.run
        if (d.num_frames - 1) % 4:
            raise UserInputError(f"--num-frames {d.num_frames} is not 4k+1 (the VAE's temporal stride): use e.g. 81")
        if d.height <= 0 or d.width <= 0:
            raise UserInputError(f"--height/--width {d.height}x{d.width} must be positive")
        for name, p in (("text_dropout", d.text_dropout), ("reference_dropout", d.reference_dropout)):
            if not 0.0 <= p <= 1.0:
                raise UserInputError(f"data.{name} = {p} is not a probability in [0, 1]")
        if self.parallel.mixed_precision not in ("bf16", "fp32"):
            raise UserInputError(f"--mixed-precision {self.parallel.mixed_precision!r}: choose bf16 or fp32")
        for name in ("max_steps", "batch_size", "grad_accum", "save_every"):
            if getattr(r, name) < 1:
                raise UserInputError(f"--{name.replace('_', '-')} {getattr(r, name)} must be at least 1")
        if not 0 <= self.optim.decay_steps <= r.max_steps - self.optim.warmup_steps:
            raise UserInputError(f"--decay-steps {self.optim.decay_steps}: must be in [0, max_steps - warmup_steps]")
        if not 0.0 <= self.optim.ema_decay < 1.0:
            raise UserInputError(f"--ema-decay {self.optim.ema_decay} must be in [0, 1) (e.g. 0.999; 0 = off)")
        if self.optim.ema_decay > 0 and self.lora.rank > 0:
            raise UserInputError("--ema-decay works with a full fine-tune only: drop it or --lora-rank")
        if self.lora.rank < 0:
            raise UserInputError(f"--lora-rank {self.lora.rank} must be >= 0 (0 = full fine-tune)")
        if self.parallel.cp_degree < 1:
            raise UserInputError(f"--cp-degree {self.parallel.cp_degree} must be >= 1")
        if self.parallel.compile and self.parallel.cp_degree > 1:
            raise UserInputError("--compile with --cp-degree > 1 is not supported (diffusers' context-parallel "
                                 "hooks): drop one of them")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _from_dict(cls, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise UserInputError(f"config section '{where}' must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise UserInputError(
                f"unknown config key '{where + '.' if where else ''}{key}': valid keys are {', '.join(fields)}"
            )
        sub = _SECTIONS.get(key) if cls is TrainConfig else None
        if sub is not None:
            kwargs[key] = _from_dict(sub, value or {}, key)
        elif key == "betas":
            kwargs[key] = tuple(float(b) for b in value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


_SECTIONS = dict(
    model=ModelConfig, data=DataConfig, optim=OptimConfig, parallel=ParallelConfig, lora=LoraConfig, run=RunConfig
)


def config_from_dict(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Apply a nested dict (YAML content) on top of `base` (or the defaults)."""
    base_dict = (base or TrainConfig()).to_dict()
    for section, entries in (values or {}).items():
        if section == "recipe":
            continue
        if section not in _SECTIONS:
            raise UserInputError(f"unknown config section '{section}': valid sections are {', '.join(_SECTIONS)}")
        if not isinstance(entries, dict):
            raise UserInputError(f"config section '{section}' must be a mapping, got {type(entries).__name__}")
        base_dict[section].update(entries)
    return _from_dict(TrainConfig, base_dict, "")


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a YAML config; an optional top-level `recipe: NAME` is the base the file's values override."""
    from ..fileio import read_mapping

    values = read_mapping(path, "config", "sections (model, data, optim, ...)")
    base = recipe(values["recipe"]) if "recipe" in values else None
    return config_from_dict(values, base)


# ---------------------------------------------------------------------------------------------- recipes
def default() -> TrainConfig:
    """The release's optimisation settings (AdamW 5e-6, betas 0.9/0.95, wd 1e-4, clip 1.0) at 480x832x81."""
    return TrainConfig()


def wan14b_fsdp8() -> TrainConfig:
    """14B full fine-tune on 8 GPUs: FSDP2, bf16, activation checkpointing, micro-batch 1, accumulation 8."""
    cfg = default()
    cfg.parallel.gradient_checkpointing = True
    cfg.run.grad_accum = 8
    return cfg


def wan14b_fsdp8_cp2() -> TrainConfig:
    """As `wan14b_fsdp8`, with a context-parallel pair for long sequences (4 data-parallel groups of 2)."""
    cfg = wan14b_fsdp8()
    cfg.parallel.cp_degree = 2
    return cfg


def wan14b_lora() -> TrainConfig:
    """LoRA rank 64 on attention and FFN projections; higher lr as usual for adapters."""
    cfg = wan14b_fsdp8()
    cfg.lora.rank = 64
    cfg.optim.lr = 1e-4
    return cfg


def toy_cpu() -> TrainConfig:
    """The tiny test model on CPU: 64x64, 5 frames, fp32, no warmup."""
    cfg = default()
    cfg.data.height, cfg.data.width, cfg.data.num_frames = 64, 64, 5
    cfg.data.max_sequence_length = 64
    cfg.parallel.mixed_precision = "fp32"
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 0
    cfg.run.max_steps, cfg.run.save_every = 80, 1000
    return cfg


def toy_cpu_gloo2() -> TrainConfig:
    """`toy_cpu` on two CPU processes (torchrun --nproc_per_node 2, gloo): FSDP2 over 2 ranks."""
    cfg = toy_cpu()
    cfg.run.batch_size = 1
    return cfg


RECIPES = {
    f.__name__: f for f in (default, wan14b_fsdp8, wan14b_fsdp8_cp2, wan14b_lora, toy_cpu, toy_cpu_gloo2)
}


def recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise UserInputError(f"unknown recipe '{name}': choose one of {', '.join(RECIPES)}")
    return RECIPES[name]()
