"""MAGREF's reference canvas: every reference fitted into a block of one white canvas, and the region mask.

`layout="release"` is the release commit's (`5a309de`, `subject2video.py:133-176`) — the layout of the code that
shipped with the weights, hence the default: three full-height columns (277/278/277 px at 832 wide); one reference
goes in the centre column, otherwise the first three fill the columns left to right and the rest are dropped.
`layout="grid"` is HEAD's (`e3c71b2`, `:150-208`): 1, 2, 3, 4, 6 or 8 blocks (the fewest that hold every
reference); references go to blocks in order when `seed` is None, else both lists are shuffled as HEAD does —
references first, then blocks — by `random.Random(seed)` (HEAD's unseeded shuffle draws a new layout every run).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..references import ReferenceImage, fit_box, load_reference
from .release import CANVAS_HEIGHT, CANVAS_WIDTH

LAYOUTS = ("release", "grid")
GRID_SIZES = (1, 2, 3, 4, 6, 8)
Block = tuple[int, int, int, int]  # (x0, y0, x1, y1), end exclusive


def release_blocks(height: int, width: int) -> list[Block]:
    """Three full-height columns; the centre one takes the remainder (277, 278, 277 at 832)."""
    side = width // 3
    return [(0, 0, side, height), (side, 0, width - side, height), (width - side, 0, width, height)]


def grid_blocks(count: int, height: int, width: int) -> list[Block]:
    """HEAD's blocks for `count` in GRID_SIZES, row by row (columns = count, or count / 2 on two rows)."""
    if count not in GRID_SIZES:
        raise ValueError(f"grid block count must be one of {GRID_SIZES}, got {count}")
    cols, rows = (count, 1) if count <= 3 else (count // 2, 2)
    bw, bh = width // cols, height // rows
    return [(c * bw, r * bh, width if c == cols - 1 else (c + 1) * bw, height if r == rows - 1 else (r + 1) * bh)
            for r in range(rows) for c in range(cols)]


def assign_blocks(num_images: int, layout: str = "release", seed: int | None = None, height: int = CANVAS_HEIGHT,
                  width: int = CANVAS_WIDTH) -> list[tuple[int, Block]]:
    """[(reference index, block)] in paste order: which reference goes where (references beyond the blocks are
    dropped: after the first three for "release", 8 of them for "grid")."""
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}")
    if num_images < 1:
        raise ValueError("MAGREF needs at least one reference image")
    if layout == "release":
        blocks = release_blocks(height, width)
        return [(0, blocks[1])] if num_images == 1 else list(enumerate(blocks[: min(num_images, 3)]))
    blocks = grid_blocks(min((s for s in GRID_SIZES if s >= num_images), default=8), height, width)
    indices = list(range(num_images))
    if seed is not None:
        rng = random.Random(seed)
        rng.shuffle(indices)
        rng.shuffle(blocks)
    return list(zip(indices[: len(blocks)], blocks))


def compose_references(images: Sequence[ReferenceImage], layout: str = "release", seed: int | None = None,
                       height: int = CANVAS_HEIGHT, width: int = CANVAS_WIDTH) -> tuple[Image.Image, np.ndarray]:
    """(canvas, mask): the references on a white (height, width) RGB canvas, and a bool (height, width) mask that
    is True exactly on reference pixels (False on the white padding around each one).

    Each reference is fitted into its block keeping its aspect ratio (LANCZOS, sizes truncated), centred, as the
    release's `resize_and_pad`; transparent pixels become white (`references.load_reference`).
    """
    if isinstance(images, (Image.Image, np.ndarray, str)) or not isinstance(images, Sequence):
        images = [images]
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    mask = np.zeros((height, width), dtype=bool)
    for index, (x0, y0, x1, y1) in assign_blocks(len(images), layout, seed, height, width):
        img = load_reference(images[index], f"reference image {index + 1}")
        new_w, new_h, left, top = fit_box(*img.size, y1 - y0, x1 - x0)
        canvas.paste(img.resize((new_w, new_h), Image.Resampling.LANCZOS), (x0 + left, y0 + top))
        mask[y0 + top : y0 + top + new_h, x0 + left : x0 + left + new_w] = True
    return canvas, mask


def latent_mask(mask: np.ndarray, stride: int = 8):
    """The region mask at latent resolution: a latent pixel is 1 if any pixel of its stride x stride patch is
    (`max_pool2d(mask, stride)`, the release's `downsample_mask`) -> float tensor (height/stride, width/stride)."""
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.max_pool2d(m, stride)[0, 0]
