"""Reading, validating and fitting reference images (the official `new_straetgy` preprocessing)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserInputError

ReferenceImage = Image.Image | str | os.PathLike | np.ndarray


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB at the image's real range; transparent pixels composited onto white.

    16-bit greyscale ("I;16", "I") is scaled to 8 bits (PIL's `convert("RGB")` clips it to white). Transparency
    goes onto white, not black: the paper's segmented references are subjects on white (the release's
    `convert("RGB")` drops alpha, which turns transparent pixels black — a deliberate difference, docs/generate.md).
    """
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(im, dtype=np.float64) / 257.0
        im = Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray((np.clip(np.asarray(im, dtype=np.float64), 0, 1) * 255 + 0.5).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


def load_reference(image: ReferenceImage, name: str = "reference image") -> Image.Image:
    """A PIL RGB image from a PIL image, a path, or an array (H, W, 3 or 4) uint8 / floats in [0, 1].

    Transparent pixels become white and 16-bit greyscale keeps its range (`_to_rgb`).
    """
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            raise UserInputError(f"{name} '{path}' is a folder, not an image: give a PNG/JPEG/WebP file")
        if not path.is_file():
            raise UserInputError(f"{name} '{path}' does not exist: check the path")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # below PIL's hard limit: fine
                with Image.open(path) as im:
                    im.load()
                    return _to_rgb(im)
        except Image.DecompressionBombError:
            raise UserInputError(f"{name} '{path}' has more pixels than PIL's safety limit "
                                 f"({2 * Image.MAX_IMAGE_PIXELS:,}): give a smaller image") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise UserInputError(f"{name} '{path}' is not a readable image ({e}): give a PNG/JPEG/WebP file") from e
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise UserInputError(f"{name} array has shape {arr.shape}: give (H, W, 3) RGB or (H, W, 4) RGBA")
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return _to_rgb(Image.fromarray(np.ascontiguousarray(arr), "RGB" if arr.shape[-1] == 3 else "RGBA"))
    raise UserInputError(f"{name} has unsupported type {type(image).__name__}: give a PIL image, a path or an array")


def fit_reference(image: ReferenceImage, height: int, width: int) -> Image.Image:
    """Fit inside (height, width) keeping the aspect ratio, then pad white, centred — as the release does.

    r = W_img / H_img against width / height: the limiting side is set to the target and the other is
    `int()`-truncated; resampling is LANCZOS; padding (left, top) = (Δw // 2, Δh // 2) with (255, 255, 255).
    """
    img = load_reference(image)
    new_w, new_h, left, top = fit_box(*img.size, height, width)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(img.resize((new_w, new_h), Image.Resampling.LANCZOS), (left, top))
    return canvas


def fit_box(w_img: int, h_img: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(new_w, new_h, left, top): where `fit_reference` puts an image of w_img x h_img (MAGREF's `resize_and_pad`
    computes the same box)."""
    if w_img / h_img > width / height:
        new_w, new_h = width, int(width / (w_img / h_img))
    else:
        new_h, new_w = height, int(height * (w_img / h_img))
    new_w, new_h = max(new_w, 1), max(new_h, 1)
    return new_w, new_h, (width - new_w) // 2, (height - new_h) // 2


def group_references(reference_images, batch_size: int) -> tuple[list[list[ReferenceImage]], bool]:
    """(one list of references per prompt, shared). A flat list (or one image) is shared by every prompt."""
    if reference_images is None:
        return [[] for _ in range(batch_size)], True
    if isinstance(reference_images, np.ndarray) and reference_images.ndim == 4:
        reference_images = list(reference_images)  # (N, H, W, 3)
    if not isinstance(reference_images, (list, tuple)):
        reference_images = [reference_images]
    if reference_images and all(isinstance(r, (list, tuple)) for r in reference_images):
        if len(reference_images) != batch_size:
            raise ValueError(
                f"`reference_images` has {len(reference_images)} per-prompt lists but there are {batch_size} "
                "prompts: give one list per prompt, or one flat list shared by all prompts"
            )
        counts = {len(r) for r in reference_images}
        if len(counts) != 1:
            raise ValueError(
                f"`reference_images` lists have different lengths {sorted(counts)}: every prompt of one call "
                "needs the same number of references"
            )
        return [list(r) for r in reference_images], False
    return [list(reference_images)] * batch_size, True
