"""Training configuration: nested kw-only dataclasses, named recipes, YAML load and flag overrides.

A config is `TrainConfig(model=..., data=..., optim=..., parallel=..., lora=..., run=...)`. Recipes are
functions returning a full config (derived from each other by mutation, as torchtitan does). YAML files
hold the same nesting; unknown keys are an error (the release silently dropped them).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserInputError

# (section, field) -> its flag, where it is not `--field-name`; fields without a flag are named by their config key
_FLAGS = {("model", "path"): "--model", ("data", "path"): "--data", ("data", "num_frames"): "--frames",
          ("lora", "rank"): "--lora-rank", ("lora", "alpha"): "--lora-alpha"}
_NO_FLAG = {"betas", "eps", "target_modules", "tensorboard"}


def flag(section: str, name: str) -> str:
    """How an error names a setting: its command-line flag (flags override the config file)."""
    return f"{section}.{name}" if name in _NO_FLAG else _FLAGS.get((section, name), f"--{name.replace('_', '-')}")


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
        """Every setting in range; a `UserInputError` naming the flag (`flag`) otherwise."""
        d, o, r = self.data, self.optim, self.run

        def need(ok: bool, section: str, name: str, what: str) -> None:
            if not ok:
                raise UserInputError(f"{flag(section, name)} {getattr(getattr(self, section), name)} must be {what}")

        for section, name in (("data", "height"), ("data", "width"), ("data", "max_sequence_length"),
                              ("run", "max_steps"), ("run", "batch_size"), ("run", "grad_accum"),
                              ("run", "save_every"), ("parallel", "cp_degree")):
            need(getattr(getattr(self, section), name) >= 1, section, name, "at least 1")
        need(d.num_frames >= 1 and (d.num_frames - 1) % 4 == 0, "data", "num_frames",
             "4k+1 (the VAE's temporal stride), e.g. 81")
        need(0 < d.fps < math.inf, "data", "fps", "a positive number of frames per second, e.g. 16")
        for section, name in (("data", "max_references"), ("data", "num_workers"), ("optim", "warmup_steps"),
                              ("optim", "decay_steps"), ("run", "seed"), ("lora", "rank")):
            need(getattr(getattr(self, section), name) >= 0, section, name, "at least 0")
        for name in ("text_dropout", "reference_dropout"):
            need(0.0 <= getattr(d, name) <= 1.0, "data", name, "a probability in [0, 1]")
        need(0 < o.lr < math.inf, "optim", "lr", "a positive number, e.g. 5e-6")
        need(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas), "optim", "betas", "two numbers in [0, 1)")
        for name in ("eps", "weight_decay", "grad_clip"):
            need(0 <= getattr(o, name) < math.inf, "optim", name, "a number >= 0" + " (0 = off)" * (name == "grad_clip"))
        need(0.0 <= o.ema_decay < 1.0, "optim", "ema_decay", "in [0, 1) (e.g. 0.999; 0 = off)")
        need(self.lora.alpha is None or 0 < self.lora.alpha < math.inf, "lora", "alpha", "a positive number")
        need(self.model.ref_rope_offset is None or self.model.ref_rope_offset >= 0, "model", "ref_rope_offset",
             "at least 0")
        warmup = min(o.warmup_steps, r.max_steps)  # a run shorter than the warmup warms up over the whole run
        if o.decay_steps > r.max_steps - warmup:
            raise UserInputError(f"--decay-steps {o.decay_steps} must be at most --max-steps minus the warmup "
                                 f"({r.max_steps} - {warmup} = {r.max_steps - warmup}): lower --decay-steps or "
                                 "--warmup-steps, or raise --max-steps")
        if self.parallel.mixed_precision not in ("bf16", "fp32"):
            raise UserInputError(f"--mixed-precision {self.parallel.mixed_precision!r}: choose bf16 or fp32")
        if o.ema_decay > 0 and self.lora.rank > 0:
            raise UserInputError("--ema-decay works with a full fine-tune only: drop it or --lora-rank")
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
        else:
            kwargs[key] = _typed(value, fields[key].type, f"{where}.{key}")
    return cls(**kwargs)


def _number(value) -> float | None:
    """`value` as a float: ints, floats and numeric strings (YAML reads `5e-6`, without a dot, as a string)."""
    if isinstance(value, bool):
        return None
    try:
        return float(value) if isinstance(value, (int, float, str)) else None
    except ValueError:
        return None


_TYPES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
          "tuple[float, float]": "a list of two numbers", "list[str]": "a list of strings"}


def _typed(value, annotation: str, key: str):
    """A YAML value checked against its field's type (the annotation's text), numbers converted."""
    base, _, optional = annotation.partition(" | ")
    if value is None and optional == "None":
        return None
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "float" and _number(value) is not None:
        return _number(value)
    if base in ("str", "bool") and type(value) is {"str": str, "bool": bool}[base]:
        return value
    if base == "tuple[float, float]" and isinstance(value, list | tuple) and len(value) == 2:
        numbers = tuple(map(_number, value))
        if None not in numbers:
            return numbers
    if base == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserInputError(f"config key '{key}' is {value!r}: give {_TYPES[base]}" + (" or null" * (optional == "None")))


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
    try:
        return config_from_dict(values, recipe(values["recipe"]) if "recipe" in values else None)
    except UserInputError as e:
        raise UserInputError(f"--config '{path}': {e}") from None


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
