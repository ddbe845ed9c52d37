"""Making the built-in model: recipe -> pipeline folder, VAE training with latent statistics, trainer config, assembly."""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kaleido_s2v.errors import UserInputError
from kaleido_s2v.toy.model import assemble, init_model, load_recipe, train_config, train_vae


@pytest.fixture(scope="module")
def recipe():
    """The shipped recipe, shrunk to test size (same keys, so the shipped file is exercised)."""
    r = copy.deepcopy(load_recipe())
    r["text_encoder"].update(d_model=16, d_kv=4, d_ff=32, num_heads=4)
    r["transformer"].update(text_dim=16, num_layers=1, num_attention_heads=2, attention_head_dim=12, ffn_dim=32)
    r["vae"].update(base_dim=4, dim_mult=[1] * len(r["vae"]["dim_mult"]))
    r["data"].update(size=32, width=32, frames=5)
    r["vae_training"].update(steps=2, batch_size=1, stats_clips=8, pool_clips=4, save_every=1)
    return r


def test_shipped_recipe_is_consistent():
    r = load_recipe()
    assert r["text_encoder"]["d_model"] == r["transformer"]["text_dim"]
    token_px = r["vae"]["scale_factor_spatial"] * r["transformer"]["patch_size"][1]
    assert (r["train"]["data"]["num_frames"] - 1) % 4 == 0 == r["train"]["data"]["height"] % token_px
    assert r["generation"]["num_frames"] == r["data"]["frames"] == r["train"]["data"]["num_frames"]
    assert r["generation"]["max_sequence_length"] == r["train"]["data"]["max_sequence_length"]
    bad = copy.deepcopy(r)
    bad["transformer"]["text_dim"] = 8
    with pytest.raises(UserInputError, match="text_dim"):
        init_model("/nonexistent/never-written", bad)
    bad = copy.deepcopy(r)
    bad["vae"]["scale_factor_spatial"] = 2 * r["vae"]["scale_factor_spatial"]
    with pytest.raises(UserInputError, match="scale_factor_spatial"):
        init_model("/nonexistent/never-written", bad)
    bad["vae"]["dim_mult"] = [*r["vae"]["dim_mult"], 4]  # (the shipped one passes: test_init_train_vae_config_and_assemble)
    with pytest.raises(UserInputError, match="temperal_downsample"):
        init_model("/nonexistent/never-written", bad)


def test_init_train_vae_config_and_assemble(recipe, tmp_path):
    import kaleido_s2v.transformer  # noqa: F401  (from_pretrained resolves the class by module name)
    from kaleido_s2v.model_folder import generation_defaults
    from kaleido_s2v.pipeline import KaleidoPipeline
    from kaleido_s2v.training.config import load_config

    model = init_model(tmp_path / "model", recipe)
    pipe = KaleidoPipeline.from_pretrained(model)
    assert pipe.transformer.config.num_layers == 1 and pipe.transformer.config.text_dim == 16
    assert pipe.vae.config.base_dim == 4 and pipe.text_encoder.config.d_model == 16
    assert generation_defaults(model) == recipe["generation"]
    before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}

    summary = train_vae(model, recipe, progress=False)
    assert summary["steps"] == 2 and len(summary["latents_mean"]) == 16
    vae_cfg = json.loads((model / "vae" / "config.json").read_text())
    assert vae_cfg["latents_mean"] == pytest.approx(summary["latents_mean"])
    assert min(vae_cfg["latents_std"]) > 0
    trained = KaleidoPipeline.from_pretrained(model).vae.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before)  # the VAE learned something

    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text(train_config(recipe, model=str(model), data=str(tmp_path / "data"), output=str(tmp_path / "run")))
    cfg = load_config(yaml_path).validate()
    assert cfg.model.path == str(model.resolve()) and cfg.data.num_frames == 9 and cfg.run.output.endswith("run")

    with pytest.raises(UserInputError, match="final/transformer"):
        assemble(model, tmp_path / "nothing", tmp_path / "out")
    assert (model / "vae_training.json").is_file()
    out = assemble(model, model / "transformer", tmp_path / "weights")
    assert not (out / "vae_training.json").exists()  # training logs stay with the model folder
    assert (out / "transformer" / "config.json").read_text() == (model / "transformer" / "config.json").read_text()
    assert (out / "vae" / "config.json").is_file() and (out / "generation_defaults.json").is_file()

    # fp16 storage: half the bytes on disk, loads back as the fp32 model with fp16-rounded weights
    half = assemble(model, model / "transformer", tmp_path / "weights16", transformer_dtype="fp16")
    name = "diffusion_pytorch_model.safetensors"
    full_w, half_w = load_file(out / "transformer" / name), load_file(half / "transformer" / name)
    assert {v.dtype for v in half_w.values()} == {torch.float16}
    assert (half / "transformer" / name).stat().st_size < 0.55 * (out / "transformer" / name).stat().st_size
    loaded = KaleidoPipeline.from_pretrained(half).transformer.state_dict()
    # exact: fp32 -> fp16 -> fp32 casts are correctly rounded, the same on any machine
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], full_w[k].half().float()) for k in full_w)
    with pytest.raises(UserInputError, match="fp32 or fp16"):
        assemble(model, model / "transformer", tmp_path / "bad", transformer_dtype="bf16")


def test_trainer_reads_the_vae_stride(recipe, tmp_path, monkeypatch):
    """A VAE of spatial stride 4: the trainer's resolution shift must see that latent grid, not H // 8."""
    import kaleido_s2v.training.trainer as trainer
    from kaleido_s2v.cli import main
    from kaleido_s2v.toy.world import WorldConfig, make_dataset

    recipe = copy.deepcopy(recipe)
    recipe["vae"].update(dim_mult=[1, 1, 1], temperal_downsample=[True, True], scale_factor_spatial=4)
    model = init_model(tmp_path / "model", recipe)
    make_dataset(tmp_path / "data", 2, cfg=WorldConfig(height=32, width=32, frames=5, ref_size=32), progress=False)
    seen = []
    monkeypatch.setattr(trainer, "resolution_shift", lambda h, w, p=2: seen.append((h, w)) or 1.5)
    assert main(["train", "--recipe", "toy_cpu", "--model", str(model), "--data", str(tmp_path / "data"), "--height", "32",
                 "--width", "48", "--num-frames", "5", "--max-steps", "1", "--output", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    assert seen == [(32 // 4, 48 // 4)]


def test_train_text_learns_the_captions(recipe, tmp_path):
    """Masked-LM on the training captions: masked bytes are predicted far above chance (1/256), the encoder is
    rewritten in place (the pipeline loads it), and a folder without captions is refused."""
    import numpy as np

    from kaleido_s2v.pipeline import KaleidoPipeline
    from kaleido_s2v.toy.__main__ import main as toy_main
    from kaleido_s2v.toy.captions import caption
    from kaleido_s2v.toy.model import train_text
    from kaleido_s2v.toy.world import WorldConfig, sample_scene

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"clip_id": f"c{i}", "video": f"videos/c{i}.mp4",
             "caption": caption(sample_scene(np.random.default_rng(i), WorldConfig()))} for i in range(200)]
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = init_model(tmp_path / "model", recipe)
    before = {k: v.clone() for k, v in KaleidoPipeline.from_pretrained(model).text_encoder.state_dict().items()}

    r = copy.deepcopy(recipe)
    r["text_training"].update(steps=500, batch_size=8, lr=3e-3)
    summary = train_text(model, data, r, progress=False)
    assert summary["captions"] == 200 and summary["steps"] == 500
    text = "".join(row["caption"] for row in rows).encode()
    unigram = max(text.count(bytes([b])) for b in set(text)) / len(text)  # always guessing the commonest byte
    assert summary["accuracy"] > 2 * unigram, (summary, unigram)  # so the context is used
    history = json.loads((model / "text_training.json").read_text())["history"]
    assert np.mean([h["loss"] for h in history[-50:]]) < 0.5 * np.mean([h["loss"] for h in history[:10]])
    after = KaleidoPipeline.from_pretrained(model).text_encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    with pytest.raises(UserInputError, match="manifest.jsonl"):
        train_text(model, tmp_path / "nothing", r, progress=False)
    assert toy_main(["train-text", "--model", str(tmp_path / "none"), "--data", str(data), "--steps", "1"]) == 2


def test_reproduce_runs_every_stage_then_only_what_is_missing(recipe, tmp_path):
    """`reproduce` makes weights from the recipe end to end; a second call does nothing; a longer run resumes
    from the last checkpoint (only the steps it lacks); a rebuilt model makes the cache and run stale."""
    from kaleido_s2v.pipeline import KaleidoPipeline
    from kaleido_s2v.toy.reproduce import STAGES, reproduce

    r = copy.deepcopy(recipe)
    r["data"].update(num=6, ref_size=32)
    r["eval"].update(num=3)
    r["text_training"].update(steps=2, batch_size=4)
    r["train"]["data"].update(height=32, width=32, num_frames=5)
    r["train"]["optim"].update(warmup_steps=0, decay_steps=0)
    r["train"]["run"].update(max_steps=2, batch_size=2, save_every=1)
    r["generation"].update(height=32, width=32, num_frames=5, num_inference_steps=2)
    r["assemble"] = {"transformer_dtype": "fp16"}
    work, lines = tmp_path / "work", []

    def written(path):
        return (work / path).stat().st_mtime_ns

    first = reproduce(work, r, progress=False, log=lines.append)
    assert first["ran"] == list(STAGES)
    assert first["matched"]["cases"] == 3 and set(first["control"]) >= {"recall", "colour_recall"}
    assert json.loads((work / "report.json").read_text())["matched"] == first["matched"]
    assert len(list((work / "videos").glob("*.mp4"))) == 3 and len(list((work / "cache").glob("toy*.pt"))) == 6
    pipe = KaleidoPipeline.from_pretrained(first["weights"])
    ema = load_file(work / "run" / "final" / "transformer_ema" / "diffusion_pytorch_model.safetensors")
    # exact: the assembled weights are the EMA cast to fp16 (and back on loading), no arithmetic
    assert all(torch.equal(v, ema[k].half().float()) for k, v in pipe.transformer.state_dict().items())  # EMA, fp16
    assert not (work / "model.partial").exists() and (work / "model" / "text_training.json").is_file()
    weights_file = work / "weights" / "transformer" / "diffusion_pytorch_model.safetensors"
    stamp = written(weights_file)

    lines.clear()
    assert reproduce(work, r, progress=False, log=lines.append)["ran"] == []
    assert lines == [f"reproduce: {s}: done (skipped)" for s in STAGES]
    assert written(weights_file) == stamp

    r["train"]["run"]["max_steps"] = 3  # a longer run: resumes at step 2, not from scratch
    ckpt2, cached = written("run/checkpoint-2/trainer_state.json"), written("cache/toy000000.pt")
    assert reproduce(work, r, progress=False, log=lines.append)["ran"] == ["run", "weights", "eval"]
    steps = [json.loads(line)["step"] for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and (work / "run" / "checkpoint-3").is_dir()
    assert written("run/checkpoint-2/trainer_state.json") == ckpt2 and written("cache/toy000000.pt") == cached
    assert not torch.equal(load_file(weights_file)[next(iter(ema))], ema[next(iter(ema))].half())

    shutil.rmtree(work / "model")  # a new model: its cache and run are stale and are made again
    assert reproduce(work, r, progress=False, log=lines.append)["ran"] == list(STAGES[1:])
    assert written("cache/toy000000.pt") != cached and written("run/checkpoint-2/trainer_state.json") != ckpt2


def test_reproduce_refuses_a_file_as_work_folder(tmp_path, capsys):
    from kaleido_s2v.toy.__main__ import main as toy_main

    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert toy_main(["reproduce", "--work", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err and f.read_text() == "mine"
    assert toy_main(["reproduce", "--work", str(tmp_path / "w"), "--recipe", str(tmp_path / "none.yaml")]) == 2
    assert not (tmp_path / "w").exists()
