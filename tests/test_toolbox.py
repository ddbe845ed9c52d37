"""The diffusers toolbox keeps working on KaleidoTransformer3DModel (each checked against the plain model)."""

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig

from kaleido_s2v import KaleidoTransformer3DModel
from kaleido_s2v.tiny import tiny_transformer


def model_and_inputs(**overrides):
    model = tiny_transformer(seed=0, **overrides).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 8, 6, generator=g)
    t = torch.tensor([900.0, 300.0])
    text = torch.randn(2, 7, 32, generator=g)
    refs = [torch.randn(1, 16, 1, 8, 6, generator=g), torch.randn(1, 16, 1, 4, 10, generator=g)]
    return model, (x, t, text), refs


def run(model, args, refs):
    with torch.no_grad():
        return model(*args, reference_latents=refs).sample


def test_save_load_round_trip_keeps_the_r_rope_config(tmp_path):
    model, args, refs = model_and_inputs(ref_rope="time_negative", ref_rope_offset=40)
    model.save_pretrained(tmp_path / "t")
    loaded = KaleidoTransformer3DModel.from_pretrained(tmp_path / "t").eval()
    assert loaded.config.ref_rope == "time_negative" and loaded.config.ref_rope_offset == 40
    # fp32, 2 blocks (reductions <= 256 long): the reloaded weights sit elsewhere in memory, so BLAS may sum in
    # another order; measured <= 8e-7 on |x| <= 2.6 across ATen/oneDNN ISAs. The R-RoPE config not kept (variant
    # or offset) moves the output by >= 6e-2, thousands of times this tolerance.
    torch.testing.assert_close(run(model, args, refs), run(loaded, args, refs), rtol=1e-5, atol=1e-5)
    assert '"ref_rope": "time_negative"' in (tmp_path / "t" / "config.json").read_text()


def test_gradient_checkpointing_gives_the_same_gradients():
    model, args, refs = model_and_inputs()

    def grads():
        model.zero_grad()
        model(*args, reference_latents=refs).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6)


def test_set_attention_backend():
    model, args, refs = model_and_inputs()
    expected = run(model, args, refs)
    model.set_attention_backend("_native_math")
    torch.testing.assert_close(run(model, args, refs), expected, rtol=1e-5, atol=1e-5)
    model.reset_attention_backend()


def test_first_block_cache():
    model, args, refs = model_and_inputs()
    x, t, text = args
    expected = [run(model, (x, t * s, text), refs) for s in (1.0, 0.999)]

    model.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # never reuses: exact
    with model.cache_context("cond"):
        got = [run(model, (x, t * s, text), refs) for s in (1.0, 0.999)]
    model.disable_cache()
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b)

    model.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # always reuses after the first call
    with model.cache_context("cond"):
        first = run(model, (x, t, text), refs)
        reused = run(model, (x, t * 0.999, text), refs)
    model.disable_cache()
    torch.testing.assert_close(first, expected[0])
    assert not torch.equal(reused, expected[1])  # the tail blocks were skipped


@pytest.mark.parametrize("to_disk", [False, True])
def test_group_offloading(tmp_path, to_disk):
    model, args, refs = model_and_inputs()
    expected = run(model, args, refs)
    model.enable_group_offload(
        onload_device=torch.device("cpu"),
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        offload_to_disk_path=str(tmp_path) if to_disk else None,
    )
    torch.testing.assert_close(run(model, args, refs), expected)


def test_layerwise_casting_stores_fp8_and_stays_close():
    model, args, refs = model_and_inputs()
    expected = run(model, args, refs)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert model.patch_embedding.weight.dtype == torch.float32  # skipped pattern, as Wan
    got = run(model, args, refs)
    assert torch.isfinite(got).all()
    assert (got - expected).abs().mean() < 0.1 * expected.abs().mean()


def test_peft_lora_adapter():
    from peft import LoraConfig

    model, args, refs = model_and_inputs()
    expected = run(model, args, refs)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.testing.assert_close(run(model, args, refs), expected)  # LoRA B starts at zero
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    assert not torch.allclose(run(model, args, refs), expected)
    model.disable_adapters()
    torch.testing.assert_close(run(model, args, refs), expected)
