"""A streaming, sharded safetensors writer: one tensor in memory at a time.

`safetensors.torch.save_file` serialises a whole shard into memory first; here each shard's header is
built from shapes and dtypes alone (known without reading data), then tensors are materialised one by one
and their bytes written straight from their storage — a memory-mapped source slice is written without an
anonymous copy. The sha256 of each file is computed while writing. Shard and index names follow
diffusers/transformers (`<name>-00001-of-00003.safetensors` + `<name>.safetensors.index.json`), so
`from_pretrained` loads the folder. Files are checked by reading them back with `safetensors` in the tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserInputError

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass
class LazyTensor:
    """A tensor described by name, shape and dtype; `load()` materialises it (as `dtype`) only when written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def parse_size(size: str | int) -> int:
    """'5GB' -> 5·10⁹, '500MiB' -> 500·2²⁰, 12345 -> 12345 (as diffusers' max_shard_size)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise UserInputError(f"--max-shard-size {size!r}: use a size like 5GB, 500MB or a number of bytes")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    value = int(float(m.group(1)) * units[(m.group(2) or "").upper()])
    if value <= 0:
        raise UserInputError(f"--max-shard-size {size!r}: must be positive")
    return value


def plan_shards(tensors: list[LazyTensor], max_shard_bytes: int) -> list[list[LazyTensor]]:
    """Greedy, in order: a new shard starts when the next tensor would exceed the limit."""
    shards: list[list[LazyTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(tensors: list[LazyTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write_shards(
    tensors: Iterable[LazyTensor],
    out_dir: Path,
    weights_name: str,
    max_shard_bytes: int,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Write `tensors` as safetensors shards in `out_dir`; returns one record per file (name, bytes, sha256, ...)."""
    tensors = list(tensors)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise AssertionError("duplicate tensor names")  # a converter bug
    shards = plan_shards(tensors, max_shard_bytes)
    n = len(shards)
    files = (
        [f"{weights_name}.safetensors"]
        if n == 1
        else [f"{weights_name}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    records = []
    weight_map = {}
    for fname, shard in zip(files, shards):
        sha = hashlib.sha256()
        with open(out_dir / fname, "wb") as f:
            head = _header(shard, {"format": "pt"})
            f.write(head)
            sha.update(head)
            for lt in shard:
                value = lt.load()
                if tuple(value.shape) != tuple(lt.shape) or value.dtype != lt.dtype:
                    raise AssertionError(
                        f"{lt.name}: planned {lt.shape} {lt.dtype}, got {tuple(value.shape)} {value.dtype}"
                    )
                data = _tensor_bytes(value)
                f.write(data)
                sha.update(data)
                del value, data
                weight_map[lt.name] = fname
                if progress is not None:
                    progress(lt.nbytes)
        records.append(
            {
                "file": fname,
                "bytes": (out_dir / fname).stat().st_size,
                "sha256": sha.hexdigest(),
                "tensors": len(shard),
            }
        )
    if n > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out_dir / f"{weights_name}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return records
