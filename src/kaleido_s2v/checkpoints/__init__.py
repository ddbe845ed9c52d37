"""Official Kaleido / Wan2.1 / MAGREF checkpoints → diffusers format.

- `resolve_model_dir(path, auto_convert=False, cache_dir=None)`: a diffusers folder for any model folder.
- `convert(src, dst, ...)`: streaming, strict, atomic conversion of a release folder (see `converter.py`).
- `keymap`: the one adapter owning SAT ↔ Wan (T2V, I2V) ↔ diffusers DiT weight names, both directions
  (`t5`, `vae`, `clip`: the encoders' renamings).
- `load_torch_file(path, trust_pickle=False)`: `torch.load(weights_only=True, mmap=True)` with a small allowlist.
"""

from .layout import SourceLayout, default_cache_dir, detect_source, is_diffusers_pipeline

__all__ = [
    "SourceLayout",
    "convert",
    "default_cache_dir",
    "detect_source",
    "is_diffusers_pipeline",
    "load_torch_file",
    "resolve_model_dir",
]


def __getattr__(name):  # heavy modules (torch, diffusers) load only when used
    if name in ("convert", "resolve_model_dir"):
        from . import converter

        return getattr(converter, name)
    if name == "load_torch_file":
        from .safe_load import load_torch_file

        return load_torch_file
    raise AttributeError(f"module 'kaleido_s2v.checkpoints' has no attribute {name!r}")
