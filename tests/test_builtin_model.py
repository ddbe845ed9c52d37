"""The shipped built-in model: it loads from the package, generates fast, and really follows its references.

The quality check is the toy evaluator on fresh evaluation cases (a seed never used in training): the
videos must show the reference subjects far more often than the shuffled-reference control would.
"""

import json

import numpy as np
import pytest
import torch

from kaleido_s2v.builtin import (
    BUILTIN_WEIGHTS_DIR,
    builtin_generation_defaults,
    builtin_model_dir,
    default_reference_image,
    load_builtin_pipeline,
)
from kaleido_s2v.model_folder import size_multiple
from kaleido_s2v.toy.evaluator import evaluate
from kaleido_s2v.toy.world import WorldConfig, make_eval_cases, read_scenes

pytestmark = pytest.mark.skipif(builtin_model_dir() is None, reason="the built-in weights are not in this checkout")


@pytest.fixture(scope="module")
def pipe():
    p = load_builtin_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def test_shipped_folder_is_small_and_complete():
    files = [f for f in BUILTIN_WEIGHTS_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (BUILTIN_WEIGHTS_DIR / part).is_dir(), part
    assert not any(f.suffix in (".bin", ".pt", ".pkl") for f in files)  # safetensors only
    vae = json.loads((BUILTIN_WEIGHTS_DIR / "vae" / "config.json").read_text())
    assert vae["latents_mean"] != [0.0] * 16 and min(vae["latents_std"]) > 0  # measured statistics, not defaults


def _generate(pipe, prompt, references, seed, **overrides):
    """One video (F, H, W, 3) in [0, 1] at the model's generation defaults."""
    d = {k: v for k, v in builtin_generation_defaults().items() if k != "fps"} | overrides
    return pipe(prompt, references, generator=torch.Generator().manual_seed(seed), output_type="np", **d).frames[0]


def test_builtin_defaults_match_the_training_sizes():
    d = builtin_generation_defaults()
    recipe = json.loads((BUILTIN_WEIGHTS_DIR / "toy_recipe.json").read_text())
    t = recipe["train"]["data"]
    assert (d["height"], d["width"], d["num_frames"]) == (t["height"], t["width"], t["num_frames"])
    assert d["max_sequence_length"] == t["max_sequence_length"]
    assert (d["num_frames"] >= 9) and min(d["height"], d["width"]) >= 64


def test_smoke_generation_with_the_default_reference(pipe):
    d = builtin_generation_defaults()
    video = _generate(pipe, "The red striped circle moves to the left on a sandy floor.", [default_reference_image()], 0,
                      num_inference_steps=4)
    assert video.shape == (d["num_frames"], d["height"], d["width"], 3) and np.isfinite(video).all()
    assert video.std() > 0.05  # an image, not a flat colour


def test_sizes_are_multiples_of_8_not_16(pipe):
    """The stride-4 VAE × patch 2: 72×56 is a valid size for this model (not for the release), 68 is not."""
    assert size_multiple(BUILTIN_WEIGHTS_DIR) == 8 and size_multiple(None) == 16
    video = _generate(pipe, "The red striped circle moves to the left.", [default_reference_image()], 0,
                      height=72, width=56, num_inference_steps=2)
    assert video.shape[1:] == (72, 56, 3)
    with pytest.raises(ValueError, match="divisible by 8"):
        _generate(pipe, "p", [default_reference_image()], 0, height=68, num_inference_steps=1)


def _score_eval_cases(pipe, cases, num, *, seed, cfg):
    """Generate `num` fresh evaluation cases at the model's defaults; the evaluator's (matched, control) scores."""
    make_eval_cases(cases, num, seed=seed, cfg=cfg, progress=False)
    records = read_scenes(cases)
    videos = [
        (_generate(pipe, r["caption"], [cases / ref["path"] for ref in r["references"]], k) * 255).round().astype(np.uint8)
        for k, r in enumerate(records)
    ]
    report = evaluate(records, videos)
    return report["matched"], report["control"]


def test_follows_its_references_better_than_the_shuffled_control(pipe, tmp_path):
    """48 unseen evaluation cases (12 per reference kind) at the model's default settings.

    Measured with the shipped round-2 weights (46000 steps, 2026-11-21, two CPU threads): colour recall 0.71
    against 0.15 for the shuffled control, recall 0.33 against 0.07 (on the 200 cases of docs/toy.md: 0.75 /
    0.23 and 0.39 / 0.10). Random weights score 0. 24 cases were too few for the shape recall: their control
    drew 0.13.
    """
    matched, control = _score_eval_cases(pipe, tmp_path / "cases", 48, seed=97, cfg=WorldConfig())
    assert matched["colour_recall"] >= 0.6, matched
    assert matched["colour_recall"] >= control["colour_recall"] + 0.35, (matched, control)
    assert matched["recall"] >= control["recall"] + 0.15, (matched, control)
    assert matched["leak_rate"] <= 0.05, matched


def test_takes_colours_from_its_references_when_the_caption_has_none(pipe, tmp_path):
    """24 unseen cases with colour-free captions ("The striped circle moves ..."): only the references say which
    subject is which colour, so a model that draws from the caption alone scores at the control's level.

    Measured (2026-11-21, two CPU threads): the shipped round-2 weights (46000 steps) colour recall 0.60 against
    0.15 for the control; a caption-driven model (the wide transformer after 18000 steps on full captions only,
    docs/toy.md) 0.42 against 0.17, which fails here.
    """
    matched, control = _score_eval_cases(pipe, tmp_path / "cases", 24, seed=98, cfg=WorldConfig(caption_style="no-colour"))
    assert matched["colour_recall"] >= 0.5, matched
    assert matched["colour_recall"] >= control["colour_recall"] + 0.3, (matched, control)
