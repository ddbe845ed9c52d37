"""Which folder is which: official Kaleido release, original Wan2.1 (T2V) release, a Wan2.1 image-to-video release
such as MAGREF's, or a diffusers pipeline.

`detect_source` validates a release folder and returns a `SourceLayout` naming every file the converter will
read; a missing or malformed folder is a `UserInputError` that says which files were expected where.
(`converter.resolve_model_dir` accepts an official folder where a pipeline folder is expected: converted into a
cache folder, or the exact `convert` command.)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserInputError

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")
# A Wan2.1 image-to-video release (MAGREF) also has the CLIP image encoder
MAGREF_COMPONENTS = (*COMPONENTS, "image_encoder")

# Official Kaleido-14B-S2V release (reference/kaleido-official.md §5.1)
OFFICIAL_LATEST = "model/latest"
OFFICIAL_MODEL_STATES = "model/{iteration}/mp_rank_00_model_states.pt"
VAE_FILE = "Wan2.1_VAE.pth"
OFFICIAL_T5_DIR = "umt5-xxl"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
# Original Wan2.1 release (e.g. Wan2.1-T2V-14B): DiT safetensors shards + the same VAE/T5 files
WAN_SHARD_GLOB = "diffusion_pytorch_model*.safetensors"
WAN_TOKENIZER_DIR = "google/umt5-xxl"
WAN_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# Wan2.1 image-to-video release (MAGREF-Video/MAGREF, reference/magref-official.md §1; Wan2.1-I2V-14B has the same
# files): the Wan2.1 files + config.json saying model_type "i2v" + Wan's open-clip ViT-H/14
WAN_CONFIG = "config.json"
I2V_MODEL_TYPE = "i2v"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
# Files that make a folder loadable by AutoTokenizer (umT5 ships a sentencepiece model and/or tokenizer.json)
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json")

OFFICIAL_TREE = (
    f"{OFFICIAL_LATEST} (text: iteration), {OFFICIAL_MODEL_STATES.format(iteration='<iteration>')}, "
    f"{VAE_FILE}, {OFFICIAL_T5_DIR}/{T5_FILE} + tokenizer files"
)
WAN_TREE = f"{WAN_SHARD_GLOB} (+ .index.json), {VAE_FILE}, {T5_FILE}, {WAN_TOKENIZER_DIR}/ tokenizer files"
MAGREF_TREE = (
    f"{WAN_CONFIG} (model_type: {I2V_MODEL_TYPE}), {WAN_SHARD_GLOB} + {WAN_INDEX}, {VAE_FILE}, {T5_FILE}, "
    f"{CLIP_FILE}, {WAN_TOKENIZER_DIR}/ tokenizer files"
)
FORMATS = ("official", "wan", "magref")


@dataclass
class SourceLayout:
    """The files of one release folder that the converter reads (None where a component is not requested)."""

    root: Path
    format: str  # "official" | "wan" | "magref"
    components: tuple[str, ...] = COMPONENTS
    transformer_files: list[Path] = field(default_factory=list)
    vae_file: Path | None = None
    t5_file: Path | None = None
    tokenizer_dir: Path | None = None
    iteration: str | None = None
    clip_file: Path | None = None  # magref: the CLIP image encoder
    config_file: Path | None = None  # magref: the DiT's config.json (read into `config`)
    config: dict | None = None
    index_file: Path | None = None  # magref: the shard index (read into `weight_map`: key -> shard file name)
    weight_map: dict[str, str] | None = None

    def files(self) -> list[Path]:
        out = list(self.transformer_files)
        out += [p for p in (self.config_file, self.index_file) if p is not None]
        out += [p for p in (self.vae_file, self.t5_file, self.clip_file) if p is not None]
        if self.tokenizer_dir is not None:
            out += sorted(p for p in self.tokenizer_dir.iterdir() if p.is_file() and p.suffix != ".pth")
        return out


def is_diffusers_pipeline(path: str | os.PathLike) -> bool:
    return (Path(path) / "model_index.json").is_file()


def _looks_official(root: Path) -> bool:  # (a `latest` file: the user named the release's model/ folder)
    return (root / "model").is_dir() or (root / OFFICIAL_T5_DIR).is_dir() or (root / "latest").is_file()


def _looks_wan(root: Path) -> bool:
    return any(root.glob(WAN_SHARD_GLOB))


def _model_type(root: Path) -> str | None:
    """config.json's `model_type` (None when there is no readable config.json object)."""
    try:
        config = json.loads((root / WAN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def guess_format(root: str | os.PathLike) -> str | None:
    """'official', 'magref' (a Wan2.1 image-to-video release: config.json says model_type "i2v"), 'wan' or None
    (none of them), from the folder's file names (and config.json's model_type) only."""
    root = Path(root)
    if not root.is_dir():
        return None
    if _looks_official(root):
        return "official"
    if _model_type(root) == I2V_MODEL_TYPE:
        return "magref"
    if _looks_wan(root):
        return "wan"
    return None


def format_components(fmt: str) -> tuple[str, ...]:
    """The components a release of format `fmt` converts into."""
    return MAGREF_COMPONENTS if fmt == "magref" else COMPONENTS


def _parse_components(only, allowed: tuple[str, ...] = COMPONENTS) -> tuple[str, ...]:
    if only is None:
        return allowed
    if isinstance(only, str):
        only = [s.strip() for s in only.split(",") if s.strip()]
    bad = [c for c in only if c not in allowed]
    if bad or not only:
        raise UserInputError(f"--only {','.join(only)}: choose a comma-separated subset of {','.join(allowed)}")
    return tuple(c for c in allowed if c in only)


def _json_object(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserInputError(f"{path}: not a readable JSON file ({e}); expected {what}") from None
    if not isinstance(obj, dict):
        raise UserInputError(f"{path}: a JSON {type(obj).__name__}, expected {what}")
    return obj


def _i2v_transformer_files(root: Path, layout: SourceLayout, missing: list[str], label: str) -> None:
    """config.json (model_type i2v) and the shards the index names, every one present and no other."""
    config_file = root / WAN_CONFIG
    if not config_file.is_file():
        missing.append(f"{config_file} (the DiT config, model_type: {I2V_MODEL_TYPE})")
    else:
        config = _json_object(config_file, f"the Wan DiT config (model_type: {I2V_MODEL_TYPE})")
        if config.get("model_type") != I2V_MODEL_TYPE:
            raise UserInputError(
                f"{label}{config_file}: model_type is {config.get('model_type')!r}, expected {I2V_MODEL_TYPE!r} "
                "(a Wan2.1 image-to-video DiT, as MAGREF's); for a Wan2.1 T2V release use --src-format wan"
            )
        layout.config_file, layout.config = config_file, config
    shards = sorted(root.glob(WAN_SHARD_GLOB))
    index_file = root / WAN_INDEX
    if not index_file.is_file():
        if not shards:
            missing.append(f"{root}/{WAN_SHARD_GLOB}")
        layout.transformer_files = shards  # one unsharded file, or shards without an index
        return
    weight_map = _json_object(index_file, "a safetensors index with a 'weight_map'").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(k, str) and isinstance(v, str) and "/" not in v for k, v in weight_map.items()
    ):
        raise UserInputError(f"{label}{index_file}: no 'weight_map' of key -> shard file name")
    named = sorted(set(weight_map.values()))
    absent = [name for name in named if not (root / name).is_file()]
    if absent:
        missing.append(f"{', '.join(str(root / n) for n in absent)} (named by {index_file.name})")
    stray = [p.name for p in shards if p.name not in named]
    if stray:
        raise UserInputError(
            f"{label}{root}: {', '.join(stray)} not named by {index_file.name} (a shard of another download?)"
        )
    layout.index_file, layout.weight_map = index_file, weight_map
    layout.transformer_files = [root / n for n in named]


def _tokenizer_ok(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def detect_source(src: str | os.PathLike, only=None, src_format: str = "auto", label: str = "--src ") -> SourceLayout:
    """Validate a release folder and return its `SourceLayout`; `UserInputError` names every missing file.

    `label` prefixes error messages (the CLI flag that named the folder)."""
    root = Path(src).expanduser()
    if root.is_file():
        raise UserInputError(f"{label}{root}: is a file; give the release folder that holds it "
                             f"(e.g. {root.parent}), laid out as {OFFICIAL_TREE}")
    if not root.is_dir():
        raise UserInputError(f"{label}{root}: no such folder; expected an official Kaleido release ({OFFICIAL_TREE})")
    if (root / "latest").is_file() and (root.parent / OFFICIAL_LATEST).is_file():
        raise UserInputError(f"{label}{root}: this is the release's model/ folder; pass its parent {root.parent}")
    fmt = guess_format(root) if src_format == "auto" else src_format
    if fmt not in FORMATS:
        if is_diffusers_pipeline(root):
            raise UserInputError(
                f"{label}{root}: already a diffusers pipeline folder (model_index.json); no conversion"
            )
        raise UserInputError(
            f"{label}{root}: not a Kaleido release (expected {OFFICIAL_TREE}), "
            f"a Wan2.1 release (expected {WAN_TREE}) nor a MAGREF / Wan2.1 image-to-video release "
            f"(expected {MAGREF_TREE})"
        )
    components = _parse_components(only, format_components(fmt))

    layout = SourceLayout(root=root, format=fmt, components=components)
    missing: list[str] = []
    if fmt == "official":
        t5_dir = root / OFFICIAL_T5_DIR
        tok_dir = t5_dir
        if "transformer" in components:
            latest = root / OFFICIAL_LATEST
            if not latest.is_file():
                missing.append(f"{latest} (a text file with the iteration number)")
            else:
                iteration = latest.read_text(encoding="utf-8", errors="replace").strip()
                states = root / OFFICIAL_MODEL_STATES.format(iteration=iteration)
                if not iteration or "/" in iteration or not states.is_file():
                    missing.append(f"{states} (named by {latest}: {iteration!r})")
                else:
                    layout.iteration = iteration
                    layout.transformer_files = [states]
    elif fmt == "wan":
        t5_dir = root
        tok_dir = root / WAN_TOKENIZER_DIR
        if "transformer" in components:
            shards = sorted(root.glob(WAN_SHARD_GLOB))
            if not shards:
                missing.append(f"{root}/{WAN_SHARD_GLOB}")
            layout.transformer_files = shards
    else:
        t5_dir = root
        tok_dir = root / WAN_TOKENIZER_DIR
        if "transformer" in components:
            _i2v_transformer_files(root, layout, missing, label)
        if "image_encoder" in components:
            layout.clip_file = root / CLIP_FILE
            if not layout.clip_file.is_file():
                missing.append(f"{layout.clip_file} (Wan's open-clip XLM-RoBERTa ViT-H/14)")
    if "vae" in components:
        layout.vae_file = root / VAE_FILE
        if not layout.vae_file.is_file():
            missing.append(str(layout.vae_file))
    if "text_encoder" in components:
        layout.t5_file = t5_dir / T5_FILE
        if not layout.t5_file.is_file():
            missing.append(str(layout.t5_file))
    if "tokenizer" in components:
        layout.tokenizer_dir = tok_dir
        if not _tokenizer_ok(tok_dir):
            missing.append(f"{tok_dir}/ with tokenizer files ({' or '.join(TOKENIZER_FILES)})")
    if missing:
        what = {"official": "official Kaleido release", "wan": "Wan2.1 release"}.get(
            fmt, "MAGREF / Wan2.1 image-to-video release"
        )
        raise UserInputError(
            f"{label}{root}: incomplete {what}; missing {'; '.join(missing)} "
            f"(use --only to convert a subset of {','.join(format_components(fmt))})"
        )
    return layout


def source_fingerprint(layout: SourceLayout) -> str:
    """A short hash of the iteration and every source file's relative path and size (cache key)."""
    h = hashlib.sha256()
    h.update(f"{layout.format}:{layout.iteration}".encode())
    for p in layout.files():
        h.update(f"\n{p.relative_to(layout.root)}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    env = os.environ.get("KALEIDO_S2V_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kaleido-s2v" / "converted"
