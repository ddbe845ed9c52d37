"""`kaleido-s2v train` on bad input: one line naming the input, exit 2, no traceback, nothing written or left behind;
an --output (or --cache-dir) it did not make is refused unless --overwrite; a short run with default settings
trains; a normal run prints only its progress bar and result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kaleido_s2v.cli import main
from tests.test_bad_input import snapshot
from tests.test_training import read_metrics

SIZES = ["--height", "32", "--width", "32", "--frames", "5", "--max-sequence-length", "16", "--warmup-steps", "0"]


@pytest.fixture(scope="module")
def run1(tmp_path_factory, tiny_dirs):
    """A full fine-tune of one step (checkpoint-1, final/), made by `kaleido-s2v train`."""
    model, data = tiny_dirs
    out = tmp_path_factory.mktemp("run1") / "run"
    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(out), *SIZES,
                 "--max-steps", "1", "--save-every", "1", "--quiet"]) == 0
    return out


def refused(capsys, args: list[str], *names: str) -> str:
    """`kaleido-s2v train ARGS` exits 2 with exactly one line on stderr that names each of `names`."""
    code = main(["train", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("kaleido-s2v train: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in err, (name, err)
    return err


def good_args(tiny_dirs, out: Path) -> list[str]:
    model, data = tiny_dirs
    return ["--model", str(model), "--data", str(data), "--output", str(out), *SIZES, "--max-steps", "1", "--quiet"]


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("flags, named", [
    (["--lr", "-1"], "--lr -1.0"),
    (["--lr", "nan"], "--lr nan"),
    (["--weight-decay", "-1"], "--weight-decay -1.0"),
    (["--grad-clip", "-0.5"], "--grad-clip -0.5"),
    (["--warmup-steps", "-1"], "--warmup-steps -1"),
    (["--decay-steps", "-1"], "--decay-steps -1"),
    (["--decay-steps", "3", "--max-steps", "2", "--warmup-steps", "0"], "--decay-steps 3"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--grad-accum", "0"], "--grad-accum 0"),
    (["--save-every", "0"], "--save-every 0"),
    (["--max-steps", "0"], "--max-steps 0"),
    (["--num-workers", "-1"], "--num-workers -1"),
    (["--text-dropout", "1.5"], "--text-dropout 1.5"),
    (["--reference-dropout", "-0.1"], "--reference-dropout -0.1"),
    (["--fps", "0"], "--fps 0.0"),
    (["--fps", "inf"], "--fps inf"),
    (["--height", "0"], "--height 0"),
    (["--width", "-32"], "--width -32"),
    (["--frames", "0"], "--frames 0"),
    (["--frames", "8"], "--frames 8"),
    (["--num-frames", "-3"], "--frames -3"),  # the old spelling still works, errors name the new one
    (["--max-references", "-1"], "--max-references -1"),
    (["--max-sequence-length", "0"], "--max-sequence-length 0"),
    (["--seed", "-1"], "--seed -1"),
    (["--lora-rank", "-1"], "--lora-rank -1"),
    (["--lora-alpha", "0"], "--lora-alpha 0.0"),
    (["--ema-decay", "1"], "--ema-decay 1.0"),
    (["--ref-rope-offset", "-1"], "--ref-rope-offset -1"),
    (["--cp-degree", "0"], "--cp-degree 0"),
])
def test_setting_out_of_range(tmp_path, capsys, tiny_dirs, flags, named):
    before = snapshot(tmp_path)
    refused(capsys, [*good_args(tiny_dirs, tmp_path / "out"), *flags], named)
    assert snapshot(tmp_path) == before  # no --output folder


@pytest.mark.parametrize("yaml, named", [
    ("run:\n  max_steps: many\n", "'run.max_steps' is 'many': give an integer"),
    ("data:\n  height: true\n", "'data.height' is True: give an integer"),
    ("optim:\n  betas: 0.9\n", "'optim.betas' is 0.9: give a list of two numbers"),
    ("run:\n  resume: 3\n", "'run.resume' is 3: give a string or null"),
    ("optim: 5\n", "section 'optim' must be a mapping"),
    ("run:\n  max_stepz: 3\n", "unknown config key 'run.max_stepz'"),
    ("optim:\n  lr: -1.0e-4\n", None),  # a value out of range: named by its flag, as any setting
])
def test_config_file_errors(tmp_path, capsys, tiny_dirs, yaml, named):
    (tmp_path / "c.yaml").write_text(yaml)
    before = snapshot(tmp_path)
    names = [f"--config '{tmp_path / 'c.yaml'}'", named] if named else ["--lr -0.0001 must be a positive number"]
    refused(capsys, ["--config", str(tmp_path / "c.yaml"), *good_args(tiny_dirs, tmp_path / "out")], *names)
    assert snapshot(tmp_path) == before


def test_config_numbers_yaml_reads_as_strings(tmp_path):
    """YAML reads `1e-4` (no dot) as a string: a number field takes it as the number it spells."""
    from kaleido_s2v.training.config import load_config

    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1e-4\n  betas: [0.8, '0.9']\ndata:\n  fps: 24\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.optim.lr, cfg.optim.betas, cfg.data.fps) == (1e-4, (0.8, 0.9), 24.0)


# ---------------------------------------------------------------------------------------------- the model folder
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("damage, named", [
    (lambda m: _truncate(m / "transformer" / "diffusion_pytorch_model.safetensors"),
     "diffusion_pytorch_model.safetensors is not a complete safetensors file"),
    (lambda m: (m / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b""), "transformer"),
    (lambda m: (m / "vae" / "config.json").write_text(""), "vae/config.json is not valid JSON"),
    (lambda m: (m / "text_encoder" / "config.json").write_text("{\"d_model\": "), "text_encoder/config.json"),
    (lambda m: (m / "text_encoder" / "model.safetensors").write_bytes(os.urandom(4096)), "text_encoder"),
    (lambda m: shutil.rmtree(m / "tokenizer"), "tokenizer"),
    (lambda m: (m / "transformer" / "config.json").write_text(json.dumps({"num_layers": "two"})), "transformer"),
])
def test_damaged_model_folder(tmp_path, capsys, tiny_dirs, damage, named):
    model = shutil.copytree(tiny_dirs[0], tmp_path / "model")
    damage(model)
    before = snapshot(tmp_path)
    refused(capsys, [*good_args(tiny_dirs, tmp_path / "out"), "--model", str(model)], "--model", named)
    assert snapshot(tmp_path) == before


def test_model_is_a_file(tmp_path, capsys, tiny_dirs):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    before = snapshot(tmp_path)
    refused(capsys, [*good_args(tiny_dirs, tmp_path / "out"), "--model", str(tmp_path / "model.safetensors")],
            "--model", "is a file")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------- data
def _corrupt_data(root: Path, n: int = 2) -> Path:
    (root / "videos").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        (root / "videos" / f"v{i}.mp4").write_bytes(b"not a video" * 50)
        (root / "labels" / f"v{i}.txt").write_text("a caption\n")
    return root


def test_every_video_corrupt(tmp_path, capsys, tiny_dirs):
    data = _corrupt_data(tmp_path / "data")
    before = snapshot(tmp_path)
    refused(capsys, [*good_args(tiny_dirs, tmp_path / "out"), "--data", str(data)], f"--data '{data}'",
            "none of its 2 samples can be read", "v0")
    assert snapshot(tmp_path) == before


def test_some_videos_corrupt_are_skipped(tmp_path, caplog, tiny_dirs):
    """One unreadable clip among good ones: logged and replaced by the next one, the run goes on."""
    data = shutil.copytree(tiny_dirs[1], tmp_path / "data")
    (data / "videos" / "c1.mp4").write_bytes(b"not a video")
    assert main(["train", *good_args(tiny_dirs, tmp_path / "out"), "--data", str(data), "--max-steps", "2",
                 "--batch-size", "3"]) == 0
    assert "skipping sample c1" in caplog.text and len(read_metrics(tmp_path / "out")) == 2


@pytest.mark.parametrize("make, named", [
    (lambda p: p.mkdir(), "neither a manifest"),
    (lambda p: (p.mkdir(), (p / "manifest.jsonl").write_bytes(b"\xff\xfe\x00bad")), "UTF-8"),
    (lambda p: (p.mkdir(), (p / "manifest.jsonl").write_text("not json\n")), "holds no training samples"),
])
def test_bad_data_path(tmp_path, capsys, tiny_dirs, make, named):
    make(tmp_path / "data")
    before = snapshot(tmp_path)
    refused(capsys, [*good_args(tiny_dirs, tmp_path / "out"), "--data", str(tmp_path / "data")], "--data", named)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("make, named", [
    (lambda p: p.mkdir(), "has no cache.json"),
    (lambda p: (p.mkdir(), (p / "cache.json").write_text("{")), "cache.json is damaged"),
])
def test_bad_cache_dir(tmp_path, capsys, tiny_dirs, make, named):
    make(tmp_path / "cache")
    before = snapshot(tmp_path)
    refused(capsys, [*good_args(tiny_dirs, tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")], "--cache-dir", named)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------- --resume
def _fake_checkpoint(path: Path, state: str) -> Path:
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(state)
    (path / ".metadata").write_bytes(b"x")
    return path


@pytest.mark.parametrize("make, named", [
    (lambda p: p.mkdir(), "is not a checkpoint folder"),
    (lambda p: p.write_text("x"), "is not a checkpoint folder"),
    (lambda p: None, "is not a checkpoint folder"),  # does not exist
    (lambda p: _fake_checkpoint(p, "{"), "trainer_state.json is damaged"),
    (lambda p: _fake_checkpoint(p / "checkpoint-3", '{"step": 3}'), "is a run folder, not a checkpoint"),
])
def test_resume_not_a_checkpoint(tmp_path, capsys, tiny_dirs, make, named):
    make(tmp_path / "ckpt")
    before = snapshot(tmp_path)
    refused(capsys, [*good_args(tiny_dirs, tmp_path / "out"), "--resume", str(tmp_path / "ckpt")], "--resume", named)
    assert snapshot(tmp_path) == before


def test_resume_from_another_setup(tmp_path, capsys, tiny_dirs, run1):
    """A full fine-tune's checkpoint resumed as LoRA: found while loading, the new run folder is removed again."""
    before = snapshot(tmp_path)
    refused(capsys, [*good_args(tiny_dirs, tmp_path / "out"), "--lora-rank", "4", "--max-steps", "2",
                     "--resume", str(run1 / "checkpoint-1")], "--resume", "does not match")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------- --output
def test_output_not_made_by_train(tmp_path, capsys, tiny_dirs):
    """A user's folder is refused (its files untouched); --overwrite writes into it, still leaving them be."""
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "sub" / "metrics.jsonl").write_text("keep me\n")
    before = snapshot(tmp_path)
    refused(capsys, good_args(tiny_dirs, out), f"--output '{out}'", "not made by kaleido-s2v train", "--overwrite")
    assert snapshot(tmp_path) == before
    assert main(["train", *good_args(tiny_dirs, out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_bytes() == b"my notes" and (out / "sub" / "metrics.jsonl").read_bytes() == b"keep me\n"
    assert (out / "final" / "transformer").is_dir()


def test_rerun_into_own_folder(tmp_path, tiny_dirs, run1):
    """A folder train made (its marker) takes a resumed run, and a fresh rerun."""
    from kaleido_s2v.fileio import folder_owner

    assert folder_owner(run1) == "kaleido-s2v train"
    out = shutil.copytree(run1, tmp_path / "run")
    assert main(["train", *good_args(tiny_dirs, out), "--max-steps", "2", "--resume", "latest"]) == 0
    assert [m["step"] for m in read_metrics(out)] == [1, 2] and (out / "checkpoint-2").is_dir()
    assert main(["train", *good_args(tiny_dirs, out)]) == 0
    assert [m["step"] for m in read_metrics(out)] == [1]


def test_output_is_a_file(tmp_path, capsys, tiny_dirs):
    (tmp_path / "out").write_text("a file")
    before = snapshot(tmp_path)
    refused(capsys, good_args(tiny_dirs, tmp_path / "out"), "--output", "is a file: give a folder")
    assert snapshot(tmp_path) == before


def test_output_under_a_file(tmp_path, capsys, tiny_dirs):
    (tmp_path / "file").write_text("a file")
    before = snapshot(tmp_path)
    refused(capsys, good_args(tiny_dirs, tmp_path / "file" / "runs" / "a"), "--output", "is a file, not a folder")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------- --build-cache
def test_build_cache_folder(tmp_path, capsys, tiny_dirs):
    """Made with its marker, rerun into it (nothing to redo); a user's folder is refused; every early error (a
    damaged model, unreadable data) leaves no cache folder."""
    model, data = tiny_dirs
    base = ["--model", str(model), "--data", str(data), *SIZES, "--quiet", "--build-cache"]
    cache = tmp_path / "cache"
    assert main(["train", *base, "--cache-dir", str(cache)]) == 0
    assert "3 written" in capsys.readouterr().err
    assert main(["train", *base, "--cache-dir", str(cache)]) == 0
    assert "3 already there" in capsys.readouterr().err

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.pt").write_bytes(b"mine")
    bad_model = shutil.copytree(model, tmp_path / "model")
    _truncate(bad_model / "vae" / "diffusion_pytorch_model.safetensors")
    bad_data = _corrupt_data(tmp_path / "bad_data")
    before = snapshot(tmp_path)
    refused(capsys, [*base, "--cache-dir", str(tmp_path / "mine")], "--cache-dir",
            "not made by kaleido-s2v train --build-cache")
    refused(capsys, [*base, "--cache-dir", str(tmp_path / "new"), "--model", str(bad_model)], "--model", "vae")
    refused(capsys, [*base, "--cache-dir", str(tmp_path / "new"), "--data", str(bad_data)], "--data",
            "none of its 2 samples")
    refused(capsys, [*base, "--cache-dir", str(tmp_path / "new"), "--lr", "-1"], "--lr")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------- defaults, quiet
def test_short_run_with_the_default_warmup(tmp_path, caplog, tiny_dirs):
    """--max-steps 2 with the default 50 warmup steps: trains, warming up over the 2 steps (said once)."""
    import logging

    caplog.set_level(logging.INFO, logger="kaleido_s2v")
    args = good_args(tiny_dirs, tmp_path / "out")
    del args[args.index("--warmup-steps"): args.index("--warmup-steps") + 2]  # the default, 50
    assert main(["train", *args, "--max-steps", "2"]) == 0
    said = [r.getMessage() for r in caplog.records if "warming up" in r.getMessage()]
    assert said == ["warmup_steps 50 > max_steps 2: warming up over 2 steps"]
    assert [m["lr"] for m in read_metrics(tmp_path / "out")] == pytest.approx([2.5e-6, 5e-6])


def test_normal_run_prints_progress_and_result_only(tmp_path, tiny_dirs):
    """The CLI as users run it (default bf16 autocast): no Python warning, no library log line, no temporary path;
    stderr holds the progress bar and the result line."""
    model, data = tiny_dirs
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "kaleido_s2v", "train", "--model", str(model), "--data", str(data), "--output",
         str(out), *SIZES, "--max-steps", "2"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert "Warning" not in proc.stderr and ".tmp" not in proc.stderr, proc.stderr
    assert all(ln.startswith("train:") for ln in lines[:-1]), proc.stderr
    assert lines[-1] == f"trained 2 steps, last loss {read_metrics(out)[-1]['loss']:.4f}; final weights in {out / 'final'}"
    assert proc.stdout == ""
