"""Training (`kaleido-s2v train`): objective vs the spec numbers, data fixes (fps, every reference), config,
single-process training with exact resume, LoRA export round trip, latent cache, bad samples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kaleido_s2v.errors import UserInputError

# ---------------------------------------------------------------------------------------------- builders
MODEL_INDEX = {
    "_class_name": "KaleidoPipeline",
    "_diffusers_version": "0.42.1",
    "tokenizer": ["transformers", "ByT5Tokenizer"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
    "transformer": ["kaleido_s2v", "KaleidoTransformer3DModel"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
}


def write_tiny_pipeline(root: Path, seed: int = 0) -> Path:
    """Save each `tiny_components()` model into its subfolder, plus model_index.json."""
    from kaleido_s2v.tiny import tiny_components

    for name, component in tiny_components(seed).items():
        component.save_pretrained(root / name)
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return root


def write_synthetic_data(root: Path, num_clips: int = 3, fps: float = 30, frames: int = 12) -> Path:
    """Official layout: random clips at `fps`, captions, clip i with i % 3 + 1 references (ref1.png, ...)."""
    from kaleido_s2v.video_io import write_video

    for i in range(num_clips):
        rng = np.random.default_rng(i)
        write_video(root / "videos" / f"c{i}.mp4", (rng.random((frames, 48, 80, 3)) * 255).astype(np.uint8), fps=fps)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "labels" / f"c{i}.txt").write_text(f"clip number {i}\nignored second line")
        (root / "references" / f"c{i}").mkdir(parents=True, exist_ok=True)
        for j in range(i % 3 + 1):
            img = (rng.random((40, 30, 3)) * 255).astype(np.uint8)
            Image.fromarray(img).save(root / "references" / f"c{i}" / f"ref{j + 1}.png")
    return root


CASES = {  # testdata case -> (reference files, caption)
    "case1": (["image1.jpg"], "a cartoon girl with blonde pigtails leaps on a pink cloud"),
    "case3": (["image1.jpg", "image2.jpg"], "a fox in a green coat pushes a toy car with a penguin plush"),
    "case7": (["subject_0.png", "subject_1.png", "subject_2.png"], "a person wearing the garments walks"),
}


def write_real_data(examples_dir: Path, root: Path, ref_size: int = 128) -> Path:
    """case1/3/7 of testdata in the official layout (videos linked, references re-saved as small PNGs)."""
    for case, (refs, caption) in CASES.items():
        src = examples_dir / case
        (root / "videos").mkdir(parents=True, exist_ok=True)
        (root / "videos" / f"{case}.mp4").symlink_to(next(src.glob("*.mp4")))
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "labels" / f"{case}.txt").write_text(caption + "\n")
        (root / "references" / case).mkdir(parents=True, exist_ok=True)
        for j, name in enumerate(refs):
            with Image.open(src / name) as im:
                im = im.convert("RGB")
                im.thumbnail((ref_size, ref_size))
                im.save(root / "references" / case / f"ref{j + 1}.png")
    return root


def toy_config(model: Path, data: Path, output: Path, **run):
    from kaleido_s2v.training.config import toy_cpu

    cfg = toy_cpu()
    cfg.model.path, cfg.data.path, cfg.run.output = str(model), str(data), str(output)
    cfg.data.height = cfg.data.width = 32
    cfg.run.tensorboard = False
    for k, v in run.items():
        setattr(cfg.run, k, v)
    return cfg


def merge_lora(model, weights: dict[str, torch.Tensor]):
    """`model` with the exported LoRA `weights` merged by hand: W + B·A (alpha = rank: scale 1)."""
    sd = model.state_dict()
    for key, a in weights.items():
        if key.endswith("lora_A.weight"):
            name = key[len("transformer."):-len(".lora_A.weight")]
            sd[f"{name}.weight"] += weights[key.replace("lora_A", "lora_B")] @ a
    model.load_state_dict(sd)
    return model


def read_metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, tiny_dirs):
    """The synthetic data encoded once with `kaleido-s2v train --build-cache` (32x32, 5 frames)."""
    from kaleido_s2v.cli import main

    model, data = tiny_dirs
    cache = tmp_path_factory.mktemp("cache") / "cache"
    assert main(["train", "--recipe", "toy_cpu", "--model", str(model), "--data", str(data), "--height", "32",
                 "--width", "32", "--cache-dir", str(cache), "--no-progress", "--build-cache"]) == 0
    return cache


# ---------------------------------------------------------------------------------------------- objective
class TestObjective:
    def test_resolution_shift_matches_spec(self):
        from kaleido_s2v.training.objective import resolution_shift, shift_mu

        assert shift_mu(1560) == pytest.approx(0.72073, abs=1e-5)
        assert resolution_shift(480 // 8, 832 // 8) == pytest.approx(2.0559, abs=1e-4)
        assert resolution_shift(512 // 8, 896 // 8) == pytest.approx(2.1383, abs=1e-4)
        assert shift_mu(256) == pytest.approx(0.5) and shift_mu(4096) == pytest.approx(1.15)

    def test_sigmas_are_shifted_logit_normal(self):
        from kaleido_s2v.training.objective import sample_sigmas, shift_sigmas

        s = 2.0559
        sigma = sample_sigmas((4096,), s, torch.Generator().manual_seed(3))
        n = torch.randn(4096, generator=torch.Generator().manual_seed(3))
        s0 = 1 / (1 + torch.exp(-n))
        torch.testing.assert_close(sigma, s * s0 / (1 + (s - 1) * s0))
        # the shift maps the median 0.5 to s / (1 + s) and keeps the ends
        assert float(shift_sigmas(torch.tensor(0.5), s)) == pytest.approx(s / (1 + s))
        assert float(shift_sigmas(torch.tensor(1.0), s)) == pytest.approx(1.0)
        assert 0 < sigma.min() and sigma.max() < 1
        assert float(sigma.median()) == pytest.approx(s / (1 + s), abs=0.02)

    def test_loss_noising_target_and_timestep(self):
        from kaleido_s2v.training.objective import flow_matching_loss

        seen = {}

        class Recorder(torch.nn.Module):
            def forward(self, hidden_states, timestep, encoder_hidden_states, reference_latents, return_dict):
                seen.update(x=hidden_states, t=timestep, refs=reference_latents)
                return (torch.full_like(hidden_states, 0.25),)

        g = torch.Generator().manual_seed(0)
        x0, eps = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 16, 2, 4, 4, generator=g)
        ref = torch.randn(2, 16, 1, 4, 4, generator=g)
        sigma = torch.tensor([0.2, 0.9])
        loss = flow_matching_loss(Recorder(), x0, eps, sigma, torch.zeros(2, 3, 32), [ref])
        expect_x = torch.stack([(1 - s) * x0[i] + s * eps[i] for i, s in enumerate(sigma.tolist())])
        torch.testing.assert_close(seen["x"], expect_x)
        torch.testing.assert_close(seen["t"], torch.tensor([200.0, 900.0]))
        assert seen["refs"][0] is ref  # references are passed clean
        assert float(loss) == pytest.approx(float(((0.25 - (eps - x0)) ** 2).mean()), rel=1e-6)


# ---------------------------------------------------------------------------------------------- data
class TestData:
    def test_fps_resampled_on_synthetic_30fps_clip(self, tmp_path):
        """Official bug: integer step 1 at 30 fps read consecutive frames. Frame k at 16 fps is source floor(k·30/16)."""
        from kaleido_s2v.training.data import Sample, load_clip
        from kaleido_s2v.video_io import write_video

        n = 60
        frames = np.repeat((np.arange(n) * 4).astype(np.uint8)[:, None, None, None], 32, 1).repeat(32, 2).repeat(3, 3)
        write_video(tmp_path / "c.mp4", frames, fps=30)  # grey level 4·i encodes the frame index i
        got = load_clip(Sample("c", tmp_path / "c.mp4", ""), num_frames=21, fps=16, rng=None)
        index = np.round(got[:, 8:24, 8:24].astype(float).mean(axis=(1, 2, 3)) / 4).astype(int)
        np.testing.assert_array_equal(index, (np.arange(21) * 30) // 16)

    def test_fps_resampled_on_real_clip(self, examples_dir, tmp_path):
        """A real clip re-timed to 24 fps: at 16 fps we must see every 1.5th source frame, not consecutive ones."""
        from kaleido_s2v.training.data import Sample, load_clip
        from kaleido_s2v.video_io import read_video, write_video

        src = read_video(examples_dir / "case3" / "6.mp4", max_frames=40)[:, ::4, ::4]  # (40, 128, 224, 3)
        write_video(tmp_path / "v24.mp4", src, fps=24)
        got = load_clip(Sample("v", tmp_path / "v24.mp4", ""), num_frames=17, fps=16, rng=None)
        err = ((got[:, None].astype(float) - src[None].astype(float)) ** 2).mean(axis=(2, 3, 4))  # (17, 40)
        np.testing.assert_array_equal(err.argmin(axis=1), (np.arange(17) * 24) // 16)

    def test_random_window_and_padding(self, tmp_path):
        from kaleido_s2v.training.data import Sample, load_clip
        from kaleido_s2v.video_io import write_video

        n = 64
        frames = np.repeat((np.arange(n) * 4).astype(np.uint8)[:, None, None, None], 16, 1).repeat(16, 2).repeat(3, 3)
        write_video(tmp_path / "long.mp4", frames, fps=16)
        starts = set()
        for seed in range(6):
            clip = load_clip(Sample("l", tmp_path / "long.mp4", ""), num_frames=9, fps=16,
                             rng=np.random.default_rng(seed))
            idx = np.round(clip[:, 4:12, 4:12].astype(float).mean(axis=(1, 2, 3)) / 4).astype(int)
            np.testing.assert_array_equal(np.diff(idx), 1)  # consecutive frames at the native 16 fps
            starts.add(int(idx[0]))
        assert len(starts) > 1
        short = load_clip(Sample("s", tmp_path / "long.mp4", "", start_s=0, end_s=0.25), num_frames=9, fps=16, rng=None)
        assert len(short) == 9 and (short[4:] == short[3]).all()  # 4 frames, padded with the last one

    def test_resize_center_crop(self):
        from kaleido_s2v.training.data import resize_center_crop

        frame = np.zeros((1, 20, 60, 3), np.uint8)
        frame[:, :, 20:40] = 255  # the middle third is white
        out = resize_center_crop(frame, 40, 40)  # scale x2 -> 40x120, keep columns 40..80 = the white band
        assert out.shape == (3, 1, 40, 40)
        assert out[:, :, :, 2:-2].min() > 0.95

    def test_discovery_folder_and_manifest(self, tmp_path, tiny_dirs):
        from kaleido_s2v.training.data import discover_samples

        _, data = tiny_dirs
        samples = discover_samples(data)
        assert [s.clip_id for s in samples] == ["c0", "c1", "c2"]
        assert samples[1].caption == "clip number 1" and [p.name for p in samples[2].references] == [
            "ref1.png", "ref2.png", "ref3.png"]
        records = [
            dict(clip_id="a", video=str(data / "videos" / "c0.mp4"), caption="A", references=["r.png"], start_s=0.1,
                 end_s=0.5, status="kept"),
            dict(clip_id="b", video="videos/c1.mp4", caption="B", references=[], status="rejected"),
        ]
        (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
        got = discover_samples(tmp_path)
        assert [s.clip_id for s in got] == ["a"]
        assert got[0].references == [tmp_path / "r.png"] and got[0].end_s == 0.5
        with pytest.raises(UserInputError, match="neither a manifest"):
            discover_samples(tmp_path / "nothing")

    def test_bad_samples_are_skipped_and_dropout_is_per_slot(self, tmp_path, tiny_dirs, caplog):
        from kaleido_s2v.training.config import DataConfig
        from kaleido_s2v.training.data import SlotKey, VideoDataset, discover_samples

        _, data = tiny_dirs
        samples = discover_samples(data)
        (tmp_path / "bad.mp4").write_bytes(b"not a video")
        samples[0].video = tmp_path / "bad.mp4"
        samples[1].references.append(tmp_path / "missing.png")
        ds = VideoDataset(samples, DataConfig(height=32, width=32, num_frames=5, text_dropout=0.0))
        item = ds[SlotKey(0, 0, 0, 0)]
        assert item["clip_id"] == "c2"  # c0 (corrupt) and c1 (missing reference) skipped
        assert "skipping sample c0" in caplog.text and "skipping sample c1" in caplog.text

        ds = VideoDataset(samples[2:], DataConfig(height=32, width=32, num_frames=5))
        ds.load = lambda index, rng: dict(clip_id="x", caption="cap", references=["r"])
        drops = [ds[SlotKey(0, step, slot, 7)]["caption"] == "" for step in range(100) for slot in range(4)]
        assert 0.06 < np.mean(drops) < 0.14  # 10 % empty captions
        assert ds[SlotKey(0, 5, 1, 7)]["caption"] == ds[SlotKey(0, 5, 1, 7)]["caption"]

    def test_step_sampler_is_layout_independent(self):
        from kaleido_s2v.training.data import StepBatchSampler

        def slots(**kw):
            return [(k.index, k.step, k.slot) for batch in StepBatchSampler(7, seed=1, start_step=0, max_steps=5, **kw)
                    for k in batch]

        one = slots(batch_size=2, grad_accum=1, dp_rank=0, dp_size=1)
        two = slots(batch_size=1, grad_accum=1, dp_rank=0, dp_size=2) + slots(batch_size=1, grad_accum=1, dp_rank=1,
                                                                               dp_size=2)
        assert sorted(one) == sorted(two)
        accum = slots(batch_size=1, grad_accum=2, dp_rank=0, dp_size=1)
        assert sorted(one) == sorted(accum)
        epoch = [i for i, _, _ in one[:7]]
        assert sorted(epoch) == list(range(7))  # every sample once per epoch

    def test_bucketed_sampler(self):
        """Every global batch shares one bucket; layout-independent; a resumed sampler replays the same stream;
        every sample is used, also in a bucket smaller than the global batch."""
        from kaleido_s2v.training.data import StepBatchSampler

        buckets = [2, 2, 3, 2, 1, 3, 2, 2, 3, 1, 2, 3, 2]  # bucket 1 has 2 samples, the global batch is 4

        def steps(start=0, stop=30, **kw):
            out = {}
            for batch in StepBatchSampler(13, seed=3, start_step=start, max_steps=stop, buckets=buckets, **kw):
                for k in batch:
                    out.setdefault(k.step, []).append((k.slot, k.index))
            return {step: [i for _, i in sorted(v)] for step, v in out.items()}

        one = steps(batch_size=4, grad_accum=1, dp_rank=0, dp_size=1)
        assert all(len({buckets[i] for i in b}) == 1 and len(b) == 4 for b in one.values())
        two = [steps(batch_size=2, grad_accum=1, dp_rank=r, dp_size=2) for r in (0, 1)]
        assert {s: sorted(two[0][s] + two[1][s]) for s in one} == {s: sorted(b) for s, b in one.items()}
        assert steps(batch_size=2, grad_accum=2, dp_rank=0, dp_size=1) == one
        assert steps(start=17, batch_size=4, grad_accum=1, dp_rank=0, dp_size=1) == {s: one[s] for s in range(17, 30)}
        assert {i for b in one.values() for i in b} == set(range(13))
        flat = StepBatchSampler(13, seed=3, start_step=0, max_steps=30, batch_size=4, grad_accum=1, dp_rank=0,
                                dp_size=1)
        assert any(len({buckets[k.index] for k in b}) > 1 for b in flat)  # unbucketed batches do mix
        with pytest.raises(ValueError, match="bucket keys"):
            StepBatchSampler(12, seed=3, start_step=0, max_steps=3, batch_size=4, grad_accum=1, dp_rank=0, dp_size=1,
                             buckets=buckets)

    def test_every_reference_encoded_alone(self, tiny_dirs):
        """3 distinct references -> 3 latent frames, each the encode of that image alone (the release fed only #1)."""
        from kaleido_s2v.latents import encode_references, encode_video, pil_to_tensor
        from kaleido_s2v.references import fit_reference
        from kaleido_s2v.training.components import load_frozen_components
        from kaleido_s2v.training.config import TrainConfig
        from kaleido_s2v.training.trainer import encode_batch

        model, _ = tiny_dirs
        frozen = load_frozen_components(model, "cpu")
        cfg = TrainConfig()
        cfg.data.height = cfg.data.width = 32
        cfg.data.max_sequence_length = 16
        refs = [Image.fromarray(np.full((24, 20, 3), c, np.uint8)) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
        item = dict(pixels=torch.zeros(3, 5, 32, 32), caption="x", references=refs, slot=None)
        enc = encode_batch([item], frozen, cfg, "cpu")[0]
        assert len(enc["ref_latents"]) == 3 and enc["latents"].shape == (16, 2, 4, 4)
        for r, image in zip(enc["ref_latents"], refs):
            torch.testing.assert_close(r, encode_references(frozen["vae"], [image], 32, 32)[0][0])
        assert all((enc["ref_latents"][i] - enc["ref_latents"][j]).abs().max() > 1e-3 for i, j in ((0, 1), (1, 2)))
        # the official bug: the stacked references as one 3-frame clip give a single latent frame
        stacked = pil_to_tensor([fit_reference(im, 32, 32) for im in refs]).permute(1, 0, 2, 3)[None]
        assert encode_video(frozen["vae"], stacked).shape[2] == 1


# ---------------------------------------------------------------------------------------------- config
class TestConfig:
    def test_recipes_validate(self):
        from kaleido_s2v.training.config import RECIPES, default

        for make in RECIPES.values():
            make().validate()
        cfg = default()
        assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.grad_clip) == (5e-6, (0.9, 0.95),
                                                                                                1e-4, 1.0)

    def test_yaml_and_flags(self, tmp_path):
        import argparse

        from kaleido_s2v.cli import train as cli

        (tmp_path / "c.yaml").write_text("recipe: wan14b_lora\nrun:\n  max_steps: 7\n  seed: 3\noptim:\n  betas: [0.8, 0.9]\n")
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        cfg = cli.config_from_args(parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--seed", "9",
                                                      "--no-gradient-checkpointing"]))
        assert (cfg.run.max_steps, cfg.run.seed, cfg.lora.rank, cfg.optim.betas) == (7, 9, 64, (0.8, 0.9))
        assert cfg.parallel.gradient_checkpointing is False
        (tmp_path / "bad.yaml").write_text("run:\n  max_stepz: 7\n")
        with pytest.raises(UserInputError, match="unknown config key 'run.max_stepz'"):
            cli.config_from_args(parser.parse_args(["--config", str(tmp_path / "bad.yaml")]))
        with pytest.raises(UserInputError, match="4k\\+1"):
            cli.config_from_args(parser.parse_args(["--num-frames", "8"])).validate()

    def test_lr_schedule_warmup_constant_decay(self):
        from kaleido_s2v.training.config import toy_cpu
        from kaleido_s2v.training.trainer import lr_at

        cfg = toy_cpu()
        cfg.optim.lr, cfg.optim.warmup_steps, cfg.run.max_steps = 1.0, 2, 10
        assert [lr_at(s, cfg) for s in range(10)] == [0.5] + [1.0] * 9  # the release's: warmup, then constant
        cfg.optim.decay_steps = 4  # WSD: the last 4 steps fall linearly towards 0 (never a wasted lr-0 step)
        assert [lr_at(s, cfg) for s in range(10)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2])
        cfg.validate()
        cfg.optim.decay_steps = 9
        with pytest.raises(UserInputError, match="--decay-steps 9"):
            cfg.validate()

    def test_parallel_dims_error(self):
        from kaleido_s2v.distributed import ParallelDims
        from kaleido_s2v.training.parallelize import check_cp_divides

        assert ParallelDims(8, 2).dp == 4
        with pytest.raises(UserInputError, match="does not divide the 6 processes"):
            ParallelDims(6, 4)
        with pytest.raises(UserInputError, match="tokens per latent frame"):
            check_cp_divides(3, 32, 32)


# ---------------------------------------------------------------------------------------------- training runs
def test_cli_bad_inputs(tmp_path, tiny_dirs):
    from kaleido_s2v.cli import main

    model, data = tiny_dirs
    assert main(["train", "--model", str(tmp_path / "none"), "--data", str(data), "--output", str(tmp_path / "o"),
                 "--max-steps", "1"]) == 2
    assert main(["train", "--model", str(model), "--data", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o" / "final").exists()


def test_frame_size_follows_the_model(tmp_path, tiny_dirs):
    """Height/width must be multiples of VAE stride × patch: 16 for a stride-8 VAE, 8 for the built-in stride 4."""
    from kaleido_s2v.builtin import builtin_model_dir
    from kaleido_s2v.cli import main
    from kaleido_s2v.training.components import check_frame_size
    from kaleido_s2v.training.config import toy_cpu

    model, data = tiny_dirs
    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o"),
                 "--height", "40", "--width", "32", "--max-steps", "1"]) == 2
    assert not (tmp_path / "o").exists()
    cfg = toy_cpu()
    cfg.model.path, cfg.data.height, cfg.data.width = str(model), 48, 32
    check_frame_size(cfg)
    if builtin_model_dir() is not None:
        cfg.model.path, cfg.data.height = str(builtin_model_dir()), 40
        check_frame_size(cfg)
        cfg.data.width = 36
        with pytest.raises(UserInputError, match="multiples of 8"):
            check_frame_size(cfg)


def test_train_resume_is_exact(tmp_path, tiny_dirs, tiny_cache):
    """4 steps straight vs 2 steps + resume from checkpoint-2: the same losses and the same final weights."""
    from safetensors.torch import load_file

    from kaleido_s2v.cli import main

    model, data = tiny_dirs
    common = ["train", "--recipe", "toy_cpu", "--model", str(model), "--data", str(data), "--height", "32",
              "--width", "32", "--batch-size", "2", "--save-every", "2", "--no-progress", "--cache-dir", str(tiny_cache)]
    assert main([*common, "--output", str(tmp_path / "a"), "--max-steps", "4"]) == 0
    assert main([*common, "--output", str(tmp_path / "b"), "--max-steps", "2"]) == 0
    assert main([*common, "--output", str(tmp_path / "b"), "--max-steps", "4", "--resume", "latest",
                 "--num-workers", "1"]) == 0
    # a checkpoint of another setup (full vs LoRA) is refused with a one-line error, exit 2
    assert main([*common, "--output", str(tmp_path / "c"), "--max-steps", "4", "--lora-rank", "4", "--resume",
                 str(tmp_path / "a" / "checkpoint-2")]) == 2
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    # exact (losses and weights): the documented promise (docs/train.md) — one process, the same files, slots, noise
    # and thread count; the checkpoint is loaded in place, so both runs do the same arithmetic on the same layout
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert {"step", "loss", "lr", "grad_norm", "samples_per_s"} <= set(a[0])
    wa = load_file(tmp_path / "a" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    wb = load_file(tmp_path / "b" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "config.yaml").is_file() and json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2

    from kaleido_s2v.transformer import KaleidoTransformer3DModel

    loaded = KaleidoTransformer3DModel.from_pretrained(tmp_path / "a" / "final" / "transformer")
    base = KaleidoTransformer3DModel.from_pretrained(model / "transformer")
    assert any(not torch.equal(p, q) for p, q in zip(loaded.parameters(), base.parameters()))


def test_ema_follows_the_formula_and_resumes_exactly(tmp_path, tiny_dirs, tiny_cache):
    """--ema-decay: final/transformer_ema = the EMA of the per-step weights (read back from each checkpoint with
    torch's own dcp_to_torch_save), decay warm-up (1 + s)/(10 + s) capped at the decay; resuming gives the same
    EMA; a checkpoint saved without EMA starts the EMA from its weights."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from kaleido_s2v.cli import main

    model, data = tiny_dirs
    common = ["train", "--recipe", "toy_cpu", "--model", str(model), "--data", str(data), "--height", "32",
              "--width", "32", "--batch-size", "2", "--no-progress", "--cache-dir", str(tiny_cache), "--lr", "1e-3"]
    assert main([*common, "--output", str(tmp_path / "a"), "--max-steps", "4", "--save-every", "1",
                 "--ema-decay", "0.2"]) == 0
    weights = []
    for k in range(1, 5):
        dcp_to_torch_save(tmp_path / "a" / f"checkpoint-{k}", tmp_path / f"w{k}.pt")
        weights.append(torch.load(tmp_path / f"w{k}.pt", weights_only=False)["model"])
    expected = dict(weights[0])  # step 1: decay 0 (the shadow takes the weights)
    for s, w in enumerate(weights[1:], start=1):
        d = min((1 + s) / (10 + s), 0.2)
        expected = {k: d * expected[k] + (1 - d) * w[k] for k in w}
    ema = load_file(tmp_path / "a" / "final" / "transformer_ema" / "diffusion_pytorch_model.safetensors")
    raw = load_file(tmp_path / "a" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert set(ema) == set(expected) and all(torch.allclose(ema[k], expected[k], atol=1e-6) for k in ema)
    assert all(torch.equal(raw[k], weights[-1][k]) for k in raw)  # exact: checkpoint-4 and final hold the same tensors
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    assert json.loads((tmp_path / "a" / "checkpoint-2" / "trainer_state.json").read_text())["ema"] is True

    # resume: 2 steps + 2 steps = 4 steps, EMA included
    assert main([*common, "--output", str(tmp_path / "b"), "--max-steps", "2", "--save-every", "2",
                 "--ema-decay", "0.2"]) == 0
    assert main([*common, "--output", str(tmp_path / "b"), "--max-steps", "4", "--save-every", "2",
                 "--ema-decay", "0.2", "--resume", "latest"]) == 0
    ema_b = load_file(tmp_path / "b" / "final" / "transformer_ema" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(ema_b[k], ema[k], atol=1e-6) for k in ema)
    # an EMA checkpoint resumed without --ema-decay trains on (and exports no EMA)
    assert main([*common, "--output", str(tmp_path / "b"), "--max-steps", "5", "--save-every", "5",
                 "--resume", "latest"]) == 0
    assert not (tmp_path / "b" / "final" / "transformer_ema").exists()

    # a run without EMA, resumed with it: the EMA starts from checkpoint-2's weights (step 3 then has decay 0.2)
    assert main([*common, "--output", str(tmp_path / "c"), "--max-steps", "2", "--save-every", "2"]) == 0
    assert not (tmp_path / "c" / "final" / "transformer_ema").exists()
    assert main([*common, "--output", str(tmp_path / "c"), "--max-steps", "3", "--save-every", "1",
                 "--ema-decay", "0.2", "--resume", "latest"]) == 0
    dcp_to_torch_save(tmp_path / "c" / "checkpoint-2", tmp_path / "c2.pt")
    w2 = torch.load(tmp_path / "c2.pt", weights_only=False)["model"]
    w3 = load_file(tmp_path / "c" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    ema_c = load_file(tmp_path / "c" / "final" / "transformer_ema" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(ema_c[k], 0.2 * w2[k] + 0.8 * w3[k], atol=1e-6) for k in w3)

    # bad values: one-line errors, exit 2
    assert main([*common, "--output", str(tmp_path / "d"), "--max-steps", "1", "--ema-decay", "1.5"]) == 2
    assert main([*common, "--output", str(tmp_path / "d"), "--max-steps", "1", "--ema-decay", "0.9",
                 "--lora-rank", "4"]) == 2


def test_bucket_by_references_one_forward_per_step(tmp_path, tiny_dirs, tiny_cache, monkeypatch):
    """Clips with 1, 2, 3 references: a batch of 2 mixes counts and needs 2 forwards, a bucketed one needs 1; a
    bucketed run resumes exactly."""
    import kaleido_s2v.training.trainer as trainer
    from kaleido_s2v.cli import main

    calls = []
    real = trainer.flow_matching_loss
    monkeypatch.setattr(trainer, "flow_matching_loss", lambda *a, **k: calls.append(len(k["references"] or [])) or real(*a, **k))
    model, data = tiny_dirs
    common = ["train", "--recipe", "toy_cpu", "--model", str(model), "--data", str(data), "--height", "32",
              "--width", "32", "--batch-size", "2", "--save-every", "2", "--no-progress", "--cache-dir", str(tiny_cache)]
    assert main([*common, "--output", str(tmp_path / "mixed"), "--max-steps", "4"]) == 0
    assert len(calls) > 4
    calls.clear()
    assert main([*common, "--output", str(tmp_path / "a"), "--max-steps", "4", "--bucket-by-references"]) == 0
    assert len(calls) == 4 and len(set(calls)) > 1  # one forward per step, different reference counts
    assert main([*common, "--output", str(tmp_path / "b"), "--max-steps", "2", "--bucket-by-references"]) == 0
    assert main([*common, "--output", str(tmp_path / "b"), "--max-steps", "4", "--resume", "latest",
                 "--bucket-by-references"]) == 0
    # exact: resume is exact by design (docs/train.md), same process, same thread count
    assert [m["loss"] for m in read_metrics(tmp_path / "a")] == [m["loss"] for m in read_metrics(tmp_path / "b")]


def test_grad_accumulation_equals_larger_batch(tmp_path, tiny_dirs, tiny_cache):
    """batch 1 x 2 accumulation steps == batch 2 (same slots, same noise): same losses and weights."""
    from kaleido_s2v.training.trainer import train

    model, data = tiny_dirs
    for name, batch, accum in (("b2", 2, 1), ("acc", 1, 2)):
        cfg = toy_config(model, data, tmp_path / name, max_steps=2, save_every=2, batch_size=batch, grad_accum=accum)
        cfg.data.cache_dir = str(tiny_cache)
        train(cfg, progress=False)
    assert [m["loss"] for m in read_metrics(tmp_path / "acc")] == pytest.approx(
        [m["loss"] for m in read_metrics(tmp_path / "b2")], rel=1e-5)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "acc" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b2" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_compile_matches_eager(tmp_path, tiny_dirs, tiny_cache, cpp_compiler):
    """--compile (each block compiled in place): the same losses and weights as eager, the same export names;
    also under gradient checkpointing."""
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    from kaleido_s2v.training.trainer import train

    model, data = tiny_dirs
    for name, compiled, ac in (("eager", False, False), ("compiled", True, False), ("compiled_ac", True, True)):
        cfg = toy_config(model, data, tmp_path / name, max_steps=3, save_every=3, batch_size=2)
        cfg.data.cache_dir = str(tiny_cache)
        cfg.parallel.compile, cfg.parallel.gradient_checkpointing = compiled, ac
        torch._dynamo.reset()  # each run traces afresh, so the counter speaks for this run alone
        counters.clear()
        train(cfg, progress=False)
        assert (counters["stats"]["calls_captured"] > 0) == compiled, name  # dynamo traced the blocks
    eager = read_metrics(tmp_path / "eager")
    final = {}
    for name in ("eager", "compiled", "compiled_ac"):
        if name != "eager":
            assert [m["loss"] for m in read_metrics(tmp_path / name)] == pytest.approx([m["loss"] for m in eager],
                                                                                     rel=1e-4)
        final[name] = load_file(tmp_path / name / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert final["compiled"].keys() == final["eager"].keys() == final["compiled_ac"].keys()
    # Adam turns float-rounding noise in near-zero gradients into lr-sized steps, so compare the updates as a
    # whole: compiled and eager moved the weights the same way to within 0.1%.
    start = load_file(model / "transformer" / "diffusion_pytorch_model.safetensors")
    update = torch.cat([(final["eager"][k] - start[k]).flatten() for k in start])
    for name in ("compiled", "compiled_ac"):
        diff = torch.cat([(final[name][k] - final["eager"][k]).flatten() for k in start])
        assert diff.norm() < 1e-3 * update.norm(), (name, float(diff.norm() / update.norm()))


def test_compile_refusals(tmp_path, tiny_dirs, monkeypatch, capsys):
    """--compile with context parallel, or on CPU without the compiler inductor looks for: exit 2, no output."""
    from torch._inductor import cpp_builder, exc

    from kaleido_s2v.cli import main

    model, data = tiny_dirs
    common = ["train", "--model", str(model), "--data", str(data), "--height", "32", "--width", "32", "--compile"]
    assert main([*common, "--output", str(tmp_path / "cp"), "--cp-degree", "2"]) == 2
    assert "--compile with --cp-degree > 1" in capsys.readouterr().err  # not the one-process world's error

    def no_compiler():
        raise exc.InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*common, "--output", str(tmp_path / "o")]) == 2
    assert "needs a C++ compiler" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "cp").exists()


def test_lora_round_trip(tmp_path, tiny_dirs):
    """Train LoRA, export, load with KaleidoPipeline.load_lora_weights: equals the base with merged W + B·A."""
    from safetensors.torch import load_file

    from kaleido_s2v.pipeline import KaleidoPipeline
    from kaleido_s2v.tiny import tiny_scheduler
    from kaleido_s2v.training.components import load_frozen_components, load_transformer
    from kaleido_s2v.training.trainer import train

    model, data = tiny_dirs
    cfg = toy_config(model, data, tmp_path / "lora", max_steps=3, save_every=3)
    cfg.lora.rank = 4
    cfg.optim.lr = 1e-2
    train(cfg, progress=False)
    final = tmp_path / "lora" / "final"
    weights = load_file(final / "pytorch_lora_weights.safetensors")
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in weights
    assert "transformer.blocks.1.ffn.net.2.lora_B.weight" in weights
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())  # it trained

    pipe = KaleidoPipeline(**load_frozen_components(model, "cpu"), transformer=load_transformer(model),
                           scheduler=tiny_scheduler())
    pipe.load_lora_weights(final)
    merged = merge_lora(load_transformer(model), weights)
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 16, 1, 4, 4, generator=g)
    text = torch.randn(1, 8, 32, generator=g)
    with torch.no_grad():
        got = pipe.transformer(x, torch.tensor([500.0]), text, [ref], return_dict=False)[0]
        want = merged(x, torch.tensor([500.0]), text, [ref], return_dict=False)[0]
        base = load_transformer(model)(x, torch.tensor([500.0]), text, [ref], return_dict=False)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got - base).abs().max() > 1e-4


def test_cache_build_and_train(tmp_path, tiny_dirs, tiny_cache):
    from kaleido_s2v.cli import main

    model, data = tiny_dirs
    entry = torch.load(tiny_cache / "c2.pt", weights_only=True)
    assert entry["latents"].shape == (16, 2, 4, 4) and len(entry["ref_latents"]) == 3
    common = ["--recipe", "toy_cpu", "--model", str(model), "--data", str(data), "--height", "32", "--width", "32",
              "--cache-dir", str(tiny_cache), "--no-progress"]
    assert main(["train", *common, "--output", str(tmp_path / "o"), "--max-steps", "2", "--ref-rope", "time_negative"]) == 0
    assert len(read_metrics(tmp_path / "o")) == 2
    config = json.loads((tmp_path / "o" / "final" / "transformer" / "config.json").read_text())
    assert config["ref_rope"] == "time_negative" and config["_class_name"] == "KaleidoTransformer3DModel"
    assert main(["train", *common, "--output", str(tmp_path / "o3"), "--ref-rope", "sideways"]) == 2
    assert main(["train", *common, "--output", str(tmp_path / "o2"), "--max-steps", "2", "--height", "48"]) == 2


def test_non_finite_step_is_skipped(tmp_path, tiny_dirs, tiny_cache):
    """A NaN sample (poisoned cache entry) must not reach the weights: the update is skipped and logged."""
    import shutil

    from kaleido_s2v.cli import main

    model, data = tiny_dirs
    cache = shutil.copytree(tiny_cache, tmp_path / "cache")
    common = ["--recipe", "toy_cpu", "--model", str(model), "--data", str(data), "--height", "32", "--width", "32",
              "--cache-dir", str(cache), "--no-progress", "--batch-size", "3"]
    entry = torch.load(cache / "c1.pt", weights_only=True)
    entry["latents"][:] = float("nan")
    torch.save(entry, cache / "c1.pt")
    assert main(["train", *common, "--output", str(tmp_path / "o"), "--max-steps", "2"]) == 0
    metrics = read_metrics(tmp_path / "o")
    assert [m["skipped"] for m in metrics] == [True, True]
    from safetensors.torch import load_file

    got = load_file(tmp_path / "o" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    base = load_file(model / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(got[k], base[k]) for k in base)  # exact: skipped steps leave the loaded weights untouched


def test_loss_falls_on_real_clips(examples_dir, tmp_path, tiny_dirs):
    """The tiny model fits case1/3/7 (1, 2 and 3 references) at 64x64: the loss falls clearly within 80 steps."""
    from kaleido_s2v.training.cache import build_cache
    from kaleido_s2v.training.trainer import train

    model, _ = tiny_dirs
    data = write_real_data(examples_dir, tmp_path / "data")
    cfg = toy_config(model, data, tmp_path / "run", max_steps=80, batch_size=3)
    cfg.data.height = cfg.data.width = 64
    cfg.data.cache_dir = str(tmp_path / "cache")
    summary = build_cache(cfg, progress=False)
    assert summary["written"] == 3 and not summary["bad"]
    train(cfg, progress=False)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.7 * first, (first, last)
    assert all(math.isfinite(v) for v in losses)
