"""KaleidoTransformer3DModel against diffusers' WanTransformer3DModel (the independent reference)."""

from inspect import signature

import pytest
import torch
from diffusers import WanTransformer3DModel

from kaleido_s2v import KaleidoTransformer3DModel
from kaleido_s2v.rope import REF_ROPE_VARIANTS, KaleidoRotaryPosEmbed
from kaleido_s2v.tiny import tiny_transformer_config
from tests.test_rope import loop_positions

WAN_KEYS = {k: v for k, v in tiny_transformer_config().items() if k not in ("ref_rope", "ref_rope_offset")}


def make_pair(seed=0, **kaleido_kwargs):
    torch.manual_seed(seed)
    wan = WanTransformer3DModel(**WAN_KEYS).eval()
    kal = KaleidoTransformer3DModel(**WAN_KEYS, **kaleido_kwargs).eval()
    kal.load_state_dict(wan.state_dict(), strict=True)
    return wan, kal


def inputs(batch=2, frames=3, h=8, w=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, h, w, generator=g)
    t = torch.tensor([999.0, 125.0][:batch])
    text = torch.randn(batch, 7, 32, generator=g)
    return x, t, text


class FixedRope(torch.nn.Module):
    """Stands in for Wan's rope: returns cos/sin of given positions (computed per token, independently)."""

    def __init__(self, positions):
        super().__init__()
        self.cos_sin = KaleidoRotaryPosEmbed(12)(torch.tensor(positions))

    def forward(self, hidden_states):
        return self.cos_sin


def test_same_parameters_and_config_keys_as_wan():
    wan, kal = make_pair()
    assert list(wan.state_dict()) == list(kal.state_dict())
    assert {k: v.shape for k, v in wan.state_dict().items()} == {k: v.shape for k, v in kal.state_dict().items()}
    assert set(kal.config) - set(wan.config) == {"ref_rope", "ref_rope_offset"}
    assert set(wan.config) - set(kal.config) == set()
    # and the other way round: Kaleido weights load strictly into Wan
    WanTransformer3DModel(**WAN_KEYS).load_state_dict(kal.state_dict(), strict=True)


def test_default_config_is_the_14b_release():
    defaults = {k: p.default for k, p in signature(KaleidoTransformer3DModel.__init__).parameters.items()}
    assert defaults["num_layers"] == 40 and defaults["num_attention_heads"] == 40
    assert defaults["attention_head_dim"] == 128 and defaults["ffn_dim"] == 13824 and defaults["text_dim"] == 4096
    assert defaults["ref_rope"] == "shift_hw" and defaults["ref_rope_offset"] == 80


def test_no_references_is_wan():
    wan, kal = make_pair()
    x, t, text = inputs()
    with torch.no_grad():
        expected = wan(x, t, text).sample
        got = kal(x, t, text).sample
        got_empty_list = kal(x, t, text, reference_latents=[]).sample
    assert (expected - got).abs().max().item() <= 1e-5
    assert torch.equal(got, got_empty_list)  # exact: None and [] are the same (empty) reference list in the code


@pytest.mark.parametrize("variant", sorted(REF_ROPE_VARIANTS))
def test_references_equal_wan_over_refs_then_video_with_r_rope_positions(variant):
    # With references of the video's size, Wan over cat([refs, video], time) has Kaleido's token order;
    # give it R-RoPE positions (from the independent loop) and keep its last T frames.
    offset = 5
    wan, kal = make_pair(ref_rope=variant, ref_rope_offset=offset)
    x, t, text = inputs()
    refs = torch.randn(2, 16, 2, 8, 6, generator=torch.Generator().manual_seed(3))
    wan.rope = FixedRope(loop_positions((3, 4, 3), [(4, 3), (4, 3)], variant, offset))
    with torch.no_grad():
        expected = wan(torch.cat([refs, x], dim=2), t, text).sample[:, :, 2:]
        got = kal(x, t, text, reference_latents=refs).sample
    assert got.shape == x.shape
    assert (expected - got).abs().max().item() <= 1e-5


def test_references_change_the_output_and_their_position_matters():
    _, kal = make_pair()
    x, t, text = inputs()
    refs = torch.randn(2, 16, 2, 8, 6)
    with torch.no_grad():
        plain = kal(x, t, text).sample
        with_refs = kal(x, t, text, reference_latents=refs).sample
        swapped = kal(x, t, text, reference_latents=refs.flip(2)).sample
    assert (plain - with_refs).abs().max() > 1e-3
    assert (with_refs - swapped).abs().max() > 1e-4  # reference j sits at t = j


def test_tensor_and_list_references_agree_and_batch_one_broadcasts():
    _, kal = make_pair()
    x, t, text = inputs()
    refs = torch.randn(1, 16, 3, 8, 6)
    with torch.no_grad():
        a = kal(x, t, text, reference_latents=refs).sample
        b = kal(x, t, text, reference_latents=list(refs.split(1, dim=2))).sample
        c = kal(x, t, text, reference_latents=refs.expand(2, -1, -1, -1, -1)).sample
    assert torch.equal(a, b)  # exact: the code splits a tensor into exactly these views, then one path
    assert (a - c).abs().max().item() <= 1e-6


def test_references_of_different_sizes():
    # subject_dynamic: each reference keeps its own patch grid; compare with Wan fed the same token
    # sequence, built by hand from the shared patch embedding, through the same blocks.
    wan, kal = make_pair()
    x, t, text = inputs(batch=1)
    refs = [torch.randn(1, 16, 1, 4, 10), torch.randn(1, 16, 1, 6, 2)]
    with torch.no_grad():
        got = kal(x, t, text, reference_latents=refs).sample
        tokens = [wan.patch_embedding(r).flatten(2).transpose(1, 2) for r in refs + [x]]
        hidden = torch.cat(tokens, dim=1)
        rope = KaleidoRotaryPosEmbed(12)(torch.tensor(loop_positions((3, 4, 3), [(2, 5), (3, 1)], "shift_hw", 80)))
        temb, proj, ctx, _ = wan.condition_embedder(t, text)
        proj = proj.unflatten(1, (6, -1))
        for block in wan.blocks:
            hidden = block(hidden, ctx, proj, rope)
        hidden = hidden[:, 10 + 3 :]
        shift, scale = (wan.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        out = wan.proj_out(wan.norm_out(hidden.float()) * (1 + scale) + shift)
        expected = out.reshape(1, 3, 4, 3, 1, 2, 2, -1).permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape)
    assert (expected - got).abs().max().item() <= 1e-5


def test_one_convolution_for_video_sized_references_equals_one_per_reference():
    # The fast path (references concatenated to the video on time, one patch embedding) against embedding each
    # reference and the video separately, as the general path does.
    _, kal = make_pair()
    x, _, _ = inputs()
    refs = [torch.randn(1, 16, 1, 8, 6), torch.randn(2, 16, 1, 8, 6)]
    with torch.no_grad():
        fast = kal._tokens(refs, x)
        separate = torch.cat([kal._embed(r.expand(2, -1, -1, -1, -1)) for r in refs] + [kal._embed(x)], dim=1)
    assert fast.shape == separate.shape == (2, 2 * 12 + 3 * 12, kal.config.num_attention_heads * 12)
    assert (fast - separate).abs().max().item() <= 1e-5  # fp32; the convolution's blocking may differ


def test_position_cache_follows_the_geometry():
    # One model run over changing reference sets equals the same model with its caches emptied before each call
    # (the caches never serve a stale geometry).
    _, kal = make_pair()
    x, t, text = inputs()
    cases = [None, [torch.randn(1, 16, 1, 8, 6)], [torch.randn(1, 16, 1, 4, 4)] * 2, None]

    def uncached(refs):
        kal._positions_cache = kal.rope._cache = None
        return kal(x, t, text, reference_latents=refs).sample

    with torch.no_grad():
        reused = [kal(x, t, text, reference_latents=refs).sample for refs in cases]
        fresh = [uncached(refs) for refs in cases]
    for a, b in zip(reused, fresh):
        assert torch.equal(a, b)  # exact: one model, same inputs, same code path; only the caches differ


def test_gradients_reach_the_reference_latents():
    _, kal = make_pair()
    x, t, text = inputs()
    refs = [torch.randn(2, 16, 1, 8, 6, requires_grad=True), torch.randn(1, 16, 1, 4, 4, requires_grad=True)]
    kal(x, t, text, reference_latents=refs).sample.square().mean().backward()
    for r in refs:
        assert r.grad is not None and r.grad.abs().sum() > 0
    assert kal.patch_embedding.weight.grad is not None


@pytest.mark.parametrize(
    "refs, message",
    [
        (torch.randn(2, 8, 1, 8, 6), "channels"),
        (torch.randn(2, 16, 1, 7, 6), "divisible"),
        (torch.randn(3, 16, 1, 8, 6), "batch size"),
        ([torch.randn(2, 16, 2, 8, 6)], r"\(B, C, 1, Hr, Wr\)"),
        (torch.randn(2, 16, 8, 6), r"\(B, C, N, Hr, Wr\)"),
    ],
)
def test_bad_references_get_clear_errors(refs, message):
    _, kal = make_pair()
    x, t, text = inputs()
    with pytest.raises(ValueError, match=message):
        kal(x, t, text, reference_latents=refs)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="ref_rope"):
        KaleidoTransformer3DModel(**WAN_KEYS, ref_rope="nope")
    with pytest.raises(ValueError, match="image-embedding"):
        KaleidoTransformer3DModel(**{**WAN_KEYS, "image_dim": 16, "added_kv_proj_dim": 24})


def test_bf16_forward_runs():
    _, kal = make_pair()
    kal = kal.to(torch.bfloat16)
    x, t, text = inputs()
    with torch.no_grad():
        out = kal(x.bfloat16(), t, text.bfloat16(), reference_latents=torch.randn(1, 16, 1, 8, 6)).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
