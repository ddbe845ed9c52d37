"""kaleido-s2v: multi-subject reference-to-video generation (Kaleido), diffusers-native.

Public names are imported lazily so that `kaleido-s2v --help` and light tools stay fast.
"""

import os
from importlib import import_module

# onnxruntime (pulled in by diffusers' loader whenever it is installed) reports telemetry to a Microsoft host
# ~9 s after import unless this is set before that import; nothing in this package may touch the network.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"


def library_versions() -> dict[str, str]:
    """Versions of this package and the libraries its results depend on (recorded in sidecars and reports)."""
    import diffusers
    import torch
    import transformers

    return {"kaleido_s2v": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}

# public name -> module that defines it
_EXPORTS = {
    "KaleidoTransformer3DModel": "kaleido_s2v.transformer",
    "KaleidoRotaryPosEmbed": "kaleido_s2v.rope",
    "REF_ROPE_VARIANTS": "kaleido_s2v.rope",
    "token_positions": "kaleido_s2v.rope",
    "KaleidoPipeline": "kaleido_s2v.pipeline",
    "fit_reference": "kaleido_s2v.references",
    "load_reference": "kaleido_s2v.references",
    "official_sigmas": "kaleido_s2v.release",
    "resolve_model_dir": "kaleido_s2v.checkpoints",
    "curate": "kaleido_s2v.curation",
    "evaluate": "kaleido_s2v.evaluation",
    "read_cases": "kaleido_s2v.evaluation",
    "read_models": "kaleido_s2v.evaluation",
    "KaleidoPipelineOutput": "kaleido_s2v.pipeline",
    "MagrefPipeline": "kaleido_s2v.magref.pipeline",
    "compose_references": "kaleido_s2v.magref.canvas",
    "KALEIDO_NEGATIVE_PROMPT": "kaleido_s2v.release",
    "load_builtin_pipeline": "kaleido_s2v.builtin",
    "read_video": "kaleido_s2v.video_io",
    "write_video": "kaleido_s2v.video_io",
    "UserInputError": "kaleido_s2v.errors",
    "enhance_prompt": "kaleido_s2v.prompts",
}

__all__ = sorted(_EXPORTS) + ["__version__", "library_versions"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kaleido_s2v' has no attribute {name!r}")


def __dir__():
    return __all__
