"""Process layout and model parallelisation: activation checkpointing, FSDP2 per block then root, context parallel.

One process = the plain model. Under torchrun the world is a (dp, cp) grid: FSDP2 shards parameters over
all ranks; each cp group of consecutive ranks sees the same samples and splits their token sequence
(diffusers Ulysses context parallel with the transformer's own `_cp_plan`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserInputError


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
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


@dataclass
class Runtime:
    rank: int
    local_rank: int
    dims: ParallelDims
    device: torch.device
    world_mesh: object = None  # DeviceMesh over all ranks (FSDP)
    cp_mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank(self.rank)


def init_runtime(cp_degree: int = 1) -> Runtime:
    """Start torch.distributed when launched by torchrun (nccl on GPUs, gloo on CPU); plain otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dims = ParallelDims(world, cp_degree)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    rt = Runtime(rank, local_rank, dims, device)
    if dims.distributed:
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        from torch.distributed.device_mesh import init_device_mesh

        rt.world_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",))
        if dims.cp > 1:  # diffusers wants named "ring" and "ulysses" dims; cp groups are consecutive ranks
            mesh = init_device_mesh(device.type, (dims.dp, 1, dims.cp), mesh_dim_names=("dp", "ring", "ulysses"))
            rt.cp_mesh = mesh["ring", "ulysses"]
    return rt


def apply_activation_checkpointing(model) -> None:
    """Recompute every transformer block in backward (diffusers' flag; works with FSDP2)."""
    model.enable_gradient_checkpointing()


def cpp_compiler() -> str | None:
    """The C++ compiler inductor will build CPU kernels with (its own search: $CXX or g++), or None."""
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return None


def check_compile_toolchain() -> None:
    """On CPU, inductor builds C++ kernels: without a compiler the first step would fail deep inside it."""
    if not torch.cuda.is_available() and cpp_compiler() is None:
        raise UserInputError("--compile on CPU needs a C++ compiler (g++, or set $CXX): install one or drop "
                             "--compile")


def apply_compile(model) -> None:
    """`torch.compile` each transformer block in place (state-dict names unchanged), as torchtitan does:
    one small graph reused by every block compiles fast and fuses the elementwise work between matmuls."""
    for block in model.blocks:
        block.compile()


def apply_fsdp(model, mesh, mixed_precision: str = "bf16") -> None:
    """`fully_shard` each WanTransformerBlock, then the root (fp32 master weights, bf16 compute when asked)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision == "bf16"
        else MixedPrecisionPolicy()
    )
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def apply_context_parallel(model, cp_mesh) -> None:
    """Ulysses context parallel over `cp_mesh`.

    diffusers' uneven-shard variant (`ulysses_anything`) has no backward, so training uses even shards: every
    reference is fitted to the video size, so the sequence is (N + T)·h·w tokens and `check_cp_divides`
    ensures h·w divides by the cp size.

    Each cp rank computes the full loss after the gather, whose backward hands every rank only its own
    tokens' gradient: blocks then hold per-rank partial gradients while the head holds full ones. Scaling the
    gradient entering the gather (the last block's output) by the cp size makes FSDP's mean over all ranks
    exact for both.
    """
    from diffusers import ContextParallelConfig

    from ..distributed import cpu_accelerator_shim

    cp = cp_mesh.size()  # ring 1 x ulysses cp
    # diffusers divides by torch.accelerator.device_count(), which is 0 on a CPU-only host
    shim = cpu_accelerator_shim() if torch.accelerator.device_count() == 0 else contextlib.nullcontext()
    with shim:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=cp, mesh=cp_mesh))
    # the last block's output is what the transformer gathers (before dropping the reference tokens)
    model.blocks[-1].register_forward_hook(lambda module, args, out: _ScaleGrad.apply(out, float(cp)))


def check_cp_divides(cp: int, height: int, width: int, patch: int = 2, vae_stride: int = 8) -> None:
    tokens = (height // vae_stride // patch) * (width // vae_stride // patch)
    if cp > 1 and tokens % cp:
        raise UserInputError(
            f"--cp-degree {cp} does not divide the {tokens} tokens per latent frame at {height}x{width}: "
            f"choose a cp degree that divides {tokens} or change the size"
        )
