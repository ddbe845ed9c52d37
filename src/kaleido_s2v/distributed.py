"""torchrun process-group setup and diffusers context parallelism (Ulysses), on GPUs and — for tests — on CPU.

Under `torchrun --nproc_per_node K`, every rank runs the same sampling with the same seed and the
transformer's token sequence is sharded K ways by diffusers context parallelism; only rank 0 writes files.
Shared by generation and training.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(device: str | torch.device) -> DistInfo:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU); a 1-process DistInfo when not under torchrun.

    On CUDA, `device` "cuda" becomes "cuda:LOCAL_RANK" (one GPU per process).
    """
    device = torch.device(device)
    if not launched_by_torchrun():
        return DistInfo(device=device)
    import torch.distributed as dist

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed(barrier: bool = True) -> None:
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
    its context-parallel path works on CPU with gloo (`all_to_all_single`, `all_gather`). Used only when the
    device is the CPU — multi-process tests and CPU demos; never on GPUs.
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


def enable_context_parallel(transformer, dist_info: DistInfo) -> None:
    """Shard the transformer's sequence over all ranks with Ulysses attention (uneven token counts allowed)."""
    if not dist_info.enabled:
        return
    from diffusers import ContextParallelConfig

    ensure_context_parallel_backend(transformer)
    config = ContextParallelConfig(ulysses_degree=dist_info.world_size, ulysses_anything=True)
    # (the transformer gathers its uneven token shards itself, on any backend)
    on_cpu = dist_info.device.type == "cpu"
    with cpu_accelerator_shim() if on_cpu else contextlib.nullcontext():
        transformer.enable_parallelism(config=config)
