"""The built-in small model: where its weights live, how to load it, and a default reference image.

The trained small model ships as a diffusers folder in the package (`kaleido_s2v/toy/weights/`, made by the
recipe in `toy/recipe.yaml`, docs/toy.md). Where the folder is missing, `load_builtin_pipeline` builds the
tiny components of `kaleido_s2v.tiny` (random weights) and warns, so the command line still runs end to end.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

BUILTIN_WEIGHTS_DIR = Path(__file__).resolve().parent / "toy" / "weights"
# Sizes for the random-weight stand-in: small enough to run in seconds on a laptop CPU.
TINY_GENERATION_DEFAULTS = dict(height=128, width=224, num_frames=17, num_inference_steps=8, guidance_scale=6.0, fps=16)


def builtin_model_dir() -> Path | None:
    """The shipped diffusers folder of the built-in model, or None when it is missing."""
    return BUILTIN_WEIGHTS_DIR if (BUILTIN_WEIGHTS_DIR / "model_index.json").is_file() else None


def builtin_generation_defaults() -> dict[str, Any]:
    """Sizes and steps to use with the built-in model (its `generation_defaults.json` over the tiny defaults)."""
    from .model_folder import generation_defaults

    return {**TINY_GENERATION_DEFAULTS, **generation_defaults(builtin_model_dir())}


def builtin_model_description() -> str:
    model_dir = builtin_model_dir()
    return str(model_dir) if model_dir is not None else "builtin:tiny-random"


def load_builtin_pipeline(dtype=None):
    """The built-in model as a `KaleidoPipeline`.

    The shipped trained folder when present; otherwise `KaleidoPipeline(**tiny_components(seed=0))` with a
    warning — its videos come from random weights.
    """
    from .pipeline import KaleidoPipeline

    model_dir = builtin_model_dir()
    if model_dir is not None:
        from .model_folder import load_pipeline

        return load_pipeline(model_dir, "the built-in model", **({} if dtype is None else {"dtype": dtype}))

    from .tiny import tiny_components

    logger.warning(
        f"The built-in model's trained weights are missing ({BUILTIN_WEIGHTS_DIR}): using tiny RANDOM weights, "
        "so the video shows noise-like patterns, not your prompt. Pass --model DIR for a real model."
    )
    pipe = KaleidoPipeline(**tiny_components(seed=0))
    if dtype is not None and dtype != pipe.transformer.dtype:
        pipe.to(dtype=dtype)
    return pipe


def default_reference_image(size: int = 256) -> Image.Image:
    """The built-in model's default reference (no file needed): a red striped circle on white, from its world."""
    from .toy.scene import Subject
    from .toy.world import subject_image

    return Image.fromarray(subject_image(Subject("circle", "red", "striped"), size))
