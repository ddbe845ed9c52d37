"""Streaming, strict, atomic conversion of an official Kaleido (or Wan2.1) release to a diffusers folder.

Each component is planned first — every source tensor named, mapped, shape-checked against the target
class built on the meta device — and only then written, tensor by tensor, into safetensors shards
(`shards.py`). Source files are memory-mapped (`safe_load.py`), so anonymous memory stays at about one tensor
(plus a dtype conversion), whatever the checkpoint size. Everything is built in a temporary folder beside
`dst` and renamed at the end; `conversion_summary.json` records what was written.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import UserInputError
from ..fileio import atomic_path, claim_folder
from ..release import REF_ROPE, REF_ROPE_OFFSET, SHIFT
from . import keymap
from .layout import (
    OFFICIAL_TREE,
    WAN_TREE,
    SourceLayout,
    default_cache_dir,
    detect_source,
    guess_format,
    is_diffusers_pipeline,
    source_fingerprint,
)
from .plan import SourceTensor, check_against_model, key_names, lazy_from_mapping
from .shards import TORCH_DTYPES, LazyTensor, parse_size, write_shards

DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SUMMARY_FILE = "conversion_summary.json"
PIPELINE_CLASS = "KaleidoPipeline"
MADE_BY = "kaleido-s2v convert"


# ------------------------------------------------------------------------------------------------- transformer
def _official_sources(layout: SourceLayout, trust_pickle: bool) -> tuple[dict[str, SourceTensor], Counter]:
    from .safe_load import load_torch_file

    path = layout.transformer_files[0]
    obj = load_torch_file(path, trust_pickle=trust_pickle)
    sd = obj.get("module", obj) if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping):
        raise UserInputError(f"{path}: expected a dict with 'module' = state dict, got {type(obj).__name__}")
    sources, skipped = {}, Counter()
    for key, value in sd.items():
        if not isinstance(key, str) or not key.startswith(keymap.SAT_PREFIX):
            skipped[str(key).split(".")[0]] += 1  # e.g. the frozen T5 under `conditioner.`
            continue
        if not isinstance(value, torch.Tensor):
            raise UserInputError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
        sources[key[len(keymap.SAT_PREFIX) :]] = SourceTensor(value.shape, value.dtype, lambda v=value: v)
    if not sources:
        top = key_names(map(str, sd)) if sd else "nothing"
        raise UserInputError(f"{path}: no DiT keys under '{keymap.SAT_PREFIX}' (found {top})")
    return sources, skipped


def _wan_sources(layout: SourceLayout) -> tuple[dict[str, SourceTensor], Counter]:
    from safetensors import safe_open

    sources: dict[str, SourceTensor] = {}
    for path in layout.transformer_files:
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise UserInputError(f"{path}: not a readable safetensors file ({e})") from None
        for key in handle.keys():
            name = key[len(keymap.WAN_OPTIONAL_PREFIX) :] if key.startswith(keymap.WAN_OPTIONAL_PREFIX) else key
            if name in sources:
                raise UserInputError(f"{path}: key {key} also appears in another shard")
            sl = handle.get_slice(key)
            dtype = TORCH_DTYPES[sl.get_dtype()]
            sources[name] = SourceTensor(sl.get_shape(), dtype, lambda h=handle, k=key: h.get_tensor(k))
    return sources, Counter()


def infer_transformer_config(shapes: Mapping[str, tuple[int, ...]], num_layers: int, attention_head_dim: int) -> dict:
    """KaleidoTransformer3DModel config from diffusers-named tensor shapes (head dim cannot be inferred)."""
    inner, in_channels, *patch = shapes["patch_embedding.weight"]
    if inner % attention_head_dim:
        raise UserInputError(f"--attention-head-dim {attention_head_dim}: does not divide the model width {inner}")
    return dict(
        patch_size=tuple(patch),
        num_attention_heads=inner // attention_head_dim,
        attention_head_dim=attention_head_dim,
        in_channels=in_channels,
        out_channels=shapes["proj_out.weight"][0] // math.prod(patch),
        text_dim=shapes["condition_embedder.text_embedder.linear_1.weight"][1],
        freq_dim=shapes["condition_embedder.time_embedder.linear_1.weight"][1],
        ffn_dim=shapes["blocks.0.ffn.net.0.proj.weight"][0],
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        ref_rope=REF_ROPE,
        ref_rope_offset=REF_ROPE_OFFSET,
    )


def plan_transformer(layout: SourceLayout, dtype=None, attention_head_dim: int = 128, trust_pickle: bool = False):
    """Load (memory-mapped), map and check the DiT; returns (LazyTensors, meta-device model, skipped-key counts)."""
    from ..transformer import KaleidoTransformer3DModel

    fmt = layout.format
    if fmt == "official":
        sources, skipped = _official_sources(layout, trust_pickle)
        prefix, where = keymap.SAT_PREFIX, layout.transformer_files[0]
    else:
        sources, skipped = _wan_sources(layout)
        prefix, where = "", layout.root
    num_layers = keymap.count_layers(sources, fmt)
    table = keymap.source_to_diffusers_table(fmt, num_layers)
    missing = [prefix + k for k in table if k not in sources]
    unexpected = [prefix + k for k in sources if k not in table]
    if unexpected:
        raise UserInputError(f"{where}: unexpected DiT keys {key_names(unexpected)} (not part of the Kaleido/Wan2.1 DiT)")
    if missing or num_layers == 0:
        raise UserInputError(f"{where}: missing DiT keys {key_names(missing or ['blocks'])}")
    targets = keymap.diffusers_to_source_table(fmt, num_layers)
    for src, dsts in table.items():
        if sources[src].shape[0] % len(dsts):
            raise UserInputError(
                f"{where}: {prefix + src} has {sources[src].shape[0]} rows, not divisible by {len(dsts)}"
            )
    tensors = lazy_from_mapping(sources, targets, dtype)
    shapes = {t.name: t.shape for t in tensors}
    for key in ("patch_embedding.weight", "proj_out.weight", "blocks.0.ffn.net.0.proj.weight"):
        if len(shapes[key]) < 2:
            raise UserInputError(f"{where}: {prefix + targets[key][0]} has shape {shapes[key]}, expected a matrix")
    config = infer_transformer_config(shapes, num_layers, attention_head_dim)
    with torch.device("meta"):
        model = KaleidoTransformer3DModel(**config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_against_model(
        shapes, expected, str(where), source_name=lambda k: prefix + targets[k][0] if k in targets else k
    )
    return tensors, model, skipped


# ------------------------------------------------------------------------------------------------- driver
def _component_summary(tensors: list[LazyTensor], shards: list[dict], **extra) -> dict:
    return dict(
        tensors=len(tensors),
        parameters=sum(t.numel for t in tensors),
        dtype=sorted({str(t.dtype).removeprefix("torch.") for t in tensors}),
        bytes=sum(s["bytes"] for s in shards),
        shards=shards,
        **extra,
    )


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)


def write_component(
    tensors, save_config, out: Path, weights_name: str, max_shard_bytes: int, desc: str, progress: bool, **extra
) -> dict:
    """config.json via `save_config(out)`, then the weights as streamed safetensors shards."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(out)
    with _progress_bar(sum(t.nbytes for t in tensors), desc, progress) as bar:
        shards = write_shards(tensors, out, weights_name, max_shard_bytes, progress=bar.update)
    return _component_summary(tensors, shards, **extra)


def _umt5_class():
    from transformers import UMT5EncoderModel

    return UMT5EncoderModel


def _model_index(components: dict[str, type]) -> dict:
    """model_index.json exactly as `KaleidoPipeline.save_pretrained` writes it (diffusers' own naming rule:
    a class outside diffusers/transformers is named by its module, e.g. `kaleido_s2v.transformer`)."""
    import diffusers
    from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple

    index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__}
    for name in ("scheduler", "text_encoder", "tokenizer", "transformer", "vae"):
        cls = components.get(name)
        index[name] = list(_fetch_class_library_tuple(cls)) if cls is not None else [None, None]
    return index


def convert(
    src: str | os.PathLike | SourceLayout,
    dst: str | os.PathLike,
    only=None,
    max_shard_size: str | int = "5GB",
    dtype: str = "keep",
    attention_head_dim: int = 128,
    trust_pickle: bool = False,
    src_format: str = "auto",
    progress: bool = True,
    t5_max_distance: int = 128,
    overwrite: bool = False,
) -> dict:
    """Convert a release folder into a diffusers pipeline folder at `dst`; returns the summary dict.

    `only`: subset of transformer,vae,text_encoder,tokenizer (default all). `dtype`: keep|bf16|fp16|fp32.
    `t5_max_distance`: umT5's relative_attention_max_distance (Wan's T5 uses 128; not stored in the weights).
    `dst` must be new, empty, or a folder an earlier conversion wrote (and nothing else since); `overwrite`
    replaces any folder.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .t5 import load_tokenizer, plan_text_encoder
    from .vae import plan_vae

    start = time.perf_counter()
    if dtype not in DTYPES:
        raise UserInputError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    max_shard_bytes = parse_size(max_shard_size)
    layout = src if isinstance(src, SourceLayout) else detect_source(src, only=only, src_format=src_format)
    components = layout.components
    dst = Path(dst).expanduser()
    if dst.resolve() == layout.root.resolve() or layout.root.resolve() in dst.resolve().parents:
        raise UserInputError(f"--dst {dst}: must be outside the source folder {layout.root}")
    if dst.resolve() in layout.root.resolve().parents:
        raise UserInputError(f"--dst {dst}: holds the source folder {layout.root}: choose a folder beside it")
    claim_folder(dst, "--dst", MADE_BY, overwrite=overwrite, replace=True)
    torch_dtype = DTYPES[dtype]

    # 1. Plan every component before writing anything: all strictness errors come first.
    plans = {}
    if "transformer" in components:
        plans["transformer"] = plan_transformer(layout, torch_dtype, attention_head_dim, trust_pickle)
    if "vae" in components:
        plans["vae"] = plan_vae(layout.vae_file, torch_dtype, trust_pickle)
    if "text_encoder" in components:
        plans["text_encoder"] = plan_text_encoder(layout.t5_file, torch_dtype, trust_pickle, t5_max_distance)
    if "tokenizer" in components:
        plans["tokenizer"] = load_tokenizer(layout.tokenizer_dir)

    # 2. Write into a temporary folder beside dst; rename at the end.
    planned = time.perf_counter()
    summary: dict = {
        "source": str(layout.root),
        "source_format": layout.format,
        "iteration": layout.iteration,
        "destination": str(dst),
        "dtype": dtype,
        "max_shard_size": max_shard_bytes,
        "components": {},
    }
    index: dict[str, type] = {}
    with atomic_path(dst, is_dir=True, made_by=MADE_BY, overwrite=overwrite) as tmp:
        if "transformer" in plans:
            tensors, model, skipped = plans["transformer"]
            summary["components"]["transformer"] = write_component(
                tensors,
                model.save_config,
                tmp / "transformer",
                "diffusion_pytorch_model",
                max_shard_bytes,
                "transformer",
                progress,
                skipped_keys=sum(skipped.values()),
                skipped_prefixes=dict(skipped),
                config=dict(model.config),
            )
            index["transformer"] = type(model)
        if "vae" in plans:
            tensors, model = plans["vae"]
            summary["components"]["vae"] = write_component(
                tensors, model.save_config, tmp / "vae", "diffusion_pytorch_model", max_shard_bytes, "vae", progress
            )
            index["vae"] = type(model)
        if "text_encoder" in plans:
            tensors, config = plans["text_encoder"]
            summary["components"]["text_encoder"] = write_component(
                tensors,
                config.save_pretrained,
                tmp / "text_encoder",
                "model",
                max_shard_bytes,
                "text_encoder",
                progress,
            )
            index["text_encoder"] = _umt5_class()
        if "tokenizer" in plans:
            tokenizer = plans["tokenizer"]
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
            files = sorted(p.name for p in (tmp / "tokenizer").iterdir())
            summary["components"]["tokenizer"] = {"class": type(tokenizer).__name__, "files": files}
            index["tokenizer"] = type(tokenizer)
        FlowMatchEulerDiscreteScheduler(shift=SHIFT).save_pretrained(tmp / "scheduler")
        index["scheduler"] = FlowMatchEulerDiscreteScheduler
        (tmp / "model_index.json").write_text(json.dumps(_model_index(index), indent=2) + "\n")
        now = time.perf_counter()
        summary["seconds"] = round(now - start, 3)
        summary["plan_seconds"] = round(planned - start, 3)  # imports, loading (mmap), checks
        summary["write_seconds"] = round(now - planned, 3)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def resolve_model_dir(path: str | os.PathLike, auto_convert: bool = False, cache_dir=None, label: str = "") -> Path:
    """Return a diffusers pipeline folder for `path`.

    - a diffusers pipeline folder (has `model_index.json`) is returned as is;
    - an official Kaleido (or original Wan2.1) release is converted into
      `<cache_dir>/<name>-<fingerprint>` when `auto_convert` (reused if already there; the cache root is
      `$KALEIDO_S2V_CACHE` or `~/.cache/kaleido-s2v/converted`), else `UserInputError` gives the exact
      `kaleido-s2v convert` command;
    - anything else is a `UserInputError` naming what was expected (`label`: the flag that named the folder).
    """
    root = Path(path).expanduser()
    if is_diffusers_pipeline(root):
        return root
    if not root.is_dir():
        raise UserInputError(
            f"{label}{root}: no such folder; expected a diffusers pipeline folder (with model_index.json) "
            f"or an official Kaleido release ({OFFICIAL_TREE})"
        )
    if guess_format(root) is None:
        raise UserInputError(
            f"{label}{root}: not a model folder; expected a diffusers pipeline folder (with model_index.json), "
            f"an official Kaleido release ({OFFICIAL_TREE}) or a Wan2.1 release ({WAN_TREE})"
        )
    layout = detect_source(root, label=label)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dst = cache_root / f"{root.resolve().name}-{source_fingerprint(layout)}"
    if is_diffusers_pipeline(dst):
        return dst
    if not auto_convert:
        raise UserInputError(
            f"{root} is an official release, not a diffusers folder; convert it once with: "
            f"kaleido-s2v convert --src {shlex.quote(str(root))} --dst {shlex.quote(str(dst))}"
            " (or allow conversion on the fly: auto_convert=True, or `generate --convert`)"
        )
    print(f"kaleido-s2v: converting {root} into {dst} (one time; reused afterwards)", file=sys.stderr)
    convert(layout, dst, progress=True)
    return dst
