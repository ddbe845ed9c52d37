import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kaleido_s2v.cli import main
from kaleido_s2v.video_io import write_video


@pytest.fixture
def small_input(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 255, (1, 64, 96, 3), dtype=np.uint8), 24, axis=0)
    frames[12:] = 255 - frames[12:]  # a hard cut at frame 12
    write_video(tmp_path / "in" / "a.mp4", frames, fps=16)
    return tmp_path / "in"


def test_help_is_fast_and_lists_stages():
    exe = Path(sys.executable).parent / "kaleido-s2v"
    res = subprocess.run([str(exe), "curate", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--stages" in res.stdout and "--ray-address" in res.stdout
    assert "crosspair" in res.stdout
    out = subprocess.run([sys.executable, "-c", "import sys, kaleido_s2v.cli.curate; "
                          "print(sorted(m for m in ('torch', 'ray', 'transformers', 'cv2') if m in sys.modules))"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"  # heavy imports stay inside run()


def test_json_summary(small_input, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("scenes: {min_clip_s: 0.5, min_scene_len: 4}\nquality: {min_clip_s: 0.5, min_sharpness: 0, min_motion: 0}\n")
    rc = main(["curate", "--input", str(small_input), "--output", str(tmp_path / "o"), "--stages", "scenes,quality",
               "--config", str(cfg), "--json", "--no-clips"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["clips"] == 2 and summary["kept"] == 2 and summary["executor"] == "local"
    assert set(summary["stages"]) == {"scenes", "quality"}
    lines = (tmp_path / "o" / "manifest.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    assert {"clip_id", "source", "start_s", "end_s", "status", "reasons", "quality", "scenes"} <= set(rec)
    assert rec["start_s"] == pytest.approx(0.75)


@pytest.mark.parametrize("argv, message", [
    (["--input", "MISSING"], "--input 'MISSING' does not exist"),
    (["--stages", "scenes,bogus"], "unknown stage 'bogus'"),
    (["--stages", "quality,scenes"], "'scenes' splits videos into clips and must come first"),
    (["--stages", "scenes,caption"], "stage 'caption' needs a local model folder"),
    (["--config", "CFG:quality: {min_luma: dark}"], "quality.min_luma must be a number"),
    (["--config", "CFG:qualty: {}"], "unknown stage 'qualty'"),
    (["--config", "CFG:quality: {blur: 3}"], "unknown setting 'quality.blur'"),
    (["--config", "CFG:[unclosed"], "cannot be parsed"),
])
def test_bad_input_exits_2_with_one_line(small_input, tmp_path, capsys, argv, message):
    args = {"--input": str(small_input), "--output": str(tmp_path / "o"), "--stages": "scenes,quality"}
    it = iter(argv)
    for k, v in zip(it, it):
        if v.startswith("CFG:"):
            (tmp_path / "c.yaml").write_text(v[4:])
            v = str(tmp_path / "c.yaml")
        args[k] = v
    rc = main(["curate", *[x for kv in args.items() for x in kv]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("kaleido-s2v curate: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()  # no partial output
