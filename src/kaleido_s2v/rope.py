"""R-RoPE: 3-D rotary positions (t, h, w) for video tokens and reference tokens.

Positions are data (as in flux): `token_positions` returns one integer (t, h, w) row per token, references
first, and `KaleidoRotaryPosEmbed` turns any positions — negative or large — into cos/sin. Nothing is
sliced from a precomputed table (the official code kept two 2.2 GB fp32 tables on the GPU).

Video token at latent patch (f, y, x) gets (f, y, x), exactly as Wan2.1. Token (y, x) of reference j
(0-based) of N gets (t, h0 + y, w0 + x) with (t, h0, w0) from the variant table below; O is the
configured `ref_rope_offset` (80 in the release), T the number of video latent frames (in patches).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from .release import REF_ROPE, REF_ROPE_OFFSET

# ref_rope -> (j, N, T, O) -> (t, h0, w0). One row per DESIGN.md table row; `shift_hw` is the release.
REF_ROPE_VARIANTS: dict[str, Callable[[int, int, int, int], tuple[int, int, int]]] = {
    "shift_hw": lambda j, n, t, o: (j, o, o),
    "shift_h": lambda j, n, t, o: (j, o, 0),
    "shift_w": lambda j, n, t, o: (j, 0, o),
    "shift_hw_no_overlap": lambda j, n, t, o: (j, (j + 1) * o, (j + 1) * o),
    "concat": lambda j, n, t, o: (t + j, 0, 0),
    "time_fixed": lambda j, n, t, o: (-1, o, o),
    "time_negative": lambda j, n, t, o: (j - n, o, o),
    "time_future": lambda j, n, t, o: (t + 1 + j, o, o),
}


def check_ref_rope(ref_rope: str) -> None:
    if ref_rope not in REF_ROPE_VARIANTS:
        raise ValueError(f"`ref_rope` must be one of {sorted(REF_ROPE_VARIANTS)}, got {ref_rope!r}")


def _grid(t0: int, h0: int, w0: int, nt: int, nh: int, nw: int, device=None) -> torch.Tensor:
    """(nt*nh*nw, 3) raster-ordered positions of the block starting at (t0, h0, w0)."""
    t = torch.arange(t0, t0 + nt, device=device)
    h = torch.arange(h0, h0 + nh, device=device)
    w = torch.arange(w0, w0 + nw, device=device)
    return torch.stack(torch.meshgrid(t, h, w, indexing="ij"), dim=-1).reshape(-1, 3)


def token_positions(
    video_grid: Sequence[int],
    ref_grids: Sequence[Sequence[int]] = (),
    ref_rope: str = REF_ROPE,
    ref_rope_offset: int = REF_ROPE_OFFSET,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Integer (t, h, w) positions of every token, shape (L, 3), in sequence order.

    Args:
        video_grid: (T, H, W) of the video in patches.
        ref_grids: (H_j, W_j) of each reference in patches (one latent frame each).
    Returns:
        int64 tensor of `sum_j H_j*W_j + T*H*W` rows: references first (reference-major, raster), then
        video frames (raster).
    """
    check_ref_rope(ref_rope)
    T, H, W = (int(v) for v in video_grid)
    place = REF_ROPE_VARIANTS[ref_rope]
    n = len(ref_grids)
    blocks = []
    for j, (hj, wj) in enumerate(ref_grids):
        t0, h0, w0 = place(j, n, T, ref_rope_offset)
        blocks.append(_grid(t0, h0, w0, 1, int(hj), int(wj), device))
    blocks.append(_grid(0, 0, 0, T, H, W, device))
    return torch.cat(blocks, dim=0)


class KaleidoRotaryPosEmbed(nn.Module):
    """cos/sin for arbitrary integer (t, h, w) positions, in diffusers `WanRotaryPosEmbed`'s layout.

    Same head-dim split (t: d - 4*(d//6), h = w: 2*(d//6); 44/42/42 for d=128), same frequencies
    θ^(-2k/d_a), same interleaved pairs (`repeat_interleave_real`), same float64 arithmetic: for video
    positions the output equals `WanRotaryPosEmbed` bit for bit. No parameters and no buffers.
    """

    def __init__(self, attention_head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.attention_head_dim = attention_head_dim
        self.theta = theta
        self.h_dim = self.w_dim = 2 * (attention_head_dim // 6)
        self.t_dim = attention_head_dim - self.h_dim - self.w_dim
        self._cache = None  # (positions, its version, (cos, sin)) of the last call

    def _axis(self, pos: torch.Tensor, dim: int, freqs_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles for the distinct positions only (a few hundred at most), then gathered per token.
        uniq, idx = torch.unique(pos, return_inverse=True)
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=freqs_dtype, device=pos.device)[: dim // 2] / dim))
        angles = torch.outer(uniq, inv_freq)  # (U, dim/2), float64 as in get_1d_rotary_pos_embed
        cos = angles.cos().repeat_interleave(2, dim=1).float()
        sin = angles.sin().repeat_interleave(2, dim=1).float()
        return cos[idx], sin[idx]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (L, 3) int -> (cos, sin), each (1, L, 1, attention_head_dim) float32."""
        if positions.ndim != 2 or positions.shape[-1] != 3:
            raise ValueError(f"positions must have shape (L, 3), got {tuple(positions.shape)}")
        # The transformer hands the same positions tensor at every step of a video: reuse its cos/sin (a one-slot
        # cache by identity and version, so an in-place change or a new tensor recomputes).
        cached = self._cache
        if cached is not None and cached[0] is positions and cached[1] == positions._version:
            return cached[2]
        freqs_dtype = torch.float32 if positions.device.type == "mps" else torch.float64
        parts = [self._axis(positions[:, a], d, freqs_dtype) for a, d in enumerate((self.t_dim, self.h_dim, self.w_dim))]
        cos = torch.cat([c for c, _ in parts], dim=1)
        sin = torch.cat([s for _, s in parts], dim=1)
        out = cos[None, :, None, :], sin[None, :, None, :]
        self._cache = (positions, positions._version, out)
        return out
