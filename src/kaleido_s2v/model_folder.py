"""What a model folder is: resolving the folder a user named, checking it whole, and the facts it holds.

A diffusers pipeline folder holds `model_index.json` and one subfolder per component (`PIPELINE_FILES`). Every
config is parsed and every safetensors file's header read (a truncated, empty or corrupt file is found here, not
as a traceback deep in a loader), and a failure is one `UserInputError` naming the file and what was expected.
An official release folder is handed to `checkpoints.resolve_model_dir` (converted, or the `convert` command).
`facts` reads what the rest of the package needs to know of a folder — pipeline class, VAE strides, patch size,
the size multiple, generation defaults — from its configs, in one place. Nothing here touches the network: a name
that is not a local folder is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserInputError

# component -> what its folder must hold
PIPELINE_FILES = {
    "transformer": "config.json + diffusion_pytorch_model*.safetensors",
    "vae": "config.json + diffusion_pytorch_model*.safetensors",
    "text_encoder": "config.json + model*.safetensors",
    "image_encoder": "config.json + model*.safetensors",  # MAGREF / Wan image-to-video only
    "tokenizer": "tokenizer files",
    "scheduler": "scheduler_config.json",
}
EXPECTED = "model_index.json + " + ", ".join(f"{c}/" for c in PIPELINE_FILES if c != "image_encoder")
# Optional file in a model folder: generation defaults that replace the release's (`release.GENERATION_DEFAULTS`)
# for models trained otherwise (a model that only ever saw "" as its unconditional text should get "" as its
# negative prompt: an unseen negative prompt makes CFG push off the data).
GENERATION_DEFAULTS_FILE = "generation_defaults.json"
GENERATION_DEFAULT_KEYS = (
    "height", "width", "num_frames", "num_inference_steps", "guidance_scale", "fps", "max_sequence_length",
    "negative_prompt",
)


def _load_class(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Family:
    """A model family: the pipeline class that runs its folders, the module holding its release's facts
    (GENERATION_DEFAULTS, MAX_REFERENCES, MIN_FRAMES, REFERENCE_NOTE) and how the batch runner feeds it.
    A new family is one entry here plus its pipeline and release module."""

    name: str
    pipeline: str  # "module:Class"
    transformer: str  # "module:Class" of its transformer (what the trainer loads)
    release: str  # module with the release's facts
    components: tuple[str, ...]  # what its folders must hold
    fits_references: bool = True  # the batch runner fits each reference to the video size (False: the pipeline
    # composes them itself, as MAGREF's canvas)
    keyed_batch: bool = False  # batch lines are `key@@prompt@@img1@@img2`, the key naming the output (MAGREF's)
    options: tuple[str, ...] = ()  # its own pipeline arguments that `generate` passes (MAGREF: layout, layout_seed)

    def pipeline_class(self):
        return _load_class(self.pipeline)

    def transformer_class(self):
        return _load_class(self.transformer)

    def _fact(self, name: str):
        import importlib

        return getattr(importlib.import_module(self.release), name)

    @property
    def defaults(self) -> dict[str, Any]:
        return dict(self._fact("GENERATION_DEFAULTS"))

    @property
    def max_references(self) -> int:
        return self._fact("MAX_REFERENCES")

    @property
    def min_frames(self) -> int:
        return self._fact("MIN_FRAMES")

    @property
    def reference_note(self) -> str:
        return self._fact("REFERENCE_NOTE")


_BASE = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
KALEIDO = Family("kaleido", "kaleido_s2v.pipeline:KaleidoPipeline", "kaleido_s2v.transformer:KaleidoTransformer3DModel",
                 "kaleido_s2v.release", _BASE)
MAGREF = Family("magref", "kaleido_s2v.magref.pipeline:MagrefPipeline", "diffusers:WanTransformer3DModel",
                "kaleido_s2v.magref.release", (*_BASE, "image_encoder"), fits_references=False, keyed_batch=True, options=("layout", "layout_seed"))
# model_index.json _class_name -> family (diffusers' Wan image-to-video folders run as MAGREF: the same network)
FAMILIES = {"KaleidoPipeline": KALEIDO, "MagrefPipeline": MAGREF, "WanImageToVideoPipeline": MAGREF}


@dataclass(frozen=True)
class ModelFacts:
    """What a pipeline folder's configs say (the release's values where a config is silent)."""

    pipeline_class: str | None  # model_index.json's _class_name, e.g. "KaleidoPipeline"
    vae_stride: int  # spatial: 8 for Wan2.1 and the release, 4 for the built-in model
    vae_temporal_stride: int  # 4
    patch_size: tuple[int, int, int]  # the transformer's (t, h, w) patch
    generation_defaults: dict[str, Any]  # generation_defaults.json (only its known keys)

    @property
    def family(self) -> Family:
        """The family of the folder's pipeline class (a folder without one is Kaleido's)."""
        return FAMILIES.get(self.pipeline_class or "KaleidoPipeline", KALEIDO)

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The family release's sampling defaults, with the folder's generation_defaults.json over them."""
        return {**self.family.defaults, **self.generation_defaults}

    @property
    def size_multiple(self) -> int:
        """What video height and width must be multiples of: VAE stride x patch (16 for the release)."""
        return self.vae_stride * self.patch_size[1]


def _json_object(path: Path, flag: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"{flag}: {path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserInputError(f"{flag}: {path} is not valid JSON ({type(e).__name__}): restore or re-save it") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{flag}: {path} must hold a JSON object: restore or re-save it")
    return data


def check_safetensors(path: Path, flag: str) -> None:
    """The file's header parses and its data covers every tensor (safetensors checks both on open)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) for bad files
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserInputError(f"{flag}: {path} is not a complete safetensors file ({reason}): restore or re-save it") from None


def _check_weights(folder: Path, flag: str) -> None:
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        if any(folder.glob("*.bin")):
            return  # legacy PyTorch weights: the loader checks them
        raise UserInputError(f"{flag}: {folder}/ has no *.safetensors weights")
    for index in folder.glob("*.safetensors.index.json"):
        weight_map = _json_object(index, flag).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserInputError(f"{flag}: {index} has no weight_map: restore or re-save it")
        missing = sorted({str(v) for v in weight_map.values()} - {p.name for p in shards})
        if missing:
            raise UserInputError(f"{flag}: {folder}/ lacks the shards {', '.join(missing[:3])} named by {index.name}")
    for shard in shards:
        check_safetensors(shard, flag)


def check_component(root: Path, name: str, flag: str) -> None:
    """One component folder of a pipeline folder: present, configs parse, weights complete."""
    folder = root / name
    if not folder.is_dir():
        raise UserInputError(f"{flag} '{root}' is incomplete: missing {folder}/ ({PIPELINE_FILES[name]})")
    if name == "scheduler":
        _json_object(folder / "scheduler_config.json", flag)
    elif name == "tokenizer":
        files = [p for p in folder.iterdir() if p.is_file()]
        if not files:
            raise UserInputError(f"{flag} '{root}' is incomplete: {folder}/ has no tokenizer files")
        for p in files:
            if p.suffix == ".json":
                _json_object(p, flag)
    else:
        _json_object(folder / "config.json", flag)
        _check_weights(folder, flag)


def check_model_folder(path: str | os.PathLike, flag: str = "--model", *,
                       components="family", index: bool = True) -> Path:
    """Check a diffusers pipeline folder: the `components` it must hold ("family": those its pipeline class needs,
    None: those model_index.json names) and, with `index`, model_index.json."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserInputError(f"{flag} '{root}' does not exist: give a local diffusers-format folder ({EXPECTED})")
    if not root.is_dir():
        raise UserInputError(f"{flag} '{root}' is a file: give the folder that holds it ({EXPECTED})")
    if index:
        entries = _json_object(root / "model_index.json", flag)
        if components == "family":
            components = FAMILIES.get(entries.get("_class_name"), KALEIDO).components
        elif components is None:
            components = [c for c, v in entries.items() if isinstance(v, list) and v and v[0] is not None
                          and c in PIPELINE_FILES]
        missing = [c for c in components if not isinstance(entries.get(c), list) or entries[c][0] is None]
        if missing:
            raise UserInputError(f"{flag} '{root}': model_index.json has no entry for {', '.join(missing)}")
    if components == "family":  # no model_index.json read: Kaleido's
        components = KALEIDO.components
    for name in components or ():
        check_component(root, name, flag)
    if (root / GENERATION_DEFAULTS_FILE).exists():
        _json_object(root / GENERATION_DEFAULTS_FILE, flag)
    return root


def _config(path: Path) -> dict:
    return _json_object(path, "model folder") if path.is_file() else {}


def facts(model_dir: str | os.PathLike) -> ModelFacts:
    """The facts of a pipeline folder (checked or not: a missing config gives the release's values)."""
    root = Path(model_dir)
    vae, transformer = _config(root / "vae" / "config.json"), _config(root / "transformer" / "config.json")
    return ModelFacts(
        pipeline_class=_config(root / "model_index.json").get("_class_name"),
        vae_stride=int(vae.get("scale_factor_spatial", 8)),
        vae_temporal_stride=int(vae.get("scale_factor_temporal", 4)),
        patch_size=tuple(int(p) for p in transformer.get("patch_size", (1, 2, 2))),
        generation_defaults={k: v for k, v in _config(root / GENERATION_DEFAULTS_FILE).items()
                             if k in GENERATION_DEFAULT_KEYS},
    )


def generation_defaults(model_dir: str | os.PathLike | None) -> dict[str, Any]:
    """A folder's generation_defaults.json (its known keys), {} for none."""
    return {} if model_dir is None else facts(model_dir).generation_defaults


def vae_stride(model_dir: str | os.PathLike) -> int:
    return facts(model_dir).vae_stride


def size_multiple(model_dir: str | os.PathLike | None) -> int:
    """`ModelFacts.size_multiple`; None (no folder: the random-weight stand-in, or the release) gives 16."""
    return 16 if model_dir is None else facts(model_dir).size_multiple


def resolve_model_folder(path: str | os.PathLike, flag: str = "--model", *, auto_convert: bool = False,
                         components="family") -> Path:
    """The checked diffusers pipeline folder for what the user named (an official release: see module doc)."""
    root = Path(path).expanduser()
    if root.is_dir() and not (root / "model_index.json").exists():
        from .checkpoints import resolve_model_dir

        root = Path(resolve_model_dir(root, auto_convert=auto_convert, label=f"{flag} "))
    return check_model_folder(root, flag, components=components)


def load_pipeline(root, flag: str = "--model", **kwargs):
    """The pipeline of a checked folder (its family's class, `from_pretrained`), a loader's error as one line
    naming `flag` (`loading`)."""
    cls = facts(root).family.pipeline_class()
    with loading(root, flag):
        return cls.from_pretrained(root, **kwargs)


def load_text_encoder(root, flag: str = "--model", device="cpu", dtype=None):
    """(tokenizer, text encoder) of a checked folder, the classes its model_index.json names (transformers'),
    frozen, on `device`: to encode prompts before (or without) the rest of the pipeline."""
    import transformers

    root = Path(root)
    entries = _config(root / "model_index.json")
    classes = {name: getattr(transformers, (entries.get(name) or [None, None])[1] or default)
               for name, default in (("tokenizer", "AutoTokenizer"), ("text_encoder", "UMT5EncoderModel"))}
    with loading(root / "tokenizer", flag):
        tokenizer = classes["tokenizer"].from_pretrained(root / "tokenizer")
    with loading(root / "text_encoder", flag):
        text_encoder = classes["text_encoder"].from_pretrained(root / "text_encoder", **({"dtype": dtype} if dtype else {}))
    return tokenizer, text_encoder.to(device).eval().requires_grad_(False)


@contextlib.contextmanager
def loading(folder: Path, flag: str = "--model") -> Iterator[None]:
    """A loader's error on a checked folder (e.g. a config that parses but does not fit the class): one line."""
    import torch

    try:
        yield
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:  # diffusers/transformers loader errors
        if isinstance(e, (UserInputError, torch.OutOfMemoryError)):
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise UserInputError(f"{flag}: {folder} cannot be loaded ({type(e).__name__}: "
                             f"{lines[0][:200] if lines else ''}): restore or re-save it") from None
