"""MagrefPipeline and its canvas against independent transcriptions of the release (reference/magref-official.md).

The canvas tests re-implement `process_refimg` / `resize_and_pad` of both official commits as written there
(block tables, `ImageOps.expand` padding, the module-level `random.shuffle`, the per-patch `any` loop), so they
share no code with `kaleido_s2v.magref.canvas`. The pipeline tests spy on the transformer's inputs.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from kaleido_s2v.latents import denormalize_latents
from kaleido_s2v.magref import compose_references, latent_mask
from kaleido_s2v.magref.release import (
    CLIP_MEAN,
    CLIP_STD,
    MAGREF_NEGATIVE_PROMPT,
    magref_scheduler,
    magref_sigmas,
)

H, W = 480, 832
FP32 = dict(rtol=1e-5, atol=1e-6)  # separately built or loaded fp32 models: other kernels may reassociate


# ------------------------------------------------------------------------------------------ the release, transcribed
def official_resize_and_pad(img: Image.Image, target_height: int, target_width: int):
    """`resize_and_pad` (both commits): (padded uint8 (H, W, 3), mask uint8 (H, W))."""
    img = img.convert("RGB")
    img_ratio = img.width / img.height
    target_ratio = target_width / target_height
    if img_ratio > target_ratio:
        new_w = target_width
        new_h = int(new_w / img_ratio)
    else:
        new_h = target_height
        new_w = int(new_h * img_ratio)
    img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    pad_w, pad_h = target_width - new_w, target_height - new_h
    padding = (pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2)
    img = ImageOps.expand(img, padding, fill=(255, 255, 255))
    mask = ImageOps.expand(Image.new("L", (new_w, new_h), color=1), padding, fill=0)
    return np.asarray(img, dtype=np.uint8), np.asarray(mask, dtype=np.uint8)


def official_release_canvas(images):
    """`process_refimg` at the release commit 5a309de (480 x 832 only)."""
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    mask = np.zeros((H, W), dtype=np.uint8)
    block_widths = [277, 278, 277]
    blocks = [(sum(block_widths[:i]), sum(block_widths[: i + 1])) for i in range(3)]
    indices = [1] if len(images) == 1 else list(range(len(images[:3])))
    for img_i, block_i in enumerate(indices):
        x_start, x_end = blocks[block_i]
        padded, m = official_resize_and_pad(images[img_i], H, block_widths[block_i])
        mask[:, x_start:x_end] = m
        canvas.paste(Image.fromarray(padded), (x_start, 0))
    return canvas, mask


def official_head_canvas(images, shuffle: bool):
    """`process_refimg` at HEAD e3c71b2; `shuffle=False` leaves out its two `random.shuffle` calls."""
    scale = min([s for s in [1, 2, 3, 4, 6, 8] if s >= len(images)], default=8)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    mask = np.zeros((H, W), dtype=np.uint8)
    if scale == 1:
        layout = [(0, 0, W, H)]
    elif scale == 2:
        bw = W // 2
        layout = [(0, 0, bw, H), (bw, 0, W, H)]
    elif scale == 3:
        bw = W // 3
        layout = [(0, 0, bw, H), (bw, 0, bw * 2, H), (bw * 2, 0, W, H)]
    elif scale == 4:
        bw, bh = W // 2, H // 2
        layout = [(0, 0, bw, bh), (bw, 0, W, bh), (0, bh, bw, H), (bw, bh, W, H)]
    elif scale == 6:
        bw, bh = W // 3, H // 2
        layout = [(0, 0, bw, bh), (bw, 0, bw * 2, bh), (bw * 2, 0, W, bh),
                  (0, bh, bw, H), (bw, bh, bw * 2, H), (bw * 2, bh, W, H)]
    else:
        bw, bh = W // 4, H // 2
        layout = [(0, 0, bw, bh), (bw, 0, bw * 2, bh), (bw * 2, 0, bw * 3, bh), (bw * 3, 0, W, bh),
                  (0, bh, bw, H), (bw, bh, bw * 2, H), (bw * 2, bh, bw * 3, H), (bw * 3, bh, W, H)]
    indices = list(range(len(images)))
    if shuffle:
        random.shuffle(indices)
        random.shuffle(layout)
    indices = indices[: len(layout)]
    for img_i, (x0, y0, x1, y1) in zip(indices, layout):
        padded, m = official_resize_and_pad(images[img_i], y1 - y0, x1 - x0)
        mask[y0:y1, x0:x1] = m
        canvas.paste(Image.fromarray(padded), (x0, y0))
    return canvas, mask


def official_downsample_mask(mask: np.ndarray, factor: int = 8) -> np.ndarray:
    h, w = mask.shape
    out = np.zeros((h // factor, w // factor), dtype=np.uint8)
    for i in range(h // factor):
        for j in range(w // factor):
            if mask[i * factor : (i + 1) * factor, j * factor : (j + 1) * factor].any():
                out[i, j] = 1
    return out


def references(n: int, seed: int = 0) -> list[Image.Image]:
    """n noise images of varied aspect ratios (portrait, landscape, square, extreme), each a different size."""
    rng = np.random.default_rng(seed)
    sizes = [(120, 200), (300, 90), (64, 64), (500, 333), (37, 410), (256, 255), (90, 300), (411, 61), (150, 149)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


# ------------------------------------------------------------------------------------------------------ the canvas
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_release_layout_equals_the_release_commit(n):
    refs = references(n)
    canvas, mask = compose_references(refs, layout="release")
    want_canvas, want_mask = official_release_canvas(refs)
    # bit-identical: the same PIL resampling, paste and integer box arithmetic
    assert canvas.size == (W, H) and canvas.mode == "RGB" and mask.dtype == bool and mask.shape == (H, W)
    np.testing.assert_array_equal(np.asarray(canvas), np.asarray(want_canvas))
    np.testing.assert_array_equal(mask, want_mask.astype(bool))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8])
def test_grid_layout_in_order_equals_head_without_its_shuffle(n):
    refs = references(n)
    canvas, mask = compose_references(refs, layout="grid")
    want_canvas, want_mask = official_head_canvas(refs, shuffle=False)
    np.testing.assert_array_equal(np.asarray(canvas), np.asarray(want_canvas))
    np.testing.assert_array_equal(mask, want_mask.astype(bool))


@pytest.mark.parametrize("n,seed", [(2, 0), (3, 7), (4, 1), (6, 3), (8, 11), (9, 5)])
def test_grid_layout_with_a_seed_is_heads_shuffle_seeded(n, seed):
    refs = references(n)
    random.seed(seed)  # HEAD shuffles with the module-level generator: seeding it is what layout_seed makes explicit
    want_canvas, want_mask = official_head_canvas(refs, shuffle=True)
    canvas, mask = compose_references(refs, layout="grid", seed=seed)
    np.testing.assert_array_equal(np.asarray(canvas), np.asarray(want_canvas))
    np.testing.assert_array_equal(mask, want_mask.astype(bool))
    again, _ = compose_references(refs, layout="grid", seed=seed)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(canvas))  # reproducible


def test_grid_seeds_give_different_layouts_and_release_ignores_order_beyond_three():
    refs = references(4)
    layouts = {compose_references(refs, layout="grid", seed=s)[1].tobytes() for s in range(6)}
    assert len(layouts) > 1
    # release: a fourth reference is dropped
    np.testing.assert_array_equal(np.asarray(compose_references(refs, "release")[0]),
                                  np.asarray(compose_references(refs[:3], "release")[0]))


def test_release_single_reference_uses_the_centre_column_and_mask_marks_only_its_pixels():
    canvas, mask = compose_references([Image.new("RGB", (100, 400), (10, 20, 30))])
    cols = np.flatnonzero(mask.any(axis=0))
    # 100 x 400 fitted into 278 x 480: 120 x 480, centred in [277, 555) -> x in [356, 476)
    assert (cols.min(), cols.max() + 1) == (277 + (278 - 120) // 2, 277 + (278 - 120) // 2 + 120)
    arr = np.asarray(canvas)
    assert (arr[mask] == (10, 20, 30)).all() and (arr[~mask] == 255).all()


def test_transparent_reference_goes_onto_white():
    rgba = np.zeros((50, 50, 4), dtype=np.uint8)
    rgba[10:40, 10:40] = (200, 0, 0, 255)
    canvas, mask = compose_references([rgba], layout="grid")
    arr = np.asarray(canvas)
    assert not mask.all() and arr[~mask].min() == 255
    assert (arr[mask][:, 1:] == 255).any()  # the transparent part of the fitted image is white, not black
    assert (arr[mask] == (0, 0, 0)).all(axis=-1).sum() == 0  # no black pixels where the image was transparent


def test_bad_layout_and_no_references_are_refused():
    with pytest.raises(ValueError, match="`layout` must be one of"):
        compose_references(references(1), layout="columns")
    with pytest.raises(ValueError, match="at least one reference"):
        compose_references([], layout="grid")


@pytest.mark.parametrize("layout,n", [("release", 1), ("release", 3), ("grid", 5), ("grid", 8)])
def test_latent_mask_is_max_pool_and_the_release_loop(layout, n):
    _, mask = compose_references(references(n), layout=layout, seed=None)
    got = latent_mask(mask, 8)
    assert got.shape == (60, 104) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.max_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], 8)[0, 0],
                               rtol=0, atol=0)
    np.testing.assert_array_equal(got.numpy().astype(np.uint8), official_downsample_mask(mask.astype(np.uint8)))


# ------------------------------------------------------------------------------------------------------ the grid
def test_the_40_step_grid_is_the_formula():
    s = np.linspace(0.999, 0.0, 41)[:-1]
    want = np.append(3.0 * s / (1.0 + 2.0 * s), 0.0)
    np.testing.assert_allclose(magref_sigmas(40), want, rtol=0, atol=1e-7)  # 0.999 vs float32(0.999)
    timesteps = (magref_sigmas(40)[:-1] * 1000).astype(np.int64)
    assert list(timesteps[:4]) == [999, 991, 982, 973] and timesteps[-1] == 71 and len(timesteps) == 40

    scheduler = magref_scheduler()
    from kaleido_s2v.magref.release import unshifted_sigmas

    scheduler.set_timesteps(sigmas=unshifted_sigmas(40))
    # the scheduler stores float32 sigmas: equal to the formula to float32 precision
    np.testing.assert_allclose(scheduler.sigmas.numpy(), want, rtol=0, atol=float(np.finfo(np.float32).eps))
    assert scheduler.timesteps.tolist() == timesteps.tolist()
    own = magref_scheduler()
    own.set_timesteps(40)  # diffusers' own grid is not the release's: why the pipeline hands the sigmas over
    assert np.abs(own.sigmas.numpy() - want).max() > 1e-3


def test_scheduler_steps_bit_identical_to_the_releases_flow_unipc():
    """diffusers' UniPC as configured (SCHEDULER_CONFIG, the sigmas handed over) == the release's own
    FlowUniPCMultistepScheduler(shift=1).set_timesteps(40, shift=3) (vendored in tests/reference), step by step."""
    from kaleido_s2v.magref.release import unshifted_sigmas
    from tests.reference.wan_fm_solvers_unipc import FlowUniPCMultistepScheduler

    release = FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    release.set_timesteps(40, device="cpu", shift=3.0)
    ours = magref_scheduler()
    ours.set_timesteps(sigmas=unshifted_sigmas(40))
    # bit-identical: the same float64 grid cast once to float32, and the same update formulas in the same order
    torch.testing.assert_close(ours.sigmas, release.sigmas, rtol=0, atol=0)
    assert ours.timesteps.tolist() == release.timesteps.long().tolist()
    g = torch.Generator().manual_seed(0)
    a = b = torch.randn(1, 16, 3, 8, 8, generator=g)
    for t_release, t_ours in zip(release.timesteps, ours.timesteps):
        v = torch.randn(1, 16, 3, 8, 8, generator=g)
        a = release.step(v, t_release, a, return_dict=False)[0]
        b = ours.step(v, t_ours, b, return_dict=False)[0]
    torch.testing.assert_close(b, a, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------ the pipeline
TH, TW, TF = 64, 96, 9  # tiny: 4 x 6 latent tokens (patch 2), 3 latent frames


@pytest.fixture(scope="module")
def pipe():
    from kaleido_s2v import MagrefPipeline
    from kaleido_s2v.tiny import tiny_magref_components

    pipe = MagrefPipeline(**tiny_magref_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Spy:
    """Records every transformer call's keyword inputs (cloned) and returns the real output."""

    def __init__(self, transformer):
        self.transformer, self.calls = transformer, []
        self.forward = transformer.forward

    def __enter__(self):
        def spy(*args, **kwargs):
            self.calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
            return self.forward(*args, **kwargs)

        self.transformer.forward = spy
        return self

    def __exit__(self, *exc):
        self.transformer.forward = self.forward


def run(pipe, refs, seed=0, **kwargs):
    kwargs = {"height": TH, "width": TW, "num_frames": TF, "num_inference_steps": 3, "output_type": "latent",
              **kwargs}
    return pipe("a cat and a hat", refs, generator=torch.Generator().manual_seed(seed), **kwargs).frames


def independent_condition(pipe, refs, layout="release", seed=None):
    """(image embeds, y) from the release's formulas (`subject2video.py:388-450`, `clip.py:527-542`)."""
    canvas, mask = compose_references(refs, layout, seed, TH, TW)
    img = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255.0 * 2 - 1  # to_tensor*2-1
    x = F.interpolate(img[None], size=(28, 28), mode="bicubic", align_corners=False) * 0.5 + 0.5
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    embeds = pipe.image_encoder(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    lat = torch.from_numpy(official_downsample_mask(mask.astype(np.uint8))).float()
    msk = torch.zeros(1, TF, *lat.shape)
    msk[:, 0] = lat
    msk = torch.cat([msk[:, :1].repeat_interleave(4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, *lat.shape).transpose(1, 2)[0]
    video = torch.cat([img[:, None], torch.zeros(3, TF - 1, TH, TW)], dim=1)[None]
    z = pipe.vae.encode(video).latent_dist.mode()
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    return embeds, torch.cat([msk[None], (z - mean) / std], dim=1)


@torch.no_grad()
def test_image_conditioning_is_the_releases_and_equal_in_both_cfg_branches(pipe):
    refs = references(2)
    with Spy(pipe.transformer) as spy:
        run(pipe, refs, guidance_scale=5.0)
    assert len(spy.calls) == 6  # 3 steps x (cond, uncond)
    embeds, y = independent_condition(pipe, refs)
    tol = dict(rtol=1e-5, atol=1e-5)  # fp32 throughout: only summation order differs
    text = []
    for call in spy.calls:
        x = call["hidden_states"]
        assert x.shape == (1, 36, 3, TH // 8, TW // 8)
        torch.testing.assert_close(x[:, 16:], y, **tol)  # noise / mask4 / canvas latent16, in this order
        torch.testing.assert_close(call["encoder_hidden_states_image"], embeds, **tol)
        text.append(call["encoder_hidden_states"])
    # the region mask sits in latent frame 0 of all 4 mask channels; later frames are zero
    assert y[0, :4, 0].sum() > 0 and (y[0, :4, 1:] == 0).all() and (y[0, :4, 0] == y[0, 0, 0]).all()
    # cond and uncond differ only in the text
    for cond, uncond in zip(spy.calls[::2], spy.calls[1::2]):
        torch.testing.assert_close(cond["hidden_states"], uncond["hidden_states"], rtol=0, atol=0)
        torch.testing.assert_close(cond["timestep"], uncond["timestep"], rtol=0, atol=0)
    assert not torch.equal(text[0], text[1])
    neg = pipe.encode_prompt("x", None, True, device="cpu")[1]
    want_neg = pipe.encode_prompt(MAGREF_NEGATIVE_PROMPT, None, False, device="cpu")[0]
    torch.testing.assert_close(neg, want_neg, rtol=0, atol=0)  # the default negative prompt is MAGREF's
    torch.testing.assert_close(text[1], want_neg, rtol=0, atol=0)


@torch.no_grad()
def test_denoising_loop_is_cfg_5_on_the_release_grid(pipe):
    """The pipeline's latents equal a loop written from the release (`:461-520`) on the same network."""
    refs = references(1)
    got = run(pipe, refs, num_inference_steps=4)
    embeds, y = independent_condition(pipe, refs)
    cond = pipe.encode_prompt("a cat and a hat", None, False, device="cpu")[0]
    uncond = pipe.encode_prompt(MAGREF_NEGATIVE_PROMPT, None, False, device="cpu")[0]
    latents = torch.randn((1, 16, 3, TH // 8, TW // 8), generator=torch.Generator().manual_seed(0))
    scheduler = magref_scheduler()
    s = np.linspace(0.999, 0.0, 5)[:-1]
    scheduler.set_timesteps(sigmas=s)
    assert scheduler.timesteps.tolist() == (3 * s / (1 + 2 * s) * 1000).astype(np.int64).tolist()
    for t in scheduler.timesteps:
        x = torch.cat([latents, y], dim=1)
        kw = dict(hidden_states=x, timestep=t.expand(1), encoder_hidden_states_image=embeds, return_dict=False)
        c = pipe.transformer(encoder_hidden_states=cond, **kw)[0]
        u = pipe.transformer(encoder_hidden_states=uncond, **kw)[0]
        latents = scheduler.step(u + 5.0 * (c - u), t, latents, return_dict=False)[0]
    torch.testing.assert_close(got, latents, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_seed_determinism_and_frames_dropped(pipe):
    refs = references(3)
    a, b = run(pipe, refs, seed=3), run(pipe, refs, seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same generator, same CPU ops: bit-identical
    assert not torch.equal(a, run(pipe, refs, seed=4))
    video = run(pipe, refs, seed=3, output_type="np")
    assert video.shape == (1, TF - 4, TH, TW, 3) and 0 <= video.min() and video.max() <= 1
    decoded = pipe.vae.decode(denormalize_latents(pipe.vae, a), return_dict=False)[0]
    assert decoded.shape[2] == TF
    want = pipe.video_processor.postprocess_video(decoded[:, :, 4:], output_type="np")
    np.testing.assert_allclose(video, want, rtol=0, atol=1e-6)  # the last TF − 4 decoded frames


@torch.no_grad()
def test_layout_and_layout_seed_reach_the_canvas(pipe):
    refs = references(4)
    ys = {}
    for key, kw in {"release": {}, "grid": {"layout": "grid"}, "grid7": {"layout": "grid", "layout_seed": 7}}.items():
        with Spy(pipe.transformer) as spy:
            run(pipe, refs, num_inference_steps=1, guidance_scale=1.0, **kw)
        assert len(spy.calls) == 1  # guidance 1: no unconditional branch
        ys[key] = spy.calls[0]["hidden_states"][:, 16:20, 0]
    _, want = independent_condition(pipe, refs, "grid", 7)
    torch.testing.assert_close(ys["grid7"], want[:, :4, 0], rtol=0, atol=0)
    assert not torch.equal(ys["release"], ys["grid"]) and not torch.equal(ys["grid"], ys["grid7"])


@pytest.mark.parametrize("kwargs,match", [
    ({"num_frames": 1}, "`num_frames` 1: must be 4k\\+1 and more than 4"),
    ({"num_frames": 11}, "`num_frames` 11"),
    ({"height": 60}, "height"),
    ({"layout": "rows"}, "`layout` must be one of"),
    ({"output_type": "mp4"}, "`output_type`"),
])
def test_bad_arguments_are_refused(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(pipe, references(1), **kwargs)


def test_no_references_and_too_many_are_refused(pipe):
    with pytest.raises(ValueError, match="at least one reference"):
        run(pipe, None)
    with pytest.raises(ValueError, match="9"):
        run(pipe, references(9))


def test_wrong_scheduler_config_is_corrected_with_a_warning(pipe, caplog):
    from diffusers import UniPCMultistepScheduler

    from kaleido_s2v import MagrefPipeline
    from kaleido_s2v.tiny import tiny_magref_components

    components = tiny_magref_components(seed=0)
    components["scheduler"] = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=5.0)
    other = MagrefPipeline(**components)
    other.set_progress_bar_config(disable=True)
    from diffusers.utils import logging as dlogging

    dlogging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            got = run(other, references(1))
    finally:
        dlogging.disable_propagation()
    assert "does not sample as MAGREF" in caplog.text
    assert other.scheduler.config.flow_shift == 3.0
    # a separately built pipeline (same seed-0 weights): fp32 tolerance, not bit-identity
    torch.testing.assert_close(got, run(pipe, references(1)), **FP32)


def test_save_and_load_round_trip_and_wan_i2v_folder(pipe, tmp_path):
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor

    from kaleido_s2v import MagrefPipeline
    from kaleido_s2v.model_folder import facts, load_pipeline

    pipe.save_pretrained(tmp_path / "magref")
    index = json.loads((tmp_path / "magref/model_index.json").read_text())
    assert index["_class_name"] == "MagrefPipeline"
    assert index["image_encoder"] == ["transformers", "CLIPVisionModel"]
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    loaded = load_pipeline(tmp_path / "magref")
    assert type(loaded) is MagrefPipeline
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(loaded, references(2)), run(pipe, references(2)), **FP32)  # a loaded copy
    defaults = facts(tmp_path / "magref").sampling_defaults
    assert (defaults["height"], defaults["width"], defaults["num_frames"], defaults["fps"]) == (480, 832, 81, 15)
    assert (defaults["num_inference_steps"], defaults["guidance_scale"]) == (40, 5.0)

    # a diffusers Wan image-to-video folder (what convert_wan_to_diffusers.py writes) runs as MAGREF
    wan = WanImageToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                  scheduler=pipe.scheduler, image_processor=CLIPImageProcessor(crop_size=28, size=28),
                                  image_encoder=pipe.image_encoder, transformer=pipe.transformer)
    wan.save_pretrained(tmp_path / "wan-i2v")
    from_wan = load_pipeline(tmp_path / "wan-i2v")
    assert type(from_wan) is MagrefPipeline
    from_wan.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(from_wan, references(2)), run(pipe, references(2)), **FP32)

