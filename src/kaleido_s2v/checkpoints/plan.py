"""The plan types of a conversion: source tensors known by shape before they are read, their mapping onto target
names (`lazy_from_mapping`), and the strict key/shape check against the target class (`check_against_model`).
A leaf module: the component planners (`converter`, `t5`, `vae`, `clip`) import it, it imports none of them."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..errors import UserInputError
from . import keymap
from .shards import LazyTensor


class SourceTensor:
    """A named source tensor whose shape/dtype are known without reading its data."""

    def __init__(self, shape, dtype, load):
        self.shape, self.dtype, self.load = tuple(shape), dtype, load


def key_names(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def lazy_from_mapping(
    sources: Mapping[str, SourceTensor], targets: Mapping[str, tuple], dtype: torch.dtype | None
) -> list[LazyTensor]:
    """LazyTensors for target names; `targets[name] = (source key, part, parts)` (dim-0 split of fused weights),
    or `(source key, part, parts, shape)` to give the part another shape of the same size (e.g. CLIP's (1, 1, D)
    class embedding stored as (D,)). The planner checks source shapes first; a size mismatch here is its bug."""
    out = []
    for name, (src, part, parts, *target_shape) in targets.items():
        s = sources[src]
        shape = (s.shape[0] // parts, *s.shape[1:])
        if target_shape:
            if math.prod(target_shape[0]) != math.prod(shape):
                raise AssertionError(f"{name}: cannot view {src} part {shape} as {target_shape[0]}")  # a table bug
            shape = tuple(target_shape[0])
        out_dtype = dtype or s.dtype

        def load(s=s, part=part, parts=parts, shape=shape, out_dtype=out_dtype):
            return keymap.split_part(s.load(), part, parts).reshape(shape).to(out_dtype)

        out.append(LazyTensor(name, shape, out_dtype, load))
    return out


def check_against_model(
    planned: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str, source_name=lambda k: k
) -> None:
    """Strict: same key set and shapes as the target model, else `UserInputError` naming the keys."""
    missing = set(expected) - set(planned)
    if missing:
        raise UserInputError(f"{what}: missing keys {key_names(source_name(k) for k in missing)}")
    unexpected = set(planned) - set(expected)
    if unexpected:
        raise UserInputError(f"{what}: unexpected keys {key_names(source_name(k) for k in unexpected)}")
    bad = [k for k in expected if tuple(planned[k]) != tuple(expected[k])]
    if bad:
        raise UserInputError(
            f"{what}: shape mismatch "
            + "; ".join(f"{source_name(k)} is {tuple(planned[k])}, expected {tuple(expected[k])}" for k in bad[:6])
        )
