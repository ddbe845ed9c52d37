"""KaleidoTransformer3DModel: Wan2.1's DiT with reference tokens and R-RoPE (no new parameters).

The parameters and config keys are exactly diffusers `WanTransformer3DModel`'s (plus `ref_rope` and
`ref_rope_offset`), so Wan and Kaleido weights load with `strict=True`. Wan's blocks and embedders are
imported unchanged. What Kaleido adds happens in `forward` only:

1. each reference latent (one VAE frame) is patch-embedded by the same `patch_embedding`;
2. reference tokens are placed *before* the video tokens and get R-RoPE positions (see `rope.py`);
3. they go through every block with the same timestep modulation and text cross-attention;
4. they are dropped before `norm_out`, so the output is the velocity of the video only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models._modeling_parallel import ContextParallelInput
from diffusers.models.attention import AttentionMixin
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanTimeTextImageEmbedding, WanTransformerBlock
from diffusers.utils import apply_lora_scale

from .release import REF_ROPE, REF_ROPE_OFFSET
from .rope import KaleidoRotaryPosEmbed, check_ref_rope, token_positions

ReferenceLatents = torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...] | None


class _GatherTokens(torch.autograd.Function):
    """All-gather of token shards split like `Tensor.tensor_split` (sizes may differ by one).

    Shards are padded to equal length first, so it works on every backend (gloo's allgather and
    diffusers' equal-size gather need equal shapes). Backward returns this rank's slice, as diffusers'
    `AllGatherFunction` does, times `grad_scale` (see `KaleidoTransformer3DModel.cp_grad_scale`).
    """

    @staticmethod
    def forward(ctx, shard: torch.Tensor, seq_len: int, group, grad_scale: float = 1.0) -> torch.Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        sizes = [seq_len // world + (1 if r < seq_len % world else 0) for r in range(world)]
        if shard.shape[1] != sizes[rank]:
            raise RuntimeError(f"rank {rank} holds {shard.shape[1]} tokens, expected {sizes[rank]} of {seq_len}")
        ctx.bounds, ctx.grad_scale = (sum(sizes[:rank]), sizes[rank]), grad_scale
        padded = F.pad(shard, (0, 0, 0, max(sizes) - sizes[rank])).contiguous()
        full = funcol.all_gather_tensor(padded, gather_dim=1, group=group)
        full = funcol.wait_tensor(full) if isinstance(full, funcol.AsyncCollectiveTensor) else full
        chunks = full.split(max(sizes), dim=1)
        return torch.cat([c[:, :n] for c, n in zip(chunks, sizes)], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start, size = ctx.bounds
        shard_grad = grad[:, start : start + size]
        return shard_grad * ctx.grad_scale if ctx.grad_scale != 1.0 else shard_grad, None, None, None


class KaleidoTransformer3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin, AttentionMixin):
    r"""Kaleido subject-to-video transformer (Wan2.1 DiT + reference tokens with R-RoPE).

    Args:
        patch_size, num_attention_heads, attention_head_dim, in_channels, out_channels, text_dim, freq_dim,
        ffn_dim, num_layers, cross_attn_norm, qk_norm, eps, image_dim, added_kv_proj_dim, rope_max_seq_len,
        pos_embed_seq_len: as in `diffusers.WanTransformer3DModel` (same defaults: the 14B model).
            `image_dim` / `added_kv_proj_dim` (Wan I2V's CLIP branch) must stay `None`; `rope_max_seq_len`
            is kept for config compatibility only (positions are computed, not sliced from a table).
        ref_rope (`str`, defaults to `"shift_hw"`): R-RoPE variant for reference tokens, a key of
            `kaleido_s2v.REF_ROPE_VARIANTS` (the release uses `shift_hw`).
        ref_rope_offset (`int`, defaults to `80`): the spatial offset O of the reference block, in patches.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm"]
    _no_split_modules = ["WanTransformerBlock"]
    _keep_in_fp32_modules = ["rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _keys_to_ignore_on_load_unexpected = ["norm_added_q"]
    _repeated_blocks = ["WanTransformerBlock"]
    # Training under context parallelism: every CP rank computes the whole loss on the gathered sequence, so the
    # gather's backward hands each rank only its own tokens' gradient. Blocks (before the gather) then hold
    # per-rank partial gradients while the head (after it) holds full ones; the trainer sets this to the CP size so
    # that FSDP's mean over all ranks is exact for both. 1 for inference.
    cp_grad_scale: float = 1.0
    # Context parallel (Ulysses/ring): the whole sequence [references | video] is split on the token dim,
    # together with its R-RoPE cos/sin, and gathered again in `forward` *before* the reference tokens are
    # dropped (they sit at the front, i.e. on the first rank(s)). Reference token counts rarely divide the
    # world size: use `ContextParallelConfig(..., ulysses_anything=True)` (uneven shards).
    _cp_plan = {
        "rope": {
            0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
            1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
        },
        "blocks.0": {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
        },
    }

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        ref_rope: str = REF_ROPE,
        ref_rope_offset: int = REF_ROPE_OFFSET,
    ) -> None:
        super().__init__()
        check_ref_rope(ref_rope)
        if image_dim is not None or added_kv_proj_dim is not None:
            raise ValueError(
                "KaleidoTransformer3DModel has no image-embedding (Wan I2V) branch: `image_dim` and "
                f"`added_kv_proj_dim` must be None, got {image_dim} and {added_kv_proj_dim}"
            )
        inner_dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels

        # 1. Patch & position embedding (the rope module has no parameters)
        self.rope = KaleidoRotaryPosEmbed(attention_head_dim)
        self.patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)

        # 2. Condition embeddings
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=inner_dim,
            time_freq_dim=freq_dim,
            time_proj_dim=inner_dim * 6,
            text_embed_dim=text_dim,
            image_embed_dim=image_dim,
            pos_embed_seq_len=pos_embed_seq_len,
        )

        # 3. Transformer blocks
        self.blocks = nn.ModuleList(
            [
                WanTransformerBlock(
                    inner_dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim
                )
                for _ in range(num_layers)
            ]
        )

        # 4. Output norm & projection
        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)

        self.gradient_checkpointing = False
        self._positions_cache = None  # (geometry, positions) of the last forward: see `_positions`

    # ------------------------------------------------------------------ references
    def _reference_list(self, reference_latents: ReferenceLatents, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        """Validate references and return them as a list of (B, C, 1, Hr, Wr) tensors."""
        if reference_latents is None:
            return []
        if isinstance(reference_latents, torch.Tensor):
            if reference_latents.ndim != 5:
                raise ValueError(
                    f"`reference_latents` must be (B, C, N, Hr, Wr) or a list of (B, C, 1, Hr, Wr), got shape "
                    f"{tuple(reference_latents.shape)}"
                )
            refs = list(reference_latents.split(1, dim=2))
        else:
            refs = list(reference_latents)
        batch, channels = hidden_states.shape[:2]
        _, p_h, p_w = self.config.patch_size
        for j, r in enumerate(refs):
            if r.ndim != 5 or r.shape[2] != 1:
                raise ValueError(f"reference {j} must have shape (B, C, 1, Hr, Wr), got {tuple(r.shape)}")
            if r.shape[1] != channels:
                raise ValueError(f"reference {j} has {r.shape[1]} channels, the video latents have {channels}")
            if r.shape[0] not in (1, batch):
                raise ValueError(f"reference {j} has batch size {r.shape[0]}; expected 1 or {batch} (the video's)")
            if r.shape[3] % p_h or r.shape[4] % p_w:
                raise ValueError(
                    f"reference {j} latent size {tuple(r.shape[3:])} is not divisible by the patch size {(p_h, p_w)}"
                )
        if refs and self.config.patch_size[0] != 1:
            raise ValueError(f"references need a temporal patch size of 1, got {self.config.patch_size[0]}")
        return refs

    def _embed(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, T*H'*W', D) tokens, raster order."""
        return self.patch_embedding(latents).flatten(2).transpose(1, 2)

    def _tokens(self, refs: list[torch.Tensor], video: torch.Tensor) -> torch.Tensor:
        """[ref_0 | ... | ref_{N-1} | video] tokens (B, L, D).

        References of the video's spatial size (the pipelines fit them so) are concatenated to the video on the
        time axis and embedded by one convolution: with a temporal patch of 1 that is the same token order and
        saves a convolution and a (B, L, D) concatenation per reference at every step. Other sizes are embedded
        one by one. Contiguous, as diffusers' Wan makes its tokens before the blocks (a transposed view costs a copy
        and slower elementwise kernels in every block)."""
        if not refs:
            return self._embed(video).contiguous()
        batch = video.shape[0]
        refs = [r.to(video.dtype).expand(batch, -1, -1, -1, -1) for r in refs]
        if all(r.shape[3:] == video.shape[3:] for r in refs):
            return self._embed(torch.cat([*refs, video], dim=2)).contiguous()
        return torch.cat([self._embed(x) for x in [*refs, video]], dim=1)

    def _positions(self, video_grid: tuple[int, int, int], ref_grids: list[tuple[int, int]], device) -> torch.Tensor:
        """`token_positions` of this geometry, kept while the geometry stays (every step of a video): the same
        tensor object lets `KaleidoRotaryPosEmbed` return its cos/sin without recomputing them."""
        key = (video_grid, tuple(ref_grids), self.config.ref_rope, self.config.ref_rope_offset, device)
        cached = self._positions_cache
        if cached is None or cached[0] != key:
            cached = self._positions_cache = (key, token_positions(video_grid, ref_grids, *key[2:]))
        return cached[1]

    def _gather_context_parallel(self, hidden_states: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Under context parallelism, gather the token shards back into the full (B, L, D) sequence."""
        cp_config = getattr(self._parallel_config, "context_parallel_config", None)
        if cp_config is None:
            return hidden_states
        return _GatherTokens.apply(hidden_states, seq_len, cp_config._flattened_mesh.get_group(), self.cp_grad_scale)

    # ------------------------------------------------------------------ forward
    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        reference_latents: ReferenceLatents = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """Predict the flow velocity of the video latents.

        Args:
            hidden_states: noisy video latents (B, C, T, H, W).
            timestep: (B,) model timesteps (1000·σ).
            encoder_hidden_states: text states (B, L, text_dim).
            reference_latents: `None`, a tensor (B, C, N, Hr, Wr) (N references of one size), or a list of N
                tensors (B, C, 1, Hr_i, Wr_i) (sizes may differ). A batch size of 1 is broadcast.
        Returns:
            The velocity for the video only, shape of `hidden_states`.
        """
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        ppf, pph, ppw = num_frames // p_t, height // p_h, width // p_w
        if timestep.ndim != 1:
            raise ValueError(f"`timestep` must have shape (B,), got {tuple(timestep.shape)}")

        # 1. Tokens: [ref_0 | ... | ref_{N-1} | video], with one R-RoPE position per token
        refs = self._reference_list(reference_latents, hidden_states)
        ref_grids = [(r.shape[3] // p_h, r.shape[4] // p_w) for r in refs]
        num_ref_tokens = sum(h * w for h, w in ref_grids)
        positions = self._positions((ppf, pph, ppw), ref_grids, hidden_states.device)
        rotary_emb = self.rope(positions)  # 2 x (1, L, 1, head_dim)
        hidden_states = self._tokens(refs, hidden_states)  # (B, L, D)

        # 2. Time and text conditioning (shared by reference and video tokens)
        temb, timestep_proj, encoder_hidden_states, _ = self.condition_embedder(timestep, encoder_hidden_states)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))  # (B, 6, D)

        # 3. Transformer blocks over the whole sequence
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            for block in self.blocks:
                hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, timestep_proj, rotary_emb
                )
        else:
            for block in self.blocks:
                hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)

        # 4. Drop the reference tokens, then output norm, projection & unpatchify (as Wan)
        hidden_states = self._gather_context_parallel(hidden_states, positions.shape[0])
        hidden_states = hidden_states[:, num_ref_tokens:]  # (B, T'*H'*W', D)
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift = shift.to(hidden_states.device)
        scale = scale.to(hidden_states.device)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)

        hidden_states = hidden_states.reshape(batch_size, ppf, pph, ppw, p_t, p_h, p_w, -1)
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
        output = hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
