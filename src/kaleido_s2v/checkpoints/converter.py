"""Streaming, strict, atomic conversion of an official Kaleido (or Wan2.1, or MAGREF) release to a diffusers folder.

Each component is planned first — every source tensor named, mapped, shape-checked against the target
class built on the meta device — and only then written, tensor by tensor, into safetensors shards
(`shards.py`). Source files are memory-mapped (`safe_load.py`), so anonymous memory stays at about one tensor
(plus a dtype conversion), whatever the checkpoint size. Everything is built in a temporary folder beside
`dst` and renamed at the end; `conversion_summary.json` records what was written.

A Kaleido or Wan2.1 (T2V) release becomes a `KaleidoPipeline` folder; a MAGREF release (a Wan2.1 image-to-video
checkpoint: config.json says model_type "i2v") a `MagrefPipeline` folder with diffusers' own
`WanTransformer3DModel`, the CLIP visual tower as `CLIPVisionModel` (`clip.py`) and the release's flow UniPC.
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
    MAGREF_TREE,
    OFFICIAL_TREE,
    WAN_TREE,
    SourceLayout,
    default_cache_dir,
    detect_source,
    format_components,
    guess_format,
    is_diffusers_pipeline,
    source_fingerprint,
)
from .plan import SourceTensor, check_against_model, key_names, lazy_from_mapping
from .shards import TORCH_DTYPES, LazyTensor, parse_size, write_shards

DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SUMMARY_FILE = "conversion_summary.json"
PIPELINE_CLASS = "KaleidoPipeline"
PIPELINE_CLASSES = {"official": PIPELINE_CLASS, "wan": PIPELINE_CLASS, "magref": "MagrefPipeline"}
MADE_BY = "kaleido-s2v convert"
DEFAULT_HEAD_DIM = 128  # Kaleido-14B, Wan2.1 14B and 1.3B (not stored in the weights)


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
    found: set[str] = set()
    for path in layout.transformer_files:
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise UserInputError(f"{path}: not a readable safetensors file ({e})") from None
        for key in handle.keys():
            name = key[len(keymap.WAN_OPTIONAL_PREFIX) :] if key.startswith(keymap.WAN_OPTIONAL_PREFIX) else key
            if name in sources:
                raise UserInputError(f"{path}: key {key} also appears in another shard")
            if layout.weight_map is not None and layout.weight_map.get(key) != path.name:
                where = layout.weight_map.get(key)
                index = layout.index_file.name
                raise UserInputError(
                    f"{path}: key {key} " + (f"is not named by {index}" if where is None else f"is in {index} as {where}'s")
                )
            found.add(key)
            sl = handle.get_slice(key)
            dtype = TORCH_DTYPES[sl.get_dtype()]
            sources[name] = SourceTensor(sl.get_shape(), dtype, lambda h=handle, k=key: h.get_tensor(k))
    if layout.weight_map is not None:  # every key the index names was found (in its shard: checked above)
        absent = [k for k in layout.weight_map if k not in found]
        if absent:
            raise UserInputError(f"{layout.index_file}: names keys its shards lack: {key_names(absent)}")
    return sources, Counter()


def _wan_config(shapes: Mapping[str, tuple[int, ...]], num_layers: int, attention_head_dim: int) -> dict:
    """The Wan DiT config shared by Kaleido and diffusers' Wan, from diffusers-named shapes (head dim given)."""
    inner, in_channels, *patch = shapes["patch_embedding.weight"]
    if attention_head_dim <= 0 or inner % attention_head_dim:
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
    )


def infer_transformer_config(shapes: Mapping[str, tuple[int, ...]], num_layers: int, attention_head_dim: int) -> dict:
    """KaleidoTransformer3DModel config from diffusers-named tensor shapes (head dim cannot be inferred)."""
    return dict(_wan_config(shapes, num_layers, attention_head_dim), ref_rope=REF_ROPE, ref_rope_offset=REF_ROPE_OFFSET)


def infer_wan_i2v_config(shapes: Mapping[str, tuple[int, ...]], num_layers: int, attention_head_dim: int) -> dict:
    """diffusers WanTransformer3DModel (image-to-video) config from diffusers-named shapes: the Wan config plus the
    CLIP branch (`image_dim`: the CLIP width; `added_kv_proj_dim`: the width the image K/V read, the inner dim)."""
    return dict(
        _wan_config(shapes, num_layers, attention_head_dim),
        image_dim=shapes["condition_embedder.image_embedder.ff.net.0.proj.weight"][1],
        added_kv_proj_dim=shapes["blocks.0.attn2.add_k_proj.weight"][1],
    )


# config.json of a Wan release (WanModel's arguments) -> the diffusers config value it must equal
_WAN_CONFIG_FIELDS = {
    "dim": lambda c: c["num_attention_heads"] * c["attention_head_dim"],
    "in_dim": lambda c: c["in_channels"],
    "out_dim": lambda c: c["out_channels"],
    "ffn_dim": lambda c: c["ffn_dim"],
    "freq_dim": lambda c: c["freq_dim"],
    "text_dim": lambda c: c["text_dim"],
    "num_layers": lambda c: c["num_layers"],
    "num_heads": lambda c: c["num_attention_heads"],
    "patch_size": lambda c: list(c["patch_size"]),
    "eps": lambda c: c["eps"],
    "qk_norm": lambda c: True,
    "cross_attn_norm": lambda c: c["cross_attn_norm"],
    "window_size": lambda c: [-1, -1],  # global attention (diffusers' Wan has no local window)
}


def check_wan_config(release_config: Mapping, config: Mapping, where) -> None:
    """The release's config.json must agree with the config read from the weights (each field it has)."""
    bad = []
    for name, value in _WAN_CONFIG_FIELDS.items():
        if name in release_config:
            got = release_config[name]
            got = list(got) if isinstance(got, (list, tuple)) else got
            if got != value(config):
                bad.append(f"{name} is {release_config[name]!r} but the weights give {value(config)!r}")
    if bad:
        hint = " (--attention-head-dim sets the heads)" if any(b.startswith("num_heads") for b in bad) else ""
        raise UserInputError(f"{where}: {'; '.join(bad)}{hint}")


def _head_dim(layout: SourceLayout, inner: int, attention_head_dim: int | None) -> int:
    """The option if given; else the release config's width / num_heads (MAGREF's config.json), else 128."""
    if attention_head_dim is not None:
        return attention_head_dim
    if layout.config is None or "num_heads" not in layout.config:
        return DEFAULT_HEAD_DIM
    heads = layout.config["num_heads"]
    if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0 or inner % heads:
        raise UserInputError(f"{layout.config_file}: num_heads {heads!r} does not divide the model width {inner}")
    return inner // heads


def plan_transformer(
    layout: SourceLayout, dtype=None, attention_head_dim: int | None = None, trust_pickle: bool = False
):
    """Load (memory-mapped), map and check the DiT; returns (LazyTensors, meta-device model, skipped-key counts).

    Kaleido / Wan2.1 T2V -> KaleidoTransformer3DModel; MAGREF (Wan2.1 I2V) -> diffusers WanTransformer3DModel.
    `attention_head_dim` None: from the release's config.json (MAGREF), else 128."""
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
        what = "the Wan2.1 image-to-video DiT" if fmt == "magref" else "the Kaleido/Wan2.1 DiT"
        raise UserInputError(f"{where}: unexpected DiT keys {key_names(unexpected)} (not part of {what})")
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
    matrices = ["patch_embedding.weight", "proj_out.weight", "blocks.0.ffn.net.0.proj.weight"]
    if fmt == "magref":
        matrices += ["condition_embedder.image_embedder.ff.net.0.proj.weight", "blocks.0.attn2.add_k_proj.weight"]
    for key in matrices:
        if len(shapes[key]) < 2:
            raise UserInputError(f"{where}: {prefix + targets[key][0]} has shape {shapes[key]}, expected a matrix")
    head_dim = _head_dim(layout, shapes["patch_embedding.weight"][0], attention_head_dim)
    if fmt == "magref":
        from diffusers import WanTransformer3DModel as model_class

        config = infer_wan_i2v_config(shapes, num_layers, head_dim)
    else:
        from ..transformer import KaleidoTransformer3DModel as model_class

        config = infer_transformer_config(shapes, num_layers, head_dim)
    if layout.config is not None:
        check_wan_config(layout.config, config, layout.config_file)
    with torch.device("meta"):
        model = model_class(**config)
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


def _clip_vision_class():
    from transformers import CLIPVisionModel

    return CLIPVisionModel


def _model_index(components: dict[str, type], pipeline_class: str = PIPELINE_CLASS,
                 names=("scheduler", "text_encoder", "tokenizer", "transformer", "vae")) -> dict:
    """model_index.json exactly as `<pipeline_class>.save_pretrained` writes it: every component of `names` (sorted,
    as diffusers writes them), `[null, null]` where not converted; diffusers' own naming rule: a class outside
    diffusers/transformers is named by its module, e.g. `kaleido_s2v.transformer`."""
    import diffusers
    from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple

    index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__}
    for name in sorted(names):
        cls = components.get(name)
        index[name] = list(_fetch_class_library_tuple(cls)) if cls is not None else [None, None]
    return index


def _scheduler(fmt: str):
    """The release's scheduler and a one-line description of it."""
    if fmt == "magref":
        from ..magref.release import magref_scheduler

        scheduler = magref_scheduler()
        return scheduler, f"{type(scheduler).__name__}(flow_shift={scheduler.config.flow_shift})"
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=SHIFT), f"FlowMatchEulerDiscreteScheduler(shift={SHIFT})"


def convert(
    src: str | os.PathLike | SourceLayout,
    dst: str | os.PathLike,
    only=None,
    max_shard_size: str | int = "5GB",
    dtype: str = "keep",
    attention_head_dim: int | None = None,
    trust_pickle: bool = False,
    src_format: str = "auto",
    progress: bool = True,
    t5_max_distance: int = 128,
    overwrite: bool = False,
    image_encoder_head_dim: int | None = None,
) -> dict:
    """Convert a release folder into a diffusers pipeline folder at `dst`; returns the summary dict.

    `only`: subset of transformer,vae,text_encoder,tokenizer (+ image_encoder for MAGREF; default all).
    `dtype`: keep|bf16|fp16|fp32. `attention_head_dim`: the DiT's head dim (not in the weights; default: from
    MAGREF's config.json num_heads, else 128). `image_encoder_head_dim`: the CLIP ViT's head dim (default 80:
    ViT-H/14's 16 heads of width 1280). `t5_max_distance`: umT5's relative_attention_max_distance (Wan's T5 uses
    128; not stored in the weights). `dst` must be new, empty, or a folder an earlier conversion wrote (and
    nothing else since); `overwrite` replaces any folder.
    """
    from .clip import HEAD_DIM, plan_image_encoder
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
    if "image_encoder" in components:
        plans["image_encoder"] = plan_image_encoder(
            layout.clip_file, torch_dtype, trust_pickle, HEAD_DIM if image_encoder_head_dim is None else image_encoder_head_dim
        )
    scheduler, scheduler_text = _scheduler(layout.format)
    pipeline_class = PIPELINE_CLASSES[layout.format]

    # 2. Write into a temporary folder beside dst; rename at the end.
    planned = time.perf_counter()
    summary: dict = {
        "source": str(layout.root),
        "source_format": layout.format,
        "pipeline": pipeline_class,
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
        if "image_encoder" in plans:
            tensors, config, skipped = plans["image_encoder"]
            summary["components"]["image_encoder"] = write_component(
                tensors,
                config.save_pretrained,
                tmp / "image_encoder",
                "model",
                max_shard_bytes,
                "image_encoder",
                progress,
                skipped_keys=sum(skipped.values()),
                skipped_prefixes=dict(skipped),
            )
            index["image_encoder"] = _clip_vision_class()
        scheduler.save_pretrained(tmp / "scheduler")
        index["scheduler"] = type(scheduler)
        summary["scheduler"] = scheduler_text
        model_index = _model_index(index, pipeline_class, ("scheduler", *format_components(layout.format)))
        (tmp / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
        now = time.perf_counter()
        summary["seconds"] = round(now - start, 3)
        summary["plan_seconds"] = round(planned - start, 3)  # imports, loading (mmap), checks
        summary["write_seconds"] = round(now - planned, 3)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def resolve_model_dir(path: str | os.PathLike, auto_convert: bool = False, cache_dir=None, label: str = "") -> Path:
    """Return a diffusers pipeline folder for `path`.

    - a diffusers pipeline folder (has `model_index.json`) is returned as is;
    - an official Kaleido (or original Wan2.1, or MAGREF) release is converted into
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
            f"an official Kaleido release ({OFFICIAL_TREE}), a Wan2.1 release ({WAN_TREE}) or a MAGREF release "
            f"({MAGREF_TREE})"
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
