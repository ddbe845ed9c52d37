"""Training a MAGREF model (`kaleido-s2v train --model MAGREF-diffusers`): each sample's references on a canvas at
a random per-slot layout, the conditioning equal to what `MagrefPipeline` feeds the network, LoRA and full runs that
load back into the pipeline, and the settings a MAGREF model refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_training import merge_lora, read_metrics, toy_config, write_synthetic_data


@pytest.fixture(scope="module")
def magref_dirs(tmp_path_factory):
    """(tiny MagrefPipeline folder, synthetic training data folder)."""
    from kaleido_s2v import MagrefPipeline
    from kaleido_s2v.tiny import tiny_magref_components

    root = tmp_path_factory.mktemp("train-magref")
    MagrefPipeline(**tiny_magref_components(seed=0)).save_pretrained(root / "model")
    return root / "model", write_synthetic_data(root / "data")


def test_layout_is_drawn_per_slot_reproducibly():
    from kaleido_s2v.training.canvas import random_layout

    draws = [random_layout(7, step, slot, 3) for step in range(20) for slot in range(2)]
    assert draws == [random_layout(7, step, slot, 3) for step in range(20) for slot in range(2)]
    assert {d[0] for d in draws} == {"release", "grid"}
    assert len({tuple(d[2]) for d in draws if d[0] == "release"}) > 1  # the release layout's order is shuffled
    assert all(sorted(d[2]) == [0, 1, 2] for d in draws)
    assert random_layout(8, 0, 0, 3) != random_layout(7, 0, 0, 3) or random_layout(8, 1, 0, 3) != random_layout(
        7, 1, 0, 3)


def test_conditioning_is_the_pipelines(magref_dirs):
    """encode_batch's y and CLIP features equal MagrefPipeline's for the layout the slot drew."""
    from kaleido_s2v.model_folder import load_pipeline
    from kaleido_s2v.training.canvas import random_layout
    from kaleido_s2v.training.components import load_frozen_components
    from kaleido_s2v.training.config import TrainConfig
    from kaleido_s2v.training.data import SlotKey
    from kaleido_s2v.training.trainer import encode_batch

    model, _ = magref_dirs
    frozen = load_frozen_components(model, "cpu")
    assert set(frozen) == {"tokenizer", "text_encoder", "vae", "image_encoder"}
    cfg = TrainConfig()
    cfg.data.height, cfg.data.width, cfg.data.num_frames, cfg.data.max_sequence_length = 32, 48, 5, 16
    refs = [Image.fromarray(np.full((24, 20, 3), c, np.uint8)) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    slots = [SlotKey(index=0, seed=3, step=s, slot=0) for s in range(2)]
    items = [dict(pixels=torch.zeros(3, 5, 32, 48), caption="x", references=refs, slot=k) for k in slots]
    items.append(dict(pixels=torch.zeros(3, 5, 32, 48), caption="", references=[], slot=slots[0]))  # dropped refs
    encoded = encode_batch(items, frozen, cfg, "cpu")
    pipe = load_pipeline(model)
    for item, enc in zip(items, encoded):
        assert enc["latents"].shape == (16, 2, 4, 6) and enc["ref_latents"] == []
        assert enc["condition"].shape == (20, 2, 4, 6)
        if item["references"]:
            layout, seed, order = random_layout(3, item["slot"].step, 0, 3)
            canvas, region = pipe.compose([refs[i] for i in order], 32, 48, layout, seed)
            from kaleido_s2v.magref.conditioning import canvas_tensor

            c = canvas_tensor(canvas)[None]
            want_y = pipe.prepare_condition(c, region[None], 5)[0]
            want_clip = pipe.encode_image(c)[0]
        else:  # the empty canvas: white, no region
            assert (enc["condition"][:4] == 0).all()
            want_y = pipe.prepare_condition(torch.ones(1, 3, 32, 48), torch.zeros(1, 4, 6), 5)[0]
            want_clip = pipe.encode_image(torch.ones(1, 3, 32, 48))[0]
        torch.testing.assert_close(enc["condition"], want_y, rtol=1e-5, atol=1e-5)  # fp32, batched vs alone
        torch.testing.assert_close(enc["image_embeds"], want_clip.float(), rtol=1e-5, atol=1e-5)


def test_loss_feeds_noise_then_condition_and_clip_features():
    from kaleido_s2v.training.objective import add_noise, flow_matching_loss

    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, **kw):
            seen.update(kw)
            return (kw["hidden_states"][:, :16] * 0,)

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 16, 2, 4, 4, generator=g)
    y, clip = torch.randn(2, 20, 2, 4, 4, generator=g), torch.randn(2, 5, 24, generator=g)
    sigma = torch.tensor([0.25, 0.75])
    loss = flow_matching_loss(Recorder(), x0, eps, sigma, torch.zeros(2, 3, 32), condition=y, image_embeds=clip)
    assert seen["hidden_states"].shape == (2, 36, 2, 4, 4) and "reference_latents" not in seen
    torch.testing.assert_close(seen["hidden_states"][:, :16], add_noise(x0, eps, sigma), rtol=0, atol=0)
    torch.testing.assert_close(seen["hidden_states"][:, 16:], y, rtol=0, atol=0)
    assert seen["encoder_hidden_states_image"] is clip
    torch.testing.assert_close(loss, ((eps - x0) ** 2).mean(), rtol=1e-6, atol=0)  # prediction 0


def test_lora_run_loads_back_into_magref_pipeline(magref_dirs, tmp_path):
    """LoRA on the tiny MAGREF model: the exported adapter loads with MagrefPipeline.load_lora_weights and
    equals the base with merged W + B·A; the pipeline then generates."""
    from safetensors.torch import load_file

    from kaleido_s2v.model_folder import load_pipeline
    from kaleido_s2v.training.components import load_transformer
    from kaleido_s2v.training.trainer import train

    model, data = magref_dirs
    cfg = toy_config(model, data, tmp_path / "lora", max_steps=3, save_every=3)
    cfg.data.width = 48
    cfg.lora.rank = 4
    cfg.optim.lr = 1e-2
    summary = train(cfg, progress=False)
    assert summary["steps"] == 3 and np.isfinite(summary["last"]["loss"])
    final = tmp_path / "lora" / "final"
    weights = load_file(final / "pytorch_lora_weights.safetensors")
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in weights
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())  # it trained

    pipe = load_pipeline(model)
    pipe.load_lora_weights(final)
    merged = merge_lora(load_transformer(model), weights)
    got, want = _forward(pipe.transformer), _forward(merged)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got - _forward(load_transformer(model))).abs().max() > 1e-4
    pipe.set_progress_bar_config(disable=True)
    video = pipe("clip number 1", [Image.new("RGB", (30, 40), (200, 10, 10))], height=32, width=48, num_frames=5,
                 num_inference_steps=2, max_sequence_length=16, output_type="latent").frames
    assert video.shape == (1, 16, 2, 4, 6) and torch.isfinite(video).all()


def test_full_run_exports_a_transformer_the_pipeline_loads(magref_dirs, tmp_path):
    from diffusers import WanTransformer3DModel

    from kaleido_s2v.model_folder import load_pipeline
    from kaleido_s2v.training.trainer import train

    model, data = magref_dirs
    cfg = toy_config(model, data, tmp_path / "full", max_steps=2, save_every=2)
    cfg.data.width = 48
    train(cfg, progress=False)
    folder = tmp_path / "full" / "final" / "transformer"
    import json

    assert json.loads((folder / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    tuned = WanTransformer3DModel.from_pretrained(folder)
    pipe = load_pipeline(model, transformer=tuned)
    assert (_forward(pipe.transformer) - _forward(load_pipeline(model).transformer)).abs().max() > 0  # it trained
    losses = [r["loss"] for r in read_metrics(tmp_path / "full")]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.parametrize("extra,message", [
    (["--cache-dir", "{tmp}/cache"], "--cache-dir: the latent cache holds Kaleido's per-reference latents"),
    (["--ref-rope", "shift_hw"], "--ref-rope/--ref-rope-offset choose Kaleido's reference RoPE"),
])
def test_magref_refuses_kaleido_only_settings(magref_dirs, tmp_path, capsys, extra, message):
    from kaleido_s2v.cli import main

    model, data = magref_dirs
    extra = [e.format(tmp=tmp_path) for e in extra]
    rc = main(["train", "--recipe", "toy_cpu", "--model", str(model), "--data", str(data), "--height", "32",
               "--width", "48", "--output", str(tmp_path / "run"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _forward(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 36, 2, 4, 6, generator=g)
    text, clip = torch.randn(1, 8, 32, generator=g), torch.randn(1, 5, 24, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                           encoder_hidden_states_image=clip, return_dict=False)[0]


def test_fsdp2_two_ranks_match_one_process(magref_dirs, tmp_path):
    """FSDP2 over 2 CPU ranks (gloo), batch 2 each == one process, batch 4: the canvas layouts, noise and σ are
    drawn per slot, so the runs see the same samples."""
    from kaleido_s2v.training.trainer import train
    from tests.test_training_dist import assert_same_weights, final_weights, torchrun

    model, data = magref_dirs
    torchrun(2, "--recipe", "toy_cpu", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "fsdp"),
             "--height", "32", "--width", "48", "--max-steps", "2", "--save-every", "2", "--no-progress",
             "--batch-size", "2", "--seed", "3")
    cfg = toy_config(model, data, tmp_path / "one", max_steps=2, save_every=2, batch_size=4)
    cfg.data.width, cfg.run.seed = 48, 3
    train(cfg, progress=False)
    fsdp, one = read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "one")
    assert [m["loss"] for m in fsdp] == pytest.approx([m["loss"] for m in one], rel=1e-5)
    assert_same_weights(final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "one"))
