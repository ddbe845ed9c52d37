"""What a generation run is set up from, for every front end (`kaleido-s2v generate`, `kaleido-s2v app`).

`choose_model` reads the model once (the built-in model or a folder): its family, its sampling defaults under the
chosen sampler, its size multiple. `check_run_options` checks the device, memory and speed flags before anything
loads. `load_generation_pipeline` loads the pipeline and applies LoRAs, memory and speed options in the order
diffusers recommends, and returns what the sidecars record about them. Errors name the command-line flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserInputError

MEMORY_FLAGS = ("cpu_offload", "group_offload", "vae_tiling", "layerwise_fp8")
SAMPLERS = ("official", "distill")


@dataclass
class GenerationModel:
    builtin: bool
    model_dir: Path | None  # the user's --model folder (None: the built-in model)
    folder: Path | None  # where the weights load from (None: the built-in model's random stand-in)
    family: Any  # model_folder.Family
    defaults: dict  # sampling defaults: the sampler's > the folder's generation_defaults.json > its release's
    size_multiple: int
    name: str  # how sidecars name the model
    sampler: str = "official"
    pipeline_options: dict = field(default_factory=dict)  # what the sampler adds to every call (distill: shift)


def choose_model(model: str | None, sampler: str = "official", *, convert: bool = False) -> GenerationModel:
    """The model a run uses (`model` None: the built-in one), read once, with `sampler`'s defaults on top."""
    from .builtin import builtin_generation_defaults, builtin_model_description, builtin_model_dir
    from .fileio import path_text
    from .model_folder import KALEIDO, facts, resolve_model_folder, size_multiple

    if sampler not in SAMPLERS:
        raise UserInputError(f"--sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    builtin = model is None
    if builtin and convert:
        raise UserInputError("--convert needs --model DIR (an official release folder)")
    model_dir = None if builtin else resolve_model_folder(model, "--model", auto_convert=convert)
    folder = builtin_model_dir() if builtin else model_dir
    folder_facts = facts(folder) if folder is not None else None  # its configs, read once
    family = KALEIDO if builtin else folder_facts.family
    defaults = {**family.defaults, **builtin_generation_defaults()} if builtin else folder_facts.sampling_defaults
    options = {}
    if sampler == "distill":
        if family.name != "kaleido":
            raise UserInputError(f"--sampler distill is the Wan2.1 T2V distillation grid for Kaleido models: drop it "
                                 f"for this {family.name.upper()} model")
        from .release import DISTILL_DEFAULTS, DISTILL_SHIFT

        defaults.update(DISTILL_DEFAULTS)
        options["shift"] = DISTILL_SHIFT
    return GenerationModel(
        builtin=builtin, model_dir=model_dir, folder=folder, family=family, defaults=defaults,
        size_multiple=folder_facts.size_multiple if folder_facts else size_multiple(None),
        name=builtin_model_description() if builtin else path_text(model_dir.resolve()), sampler=sampler,
        pipeline_options=options)


def check_run_options(device, *, cpu_offload=False, group_offload=False, attention_backend=None, loras=()) -> None:
    """The memory and speed flags, checked before anything loads (`device`: a `torch.device`)."""
    if attention_backend is not None:
        from .speed import check_attention_backend

        check_attention_backend(attention_backend)
    if loras:
        from .lora_files import parse_lora_spec

        for spec in loras:
            parse_lora_spec(spec)
    if cpu_offload and group_offload:
        raise UserInputError("--cpu-offload and --group-offload exclude each other: pick one")
    if (cpu_offload or group_offload) and device.type == "cpu":
        raise UserInputError("--cpu-offload/--group-offload move weights to a GPU: they need a CUDA --device")


def magcache_ratios(model: GenerationModel, steps: int) -> list[float]:
    """The ratios `--cache magcache` needs for this model, sampler and step count (one line saying how to make them
    when the folder has none)."""
    from .speed import read_magcache_ratios

    fix = ("the built-in model ships ratios for its default grid only (the official sampler, its default --steps)"
           if model.builtin else None)
    return read_magcache_ratios(model.folder, model.sampler, steps, fix)


def load_generation_pipeline(model: GenerationModel, device, dtype, *, text_encoder: bool = True, loras=(),
                             memory: dict | None = None, cache: str = "none", compile: bool = False,
                             attention_backend: str | None = None, num_inference_steps: int | None = None,
                             mag_ratios: list[float] | None = None):
    """The pipeline, ready: loaded (`text_encoder` False: without it, the prompts being encoded beforehand), LoRAs
    fused in before offloading and fp8 storage, then the memory options (`memory`: MEMORY_FLAGS -> bool), then the
    speed options. Returns (pipe, record): what the sidecars say about dtype, device, memory and speed."""
    from .batch import apply_memory_options
    from .speed import apply_speed_options

    if model.folder is None:  # no shipped weights: the random stand-in, with its own text encoder
        from .builtin import load_builtin_pipeline

        pipe = load_builtin_pipeline(dtype=dtype)
    else:
        from .model_folder import load_pipeline

        skip = {} if text_encoder else {"text_encoder": None, "tokenizer": None}
        pipe = load_pipeline(model.folder, "the built-in model" if model.builtin else "--model", dtype=dtype, **skip)
    loaded = []
    if loras:
        from .lora_files import load_loras

        loaded = [{k: r[k] for k in ("file", "scale", "format")} for r in load_loras(pipe, list(loras))]
    memory = {k: bool((memory or {}).get(k)) for k in MEMORY_FLAGS}
    apply_memory_options(pipe, device, **memory)
    apply_speed_options(pipe, cache=cache, compile=compile, attention_backend=attention_backend,
                        num_inference_steps=num_inference_steps, mag_ratios=mag_ratios)
    record = {"dtype": str(dtype).removeprefix("torch."), "device": str(device), **memory, "sampler": model.sampler,
              "loras": loaded, "cache": cache, "compile": compile, "attention_backend": attention_backend or "native"}
    return pipe, record
