"""Evaluation metrics: identities that hold for any backbone (tiny random real-class models), the report and CLI."""

import csv
import json
import os
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kaleido_s2v.cli import main
from kaleido_s2v.errors import UserInputError
from kaleido_s2v.evaluation import METRICS, Case, Reference, select_metrics
from kaleido_s2v.evaluation.frames import CaseData, middle_indices, uniform_indices
from kaleido_s2v.evaluation.metrics import consistency_from_features
from kaleido_s2v.evaluation.models import ModelStore
from kaleido_s2v.evaluation.tiny import save_tiny_models
from kaleido_s2v.video_io import write_video

ALL = list(METRICS)
DETECT_ALL = {"box_threshold": 0.0, "text_threshold": 0.0, "mask_min_iou": -1.0}


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def store(model_paths):
    return ModelStore(model_paths, batch_size=8)


def _data(frames, refs=(), prompt="a toy on a table", labels=None):
    refs = [Image.fromarray(r) if isinstance(r, np.ndarray) else r for r in refs]
    labels = labels or ["toy"] * len(refs)
    case = Case("c", None, prompt, tuple(Reference(None, lab) for lab in labels))
    return CaseData(case, np.ascontiguousarray(frames), refs)


def _rng_image(seed=0, h=40, w=56):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _moving_video(t=9, h=48, w=64, step=3):
    """A smooth textured pattern translating `step` px per frame."""
    yy, xx = np.mgrid[0:h, 0:w + step * t].astype(np.float32)
    tex = 127.5 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + 60 * np.sin((xx + yy) / 11.0)
    tex = np.clip(tex, 0, 255).astype(np.uint8)
    return np.stack([np.repeat(tex[:, i * step:i * step + w, None], 3, axis=2) for i in range(t)])


def test_sampling_indices():
    assert uniform_indices(81, 16).tolist() == np.linspace(0, 80, 16).astype(int).tolist()
    assert uniform_indices(5, 16).tolist() == [0, 1, 2, 3, 4]
    assert middle_indices(81, 8).tolist() == [4, 14, 24, 34, 44, 54, 64, 75]


def test_consistency_formula_matches_a_plain_loop():
    f = F.normalize(torch.randn(7, 5), dim=-1)
    total, pairs = consistency_from_features(f)
    want = [0.5 * (max(0.0, float(f[t] @ f[t - 1])) + max(0.0, float(f[t] @ f[0]))) for t in range(1, 7)]
    assert pairs == 6 and total == pytest.approx(sum(want), abs=1e-6)


def test_static_video_has_consistency_one(store):
    data = _data(np.repeat(_rng_image()[None], 6, axis=0))
    for name in ("subject_consistency", "background_consistency"):
        res = METRICS[name].load().score(data, store, {})
        assert res.value == pytest.approx(1.0, abs=1e-5), name
        assert res.details["pairs"] == 5
    changing = _data(np.stack([_rng_image(s) for s in range(6)]))
    assert METRICS["subject_consistency"].load().score(changing, store, {}).value < 1.0 - 1e-4


def test_video_of_the_reference_has_zero_decoupling_and_full_consistency(store):
    ref = _rng_image(3)
    data = _data(np.repeat(ref[None], 5, axis=0), [ref])
    dec = METRICS["s2v_decoupling"].load().score(data, store, DETECT_ALL)
    cons = METRICS["s2v_consistency"].load().score(data, store, DETECT_ALL)
    assert dec.details["detection_rate"] == 1.0 and dec.details["reference_detected"] == [True]
    assert dec.value == pytest.approx(0.0, abs=1e-3)
    assert cons.value == pytest.approx(1.0, abs=1e-3)
    # A different background in the frames gives a positive decoupling.
    other = _data(np.repeat(_rng_image(4)[None], 5, axis=0), [ref])
    assert METRICS["s2v_decoupling"].load().score(other, store, DETECT_ALL).value > 1e-3


def test_nothing_detected_is_reported_not_fatal(store):
    ref = _rng_image(5)
    data = _data(np.repeat(ref[None], 4, axis=0), [ref])
    none = {"box_threshold": 1.01}  # probabilities never exceed 1: nothing is detected anywhere
    cons = METRICS["s2v_consistency"].load().score(data, store, none)
    dec = METRICS["s2v_decoupling"].load().score(data, store, none)
    assert cons.value is None and cons.details["detection_rate"] == 0.0 and "skipped" in cons.details
    assert dec.details["detection_rate"] == 0.0
    assert dec.value == pytest.approx(0.0, abs=1e-3)  # whole frame vs whole reference: still identical
    scene_only = _data(np.repeat(ref[None], 4, axis=0), [ref])
    scene_only.case = Case("c", None, "", (Reference(None, "room", "scene"),))
    assert METRICS["s2v_consistency"].load().score(scene_only, store, DETECT_ALL).value is None


def test_motion_smoothness_orders_and_formula():
    from kaleido_s2v.evaluation.metrics.motion_smoothness import interpolate_midpoint, motion_smoothness

    video = _moving_video()
    shuffled = video[np.random.default_rng(0).permutation(len(video))]
    for method in ("dis", "farneback", "linear"):
        ordered_s, n = motion_smoothness(video, method)
        assert n == 4 and ordered_s > motion_smoothness(shuffled, method)[0], method
    # linear: (255 - mean |trunc((a + b) / 2) - odd|) / 255, recomputed by hand
    errs = [np.abs(((video[i - 1].astype(np.float32) + video[i + 1]) / 2).astype(np.uint8).astype(np.float32)
                   - video[i]).mean() for i in (1, 3, 5, 7)]
    assert motion_smoothness(video, "linear")[0] == pytest.approx((255 - np.mean(errs)) / 255, abs=1e-6)
    # the flow interpolator must beat blending on a pure translation (checks the warp directions)
    a, mid, b = video[2], video[3], video[4]
    lin_err = np.abs(interpolate_midpoint(a, b, "linear") - mid)[8:-8, 8:-8].mean()
    for method in ("dis", "farneback"):
        flow_err = np.abs(interpolate_midpoint(a, b, method, flow_max_side=None) - mid)[8:-8, 8:-8].mean()
        assert flow_err < 0.5 * lin_err, method


def test_aesthetic_head_formats_and_value(store, model_paths, tmp_path):
    from kaleido_s2v.evaluation.metrics.aesthetic_quality import AestheticHead

    head = AestheticHead.load(model_paths["aesthetic"])
    torch.save(dict(head.linear.state_dict()), tmp_path / "sa_0_4_vit_l_14_linear.pth")
    torch.testing.assert_close(AestheticHead.load(tmp_path).linear.weight, head.linear.weight)
    (tmp_path / "bad").mkdir()
    torch.save({"w": torch.zeros(1, 16)}, tmp_path / "bad" / "sa_0_4_vit_l_14_linear.pth")
    with pytest.raises(UserInputError, match="weight"):
        AestheticHead.load(tmp_path / "bad")
    frames = np.stack([_rng_image(s) for s in range(3)])
    res = METRICS["aesthetic_quality"].load().score(_data(frames), store, {})
    emb = store.get("clip_large").embed_images(frames, preprocess="vbench")
    with torch.no_grad():
        want = (emb @ head.linear.weight.T + head.linear.bias).mean() / 10
    assert res.value == pytest.approx(float(want), abs=1e-6)


def test_text_alignment_matches_direct_clip(store, model_paths):
    from transformers import AutoProcessor, CLIPModel

    frames = np.stack([_rng_image(s) for s in range(20)])
    res = METRICS["text_alignment"].load().score(_data(frames, prompt="a cat sits"), store, {"frames": 16})
    model = CLIPModel.from_pretrained(model_paths["clip_large"]).eval()
    proc = AutoProcessor.from_pretrained(model_paths["clip_large"])
    idx = np.linspace(0, 19, 16).astype(int)
    with torch.no_grad():
        img = model.get_image_features(**proc(images=[Image.fromarray(frames[i]) for i in idx], return_tensors="pt"))
        txt = model.get_text_features(**proc.tokenizer(["a cat sits"], return_tensors="pt"))
    img, txt = (F.normalize(getattr(x, "pooler_output", x), dim=-1) for x in (img, txt))
    assert res.value == pytest.approx(float((img @ txt.T).mean()), abs=1e-5)
    assert "clip_large" in res.implementation
    assert METRICS["text_alignment"].load().score(_data(frames, prompt=" "), store, {}).value is None


def test_imaging_quality_substitute_is_named(store, model_paths, tmp_path):
    only_clip = ModelStore({"clip": model_paths["clip"]})
    res = METRICS["imaging_quality"].load().score(_data(np.stack([_rng_image(1)] * 2)), only_clip, {})
    assert 0.0 < res.value < 1.0 and "substitute" in res.implementation and "CLIP-IQA" in res.implementation
    (tmp_path / "musiq").mkdir()
    (tmp_path / "musiq" / "musiq_spaq_ckpt-358bb6af.pth").write_bytes(b"")
    with_musiq = ModelStore({"musiq": tmp_path / "musiq", "clip": model_paths["clip"]})
    try:
        import pyiqa  # noqa: F401
    except Exception:
        with pytest.raises(UserInputError, match="pyiqa"):
            with_musiq.get("musiq")


def test_face_similarity_without_faces_is_none(store):
    res = METRICS["face_similarity"].load().score(_data(np.stack([_rng_image(2)] * 3), [_rng_image(9)]), store, {})
    assert res.value is None and res.details["detection_rate"] == 0.0


def test_metric_selection_and_missing_roles(model_paths):
    assert select_metrics(None, model_paths) == ALL
    assert select_metrics(None, {}) == ["motion_smoothness"]
    assert select_metrics(None, {"clip": 1}) == ["background_consistency", "motion_smoothness",
                                                  "imaging_quality", "text_alignment"]
    with pytest.raises(UserInputError, match="'face_similarity' needs model role face"):
        select_metrics(["face_similarity"], {"clip": 1})
    with pytest.raises(UserInputError, match="unknown metric"):
        select_metrics(["fvd"], model_paths)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.svgs = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])
        self.svgs += tag == "svg"


def _write_case(root, name, frames, refs, prompt="a toy"):
    write_video(root / f"{name}.mp4", frames, fps=8)
    paths = []
    for k, r in enumerate(refs):
        Image.fromarray(r).save(root / f"{name}_ref{k}.png")
        paths.append({"path": f"{name}_ref{k}.png", "label": "toy"})
    return {"id": name, "video": f"{name}.mp4", "prompt": prompt, "references": paths}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, model_paths):
    root = tmp_path_factory.mktemp("run")
    ref = _rng_image(7, 48, 64)
    cases = [_write_case(root, "moving", _moving_video(), [ref]),
             _write_case(root, "still", np.repeat(ref[None], 6, axis=0), [ref], prompt="")]
    (root / "cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))
    (root / "models.yaml").write_text("".join(f"{k}: {v}\n" for k, v in model_paths.items()))
    (root / "params.json").write_text(json.dumps({"s2v": DETECT_ALL}))
    return root


def test_cli_end_to_end_outputs(small_run, capsys):
    out = small_run / "out"
    rc = main(["evaluate", "--cases", str(small_run / "cases.jsonl"), "--videos", str(small_run), "--models",
               str(small_run / "models.yaml"), "--output", str(out), "--params", str(small_run / "params.json"),
               "--device", "cpu", "--batch-size", "4", "--json", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    scores = json.loads((out / "scores.json").read_text())
    assert summary["mean"] == scores["mean"] and list(scores["mean"]) == ALL
    assert set(scores["per_case"]) == {"moving", "still"}
    assert scores["per_case"]["still"]["text_alignment"] is None  # no prompt
    assert scores["per_case"]["still"]["subject_consistency"] > scores["per_case"]["moving"]["subject_consistency"]
    info = scores["metrics"]
    assert "substitute" in info["motion_smoothness"]["implementation"][0]
    assert info["s2v_consistency"]["params"]["box_threshold"] == 0.0 and "detection_rate_mean" in info["s2v_decoupling"]
    assert info["subject_consistency"]["vbench_overall"] is not None
    umask = os.umask(0)
    os.umask(umask)
    assert all((out / f).stat().st_mode & 0o777 == 0o666 & ~umask for f in ("scores.json", "scores.csv", "report.html"))
    rows = list(csv.reader((out / "scores.csv").open()))
    assert rows[0] == ["case_id", *ALL] and [r[0] for r in rows[1:]] == ["moving", "still", "mean"]
    page = _Images()
    page.feed((out / "report.html").read_text())
    assert page.svgs == len(ALL)
    assert len(page.srcs) == 2 * (1 + 4)  # per case: one reference and four frames
    import base64
    import io

    for src in page.srcs:
        assert src.startswith("data:image/jpeg;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()


def test_cli_errors_exit_2(small_run, tmp_path, capsys):
    args = ["evaluate", "--videos", str(small_run), "--output", str(tmp_path / "o"), "--no-progress"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "video": "missing.mp4", "prompt": "p", "references": []}) + "\n")
    assert main([*args, "--cases", str(bad)]) == 2
    assert "missing.mp4" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main([*args, "--cases", str(small_run / "cases.jsonl"), "--metrics", "subject_consistency"]) == 2
    assert "needs model role dino" in capsys.readouterr().err
    (small_run / "corrupt.mp4").write_bytes(b"not a video at all")
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text(json.dumps({"id": "bad", "video": "corrupt.mp4"}) + "\n"
                       + (small_run / "cases.jsonl").read_text().splitlines()[1] + "\n")
    corrupt_refs = corrupt.read_text().replace('"still_ref0.png"', json.dumps(str(small_run / "still_ref0.png")))
    corrupt.write_text(corrupt_refs)
    err_line = [*args, "--cases", str(corrupt), "--metrics", "motion_smoothness"]
    assert main(err_line) == 2
    assert "corrupt.mp4" in capsys.readouterr().err
    assert main([*err_line, "--keep-going", "--json"]) == 3  # done, but a case could not be scored
    scores = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert "bad" in scores["errors"] and scores["per_case"]["bad"]["motion_smoothness"] is None
    assert scores["per_case"]["still"]["motion_smoothness"] is not None


def test_help_lists_metrics_and_roles(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    for name, spec in METRICS.items():
        assert name in text and spec.roles_text() in text


def test_models_file_errors(tmp_path):
    from kaleido_s2v.evaluation import read_models

    (tmp_path / "m.yaml").write_text("clipp: /x\n")
    with pytest.raises(UserInputError, match="unknown role 'clipp'"):
        read_models(tmp_path / "m.yaml")
    (tmp_path / "m.yaml").write_text("clip: does-not-exist\n")
    with pytest.raises(UserInputError, match="role 'clip' not found"):
        read_models(tmp_path / "m.yaml")


@pytest.mark.slow
def test_report_renders_in_headless_chromium(small_run, tmp_path):
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium installed (apt-get install chromium)")
    out = tmp_path / "out"
    assert main(["evaluate", "--cases", str(small_run / "cases.jsonl"), "--videos", str(small_run), "--models",
                 str(small_run / "models.yaml"), "--output", str(out), "--metrics", "motion_smoothness,text_alignment",
                 "--device", "cpu", "--no-progress"]) == 0
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,900", (out / "report.html").as_uri()], check=True, timeout=120,
                   capture_output=True)
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert img.shape == (900, 1200) and img.std() > 10  # something was drawn, not a blank page


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import argparse, sys; from kaleido_s2v.cli import evaluate; "
            "evaluate.add_arguments(argparse.ArgumentParser()); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
