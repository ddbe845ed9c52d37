"""What commands may replace (their own outputs), what they may not (the user's), and what --overwrite allows;
no partial output; no network; Ctrl-C during start-up. The refusals themselves are swept in test_bad_input.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kaleido_s2v.cli import main
from kaleido_s2v.errors import UserInputError
from kaleido_s2v.fileio import MARKER, atomic_path, claim_folder, folder_owner, output_folder
from kaleido_s2v.toy.__main__ import main as toy_main

BIN = Path(sys.executable).with_name("kaleido-s2v")
FAST = ["--steps", "1", "--quiet", "--seed", "0"]
PROMPT = ["--prompt", "The red striped circle moves to the left."]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ generate
def test_generate_replaces_its_own_video_but_not_the_users(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", *PROMPT, *FAST, "-o", "a.mp4"]) == 0
    assert json.loads(Path("a.json").read_text())["made_by"] == "kaleido-s2v generate"
    assert main(["generate", *PROMPT, *FAST[:-1], "7", "-o", "a.mp4"]) == 0  # a rerun replaces its own pair
    assert json.loads(Path("a.json").read_text())["seed"] == 7

    Path("mine.mp4").write_bytes(b"my video")
    assert main(["generate", *PROMPT, *FAST, "-o", "mine.mp4"]) == 2
    assert Path("mine.mp4").read_bytes() == b"my video" and not Path("mine.json").exists()
    assert main(["generate", *PROMPT, *FAST, "-o", "mine.mp4", "--overwrite"]) == 0  # asked for
    assert Path("mine.mp4").read_bytes() != b"my video" and Path("mine.json").is_file()


def test_an_input_is_never_an_output_even_with_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (32, 32), (200, 30, 30)).save("ref.mp4", format="PNG")  # an image with a video's name
    before = Path("ref.mp4").read_bytes()
    assert main(["generate", *PROMPT, *FAST, "--ref", "ref.mp4", "-o", "ref.mp4", "--overwrite"]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert Path("ref.mp4").read_bytes() == before


def test_batch_outputs_stay_inside_out_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (32, 32), (200, 30, 30)).save("r.png")
    Path("cases.jsonl").write_text(json.dumps({"prompt": "a red ball", "references": ["r.png"], "output": "sub/x.mp4"})
                                   + "\n")
    assert main(["generate", "--batch", "cases.jsonl", "--out-dir", "o", *FAST]) == 0
    assert sorted(_tree(tmp_path / "o")) == ["manifest.jsonl", "sub/x.json", "sub/x.mp4"]


def test_names_that_are_not_utf8_give_a_video_and_a_valid_sidecar(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ref, out = os.fsdecode(b"\xffref.png"), os.fsdecode(b"\xfe.mp4")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(ref, format="PNG")
    assert main(["generate", *PROMPT, *FAST, "--ref", ref, "-o", out]) == 0
    sidecar = json.loads((tmp_path / os.fsdecode(b"\xfe.json")).read_bytes().decode("utf-8"))  # strict UTF-8
    assert sidecar["video"] == "\\xfe.mp4" and sidecar["references"][0].endswith("\\xffref.png")


# ------------------------------------------------------------------------------------------------ whole folders
def _make_data(out: str, num: int = 1, *extra: str) -> list[str]:
    return ["make-data", "--out", out, "--num", str(num), "--frames", "1", "--size", "16", "--ref-size", "16",
            "--json", *extra]


def test_a_folder_a_command_wrote_is_replaced_on_rerun_unless_the_user_added_to_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert toy_main(_make_data("d")) == 0
    assert folder_owner("d") == "kaleido_s2v.toy make-data"
    assert toy_main(_make_data("d", 2)) == 0  # replaced: its own folder
    assert json.loads(Path("d/world.json").read_text())["num"] == 2
    Path("d/my_notes.txt").write_text("mine")
    before = _tree(tmp_path / "d")
    assert toy_main(_make_data("d")) == 2
    assert "holds files kaleido_s2v.toy make-data did not write (my_notes.txt)" in capsys.readouterr().err
    assert _tree(tmp_path / "d") == before
    assert toy_main(_make_data("d", 1, "--overwrite")) == 0  # asked for: replaced, the user's file with it
    assert not Path("d/my_notes.txt").exists() and json.loads(Path("d/world.json").read_text())["num"] == 1


def test_a_folder_of_another_command_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert toy_main(["make-eval", *_make_data("d")[1:]]) == 0
    assert toy_main(_make_data("d")) == 2
    assert "was made by kaleido_s2v.toy make-eval, not kaleido_s2v.toy make-data" in capsys.readouterr().err


def test_convert_reruns_into_its_own_folder(tmp_path, capsys):
    from kaleido_s2v.checkpoints.export import save_official_release
    from kaleido_s2v.tiny import tiny_transformer

    src = save_official_release(tmp_path / "rel", tiny_transformer().state_dict())
    argv = ["convert", "--src", str(src), "--dst", str(tmp_path / "out"), "--only", "transformer", "--quiet",
            "--attention-head-dim", "12"]
    assert main(argv) == 0
    marker = json.loads((tmp_path / "out" / MARKER).read_text())
    assert marker["made_by"] == "kaleido-s2v convert" and "model_index.json" in marker["files"]
    assert main(argv) == 0  # a rerun replaces its own folder
    (tmp_path / "out" / "my_lora.safetensors").write_bytes(b"mine")
    assert main(argv) == 2  # ... but not one the user added a file to
    assert (tmp_path / "out" / "my_lora.safetensors").read_bytes() == b"mine"


def test_claim_folder_rules(tmp_path):
    (tmp_path / "empty").mkdir()
    assert claim_folder(tmp_path / "new" / "deeper", "--out", "x") is False
    assert claim_folder(tmp_path / "empty", "--out", "x", replace=True) is True
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "f").write_text("1")
    with pytest.raises(UserInputError, match="was not made by x"):
        claim_folder(tmp_path / "user", "--out", "x")
    assert claim_folder(tmp_path / "user", "--out", "x", overwrite=True) is True
    with pytest.raises(UserInputError, match="current folder"):
        claim_folder(Path.cwd().parent, "--out", "x", overwrite=True, replace=True)


# ------------------------------------------------------------------------------------------------ no partial output
def test_failed_atomic_write_removes_the_parents_it_made(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a" / "b" / "out.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_output_folder_is_removed_after_an_early_failure_and_kept_after_output(tmp_path):
    with pytest.raises(RuntimeError), output_folder(tmp_path / "run" / "a", "kaleido-s2v train"):
        raise RuntimeError("bad data")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), output_folder(tmp_path / "run", "kaleido-s2v train") as run:
        (run / "metrics.jsonl").write_text("{}\n")
        raise RuntimeError("crash at step 5")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [MARKER, "metrics.jsonl"]  # resumable


def test_curate_bad_input_leaves_no_output_folder(tmp_path, capsys):
    assert main(["curate", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    (tmp_path / "clip.mp4").write_bytes(b"x")
    assert main(["curate", "--input", str(tmp_path / "clip.mp4"), "--output", str(tmp_path / "out"), "--stages",
                 "nope"]) == 2
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ environment
def test_importing_the_package_turns_onnxruntime_telemetry_off():
    code = "import os, kaleido_s2v; print(os.environ.get('ORT_DISABLE_TELEMETRY'))"
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.strip() == "1", proc.stderr


def test_generate_makes_no_connection(tmp_path, monkeypatch, capsys):
    """Python-level guard (no tool needed): no socket leaves the machine during a whole generate run."""
    attempts = []

    def hook(event, args):
        if event in ("socket.connect", "socket.getaddrinfo") and recording:
            attempts.append((event, args))

    recording = False
    sys.addaudithook(hook)  # cannot be removed: gated by `recording`
    monkeypatch.chdir(tmp_path)
    try:
        recording = True
        assert main(["generate", *PROMPT, *FAST, "-o", "a.mp4"]) == 0
        assert toy_main(["generate", "--model", "missing", "--cases", ".", "--out", "v"]) == 2  # not the Hub
    finally:
        recording = False
    assert attempts == []


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to see native connections")
def test_no_process_connects_outside_even_after_onnxruntime_wakes_up(tmp_path):
    """onnxruntime's telemetry is native code ~9 s after import: strace sees what an audit hook cannot."""
    log = tmp_path / "connect.log"
    code = "import kaleido_s2v, onnxruntime, time; time.sleep(12)"
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    subprocess.run(["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(log), sys.executable, "-c", code],
                   check=True, env=env, timeout=120)
    outside = [ln for ln in log.read_text().splitlines() if "AF_INET" in ln and "127.0.0.1" not in ln]
    assert outside == []


def test_a_plain_generate_prints_progress_and_its_result_only(tmp_path):
    proc = subprocess.run([str(BIN), "generate", *PROMPT, "--steps", "2", "--seed", "0", "-o", "a.mp4"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "warn" not in proc.stderr.lower(), proc.stderr
    assert proc.stderr.strip().splitlines()[-1].split("\r")[-1].strip().startswith("wrote a.mp4")


@pytest.mark.parametrize("delay", [0.5, 1.5, 3.0])
def test_ctrl_c_during_start_up_is_interrupted_exit_130(tmp_path, delay):
    proc = subprocess.Popen([str(BIN), "generate", *PROMPT, "-o", str(tmp_path / "a.mp4"), "--steps", "500"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal")
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "kaleido-s2v generate: interrupted"
    assert "Traceback" not in err and "terminate called" not in err
    assert not (tmp_path / "a.mp4").exists() and not (tmp_path / "a.json").exists()


# ------------------------------------------------------------------------------------------------ references
def test_transparent_pixels_become_white_and_16_bit_grey_keeps_its_range(tmp_path):
    from kaleido_s2v.references import load_reference

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4, :, :] = (200, 10, 10, 255)  # top half: opaque red; bottom half: transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    got = np.asarray(load_reference(tmp_path / "cut.png"))
    assert (got[:4] == (200, 10, 10)).all() and (got[4:] == 255).all()  # exact: compositing over 0/255 alpha
    grey = np.full((8, 8), 32768, np.uint16)  # mid-grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert np.abs(np.asarray(load_reference(tmp_path / "g16.png")).astype(int) - 128).max() <= 1  # not white


def test_a_fully_transparent_reference_gives_the_video_of_a_white_one(tmp_path):
    import torch

    from kaleido_s2v.builtin import load_builtin_pipeline

    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("RGB", (40, 40), (255, 255, 255)).save(tmp_path / "white.png")
    pipe = load_builtin_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def video(ref):
        return pipe("The red striped circle moves to the left.", [tmp_path / ref], height=32, width=32,
                    num_frames=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames[0]

    # exact: both files decode to the same RGB pixels, so the same process computes the same numbers
    np.testing.assert_array_equal(video("clear.png"), video("white.png"))
