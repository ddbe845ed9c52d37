"""Model stages with tiny random-weight models of the real classes, saved to local folders in the test.

Random weights make the *content* meaningless (captions are random words, boxes random), so these tests check
plumbing, batching, files and the record format; the logic (IoU, size, cliques, face) is tested in test_filter.
"""

import json

import numpy as np
import pytest
from PIL import Image

from kaleido_s2v.curation.config import build_stage
from kaleido_s2v.curation.stages.export import mix_counts
from kaleido_s2v.curation.stages.ground import assign_phrase, save_png
from kaleido_s2v.curation.tasks import Clip
from kaleido_s2v.errors import UserInputError
from kaleido_s2v.video_io import read_video, video_info, write_video

from .footage import variant
from .tiny_models import WORDS, save_tiny_llava

N = 16  # frames per test clip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from kaleido_s2v.vision.tiny import save_tiny_clip, save_tiny_grounding_dino, save_tiny_sam

    d = tmp_path_factory.mktemp("models")
    return {"caption": str(save_tiny_llava(d / "llava")), "ground": str(save_tiny_grounding_dino(d / "gdino")),
            "segment": str(save_tiny_sam(d / "sam")), "filter": str(save_tiny_clip(d / "clip"))}


@pytest.fixture
def clips(examples_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {case: variant(examples_dir, d, case, N, "original") for case in ("case6", "case3")}


def _clip(path, cid="c0"):
    return Clip(clip_id=cid, source=str(path), start_s=0.0, end_s=N / 16, fps=16.0, width=896, height=512)


def test_caption_batches_like_single_calls_and_records_unreadable(models, clips, tmp_path):
    stage = build_stage("caption", {"model": models["caption"], "num_frames": 2, "batch_size": 3,
                                    "max_new_tokens": 6, "device": "cpu"}, tmp_path)
    stage.setup()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"junk")
    batch = stage.process_batch([_clip(clips["case6"], "a"), _clip(bad, "bad"), _clip(clips["case3"], "b")])
    singles = [stage.process(_clip(clips[c], c)) for c in ("case6", "case3")]
    # exact: greedy token ids; batching changes the float sums by ~1e-8, the smallest top-2 logit gap is 6e-4
    assert [c.fields["caption"] for c in (batch[0], batch[2])] == [c.fields["caption"] for c in singles]
    for c in (batch[0], batch[2]):
        assert c.kept and "\n" not in c.fields["caption"] and set(c.fields) <= set(stage.outputs())
        assert all(w in WORDS + [".", ",", ":", "USER", "ASSISTANT"] for w in c.fields["caption"].split())
    assert batch[1].reasons == ["unreadable"]


def test_qwen25_vl_loads_through_the_same_auto_class():
    """The caption stage loads with AutoModelForImageTextToText; Qwen2.5-VL (the paper-era captioner) maps there.

    A tiny Qwen2.5-VL cannot be run here: `Qwen2_5_VLProcessor` needs a video processor, which needs torchvision.
    """
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    assert AutoModelForImageTextToText._model_mapping[Qwen2_5_VLConfig] is Qwen2_5_VLForConditionalGeneration


def test_caption_needs_a_model_folder(tmp_path):
    with pytest.raises(UserInputError, match=r"caption.*needs a local model folder.*--config"):
        build_stage("caption", {})
    with pytest.raises(UserInputError, match="does not exist"):
        build_stage("caption", {"model": str(tmp_path / "missing")})


def test_assign_phrase():
    phrases = ["woman", "red dress", "dog"]
    assert assign_phrase("woman", phrases) == 0
    assert assign_phrase("red", phrases) == 1
    assert assign_phrase("dress dog", phrases) == 1  # first best overlap
    assert assign_phrase("woman. shirt. [SEP]", phrases) == 0  # Grounding DINO labels can span phrases
    assert assign_phrase("", phrases) is None and assign_phrase("cat", phrases) is None


def _grounded(models, clip_path, out):
    clip = _clip(clip_path)
    clip.fields["subjects"] = [{"category": "woman", "group": "person", "phrase": "woman", "human": True},
                               {"category": "shirt", "group": "garment", "phrase": "shirt", "human": False}]
    ground = build_stage("ground", {"model": models["ground"], "box_threshold": 0.0, "text_threshold": 0.0,
                                    "max_per_subject": 1, "device": "cpu"}, out)
    ground.setup()
    ground.process(clip)
    return clip, ground


def test_ground_segment_filter_records_and_files(models, clips, tmp_path):
    clip, ground = _grounded(models, clips["case6"], tmp_path)
    assert set(clip.fields) == {"subjects", *ground.outputs()}
    assert len(clip.fields["frames"]) == 3
    for p in clip.fields["frames"]:
        assert Image.open(tmp_path / p).size == (896, 512)
    dets = clip.fields["detections"]
    assert dets and all(d["frame"] in (0, 1, 2) and d["subject"] in (0, 1) for d in dets)
    assert all(0 <= d["box"][0] < d["box"][2] <= 896 and 0 <= d["box"][1] < d["box"][3] <= 512 for d in dets)

    segment = build_stage("segment", {"model": models["segment"], "device": "cpu"}, tmp_path)
    segment.setup()
    segment.process(clip)
    for d in clip.fields["detections"]:
        m = np.asarray(Image.open(tmp_path / d["mask"]))
        assert m.shape == (512, 896) and set(np.unique(m)) <= {0, 255}
        assert d["mask_area"] == pytest.approx((m > 0).mean(), abs=1e-4) and isinstance(d["sam_iou"], float)

    loose = {"model": str(models["filter"]), "min_area_ratio": 0.0, "min_side_px": 1.0, "max_area_ratio": 1.0,
             "max_iou": 1.0, "min_clip_score": -1.0, "require_top1": False, "clique_threshold": -1.0,
             "device": "cpu"}
    flt = build_stage("filter", loose, tmp_path)
    flt.setup()
    flt.process(clip)
    kept = [s for s in clip.fields["subjects"] if s["status"] == "kept"]
    assert clip.kept and kept
    for s in kept:
        assert len(s["identity"]) >= 2 and len({dets[j]["frame"] for j in s["identity"]}) == len(s["identity"])
        ref = clip.fields["detections"][s["ref_detection"]]
        seg = np.asarray(Image.open(tmp_path / s["refs"]["segment"]))
        mask = np.asarray(Image.open(tmp_path / ref["mask"])) > 0
        x0, y0, x1, y1 = (int(round(v)) for v in ref["box"])
        outside = ~mask[y0:y1, x0:x1]
        assert seg.shape[:2] == outside.shape and (seg[outside] == 255).all()  # background is white
    # nothing similar enough across frames -> no consistent subject
    strict = build_stage("filter", {**loose, "clique_threshold": 1.01}, tmp_path)
    strict._model = flt._model
    strict.process(clip)
    assert clip.reasons == ["no_consistent_subject"]
    assert {s["reason"] for s in clip.fields["subjects"]} <= {"inconsistent", "no_valid_detection"}


def test_face_stage_on_real_person(examples_dir, clips, tmp_path):
    frame = read_video(clips["case6"], max_frames=1)[0]
    save_png(tmp_path / "subjects/c0/frame_0.png", frame)
    clip = _clip(clips["case6"])
    clip.fields.update(frames=["subjects/c0/frame_0.png"], detections=[
        {"frame": 0, "box": [160, 0, 480, 512], "score": 0.9},  # the woman
        {"frame": 0, "box": [600, 0, 896, 300], "score": 0.8},  # sea and sky
    ], subjects=[
        {"category": "woman", "human": True, "status": "kept", "ref_detection": 0},
        {"category": "man", "human": True, "status": "kept", "ref_detection": 1},
        {"category": "shirt", "human": False, "status": "kept", "ref_detection": 0},
    ])
    stage = build_stage("face", {}, tmp_path)
    stage.process(clip)
    woman, man, shirt = clip.fields["subjects"]
    assert woman["status"] == "kept" and woman["face"]["frontal"]
    assert man["status"] == "dropped" and man["reason"] == "no_face"
    assert "face" not in shirt and shirt["status"] == "kept" and clip.kept


def _segmented_clip(out, cid, source, colour):
    frame = np.full((64, 96, 3), colour, np.uint8)
    frame[16:48, 32:64] = (200, 30, 30)
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 32:64] = 255
    save_png(out / f"subjects/{cid}/frame_0.png", frame)
    save_png(out / f"subjects/{cid}/mask_0_0.png", mask)
    seg = np.full((32, 32, 3), 255, np.uint8)
    seg[:] = (200, 30, 30)
    save_png(out / f"subjects/{cid}/segment_0.png", seg)
    save_png(out / f"subjects/{cid}/crop_0.png", frame[16:48, 32:64])
    c = Clip(clip_id=cid, source=source, start_s=0, end_s=1)
    c.fields.update(frames=[f"subjects/{cid}/frame_0.png"], caption=f"A red toy in clip {cid}.\nSecond line.",
                    detections=[{"frame": 0, "box": [32, 16, 64, 48], "score": 0.9,
                                 "mask": f"subjects/{cid}/mask_0_0.png"}],
                    subjects=[{"category": "toy", "phrase": "red toy", "status": "kept", "ref_detection": 0,
                               "refs": {"crop": f"subjects/{cid}/crop_0.png",
                                        "segment": f"subjects/{cid}/segment_0.png"}}])
    return c


def test_crosspair_uses_another_source_and_is_deterministic(tmp_path):
    a = _segmented_clip(tmp_path, "a", "/v/one.mp4", (0, 0, 255))
    b = _segmented_clip(tmp_path, "b", "/v/two.mp4", (0, 255, 0))
    stage = build_stage("crosspair", {}, tmp_path)
    stage.set_pool([a, b])
    stage.process(a)
    cp = a.fields["subjects"][0]["crosspair"]
    assert cp["background_clip"] == "b"
    img = np.asarray(Image.open(tmp_path / cp["path"]))
    red = (img == (200, 30, 30)).all(-1)
    green = (img == (0, 255, 0)).all(-1)
    assert red.sum() > 200 and green.sum() > 0.5 * img.shape[0] * img.shape[1]  # subject on b's background
    first = img.copy()
    stage.process(a)
    assert (np.asarray(Image.open(tmp_path / cp["path"])) == first).all()


class _FakePipe:
    def __init__(self):
        self.calls = []

    def __call__(self, **kw):
        self.calls.append(kw)
        w, h = kw.get("width", 32), kw.get("height", 32)
        return type("Out", (), {"images": [Image.new("RGB", (w, h), (10, 20, 30))]})()


def test_inpaint_plumbing_with_a_stand_in_pipeline(tmp_path):
    (tmp_path / "flux-fill").mkdir()
    c = _segmented_clip(tmp_path, "a", "/v/one.mp4", (0, 0, 255))
    stage = build_stage("inpaint", {"model": str(tmp_path / "flux-fill"), "num_inference_steps": 2}, tmp_path)
    stage._pipe = _FakePipe()  # records the call (the real tiny pipeline runs in the next test)
    stage.process(c)
    (call,) = stage._pipe.calls
    assert call["width"] % 16 == 0 and call["height"] % 16 == 0 and "red toy" in call["prompt"]
    mask = np.asarray(call["mask_image"])
    assert mask[32, 48] == 0 and mask[2, 2] == 255  # repaint the background, keep the subject
    assert call["num_inference_steps"] == 2 and call["guidance_scale"] == 30.0
    out = c.fields["subjects"][0]["inpaint"]
    assert (tmp_path / out["path"]).is_file() and out["prompt"] == call["prompt"]
    with pytest.raises(UserInputError, match="inpaint"):
        build_stage("inpaint", {})


def test_inpaint_with_a_tiny_flux_fill_pipeline(tmp_path):
    from .tiny_models import save_tiny_flux_fill

    c = _segmented_clip(tmp_path, "a", "/v/one.mp4", (0, 0, 255))
    model = save_tiny_flux_fill(tmp_path / "flux-fill")
    stage = build_stage("inpaint", {"model": str(model), "num_inference_steps": 2, "max_sequence_length": 16,
                                    "device": "cpu"}, tmp_path)
    stage.setup()
    stage.process(c)
    out = np.asarray(Image.open(tmp_path / c.fields["subjects"][0]["inpaint"]["path"]))
    assert out.shape == (64, 64, 3)  # the 32 x 32 box grown by 50 % on each side, inside the 96 x 64 frame


def test_redux_with_tiny_flux_pipelines(tmp_path):
    from .tiny_models import save_tiny_flux_redux

    c = _segmented_clip(tmp_path, "a", "/v/one.mp4", (0, 0, 255))
    flux, prior = save_tiny_flux_redux(tmp_path / "flux", tmp_path / "redux")
    stage = build_stage("redux", {"model": str(flux), "prior_model": str(prior), "num_inference_steps": 2,
                                  "size": 32, "device": "cpu"}, tmp_path)
    stage.setup()
    stage.process(c)
    out = Image.open(tmp_path / c.fields["subjects"][0]["redux"]["path"])
    assert out.size == (32, 32) and out.mode == "RGB"


def test_redux_plumbing_with_stand_in_pipelines(tmp_path):
    (tmp_path / "flux").mkdir()
    (tmp_path / "redux").mkdir()
    c = _segmented_clip(tmp_path, "a", "/v/one.mp4", (0, 0, 255))
    stage = build_stage("redux", {"model": str(tmp_path / "flux"), "prior_model": str(tmp_path / "redux"),
                                  "size": 64}, tmp_path)
    seen = []
    stage._prior = lambda image: seen.append(image) or {"prompt_embeds": "E", "pooled_prompt_embeds": "P"}
    stage._pipe = _FakePipe()
    stage.process(c)
    assert seen[0].size == (32, 32) and stage._pipe.calls[0]["prompt_embeds"] == "E"
    assert (tmp_path / c.fields["subjects"][0]["redux"]["path"]).is_file()
    with pytest.raises(UserInputError, match="prior_model"):
        build_stage("redux", {"model": str(tmp_path / "flux")})


def test_mix_counts():
    full = {"crop": 10, "segment": 10, "inpaint": 10, "redux": 10}
    mix = {"crop": 1, "segment": 5, "inpaint": 3, "redux": 1}
    assert mix_counts(full, mix) == {"crop": 2, "segment": 10, "inpaint": 6, "redux": 2}
    assert mix_counts({**full, "redux": 0}, mix) == {"crop": 2, "segment": 10, "inpaint": 6, "redux": 0}
    assert mix_counts({"crop": 100, "segment": 100, "inpaint": 100, "redux": 100}, mix, 20) == {
        "crop": 2, "segment": 10, "inpaint": 6, "redux": 2}
    assert mix_counts({}, mix) == {"crop": 0, "segment": 0, "inpaint": 0, "redux": 0}


def test_export_writes_kaleido_layout_and_train_manifest(tmp_path):
    rng = np.random.default_rng(0)
    src = write_video(tmp_path / "src.mp4", rng.integers(0, 255, (40, 64, 96, 3), dtype=np.uint8), fps=25)
    clips = [_segmented_clip(tmp_path, cid, str(src), (0, 0, 255)) for cid in ("a", "b", "c")]
    for c in clips:
        c.end_s = 1.2
    stage = build_stage("export", {"mix": {"crop": 1, "segment": 2}}, tmp_path)
    for c in clips:
        stage.process(c)
        assert set(c.fields["export"]["candidates"]) == {"crop", "segment"}
    counts = stage.finalize(clips)
    # largest total with shares within availability: 4 (4/3 crop, 8/3 segment), rounded by largest remainder
    assert counts == {"crop": 1, "segment": 3}
    lines = [json.loads(x) for x in (tmp_path / "train_manifest.jsonl").read_text().splitlines()]
    assert sorted(x["type"] for x in lines) == ["crop", "segment", "segment", "segment"]
    for rec in lines:
        assert rec["status"] == "kept" and "\n" not in rec["caption"] and rec["caption"].startswith("A red toy")
        info = video_info(tmp_path / rec["video"])
        assert info.fps == 16 and info.num_frames in (19, 20)  # 1.2 s re-encoded at exactly 16 fps
        assert 1 <= len(rec["references"]) <= 3
        for r in rec["references"]:
            assert Image.open(tmp_path / r).mode == "RGB"
        sid = rec["sample_id"]
        assert (tmp_path / "kaleido/labels" / f"{sid}.txt").read_text().count("\n") == 1
        assert (tmp_path / "kaleido/references" / sid / "ref1.png").is_file()
    with pytest.raises(UserInputError, match="export.mix"):
        build_stage("export", {"mix": {"crop": 1, "bogus": 2}})


def test_every_stage_in_one_resumable_run(models, clips, tmp_path, monkeypatch):
    from kaleido_s2v.curation.runner import run_pipeline
    from kaleido_s2v.curation.stages import STAGES
    from kaleido_s2v.curation.stages.caption import CaptionStage
    from kaleido_s2v.curation.stages.inpaint import InpaintStage
    from kaleido_s2v.curation.stages.redux import ReduxStage

    inp = tmp_path / "in"
    inp.mkdir()
    for case, p in clips.items():
        (inp / f"{case}.mp4").write_bytes(p.read_bytes())
    real_caption = CaptionStage.process_batch

    def caption_then_known_text(self, batch):  # random weights say random words: append a known sentence
        out = real_caption(self, batch)
        for c in out:
            c.fields["caption"] += " A woman in a white shirt walks with a dog."
        return out

    monkeypatch.setattr(CaptionStage, "process_batch", caption_then_known_text)
    monkeypatch.setattr(InpaintStage, "setup", lambda self: setattr(self, "_pipe", _FakePipe()))
    monkeypatch.setattr(ReduxStage, "setup", lambda self: (setattr(self, "_pipe", _FakePipe()), setattr(
        self, "_prior", lambda image: {"prompt_embeds": None})))
    (tmp_path / "flux").mkdir()
    cfg = {
        "scenes": {"min_clip_s": 0.5}, "quality": {"min_clip_s": 0.5},
        "caption": {"model": models["caption"], "num_frames": 2, "max_new_tokens": 4, "batch_size": 2,
                    "device": "cpu"},
        "ground": {"model": models["ground"], "box_threshold": 0.0, "text_threshold": 0.0, "max_per_subject": 1,
                   "device": "cpu"},
        "segment": {"model": models["segment"], "device": "cpu"},
        "filter": {"model": models["filter"], "min_area_ratio": 0.0, "min_side_px": 1.0, "max_area_ratio": 1.0,
                   "max_iou": 1.0, "min_clip_score": -1.0, "require_top1": False, "clique_threshold": -1.0,
                   "device": "cpu"},
        "face": {"require_frontal": False},
        "inpaint": {"model": str(tmp_path / "flux"), "num_inference_steps": 1},
        "redux": {"model": str(tmp_path / "flux"), "prior_model": str(tmp_path / "flux"), "size": 32},
    }
    # every stage's declared contract: reads only declared inputs' presence, writes only declared outputs
    import kaleido_s2v.curation.runner as runner_mod

    real_apply, seen = runner_mod.apply_stage, set()

    def checked_apply(stage, batch, fp):
        before = [{k: json.dumps(v, sort_keys=True) for k, v in c.fields.items()} for c in batch]
        for c in batch:
            assert set(stage.inputs()) <= set(c.fields), (stage.name, sorted(c.fields))
        out = real_apply(stage, batch, fp)
        for c, b in zip(out, before):
            changed = {k for k, v in c.fields.items() if b.get(k) != json.dumps(v, sort_keys=True)}
            assert changed <= set(stage.outputs()), (stage.name, changed)
        seen.add(stage.name)
        return out

    monkeypatch.setattr(runner_mod, "apply_stage", checked_apply)
    stages = list(STAGES)
    out = tmp_path / "out"
    res = run_pipeline(inp, out, stages, cfg, write_clips=False)
    assert seen == set(stages) - {"scenes"}
    assert res.summary["kept"] == 2, res.summary
    for c in res.clips:
        assert set(c.stages_done) == set(stages)
        assert {"scenes", "quality", "caption", "subjects", "frames", "detections", "export"} <= set(c.fields)
        kept = [s for s in c.fields["subjects"] if s["status"] == "kept"]
        assert kept and all({"inpaint", "redux"} <= set(s) for s in kept)
        assert all("face" in s for s in kept if s["human"])
        for s in kept:  # a composite needs mask pixels inside the box (random SAM masks may have none)
            det = c.fields["detections"][s["ref_detection"]]
            x0, y0, x1, y1 = (int(round(v)) for v in det["box"])
            has_pixels = (np.asarray(Image.open(out / det["mask"]))[y0:y1, x0:x1] > 0).any()
            assert ("crosspair" in s) == bool(has_pixels)
    assert sum(res.summary["export"].values()) > 0
    lines = [json.loads(x) for x in (out / "train_manifest.jsonl").read_text().splitlines()]
    assert lines and all((out / r["video"]).is_file() and all((out / p).is_file() for p in r["references"])
                         for r in lines)
    from kaleido_s2v.training.data import discover_samples  # the training side reads every export

    for data in (out, out / "train_manifest.jsonl", out / "kaleido"):
        samples = discover_samples(data)
        assert len(samples) == len(lines)
        assert all(s.video.is_file() and s.references and s.caption for s in samples)
    again = run_pipeline(inp, out, stages, cfg, write_clips=False)
    assert all(st.processed == 0 for st in again.stats.values())
