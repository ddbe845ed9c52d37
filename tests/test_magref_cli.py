"""`kaleido-s2v generate` with a MAGREF model: the synthetic release converts and generates in one command, with
MAGREF's defaults (77 of 81 frames at 15 fps), its layout flags and its keyed prompt files; bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kaleido_s2v.cli import main
from kaleido_s2v.magref.release import MAGREF_NEGATIVE_PROMPT
from kaleido_s2v.video_io import read_video, video_info, write_video
from tests.magref_release import write_magref_release

SMALL = ["--height", "32", "--width", "48", "--steps", "2", "--max-sequence-length", "32"]


@pytest.fixture(scope="module")
def magref_dir(tmp_path_factory):
    """A converted synthetic release (the diffusers folder `convert` writes)."""
    root = tmp_path_factory.mktemp("magref")
    write_magref_release(root / "MAGREF")
    assert main(["convert", "--src", str(root / "MAGREF"), "--dst", str(root / "MAGREF-diffusers"), "--quiet"]) == 0
    return root / "MAGREF-diffusers"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (64, 30, 3), dtype=np.uint8)).save(root / "b.png")
    return root


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_release_converts_and_generates_77_frames_at_15_fps(tmp_path, images, monkeypatch, capsys):
    """One command from the official folder: --convert into the cache, then MAGREF's defaults."""
    write_magref_release(tmp_path / "MAGREF")
    monkeypatch.setenv("KALEIDO_S2V_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out" / "v.mp4"
    rc = main(["generate", "--model", str(tmp_path / "MAGREF"), "--convert", "--prompt", "a fox and a hat",
               "--ref", str(images / "a.png"), "--ref", str(images / "b.png"), *SMALL, "--seed", "5", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    info = video_info(out)
    assert info.fps == 15 and info.num_frames == 77  # 81 decoded, the first 4 dropped
    assert read_video(out).shape == (77, 32, 48, 3)
    side = json.loads(out.with_suffix(".json").read_text())
    s = side["settings"]
    assert (s["num_frames"], s["fps"], s["guidance_scale"], s["num_inference_steps"]) == (81, 15, 5.0, 2)
    assert (s["layout"], s["layout_seed"], s["max_references"]) == ("release", None, 8)
    assert side["seed"] == 5 and side["negative_prompt"] == MAGREF_NEGATIVE_PROMPT
    assert _files(tmp_path / "out") == ["v.json", "v.mp4"]


def test_same_video_as_the_pipeline(magref_dir, images, tmp_path):
    """The CLI's frames are the pipeline's for the same seed and layout (up to the mp4 codec)."""
    import torch

    from kaleido_s2v.model_folder import load_pipeline

    out = tmp_path / "v.mp4"
    args = ["--layout", "grid", "--layout-seed", "3", "--frames", "9"]
    assert main(["generate", "--model", str(magref_dir), "--prompt", "p", "--ref", str(images / "a.png"),
                 "--ref", str(images / "b.png"), *SMALL, *args, "--seed", "2", "-o", str(out), "--quiet"]) == 0
    pipe = load_pipeline(magref_dir, dtype=torch.float32)  # as the CLI on CPU (stored: bf16 T5, fp16 CLIP)
    pipe.set_progress_bar_config(disable=True)
    want = pipe("p", [str(images / "a.png"), str(images / "b.png")], height=32, width=48, num_frames=9,
                num_inference_steps=2, max_sequence_length=32, layout="grid", layout_seed=3,
                generator=torch.Generator().manual_seed(2)).frames[0]
    assert want.shape == (5, 32, 48, 3)
    # through the same encoder (H.264 is lossy; its chroma subsampling blurs these noise-like frames)
    write_video(tmp_path / "want.mp4", (want * 255.0).round().clip(0, 255).astype("uint8"), fps=15)
    got, expected = read_video(out).astype(int), read_video(tmp_path / "want.mp4").astype(int)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1


def test_keyed_prompt_file_names_outputs_and_manifest(magref_dir, images, tmp_path):
    cases = tmp_path / "prompts.txt"
    cases.write_text(f"cat_01@@a cat sits@@{images / 'a.png'}\n# a comment\n"
                     f"dog-02@@a dog runs@@{images / 'a.png'}@@{images / 'b.png'}\n")
    out = tmp_path / "videos"
    assert main(["generate", "--model", str(magref_dir), "--batch", str(cases), "--out-dir", str(out), *SMALL,
                 "--frames", "5", "--seed", "1", "--quiet"]) == 0
    assert _files(out) == ["cat_01.json", "cat_01.mp4", "dog-02.json", "dog-02.mp4", "manifest.jsonl"]
    rows = [json.loads(ln) for ln in (out / "manifest.jsonl").read_text().splitlines() if not ln.startswith("#")]
    assert [r["id"] for r in rows] == ["cat_01", "dog-02"]
    assert rows[1]["prompt"] == "a dog runs" and len(rows[1]["references"]) == 2
    assert rows[0]["settings"]["layout"] == "release" and video_info(out / "cat_01.mp4").num_frames == 1


@pytest.mark.parametrize("extra,message", [
    (["--layout-seed", "3"], "--layout-seed shuffles the grid layout"),
    (["--frames", "1"], "--frames 1: this model needs at least 5"),
    (["--official-prompt-quirk"], "--official-prompt-quirk reproduces Kaleido's release script"),
    (["--ref", "{a}"] * 8, "9 reference images, more than the limit 8"),
])
def test_bad_magref_flags_exit_2_in_one_line(magref_dir, images, tmp_path, capsys, extra, message):
    extra = [e.format(a=images / "a.png") for e in extra]
    out = tmp_path / "o" / "v.mp4"
    rc = main(["generate", "--model", str(magref_dir), "--prompt", "p", "--ref", str(images / "a.png"), *SMALL,
               *extra, "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_layout_on_a_kaleido_model_and_no_reference_are_refused(magref_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error
        main(["generate", "--model", str(magref_dir), "--prompt", "p", "--layout", "rows"])
    assert exit_info.value.code == 2 and "invalid choice: 'rows'" in capsys.readouterr().err
    rc = main(["generate", "--prompt", "p", "--layout", "grid", "-o", str(tmp_path / "v.mp4")])  # built-in: Kaleido
    err = capsys.readouterr().err
    assert rc == 2 and "--layout/--layout-seed place references on MAGREF's canvas" in err
    rc = main(["generate", "--model", str(magref_dir), "--prompt", "p", *SMALL, "-o", str(tmp_path / "v.mp4")])
    assert rc == 2 and "no reference image" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("line,message", [
    ("a/b@@p@@{a}", "key 'a/b' cannot name a video file"),
    ("@@p@@{a}", "key '' cannot name a video file"),
    ("justakey", "no '@@' after the key"),
    ("k@@p@@{a}\nk@@q@@{a}", "output 'k.mp4' is already used by line 1"),
])
def test_bad_keyed_lines_exit_2(magref_dir, images, tmp_path, capsys, line, message):
    cases = tmp_path / "p.txt"
    cases.write_text(line.format(a=images / "a.png") + "\n")
    rc = main(["generate", "--model", str(magref_dir), "--batch", str(cases), *SMALL, "--frames", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert _files(tmp_path) == ["p.txt"]


def test_magref_references_are_decoded_not_fitted(images):
    """The batch runner decodes MAGREF's references and leaves fitting to the canvas (Kaleido's are fitted)."""
    from kaleido_s2v import batch
    from kaleido_s2v.model_folder import KALEIDO, MAGREF

    settings = dict(height=32, width=48)
    for family, size in ((MAGREF, (70, 40)), (KALEIDO, (48, 32))):
        case = batch.single_case("p", [images / "a.png"], Path("/nonexistent/x.mp4"))
        batch.prepare_case(case, settings, max_references=8, builtin=False, family=family)
        assert case.images[0].size == size

