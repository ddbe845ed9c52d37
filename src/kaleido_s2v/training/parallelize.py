"""Model parallelisation for training: activation checkpointing, compiled blocks, FSDP2 per block then root,
context parallel. The process layout (the (dp, cp) grid, meshes) is `kaleido_s2v.distributed.Runtime`: FSDP2
shards parameters over all ranks; each CP group of consecutive ranks sees the same samples and splits their
token sequence (diffusers Ulysses with the transformer's own `_cp_plan`).
"""

from __future__ import annotations

import torch

from ..distributed import Runtime, enable_context_parallel
from ..errors import UserInputError


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


def apply_context_parallel(model, rt: Runtime) -> None:
    """Ulysses context parallel over the rank's CP group, with even shards (diffusers' uneven variant has no
    backward): every reference is fitted to the video size, so the sequence is (N + T)·h·w tokens and
    `check_cp_divides` ensures h·w divides by the CP size. The gradient scaling this needs is stated where the
    transformer gathers (`KaleidoTransformer3DModel.cp_grad_scale`)."""
    enable_context_parallel(model, rt, mesh=rt.cp_mesh)
    model.cp_grad_scale = float(rt.dims.cp)


def check_cp_divides(cp: int, height: int, width: int, patch: int = 2, vae_stride: int = 8) -> None:
    tokens = (height // vae_stride // patch) * (width // vae_stride // patch)
    if cp > 1 and tokens % cp:
        raise UserInputError(
            f"--cp-degree {cp} does not divide the {tokens} tokens per latent frame at {height}x{width}: "
            f"choose a cp degree that divides {tokens} or change the size"
        )
