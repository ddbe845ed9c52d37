"""R-RoPE positions and angles against independent computations (the spec's tables and formulas)."""

import math

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from kaleido_s2v.rope import REF_ROPE_VARIANTS, KaleidoRotaryPosEmbed, token_positions


def loop_positions(video_grid, ref_grids, variant, O):  # noqa: E741  (O as in DESIGN.md)
    """DESIGN.md's table, written as plain loops (an independent implementation)."""
    T, H, W = video_grid
    N = len(ref_grids)
    out = []
    for j, (hj, wj) in enumerate(ref_grids):
        for y in range(hj):
            for x in range(wj):
                row = {
                    "shift_hw": (j, O + y, O + x),
                    "shift_h": (j, O + y, x),
                    "shift_w": (j, y, O + x),
                    "shift_hw_no_overlap": (j, (j + 1) * O + y, (j + 1) * O + x),
                    "concat": (T + j, y, x),
                    "time_fixed": (-1, O + y, O + x),
                    "time_negative": (j - N, O + y, O + x),
                    "time_future": (T + 1 + j, O + y, O + x),
                }[variant]
                out.append(row)
    for f in range(T):
        for y in range(H):
            for x in range(W):
                out.append((f, y, x))
    return out


def test_worked_example_of_the_official_spec():
    # kaleido-official.md §1.7: video 2 frames of 2x3 patches, two references of 2x3 patches.
    expected = [
        (0, 80, 80), (0, 80, 81), (0, 80, 82), (0, 81, 80), (0, 81, 81), (0, 81, 82),
        (1, 80, 80), (1, 80, 81), (1, 80, 82), (1, 81, 80), (1, 81, 81), (1, 81, 82),
        (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 1, 2),
        (1, 0, 0), (1, 0, 1), (1, 0, 2), (1, 1, 0), (1, 1, 1), (1, 1, 2),
    ]  # fmt: skip
    pos = token_positions((2, 2, 3), [(2, 3), (2, 3)], "shift_hw", 80)
    assert [tuple(p) for p in pos.tolist()] == expected


def test_real_size_spans():
    # 512x896 with two references: ref0 (0, 80..111, 80..135), ref1 (1, ...), video (0..20, 0..31, 0..55).
    pos = token_positions((21, 32, 56), [(32, 56), (32, 56)])
    assert pos.shape == (21 * 1792 + 2 * 1792, 3)
    ref0, ref1, video = pos[:1792], pos[1792:3584], pos[3584:]
    assert ref0.min(0).values.tolist() == [0, 80, 80] and ref0.max(0).values.tolist() == [0, 111, 135]
    assert ref1.min(0).values.tolist() == [1, 80, 80] and ref1.max(0).values.tolist() == [1, 111, 135]
    assert video.min(0).values.tolist() == [0, 0, 0] and video.max(0).values.tolist() == [20, 31, 55]


@pytest.mark.parametrize("variant", sorted(REF_ROPE_VARIANTS))
@pytest.mark.parametrize("offset", [80, 7])
def test_every_variant_matches_the_table(variant, offset):
    video, refs = (3, 2, 4), [(2, 3), (1, 2), (3, 3)]  # references of different sizes
    got = [tuple(p) for p in token_positions(video, refs, variant, offset).tolist()]
    assert got == loop_positions(video, refs, variant, offset)


def test_all_design_variants_exist():
    assert set(REF_ROPE_VARIANTS) == {
        "shift_hw", "shift_h", "shift_w", "shift_hw_no_overlap", "concat", "time_fixed", "time_negative",
        "time_future",
    }  # fmt: skip


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="ref_rope"):
        token_positions((1, 1, 1), [(1, 1)], "shift_everything")


@pytest.mark.parametrize("grid", [(1, 1, 1), (3, 4, 5), (21, 8, 14)])
def test_video_tokens_equal_wan_rotary_bit_for_bit(grid):
    wan = WanRotaryPosEmbed(attention_head_dim=128, patch_size=(1, 2, 2), max_seq_len=1024)
    T, H, W = grid
    cos_w, sin_w = wan(torch.zeros(1, 16, T, 2 * H, 2 * W))
    cos_k, sin_k = KaleidoRotaryPosEmbed(128)(token_positions(grid))
    # exact: the documented promise (same float64 angles and cos/sin, one rounding to fp32, same process)
    assert torch.equal(cos_w, cos_k) and torch.equal(sin_w, sin_k)


def test_angles_from_explicit_formula_for_negative_and_large_positions():
    # §1.7: pair j rotates by t*1e4^(-2j/44) (j < 22), h*1e4^(-2(j-22)/42) (22 <= j < 43), w*... (j >= 43).
    positions = torch.tensor([[-3, 5000, 123456], [-1, 80, 81], [1000, -7, 0]])
    cos, sin = KaleidoRotaryPosEmbed(128)(positions)
    assert cos.shape == sin.shape == (1, 3, 1, 128)
    for i, (t, h, w) in enumerate(positions.tolist()):
        for j in range(64):
            if j < 22:
                theta = t * 10000 ** (-2 * j / 44)
            elif j < 43:
                theta = h * 10000 ** (-2 * (j - 22) / 42)
            else:
                theta = w * 10000 ** (-2 * (j - 43) / 42)
            for c in (2 * j, 2 * j + 1):  # interleaved pairs share one angle
                assert cos[0, i, 0, c].item() == pytest.approx(math.cos(theta), abs=2e-6)
                assert sin[0, i, 0, c].item() == pytest.approx(math.sin(theta), abs=2e-6)


def test_no_table_spans_the_position_range():
    # Positions 10^12 apart: any table indexed by position (official code, or a min..max range) cannot be
    # allocated; only the distinct positions may be evaluated.
    rope = KaleidoRotaryPosEmbed(12)
    cos, sin = rope(torch.tensor([[-(10**12), 0, 0], [10**12, 3, 2]]))
    assert cos.shape == (1, 2, 1, 12) and torch.isfinite(cos).all() and torch.isfinite(sin).all()


def test_cos_sin_are_reused_for_the_same_positions_only():
    rope = KaleidoRotaryPosEmbed(12)
    positions = token_positions((2, 3, 4), [(3, 4)])
    first = rope(positions)
    assert rope(positions) is first  # the same tensor again: the cached pair itself
    positions[0, 1] += 1  # changed in place: recomputed
    changed = rope(positions)
    expected = KaleidoRotaryPosEmbed(12)(positions.clone())
    assert changed is not first  # and the recomputed pair is exactly a fresh module's (same arithmetic):
    assert all(torch.equal(a, b) for a, b in zip(changed, expected))
