"""The one distributed runtime of generation and training: torchrun's process group, the device, the (dp, cp)
grid, diffusers context parallelism (Ulysses), and the CPU shim that lets all of it run on gloo in tests.

Under `torchrun --nproc_per_node K` a generation run shards each video's token sequence over all K ranks
(`enable_context_parallel`, uneven shards allowed) and rank 0 writes; a training run lays the K ranks out as
data-parallel x context-parallel (`ParallelDims`), FSDP2 over all of them and CP groups of consecutive ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .errors import UserInputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelDims:
    world_size: int = 1
    cp: int = 1

    def __post_init__(self):
        if self.cp < 1 or self.world_size % self.cp:
            raise UserInputError(
                f"--cp-degree {self.cp} does not divide the {self.world_size} processes: the world must be "
                f"data-parallel x context-parallel; use a cp degree that divides {self.world_size}"
            )

    @property
    def dp(self) -> int:
        return self.world_size // self.cp

    def dp_rank(self, rank: int) -> int:
        return rank // self.cp  # cp groups are consecutive ranks (same node first)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class Runtime:
    """This process's place in the run: a single process by default."""

    rank: int = 0
    local_rank: int = 0
    dims: ParallelDims = field(default_factory=ParallelDims)
    device: torch.device = torch.device("cpu")

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def distributed(self) -> bool:
        return self.dims.distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank(self.rank)

    @functools.cached_property
    def world_mesh(self):
        """DeviceMesh over all ranks (FSDP); None for one process."""
        if not self.distributed:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("fsdp",))

    @functools.cached_property
    def cp_mesh(self):
        """The ("ring", "ulysses") mesh of this rank's CP group (diffusers' names), None without CP."""
        if self.dims.cp == 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device.type, (self.dims.dp, 1, self.dims.cp), mesh_dim_names=("dp", "ring", "ulysses"))
        return mesh["ring", "ulysses"]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_runtime(device: str | torch.device | None = None, cp_degree: int = 1) -> Runtime:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); a one-process `Runtime` otherwise.

    `device` None: CUDA when available, else the CPU. On CUDA, "cuda" becomes "cuda:LOCAL_RANK" (one GPU per
    process). `cp_degree`: the training grid's context-parallel group size (generation shards over all ranks).
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not launched_by_torchrun():
        return Runtime(dims=ParallelDims(1, cp_degree), device=device)
    import torch.distributed as dist

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dims = ParallelDims(world_size, cp_degree)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return Runtime(rank=rank, local_rank=local_rank, dims=dims, device=device)


def shutdown(barrier: bool = True) -> None:
    """Leave the process group (after a barrier unless `barrier=False`, e.g. on an error path)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def cpu_accelerator_shim() -> Iterator[None]:
    """CPU-only shim: make `torch.accelerator.device_count()` return 1 for the duration of the block.

    diffusers' `enable_parallelism` picks the rank's device as `rank % torch.accelerator.device_count()`,
    which is a division by zero on a machine without an accelerator (the count is 0). Everything else in
    its context-parallel path works on CPU with gloo (`all_to_all_single`, `all_gather`). Used only when no
    accelerator is there — multi-process tests and CPU demos; never on GPUs.
    """
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def ensure_context_parallel_backend(transformer) -> str:
    """Switch the transformer's attention to diffusers' "native" (SDPA) backend if the current one cannot do CP."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    backend = None
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            backend = processor._attention_backend
            break
    backend = AttentionBackendName(backend) if backend else _AttentionBackendRegistry.get_active_backend()[0]
    if _AttentionBackendRegistry._is_context_parallel_available(backend):
        return backend.value
    logger.warning(f"attention backend {backend.value!r} does not support context parallelism; using 'native'")
    transformer.set_attention_backend("native")
    return "native"


def enable_context_parallel(transformer, rt: Runtime, mesh=None) -> None:
    """Shard the transformer's token sequence with Ulysses attention.

    Generation (`mesh` None): over all ranks, uneven token counts allowed (`ulysses_anything`; the transformer
    gathers its uneven shards itself, on any backend). Training (`mesh`: `rt.cp_mesh`): over the CP group, with
    even shards, because diffusers' uneven variant has no backward.
    """
    if not rt.distributed:
        return
    from diffusers import ContextParallelConfig

    if mesh is None:
        ensure_context_parallel_backend(transformer)
        config = ContextParallelConfig(ulysses_degree=rt.world_size, ulysses_anything=True)
    else:
        config = ContextParallelConfig(ulysses_degree=mesh.size(), mesh=mesh)
    no_accelerator = torch.accelerator.device_count() == 0
    with cpu_accelerator_shim() if no_accelerator else contextlib.nullcontext():
        transformer.enable_parallelism(config=config)
