"""`kaleido-s2v generate`: outputs, sidecars, batch files, and every bad-input case (exit 2, one line, no file)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kaleido_s2v.batch import apply_memory_options, parse_batch_file
from kaleido_s2v.cli import main
from kaleido_s2v.errors import UserInputError
from kaleido_s2v.pipeline import KALEIDO_NEGATIVE_PROMPT
from kaleido_s2v.video_io import read_video

SMALL = ["--height", "32", "--width", "48", "--frames", "5", "--steps", "2", "--max-sequence-length", "32"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from kaleido_s2v.pipeline import KaleidoPipeline
    from kaleido_s2v.tiny import tiny_components

    path = tmp_path_factory.mktemp("models") / "tiny-kaleido"
    KaleidoPipeline(**tiny_components(seed=0)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (64, 30, 3), dtype=np.uint8)).save(root / "b.jpg")
    (root / "not_an_image.png").write_text("hello")
    data = (root / "a.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 3])
    return root


def _generate(tmp_path, *args, capsys=None):
    rc = main(["generate", *args])
    out = capsys.readouterr() if capsys is not None else None
    return rc, out


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ generation
def test_generate_writes_video_and_sidecar(model_dir, images, tmp_path, capsys):
    out = tmp_path / "out" / "video.mp4"
    rc, _ = _generate(
        tmp_path, "--model", str(model_dir), "--prompt", "a fox wears the hat", "--ref", str(images / "a.png"),
        "--ref", str(images / "b.jpg"), "--seed", "7", "--fps", "8", "-o", str(out), *SMALL, capsys=capsys,
    )
    assert rc == 0
    frames = read_video(out)
    assert frames.shape == (5, 32, 48, 3)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["prompt"] == side["encoded_prompt"] == "a fox wears the hat"
    assert side["references"] == [str((images / "a.png").resolve()), str((images / "b.jpg").resolve())]
    assert side["seed"] == 7 and side["negative_prompt_is_default"]
    assert side["negative_prompt"] == KALEIDO_NEGATIVE_PROMPT
    assert side["settings"]["height"] == 32 and side["settings"]["num_inference_steps"] == 2
    assert side["settings"]["fps"] == 8 and side["settings"]["dtype"] == "float32"
    assert side["model"] == str(model_dir.resolve()) and side["versions"]["diffusers"]
    assert side["seconds"] > 0
    assert _files(tmp_path / "out") == ["video.json", "video.mp4"]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~umask  # not mkstemp's 0600


def test_cli_video_matches_the_pipeline(model_dir, images, tmp_path):
    from kaleido_s2v.pipeline import KaleidoPipeline

    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", str(model_dir), "--prompt", "p", "--ref", str(images / "a.png"), "--seed",
                 "3", "-o", str(out), *SMALL]) == 0
    pipe = KaleidoPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("p", [images / "a.png"], height=32, width=48, num_frames=5, num_inference_steps=2,
                    max_sequence_length=32, generator=torch.Generator().manual_seed(3)).frames[0]
    got = read_video(out).astype(np.float32) / 255
    assert np.abs(got - expected).mean() < 0.03  # H.264 is lossy; same seed -> same video


def test_model_generation_defaults_set_the_negative_prompt(model_dir, images, tmp_path):
    """A model trained with "" as its unconditional text carries `negative_prompt: ""` in generation_defaults.json."""
    model = shutil.copytree(model_dir, tmp_path / "model")
    (model / "generation_defaults.json").write_text(json.dumps({"negative_prompt": "", "num_inference_steps": 2}))
    args = ["generate", "--model", str(model), "--prompt", "p", "--ref", str(images / "a.png"), "--seed", "3", *SMALL]
    assert main([*args, "-o", str(tmp_path / "a.mp4")]) == 0
    side = json.loads((tmp_path / "a.json").read_text())
    assert side["negative_prompt"] == "" and side["negative_prompt_is_default"]
    assert main([*args, "-o", str(tmp_path / "b.mp4"), "--negative-prompt", "blurry"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["negative_prompt"] == "blurry"

    from kaleido_s2v.pipeline import KaleidoPipeline

    pipe = KaleidoPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("p", [images / "a.png"], negative_prompt="", height=32, width=48, num_frames=5,
                    num_inference_steps=2, max_sequence_length=32, generator=torch.Generator().manual_seed(3)).frames[0]
    got = read_video(tmp_path / "a.mp4").astype(np.float32) / 255
    assert np.abs(got - expected).mean() < 0.03


def test_builtin_model_needs_no_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out = _generate(tmp_path, "--prompt", "the red disc rolls", "--steps", "1", "--height", "32", "--width",
                        "32", "--frames", "1", "--json", capsys=capsys)
    assert rc == 0
    summary = json.loads(out.out)
    from kaleido_s2v.builtin import builtin_model_description

    assert summary["model"] == builtin_model_description() and len(summary["videos"]) == 1
    assert read_video(tmp_path / "output.mp4").shape == (1, 32, 32, 3)
    side = json.loads((tmp_path / "output.json").read_text())
    assert side["references"] == ["builtin:default-reference"]
    from kaleido_s2v.builtin import builtin_model_dir
    from kaleido_s2v.model_folder import size_multiple

    m = size_multiple(builtin_model_dir())  # 8 for the shipped stride-4 model, 16 for the random stand-in
    rc, out = _generate(tmp_path, "--prompt", "p", "--height", str(m + m // 2), "-o", "bad.mp4", capsys=capsys)
    assert rc == 2 and f"multiples of {m} for this model" in out.err and not (tmp_path / "bad.mp4").exists()


def test_batch_official_format_with_relative_paths(model_dir, images, tmp_path, capsys):
    shutil.copy(images / "a.png", tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    shutil.copy(images / "b.jpg", tmp_path / "sub" / "b.jpg")
    batch = tmp_path / "cases.txt"
    batch.write_text("a fox@@a.png@@sub/b.jpg\n\n# comment\na hat@@sub/b.jpg\n")
    rc, out = _generate(tmp_path, "--model", str(model_dir), "--batch", str(batch), "--out-dir", str(tmp_path / "o"),
                        "--seed", "1", "--json", "--official-prompt-quirk", *SMALL, capsys=capsys)
    assert rc == 0
    summary = json.loads(out.out)
    assert [Path(v["video"]).name for v in summary["videos"]] == ["case0001.mp4", "case0004.mp4"]
    side = json.loads((tmp_path / "o" / "case0001.json").read_text())
    assert side["prompt"] == "a fox" and side["encoded_prompt"] == "a fox@@a.png@@sub/b.jpg"  # the raw line
    assert side["references"] == [str(tmp_path.resolve() / "a.png"), str(tmp_path.resolve() / "sub" / "b.jpg")]
    assert side["source"] == f"{batch}:1"


def test_batch_jsonl_and_keep_going(model_dir, images, tmp_path, capsys):
    batch = tmp_path / "cases.jsonl"
    lines = [
        {"prompt": "one", "references": [str(images / "a.png")], "seed": 5, "output": "first.mp4"},
        {"prompt": "two", "references": ["missing.png"]},
        {"prompt": "three", "references": [str(images / "b.jpg")], "negative_prompt": "blurry"},
    ]
    batch.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out_dir = tmp_path / "o"
    rc, out = _generate(tmp_path, "--model", str(model_dir), "--batch", str(batch), "--out-dir", str(out_dir),
                        *SMALL, capsys=capsys)
    assert rc == 2 and f"{batch}:2" in out.err and "missing.png" in out.err
    assert not out_dir.exists()  # nothing generated before the bad line was found

    rc, out = _generate(tmp_path, "--model", str(model_dir), "--batch", str(batch), "--out-dir", str(out_dir),
                        "--keep-going", "--json", *SMALL, capsys=capsys)
    assert rc == 3 and f"{batch}:2" in out.err  # 3: done, but lines were skipped
    summary = json.loads(out.out)
    assert len(summary["videos"]) == 2 and len(summary["skipped"]) == 1
    assert _files(out_dir) == ["case0003.json", "case0003.mp4", "first.json", "first.mp4", "manifest.jsonl"]
    assert json.loads((out_dir / "first.json").read_text())["seed"] == 5
    assert json.loads((out_dir / "case0003.json").read_text())["negative_prompt"] == "blurry"


def test_parse_batch_file_formats_and_errors(tmp_path):
    f = tmp_path / "b.txt"
    f.write_text("prompt one@@x.png@@/abs/y.png\nno refs here\nbad@@@@x.png\n")
    (l1, c1), (l2, c2), (l3, e3) = parse_batch_file(f)
    assert (l1, l2, l3) == (1, 2, 3)
    assert c1["prompt"] == "prompt one" and c1["references"] == [str(tmp_path.resolve() / "x.png"), "/abs/y.png"]
    assert c2["references"] == []
    assert isinstance(e3, UserInputError) and str(e3).startswith(f"{f}:3:")
    j = tmp_path / "b.jsonl"
    j.write_text(
        '{"prompt": "p", "references": "r.png", "seed": 3}\n{"prompt": 1}\nnot json\n{"prompt": "p", "x": 1}\n'
    )
    rows = parse_batch_file(j)
    assert rows[0][1]["references"] == [str(tmp_path.resolve() / "r.png")] and rows[0][1]["seed"] == 3
    assert [type(r[1]) for r in rows[1:]] == [UserInputError] * 3
    assert "prompt" in str(rows[1][1]) and "invalid JSON" in str(rows[2][1]) and "unknown keys" in str(rows[3][1])


# ------------------------------------------------------------------------------------------------ bad input
def _bad_cases(model_dir, images, tmp_path):
    ok = ["--model", str(model_dir), "--prompt", "p", "--ref", str(images / "a.png"), *SMALL]
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "model_index.json").write_text(json.dumps({"_class_name": "KaleidoPipeline",
                                                               "transformer": ["kaleido_s2v", "X"]}))
    batch = tmp_path / "bad.txt"
    batch.write_text(f"good@@{images / 'a.png'}\n@@{images / 'a.png'}\n")
    five = [a for _ in range(5) for a in ("--ref", str(images / "a.png"))]
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"prompt": "p", "references": [str(images / "a.png")], "output": "x.mp4"})
                           + "\n" for _ in range(2)))
    return {
        "missing image": (ok[:4] + ["--ref", str(tmp_path / "nope.png")] + SMALL, "does not exist"),
        "unreadable image": (ok[:4] + ["--ref", str(images / "not_an_image.png")] + SMALL, "not a readable image"),
        "corrupt image": (ok[:4] + ["--ref", str(images / "truncated.png")] + SMALL, "not a readable image"),
        "empty prompt": (["--model", str(model_dir), "--prompt", " ", "--ref", str(images / "a.png"), *SMALL],
                         "prompt is empty"),
        "height": (ok + ["--height", "40"], "multiples of 16"),
        "width": (ok + ["--width", "50"], "multiples of 16"),
        "frames": (ok + ["--frames", "10"], "4k+1"),
        "too many refs": (ok[:4] + five + SMALL, "more than the limit 4"),
        "no ref for a user model": (ok[:4] + SMALL, "no reference image"),
        "model missing": (["--model", str(tmp_path / "nomodel")] + ok[2:], "does not exist"),
        "model incomplete": (["--model", str(incomplete)] + ok[2:], "incomplete"),
        "model not a diffusers folder": (["--model", str(images)] + ok[2:], "model_index.json"),
        "bad batch line": (["--model", str(model_dir), "--batch", str(batch), "--out-dir", str(tmp_path / "o"),
                            *SMALL], f"{batch}:2"),
        "output suffix": (ok + ["-o", str(tmp_path / "x.avi")], ".mp4"),
        "offload on cpu": (ok + ["--cpu-offload", "--device", "cpu"], "need a CUDA"),
        "both offloads": (ok + ["--cpu-offload", "--group-offload"], "exclude each other"),
        "convert without model": (ok[2:] + ["--convert"], "--convert needs --model"),
        "batch and prompt": (ok + ["--batch", str(batch)], "--batch FILE replaces"),
        "out-dir without batch": (ok + ["--out-dir", str(tmp_path / "o")], "--out-dir applies to --batch"),
        "duplicate batch output": (["--model", str(model_dir), "--batch", str(dup), *SMALL], f"{dup}:2"),
    }


CASES = ["missing image", "unreadable image", "corrupt image", "empty prompt", "height", "width", "frames",
         "too many refs", "no ref for a user model", "model missing", "model incomplete",
         "model not a diffusers folder", "bad batch line", "output suffix", "offload on cpu", "both offloads",
         "convert without model", "batch and prompt", "out-dir without batch", "duplicate batch output"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_no_output(case, model_dir, images, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args, message = _bad_cases(model_dir, images, tmp_path)[case]
    rc = main(["generate", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("kaleido-s2v generate: error: ") and message in err[0], err
    assert _files(work) == [] and not (tmp_path / "o").exists()


def test_resolve_model_folder_accepts_a_pipeline_folder(model_dir):
    from kaleido_s2v.model_folder import resolve_model_folder

    assert resolve_model_folder(model_dir) == model_dir


def test_memory_options_on_cpu(model_dir, images):
    """Group offload (hooks on CPU->CPU) gives the plain result; VAE tiling and fp8 storage are applied."""
    from kaleido_s2v.pipeline import KaleidoPipeline

    kw = dict(height=32, width=48, num_frames=1, num_inference_steps=1, max_sequence_length=32, output_type="latent")
    plain = KaleidoPipeline.from_pretrained(model_dir)
    plain.set_progress_bar_config(disable=True)
    expected = plain("p", [images / "a.png"], generator=torch.Generator().manual_seed(0), **kw).frames
    offloaded = KaleidoPipeline.from_pretrained(model_dir)
    offloaded.set_progress_bar_config(disable=True)
    apply_memory_options(offloaded, torch.device("cpu"), group_offload=True, vae_tiling=True)
    assert offloaded.vae.use_tiling
    got = offloaded("p", [images / "a.png"], generator=torch.Generator().manual_seed(0), **kw).frames
    torch.testing.assert_close(got, expected)
    fp8 = KaleidoPipeline.from_pretrained(model_dir)
    fp8.set_progress_bar_config(disable=True)
    apply_memory_options(fp8, torch.device("cpu"), layerwise_fp8=True)
    assert fp8.transformer.blocks[0].ffn.net[2].weight.dtype == torch.float8_e4m3fn
    assert fp8("p", [images / "a.png"], generator=torch.Generator().manual_seed(0), **kw).frames.shape == got.shape


def test_installed_console_script_reports_bad_input(tmp_path, images):
    exe = Path(sys.executable).with_name("kaleido-s2v")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [str(exe), "generate", "--model", str(tmp_path / "missing"), "--prompt", "p", "--ref", str(images / "a.png"),
         "-o", str(tmp_path / "o.mp4")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"kaleido-s2v generate: error: --model '{tmp_path / 'missing'}' does not exist: give a local diffusers-format "
        "folder (model_index.json + transformer/, vae/, text_encoder/, tokenizer/, scheduler/)"
    ]
    assert not (tmp_path / "o.mp4").exists()
    help_ = subprocess.run([str(exe), "generate", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert help_.returncode == 0 and "--group-offload" in help_.stdout and "--batch" in help_.stdout
