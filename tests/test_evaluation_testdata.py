"""`kaleido-s2v evaluate` end to end on the official Kaleido outputs (../shared/testdata), tiny models."""

import json

import numpy as np
import pytest
from PIL import Image

from kaleido_s2v.cli import main
from kaleido_s2v.evaluation import METRICS
from kaleido_s2v.evaluation.tiny import save_tiny_models

pytestmark = pytest.mark.testdata

LABELS = {"case1": ["man"], "case2": ["toy"], "case3": ["fox", "penguin"], "case4": ["toy", "woman"],
          "case5": ["man", "woman"], "case6": ["hat", "woman"], "case7": ["scarf", "woman", "wand"],
          "case9": ["toy", "toy", "toy"], "case10": ["shirt", "skirt", "woman"]}


def _official_prompts(examples_dir):
    """[(prompt, [reference arrays])] from inference_examples.txt (`prompt@@resources/refN.png@@...`)."""
    out = []
    for line in (examples_dir / "inference_examples.txt").read_text().splitlines():
        if "@@" in line:
            prompt, *paths = line.split("@@")
            refs = [np.asarray(Image.open(examples_dir / p.split("/")[-1]).convert("RGB")) for p in paths]
            out.append((prompt.strip(), refs))
    return out


def _case_lines(examples_dir, names):
    """Cases with their references; the official prompt where the references are those of an official example."""
    examples = _official_prompts(examples_dir)
    lines = []
    for name in names:
        folder = examples_dir / name
        video = next(p for p in sorted(folder.iterdir()) if p.suffix == ".mp4")
        refs = sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg"))
        arrays = [np.asarray(Image.open(p).convert("RGB")) for p in refs]
        prompt = ""
        for text, ex_refs in examples:
            if len(ex_refs) == len(arrays) and all(a.shape == b.shape and (a == b).all()
                                                   for a, b in zip(arrays, ex_refs)):
                prompt = text
        lines.append({"id": name, "video": f"{name}/{video.name}", "prompt": prompt,
                      "references": [str(p) for p in refs], "labels": LABELS[name]})
    return lines


def _run(tmp_path, examples_dir, names, extra=()):
    models = save_tiny_models(tmp_path / "models")
    (tmp_path / "models.json").write_text(json.dumps({k: str(v) for k, v in models.items()}))
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in _case_lines(examples_dir, names)))
    params = {"s2v": {"box_threshold": 0.0, "text_threshold": 0.0, "mask_min_iou": -1.0, "frames": 8},
              "face_similarity": {"frames": 8}}
    rc = main(["evaluate", "--cases", str(tmp_path / "cases.jsonl"), "--videos", str(examples_dir), "--models",
               str(tmp_path / "models.json"), "--output", str(tmp_path / "out"), "--params", json.dumps(params),
               "--device", "cpu", "--no-progress", *extra])
    assert rc == 0
    return json.loads((tmp_path / "out" / "scores.json").read_text())


def test_official_outputs_end_to_end(tmp_path, examples_dir):
    lines = _case_lines(examples_dir, ["case3"])
    assert lines[0]["prompt"].startswith("In a sun-drenched attic, a fox")  # matched to the official example
    scores = _run(tmp_path, examples_dir, ["case1", "case3"])
    assert list(scores["mean"]) == list(METRICS)
    for cid in ("case1", "case3"):
        row = scores["per_case"][cid]
        assert 0.9 < row["subject_consistency"] <= 1.0 and 0.9 < row["background_consistency"] <= 1.0
        assert 0.9 < row["motion_smoothness"] <= 1.0  # real generated video: small interpolation error
        assert scores["details"][cid]["s2v_consistency"]["frames"] == 8
    assert scores["per_case"]["case1"]["text_alignment"] is None  # no official prompt for case1
    assert scores["per_case"]["case3"]["text_alignment"] is not None
    face = scores["details"]["case1"]["face_similarity"]  # a real man's photo and his generated video
    assert face["reference_index"] == 0 and face["detection_rate"] >= 0.5
    assert (tmp_path / "out" / "report.html").stat().st_size > 10_000


def test_shuffling_a_real_video_lowers_smoothness(examples_dir):
    from kaleido_s2v.evaluation.metrics.motion_smoothness import motion_smoothness
    from kaleido_s2v.video_io import read_video

    frames = read_video(examples_dir / "case2" / "2.mp4", max_frames=17)
    shuffled = frames[np.random.default_rng(0).permutation(len(frames))]
    for method in ("dis", "farneback", "linear"):
        assert motion_smoothness(frames, method)[0] > motion_smoothness(shuffled, method)[0]


@pytest.mark.slow
def test_all_official_outputs(tmp_path, examples_dir):
    scores = _run(tmp_path, examples_dir, list(LABELS), extra=["--keep-going"])
    assert not scores["errors"] and set(scores["per_case"]) == set(LABELS)
    assert all(scores["mean"][m] is not None for m in METRICS)
