"""Speed options (`kaleido_s2v.speed`, `generate --cache/--compile/--attention-backend`): cache modes skip forwards
(counted), `none` is bit-identical to no option, both CFG branches keep their own cache, an unusable attention
backend is one line listing the usable ones, and the sidecar says what a run computed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kaleido_s2v import KaleidoPipeline, MagrefPipeline
from kaleido_s2v.cli import main
from kaleido_s2v.speed import CACHE_MODES, ForwardCounter, apply_speed_options, attention_backends
from kaleido_s2v.tiny import tiny_components, tiny_magref_components

REF = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
CALL = dict(height=32, width=48, num_frames=5, num_inference_steps=12, max_sequence_length=16, output_type="latent")


def run(pipe, mode: str):
    apply_speed_options(pipe, cache=mode)
    counter = ForwardCounter(pipe.transformer)
    with counter.counting():
        out = pipe("a cat", [REF], generator=torch.Generator().manual_seed(0), **CALL).frames
    return out, counter.record()


@pytest.mark.parametrize("make", [lambda: KaleidoPipeline(**tiny_components(seed=0)),
                                  lambda: MagrefPipeline(**tiny_magref_components(seed=0))], ids=["kaleido", "magref"])
def test_cache_modes_skip_forwards_and_none_is_unchanged(make):
    base = make()
    base.set_progress_bar_config(disable=True)
    want, counts = run(base, "none")
    assert counts == {"calls": 24, "computed": 24, "cached": 0}  # 12 steps x 2 CFG branches
    again, _ = run(make(), "none")
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-6)  # a separately built pipeline: fp32 tolerance
    for mode in ("fbcache", "taylorseer"):
        pipe = make()
        pipe.set_progress_bar_config(disable=True)
        out, counts = run(pipe, mode)
        assert counts["calls"] == 24 and 0 < counts["computed"] < 24, (mode, counts)
        assert torch.isfinite(out).all() and out.shape == want.shape


def test_cfg_branches_keep_their_own_cache():
    """First Block Cache with an infinite threshold computes each branch once (the first step) and then reuses its
    own residuals: 2 computed forwards, not 1 (which a shared cache would give)."""
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = KaleidoPipeline(**tiny_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=float("inf")))
    counter = ForwardCounter(pipe.transformer)
    with counter.counting():
        pipe("a cat", [REF], generator=torch.Generator().manual_seed(0), **CALL)
    assert counter.record() == {"calls": 24, "computed": 2, "cached": 22}


def test_attention_backends_and_cli_flags(tmp_path, capsys):
    usable = attention_backends()
    assert "native" in usable and not any(b.endswith("_hub") for b in usable)  # nothing fetched at run time
    assert set(CACHE_MODES) == {"none", "fbcache", "taylorseer", "magcache", "magcache-calibrate"}
    rc = main(["generate", "--prompt", "p", "--attention-backend", "no_such_kernel", "-o", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and "--attention-backend 'no_such_kernel' is not usable on this machine: choose one of" in err
    assert "native" in err and list(tmp_path.iterdir()) == []

    common = ["generate", "--prompt", "The red striped circle moves to the left.", "--seed", "1", "--quiet"]
    assert main([*common, "-o", str(tmp_path / "plain.mp4")]) == 0
    assert main([*common, "--cache", "none", "--attention-backend", "native", "-o", str(tmp_path / "none.mp4")]) == 0
    assert main([*common, "--cache", "fbcache", "-o", str(tmp_path / "fb.mp4")]) == 0
    plain, none, fb = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "none", "fb"))
    from kaleido_s2v.video_io import read_video

    plain_video, none_video = (read_video(tmp_path / f"{n}.mp4").astype(int) for n in ("plain", "none"))
    assert np.abs(plain_video - none_video).max() <= 1  # none = no option (two loads: uint8 rounding at most)
    steps = plain["settings"]["num_inference_steps"]
    assert plain["transformer_forwards"] == {"calls": 2 * steps, "computed": 2 * steps, "cached": 0}
    assert none["settings"]["cache"] == "none" and none["settings"]["attention_backend"] == "native"
    assert fb["settings"]["cache"] == "fbcache" and fb["transformer_forwards"]["cached"] > 0
    stages = plain["stages"]
    assert set(stages["seconds"]) == {"references", "denoise", "decode"} and stages["seconds"]["denoise"] > 0
    assert sum(stages["seconds"].values()) <= plain["seconds"] and stages["memory"]["peak_gib"] > 0
    assert plain["settings"]["text_encoder_seconds"] > 0  # encoded once, before the pipeline loaded
    assert fb["transformer_forwards"]["calls"] == 2 * steps


def test_compile_runs_the_repeated_blocks_compiled(cpp_compiler, tmp_path):
    """--compile: diffusers' regional compilation (`compile_repeated_blocks`) of the tiny pipeline matches eager."""
    pipe = KaleidoPipeline(**tiny_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    want = pipe("a cat", [REF], generator=torch.Generator().manual_seed(0), **{**CALL, "num_inference_steps": 2}).frames
    apply_speed_options(pipe, compile=True)
    got = pipe("a cat", [REF], generator=torch.Generator().manual_seed(0), **{**CALL, "num_inference_steps": 2}).frames
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # fused kernels: float32 reassociation only


def test_distill_grid_is_the_published_one():
    """LightX2V's 4-step list [1000, 750, 500, 250] warped by shift 5: the timesteps its maintainers give
    (1000, 937.5001, 833.3333, 625; ModelTC/LightX2V-Wan2.2-Lightning#3), with Euler steps and then σ = 0."""
    from kaleido_s2v.release import DISTILL_SHIFT

    pipe = KaleidoPipeline(**tiny_components(seed=0))
    timesteps = pipe.set_official_timesteps(4, shift=DISTILL_SHIFT)
    np.testing.assert_allclose(timesteps.numpy(), [1000.0, 937.5001, 833.3333, 625.0], rtol=0, atol=1e-3)
    np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), [1.0, 0.9375, 0.833333, 0.625, 0.0], atol=1e-6)
    official = pipe.set_official_timesteps(4)  # the release's shift 7 is untouched
    np.testing.assert_allclose(official.numpy()[1], 1000 * 7 * 0.75 / (1 + 6 * 0.75), atol=1e-3)


def test_cli_distill_sampler_runs_4_steps_without_cfg(tmp_path):
    common = ["generate", "--prompt", "The red striped circle moves to the left.", "--seed", "1", "--quiet"]
    assert main([*common, "--sampler", "distill", "-o", str(tmp_path / "d.mp4")]) == 0
    side = json.loads((tmp_path / "d.json").read_text())
    s = side["settings"]
    assert (s["sampler"], s["shift"], s["num_inference_steps"], s["guidance_scale"]) == ("distill", 5.0, 4, 1.0)
    assert side["transformer_forwards"] == {"calls": 4, "computed": 4, "cached": 0}  # no CFG: one forward a step
    assert main([*common, "--sampler", "distill", "--steps", "6", "-o", str(tmp_path / "d6.mp4")]) == 0
    assert json.loads((tmp_path / "d6.json").read_text())["transformer_forwards"]["calls"] == 6


def test_cli_lora_changes_the_video_and_is_recorded(tmp_path, capsys):
    """--lora FILE:SCALE on the built-in model, in the original Wan key names (as LightX2V ships): the video
    changes, scale 0 gives the plain video back, the sidecar lists the file, scale and format; a bad file exits 2."""
    from kaleido_s2v.builtin import load_builtin_pipeline
    from tests.test_lora_files import random_lora, write

    transformer = load_builtin_pipeline().transformer
    blocks = len(transformer.blocks)
    modules = [(f"blocks.{i}.self_attn.q", f"blocks.{i}.attn1.to_q") for i in range(blocks)]
    lora = tmp_path / "style.safetensors"
    write(lora, random_lora(transformer, 0, modules), "wan")
    common = ["generate", "--prompt", "The red striped circle moves to the left.", "--seed", "1", "--quiet",
              "--steps", "4"]
    assert main([*common, "-o", str(tmp_path / "plain.mp4")]) == 0
    assert main([*common, "--lora", f"{lora}:0.8", "-o", str(tmp_path / "lora.mp4")]) == 0
    assert main([*common, "--lora", f"{lora}:0", "-o", str(tmp_path / "zero.mp4")]) == 0
    side = json.loads((tmp_path / "lora.json").read_text())
    assert side["settings"]["loras"] == [{"file": str(lora), "scale": 0.8, "format": "wan"}]
    from kaleido_s2v.video_io import read_video

    plain, with_lora, zero = (read_video(tmp_path / f"{n}.mp4").astype(int) for n in ("plain", "lora", "zero"))
    assert np.abs(with_lora - plain).max() > 8
    assert np.abs(zero - plain).max() <= 1  # scale 0: the base weights (up to float rounding in the LoRA path)

    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"diffusion_model.blocks.99.self_attn.q.lora_down.weight": torch.zeros(4, 8),
               "diffusion_model.blocks.99.self_attn.q.lora_up.weight": torch.zeros(8, 4)}, str(bad))
    capsys.readouterr()
    rc = main([*common, "--lora", str(bad), "-o", str(tmp_path / "bad.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.safetensors" in err and "Traceback" not in err and not (tmp_path / "bad.mp4").exists()


def test_magcache_calibrates_once_then_skips_and_refuses_other_grids(tmp_path, capsys):
    """magcache-calibrate stores the ratios in the model folder (keyed by sampler and steps, stdout untouched);
    magcache then skips forwards; another step count, or a calibration file the user wrote, is refused."""
    from PIL import Image

    from kaleido_s2v.speed import CALIBRATION_FILE

    model = tmp_path / "model"
    KaleidoPipeline(**tiny_components(seed=0)).save_pretrained(model)
    Image.fromarray(REF).save(tmp_path / "a.png")
    common = ["generate", "--model", str(model), "--prompt", "cat", "--ref", str(tmp_path / "a.png"), "--height",
              "32", "--width", "48", "--frames", "5", "--steps", "12", "--max-sequence-length", "16", "--seed", "0",
              "--quiet"]
    assert main([*common, "--cache", "magcache", "-o", str(tmp_path / "a.mp4")]) == 2
    assert "no calibration for 12 steps of the official sampler" in capsys.readouterr().err
    assert main([*common, "--cache", "magcache-calibrate", "--json", "-o", str(tmp_path / "cal.mp4")]) == 0
    out = capsys.readouterr()
    json.loads(out.out)  # only the JSON summary on stdout
    calibration = json.loads((model / CALIBRATION_FILE).read_text())
    ratios = calibration["magcache"]["official:12"]["ratios"]
    assert calibration["made_by"] == "kaleido-s2v generate" and len(ratios) == 12 and ratios[0] == 1.0
    assert main([*common, "--cache", "magcache", "-o", str(tmp_path / "m.mp4")]) == 0
    forwards = json.loads((tmp_path / "m.json").read_text())["transformer_forwards"]
    assert forwards["calls"] == 24 and forwards["computed"] < 24
    six = [*common[:-6], "6", *common[-5:]]
    assert main([*six, "--cache", "magcache", "-o", str(tmp_path / "six.mp4")]) == 2
    assert "(it holds official:12): run once with --cache magcache-calibrate --steps 6" in capsys.readouterr().err
    # a calibration file the user wrote is theirs: refused, kept
    (model / CALIBRATION_FILE).write_text('{"mine": true}\n')
    assert main([*common, "--cache", "magcache-calibrate", "-o", str(tmp_path / "again.mp4")]) == 2
    assert "already exists" in capsys.readouterr().err and (model / CALIBRATION_FILE).read_text() == '{"mine": true}\n'


def test_builtin_model_ships_magcache_ratios(tmp_path):
    """The built-in model's 20-step official grid is calibrated in the package: --cache magcache works at once."""
    from kaleido_s2v.builtin import builtin_model_dir
    from kaleido_s2v.speed import read_magcache_ratios

    assert len(read_magcache_ratios(builtin_model_dir(), "official", 20)) == 20
    assert main(["generate", "--prompt", "The red striped circle moves to the left.", "--seed", "1", "--quiet",
                 "--cache", "magcache", "-o", str(tmp_path / "m.mp4")]) == 0
    forwards = json.loads((tmp_path / "m.json").read_text())["transformer_forwards"]
    assert forwards["calls"] == 40 and 0 < forwards["computed"] < 40
