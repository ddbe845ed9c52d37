"""KaleidoPipeline on tiny real-class components: sampler grid, CFG references, I/O, round trips."""

import numpy as np
import pytest
import torch
from PIL import Image

from kaleido_s2v.latents import encode_references
from kaleido_s2v.pipeline import (
    KALEIDO_NEGATIVE_PROMPT,
    WAN_NEGATIVE_PROMPT,
    KaleidoPipeline,
    KaleidoPipelineOutput,
    official_prompt,
)
from kaleido_s2v.references import fit_reference
from kaleido_s2v.text import encode_text
from kaleido_s2v.tiny import tiny_components

H, W, F = 48, 80, 5  # latent 6x10 -> 3x5 patches; 2 latent frames
LATENT = (1, 16, 2, H // 8, W // 8)


def _image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pipe():
    p = KaleidoPipeline(**tiny_components(seed=0))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def refs():
    return [_image(1, 30, 70), _image(2, 64, 40)]


def _run(pipe, prompt="a fox and a hat", references=None, seed=0, **kw):
    kw = {"height": H, "width": W, "num_frames": F, "num_inference_steps": 3, "output_type": "latent",
          "max_sequence_length": 64, **kw}
    return pipe(prompt, references, generator=torch.Generator().manual_seed(seed), **kw)


class TransformerSpy:
    """Records every transformer call's inputs (the pipeline's real forward still runs)."""

    def __init__(self, pipe):
        self.calls = []
        self.pipe = pipe

    def __enter__(self):
        original = type(self.pipe.transformer).forward
        calls = self.calls

        def forward(module, *args, **kwargs):
            calls.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
            out = original(module, *args, **kwargs)
            calls[-1]["output"] = out[0].clone()
            return out

        self.pipe.transformer.forward = forward.__get__(self.pipe.transformer)
        return self

    def __exit__(self, *exc):
        del self.pipe.transformer.forward


def test_output_types_and_shapes(pipe, refs):
    out = _run(pipe, references=refs, output_type="np")
    assert isinstance(out, KaleidoPipelineOutput)
    assert out.frames.shape == (1, F, H, W, 3) and out.frames.dtype == np.float32
    assert 0.0 <= out.frames.min() and out.frames.max() <= 1.0
    pt = _run(pipe, references=refs, output_type="pt").frames
    assert pt.shape == (1, F, 3, H, W)
    np.testing.assert_allclose(pt[0].permute(0, 2, 3, 1).numpy(), out.frames[0], atol=1e-6)
    pil = _run(pipe, references=refs, output_type="pil").frames
    assert len(pil) == 1 and len(pil[0]) == F and pil[0][0].size == (W, H)
    # exact: same pipe, seed and process -> the same floats (test_determinism_and_sensitivity), and "pil" is
    # diffusers' (x * 255).round() of them
    np.testing.assert_array_equal(np.asarray(pil[0][2]), (out.frames[0, 2] * 255).round().astype(np.uint8))
    latents = _run(pipe, references=refs).frames
    assert latents.shape == LATENT
    (frames,) = _run(pipe, references=refs, return_dict=False, num_videos_per_prompt=2)
    assert frames.shape == (2, *LATENT[1:])
    torch.testing.assert_close(frames[0], latents[0])  # the first video's noise is the same draw


def test_fifty_timesteps_follow_the_official_formula(pipe, refs):
    # σ_k = 7s / (1 + 6s), s = 1 - k/50 — written out here, independent of kaleido_s2v.release
    s = 1.0 - np.arange(51) / 50
    sigma = 7 * s / (1 + 6 * s)
    assert sigma[1] == pytest.approx(0.99709, abs=1e-5)
    assert sigma[25] == pytest.approx(0.875, abs=1e-12) and sigma[49] == pytest.approx(0.125, abs=1e-12)
    with TransformerSpy(pipe) as spy:
        _run(pipe, references=refs[:1], num_inference_steps=50, num_frames=1)
    used = np.array([c["timestep"][0].item() for c in spy.calls])
    assert len(used) == 100  # cond + uncond per step
    np.testing.assert_allclose(used[0::2], 1000 * sigma[:50], rtol=0, atol=2e-4)
    np.testing.assert_allclose(used[1::2], 1000 * sigma[:50], rtol=0, atol=2e-4)
    np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), sigma, rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [4, 7])
def test_other_step_counts_use_the_same_formula(pipe, steps):
    timesteps = pipe.set_official_timesteps(steps).numpy()
    s = 1.0 - np.arange(steps) / steps
    np.testing.assert_allclose(timesteps, 1000 * 7 * s / (1 + 6 * s), rtol=0, atol=2e-4)


def test_a_loaded_scheduler_config_cannot_change_the_grid():
    from diffusers import FlowMatchEulerDiscreteScheduler

    components = tiny_components(seed=0)
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, use_karras_sigmas=True
    )
    p = KaleidoPipeline(**components)
    s = 1.0 - np.arange(50) / 50
    np.testing.assert_allclose(p.set_official_timesteps(50).numpy(), 7000 * s / (1 + 6 * s), rtol=0, atol=2e-4)
    assert p.scheduler.config.shift == 7.0 and not p.scheduler.config.use_dynamic_shifting


def test_both_cfg_branches_get_the_same_references(pipe, refs):
    with TransformerSpy(pipe) as spy:
        _run(pipe, references=refs, num_inference_steps=2)
    assert len(spy.calls) == 4
    expected = torch.cat(encode_references(pipe.vae, refs, H, W), dim=2)  # one encode per reference, shared helper
    for call in spy.calls:
        assert call["reference_latents"].shape == (1, 16, 2, H // 8, W // 8)
        torch.testing.assert_close(call["reference_latents"], expected)
    cond, uncond = spy.calls[0], spy.calls[1]
    assert not torch.equal(cond["encoder_hidden_states"], uncond["encoder_hidden_states"])  # text differs...
    assert torch.equal(cond["hidden_states"], uncond["hidden_states"])  # ...the rest does not (exact: one tensor)


def test_euler_update_with_cfg_follows_the_official_sampler(pipe, refs):
    """x_{k+1} = x_k + (σ_{k+1} − σ_k)·(v_u + 6·(v_c − v_u)), σ from the formula, fp32 throughout."""
    x0 = torch.randn(LATENT, generator=torch.Generator().manual_seed(5))
    states = []
    callback = lambda p, i, t, kw: states.append(kw["latents"].clone()) or {}  # noqa: E731
    with TransformerSpy(pipe) as spy:
        _run(pipe, references=refs, num_inference_steps=4, latents=x0.clone(), callback_on_step_end=callback)
    s = 1.0 - np.arange(5) / 4
    sigma = 7 * s / (1 + 6 * s)
    x = x0
    for k in range(4):
        v_c, v_u = spy.calls[2 * k]["output"], spy.calls[2 * k + 1]["output"]
        x = x + (sigma[k + 1] - sigma[k]) * (v_u + 6.0 * (v_c - v_u))
        torch.testing.assert_close(states[k], x.float(), atol=1e-5, rtol=1e-5)
        assert states[k].dtype == torch.float32


def test_latents_stay_fp32_with_a_bf16_transformer():
    p = KaleidoPipeline(**tiny_components(seed=0))
    p.set_progress_bar_config(disable=True)
    p.transformer.to(torch.bfloat16)
    out = _run(p, references=[_image(1, 16, 16)], num_inference_steps=2, guidance_scale=1.0).frames
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_one_vae_encode_per_reference_each_a_single_frame(pipe, refs, monkeypatch):
    shapes = []
    original = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda x, *a, **k: shapes.append(tuple(x.shape)) or original(x, *a, **k))
    _run(pipe, references=refs + [refs[0]], num_inference_steps=1)
    assert shapes == [(1, 3, 1, H, W)] * 3


def test_no_guidance_means_one_call_per_step(pipe, refs):
    with TransformerSpy(pipe) as spy:
        _run(pipe, references=refs, num_inference_steps=2, guidance_scale=1.0)
    assert len(spy.calls) == 2


def test_default_negative_prompt_is_the_release_one(pipe):
    assert "画得不好的脸部" in WAN_NEGATIVE_PROMPT and "画得不好的脸部" not in KALEIDO_NEGATIVE_PROMPT
    assert KALEIDO_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态") and KALEIDO_NEGATIVE_PROMPT.endswith("倒着走")
    assert len(WAN_NEGATIVE_PROMPT) - len(KALEIDO_NEGATIVE_PROMPT) == len("画得不好的脸部，")
    _, negative = pipe.encode_prompt("a cat", max_sequence_length=64)
    torch.testing.assert_close(negative, encode_text(pipe.tokenizer, pipe.text_encoder, KALEIDO_NEGATIVE_PROMPT, 64))


def test_determinism_and_sensitivity(pipe, refs):
    # (latents: the tiny random VAE decoder squashes small latent differences to ~1e-6 in pixels)
    a = _run(pipe, references=refs, seed=0).frames
    # exact: the same pipe (same weight tensors) on the same inputs in one process: a rerun is bit-identical
    torch.testing.assert_close(a, _run(pipe, references=refs, seed=0).frames, rtol=0, atol=0)
    assert (a - _run(pipe, references=refs, seed=1).frames).abs().max() > 1e-1
    other = [_image(3, 50, 50), _image(4, 20, 90)]
    assert (a - _run(pipe, references=other, seed=0).frames).abs().max() > 1e-4
    assert (a - _run(pipe, references=refs[::-1], seed=0).frames).abs().max() > 1e-4  # order matters (R-RoPE)
    assert (a - _run(pipe, references=refs[:1], seed=0).frames).abs().max() > 1e-4


def test_reference_inputs_paths_pil_and_arrays_agree(pipe, refs, tmp_path):
    path = tmp_path / "ref.png"
    Image.fromarray(refs[0]).save(path)
    a = _run(pipe, references=[refs[0]], num_inference_steps=1).frames
    for same in ([str(path)], Image.fromarray(refs[0]), refs[0].astype(np.float32) / 255.0):
        # exact: each form becomes the same uint8 image (k/255 * 255 + 0.5 truncates to k) before any arithmetic
        torch.testing.assert_close(a, _run(pipe, references=same, num_inference_steps=1).frames, rtol=0, atol=0)


def test_batch_with_per_prompt_references_equals_separate_calls(pipe, refs):
    other = [_image(5, 40, 40), _image(6, 33, 77)]
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    batch = pipe(
        ["a fox", "a hat"], [refs, other], height=H, width=W, num_frames=F, num_inference_steps=2,
        generator=generators, output_type="latent", max_sequence_length=64,
    ).frames
    one = _run(pipe, "a fox", refs, seed=0, num_inference_steps=2).frames[0]
    two = _run(pipe, "a hat", other, seed=1, num_inference_steps=2).frames[0]
    torch.testing.assert_close(batch[0], one, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1], two, atol=1e-5, rtol=0)


def test_text_to_video_without_references(pipe):
    with TransformerSpy(pipe) as spy:
        out = _run(pipe, references=None, num_inference_steps=1)
    assert out.frames.shape == LATENT
    assert spy.calls[0]["reference_latents"] is None


def test_official_prompt_quirk_encodes_the_whole_line(pipe, refs, tmp_path, monkeypatch):
    import kaleido_s2v.pipeline as module

    paths = []
    for j, r in enumerate(refs):
        paths.append(str(tmp_path / f"r{j}.png"))
        Image.fromarray(r).save(paths[-1])
    seen = []
    monkeypatch.setattr(module, "encode_text", lambda tok, enc, prompts, *a: seen.append(prompts) or encode_text(
        tok, enc, prompts, *a))
    _run(pipe, "two things", paths, num_inference_steps=1, official_prompt_with_paths=True)
    assert seen[0] == [f"two things@@{paths[0]}@@{paths[1]}"] == [official_prompt("two things", paths)]
    seen.clear()
    _run(pipe, "two things", paths, num_inference_steps=1)
    assert seen[0] == ["two things"]
    with pytest.raises(ValueError, match="paths"):
        _run(pipe, "x", refs, official_prompt_with_paths=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"height": 50}, "height"),
        ({"width": 81}, "width"),
        ({"prompt": "  "}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"references": [np.zeros((8, 8, 3), np.uint8)] * 5}, "max_references"),
        ({"references": "/nonexistent/ref.png"}, "does not exist"),
        ({"output_type": "mp4"}, "output_type"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(pipe, refs, kwargs, match):
    kwargs = {"prompt": "p", "references": refs, **kwargs}
    with pytest.raises(ValueError, match=match):
        _run(pipe, kwargs.pop("prompt"), kwargs.pop("references"), **kwargs)


def test_more_than_three_references_warn_and_limit_is_configurable(pipe, caplog):
    four = [_image(i, 16, 16) for i in range(4)]
    from diffusers.utils import logging as dlogging

    dlogging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            _run(pipe, references=four, num_inference_steps=1)
    finally:
        dlogging.disable_propagation()
    assert "at most 3" in caplog.text
    with pytest.raises(ValueError, match="max_references"):
        _run(pipe, references=four, max_references=2)


def test_frames_are_rounded_to_4k_plus_1(pipe, refs):
    assert _run(pipe, references=refs, num_frames=10, num_inference_steps=1).frames.shape[2] == 3  # 9 frames


def test_fit_reference_matches_a_hand_computation():
    # 100x37 (w x h) into 48x80: r = 2.7027 > 80/48, so new_w = 80, new_h = int(80 / (100/37)) = int(29.6) = 29
    img = Image.fromarray(_image(7, 37, 100))
    fitted = np.asarray(fit_reference(img, 48, 80))
    top = (48 - 29) // 2  # 9
    assert fitted.shape == (48, 80, 3)
    assert (fitted[:top] == 255).all() and (fitted[top + 29 :] == 255).all()
    # exact (here and below): fit_reference makes this very PIL call on the same uint8 image
    np.testing.assert_array_equal(fitted[top : top + 29], np.asarray(img.resize((80, 29), Image.Resampling.LANCZOS)))
    # tall image: r = 30/90 < 80/48, so new_h = 48, new_w = int(48 * 30/90) = 16; left = (80 - 16) // 2 = 32
    tall = Image.fromarray(_image(8, 90, 30))
    fitted = np.asarray(fit_reference(tall, 48, 80))
    assert (fitted[:, :32] == 255).all() and (fitted[:, 48:] == 255).all()
    np.testing.assert_array_equal(fitted[:, 32:48], np.asarray(tall.resize((16, 48), Image.Resampling.LANCZOS)))


def test_fit_reference_on_a_real_release_image(examples_dir):
    path = examples_dir / "ref1.png"
    img = Image.open(path).convert("RGB")
    w, h = img.size
    if w / h > 896 / 512:
        nw, nh = 896, int(896 / (w / h))
    else:
        nw, nh = int(512 * (w / h)), 512
    fitted = np.asarray(fit_reference(path, 512, 896))
    left, top = (896 - nw) // 2, (512 - nh) // 2
    expected = np.asarray(img.resize((nw, nh), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(fitted[top : top + nh, left : left + nw], expected)  # exact: the same PIL call
    pad = np.ones((512, 896), bool)
    pad[top : top + nh, left : left + nw] = False
    assert (fitted[pad] == 255).all()


def test_save_and_load_round_trip_gives_the_same_video(pipe, refs, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "model_index.json").is_file()
    loaded = KaleidoPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.transformer).__name__ == "KaleidoTransformer3DModel"
    kw = {"references": refs, "num_frames": 1, "output_type": "np"}
    # Not bit-identical: the reloaded weights lie elsewhere in memory (safetensors offsets), so MKL/oneDNN may take
    # other SIMD paths and sum in another order. fp32 noise in the latents (~1e-6 after 3 CFG steps) shrinks in
    # the tiny VAE's pixels to ~1 ulp (6e-8, measured also across ATen/oneDNN ISAs); a lost weight, config key
    # (ref_rope_offset) or component moves pixels by >= 1.4e-3, 1000x this tolerance.
    np.testing.assert_allclose(_run(pipe, **kw).frames, _run(loaded, **kw).frames, rtol=0, atol=1e-6)


def test_load_lora_weights_as_wan_pipelines(refs, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    trained = KaleidoPipeline(**tiny_components(seed=0))
    trained.set_progress_bar_config(disable=True)
    base = _run(trained, references=refs, num_inference_steps=2).frames.numpy()
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    trained.transformer.add_adapter(config)
    with_lora = _run(trained, references=refs, num_inference_steps=2).frames.numpy()
    assert np.abs(with_lora - base).max() > 1e-4
    lora_layers = get_peft_model_state_dict(trained.transformer)
    KaleidoPipeline.save_lora_weights(tmp_path, transformer_lora_layers=lora_layers)

    fresh = KaleidoPipeline(**tiny_components(seed=0))
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(tmp_path)
    np.testing.assert_allclose(_run(fresh, references=refs, num_inference_steps=2).frames.numpy(), with_lora, atol=1e-6)


def test_expected_slice(pipe, refs):
    """diffusers-style regression pin of a few output values (tiny components, seed 0, 3 steps)."""
    latents = _run(pipe, references=refs).frames
    got = latents[0, :, 1, 2, 4].numpy()  # 16 channels of one latent pixel
    expected = np.array(EXPECTED_SLICE, dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-3)


EXPECTED_SLICE = [
    2.3884, 1.1355, 1.2658, -0.1409, -1.1224, -1.5789, 0.3089, -0.0093,
    1.2627, -1.5733, 0.2468, -0.2754, 3.5279, -0.3305, -0.8619, -1.7007,
]


def test_from_pretrained_in_a_fresh_process(pipe, tmp_path):
    """model_index.json names `kaleido_s2v.transformer`; importing KaleidoPipeline must be enough to load it."""
    import os
    import subprocess
    import sys

    pipe.save_pretrained(tmp_path / "m")
    code = f"from kaleido_s2v import KaleidoPipeline; KaleidoPipeline.from_pretrained({str(tmp_path / 'm')!r})"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]


def test_from_pretrained_on_a_folder_that_is_not_a_pipeline_names_what_is_expected(tmp_path):
    from kaleido_s2v.errors import UserInputError

    with pytest.raises(UserInputError, match="model_index.json"):
        KaleidoPipeline.from_pretrained(tmp_path)
