"""diffusers parity: precomputed prompt embeddings, reference latents (Kaleido) and canvas conditioning (MAGREF)
give the videos of the raw inputs, with the text encoder removed from the pipeline; the CLI encodes each distinct
text once, before the transformer loads, and frees the text encoder; bad shapes are one-line errors."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image

from kaleido_s2v import KaleidoPipeline, MagrefPipeline
from kaleido_s2v.tiny import tiny_components, tiny_magref_components

H, W, F = 32, 48, 5
SETTINGS = dict(height=H, width=W, num_frames=F, num_inference_steps=2, max_sequence_length=16, output_type="latent")
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32; the same ops in the same order, but batched text encodes may differ


def refs(n=2):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (30 + 10 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def kaleido():
    pipe = KaleidoPipeline(**tiny_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def magref():
    pipe = MagrefPipeline(**tiny_magref_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def without_text_encoder(pipe):
    cls = type(pipe)
    components = {**pipe.components, "text_encoder": None, "tokenizer": None}
    bare = cls(**components)
    bare.set_progress_bar_config(disable=True)
    return bare


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_call_signatures_carry_wan_pipelines_embedding_parameters():
    from diffusers import WanPipeline

    wan = set(inspect.signature(WanPipeline.__call__).parameters)
    for cls, extra in ((KaleidoPipeline, {"reference_latents"}), (MagrefPipeline, {"image_embeds", "condition"})):
        params = set(inspect.signature(cls.__call__).parameters)
        assert {"prompt_embeds", "negative_prompt_embeds"} <= params & wan
        assert extra <= params
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        assert name in inspect.signature(KaleidoPipeline.encode_prompt).parameters


def test_kaleido_embeddings_and_reference_latents_without_text_encoder(kaleido):
    want = kaleido("a fox pushes a car", refs(), generator=gen(), **SETTINGS).frames
    embeds, negative = kaleido.encode_prompt("a fox pushes a car", max_sequence_length=16, device="cpu")
    ref_latents = kaleido.encode_references(refs(), H, W)
    assert ref_latents.shape == (1, 16, 2, H // 8, W // 8)
    bare = without_text_encoder(kaleido)
    got = bare(prompt_embeds=embeds, negative_prompt_embeds=negative, reference_latents=ref_latents, generator=gen(),
               **SETTINGS).frames
    torch.testing.assert_close(got, want, **TOL)
    # guidance off: no negative embeddings needed
    off = bare(prompt_embeds=embeds, reference_latents=ref_latents, guidance_scale=1.0, generator=gen(),
               **SETTINGS).frames
    torch.testing.assert_close(off, kaleido("a fox pushes a car", refs(), guidance_scale=1.0, generator=gen(),
                                            **SETTINGS).frames, **TOL)
    # a different seed with the same encodings: a different video (the latents are reusable inputs, not a cache)
    assert not torch.equal(bare(prompt_embeds=embeds, negative_prompt_embeds=negative, reference_latents=ref_latents,
                                generator=gen(1), **SETTINGS).frames, got)


def test_kaleido_per_prompt_reference_latents(kaleido):
    prompts = ["a fox", "a penguin"]
    per_prompt = [refs(1), refs(2)[1:]]
    want = kaleido(prompts, per_prompt, generator=gen(), **SETTINGS).frames
    latents = kaleido.encode_references(per_prompt, H, W, batch_size=2)
    assert latents.shape[0] == 2
    got = kaleido(prompts, reference_latents=latents, generator=gen(), **SETTINGS).frames
    torch.testing.assert_close(got, want, **TOL)


def test_magref_embeddings_and_canvas_without_text_encoder(magref):
    kw = dict(layout="grid", layout_seed=2)
    want = magref("a man and a dog", refs(), generator=gen(), **kw, **SETTINGS).frames
    embeds, negative = magref.encode_prompt("a man and a dog", max_sequence_length=16, device="cpu")
    image_embeds, condition = magref.encode_canvas(refs(), H, W, F, **kw)
    assert condition.shape == (1, 20, 2, H // 8, W // 8) and image_embeds.shape[0] == 1
    got = without_text_encoder(magref)(prompt_embeds=embeds, negative_prompt_embeds=negative, image_embeds=image_embeds,
                                       condition=condition, generator=gen(), **SETTINGS).frames
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("family,kwargs,match", [
    ("kaleido", dict(prompt="p", prompt_embeds=torch.zeros(1, 16, 32)), "Cannot forward both `prompt` and `prompt_embeds`"),
    ("kaleido", dict(), "Provide either `prompt` or `prompt_embeds`"),
    ("kaleido", dict(prompt_embeds=torch.zeros(1, 16, 7)), r"`prompt_embeds` must be a \(batch, tokens, 32\) tensor"),
    ("kaleido", dict(prompt_embeds=torch.zeros(1, 16, 32), negative_prompt_embeds=torch.zeros(1, 8, 32)),
     "must have the same shape"),
    ("kaleido", dict(prompt="p", negative_prompt="n", negative_prompt_embeds=torch.zeros(1, 16, 32)),
     "Cannot forward both `negative_prompt` and `negative_prompt_embeds`"),
    ("kaleido", dict(prompt="p", reference_latents=torch.zeros(1, 16, 1, 3, 3)), "`reference_latents` must be"),
    ("kaleido", dict(prompt="p", reference_images=refs(1), reference_latents=torch.zeros(1, 16, 1, 4, 6)),
     "Cannot forward both `reference_images` and `reference_latents`"),
    ("magref", dict(prompt="p", image_embeds=torch.zeros(1, 5, 24)), "give both `image_embeds` and `condition`"),
    ("magref", dict(prompt="p", image_embeds=torch.zeros(1, 5, 24), condition=torch.zeros(1, 20, 3, 4, 6)),
     r"`condition` must be \(1, 20, 2, 4, 6\)"),
    ("magref", dict(prompt="p", image_embeds=torch.zeros(1, 5, 9), condition=torch.zeros(1, 20, 2, 4, 6)),
     r"`image_embeds` must be \(1, tokens, 24\)"),
])
def test_bad_precomputed_inputs_are_one_line_errors(kaleido, magref, family, kwargs, match):
    pipe = kaleido if family == "kaleido" else magref
    with pytest.raises(ValueError, match=match) as info:
        pipe(**kwargs, **SETTINGS)
    assert "\n" not in str(info.value)


def test_no_text_encoder_and_no_embeddings_names_the_argument(kaleido):
    bare = without_text_encoder(kaleido)
    with pytest.raises(ValueError, match="`negative_prompt_embeds` must be given: this pipeline has no text encoder"):
        bare(prompt_embeds=torch.zeros(1, 16, 32), reference_latents=kaleido.encode_references(refs(1), H, W),
             **SETTINGS)
    with pytest.raises(ValueError, match="`prompt_embeds` must be given"):
        bare("a prompt", refs(1), **SETTINGS)


# ------------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-kaleido"
    KaleidoPipeline(**tiny_components(seed=0)).save_pretrained(path)
    return path


def test_batch_encodes_each_distinct_text_once_before_the_transformer_loads(model_dir, tmp_path, monkeypatch):
    """4 cases, 2 distinct prompts, the default negative prompt: 3 text-encoder calls, all before the pipeline
    (which loads without a text encoder); the videos equal the pipeline's own for the same seeds."""
    import transformers

    from kaleido_s2v import model_folder
    from kaleido_s2v.cli import main
    from kaleido_s2v.video_io import read_video, write_video

    events = []
    real_forward = transformers.UMT5EncoderModel.forward
    monkeypatch.setattr(transformers.UMT5EncoderModel, "forward",
                        lambda self, *a, **k: events.append("encode") or real_forward(self, *a, **k))
    real_load = model_folder.load_pipeline
    loaded = {}

    def load(*a, **k):
        events.append("load")
        loaded["pipe"] = real_load(*a, **k)
        return loaded["pipe"]

    monkeypatch.setattr(model_folder, "load_pipeline", load)
    refs(1)[0].save(tmp_path / "a.png")
    lines = ["a fox@@a.png", "a penguin@@a.png", "a fox@@a.png", "a penguin@@a.png"]
    (tmp_path / "cases.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "videos"
    assert main(["generate", "--model", str(model_dir), "--batch", str(tmp_path / "cases.txt"), "--out-dir", str(out),
                 "--height", str(H), "--width", str(W), "--frames", str(F), "--steps", "2", "--max-sequence-length",
                 "16", "--seed", "3", "--quiet", "--text-encoder-device", "cpu"]) == 0
    assert events == ["encode"] * 3 + ["load"]
    assert loaded["pipe"].text_encoder is None and loaded["pipe"].tokenizer is None
    side = json.loads((out / "case0001.json").read_text())
    assert side["settings"]["text_encoder_device"] == "cpu"

    pipe = real_load(model_dir)
    pipe.set_progress_bar_config(disable=True)
    want = pipe("a penguin", [str(tmp_path / "a.png")], generator=gen(3), height=H, width=W, num_frames=F,
                num_inference_steps=2, max_sequence_length=16).frames[0]
    write_video(tmp_path / "want.mp4", (want * 255).round().clip(0, 255).astype(np.uint8), fps=16)
    got, expected = read_video(out / "case0002.mp4").astype(int), read_video(tmp_path / "want.mp4").astype(int)
    assert np.abs(got - expected).max() <= 1  # the same frames through the same encoder
