import json

import numpy as np
import pytest

from kaleido_s2v.curation.manifest import read_manifest
from kaleido_s2v.curation.runner import resolve_inputs, run_pipeline
from kaleido_s2v.curation.stages.quality import QualityStage
from kaleido_s2v.errors import UserInputError
from kaleido_s2v.video_io import video_info

from .footage import concatenation, variant

N = 24
CFG = {"scenes": {"min_clip_s": 1.0}, "quality": {"min_clip_s": 1.0}}


@pytest.fixture
def inputs(examples_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("runner_in")
    src = tmp_path_factory.mktemp("runner_src")
    concat = concatenation(examples_dir, src, ("case3", "case7"), N)
    dark = variant(examples_dir, src, "case4", N, "dark")
    for p in (concat, dark):
        (d / p.name).write_bytes(p.read_bytes())
    (d / "broken.mp4").write_bytes(b"\x00\x01 not a video")
    return d


def _by_source(clips):
    out = {}
    for c in clips:
        out.setdefault(c.source.rsplit("/", 1)[-1], []).append(c)
    return out


def test_scenes_quality_run_then_resume_without_redoing_work(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = run_pipeline(inputs, out, ["scenes", "quality"], CFG)
    clips = _by_source(read_manifest(out / "manifest.jsonl"))
    concat = clips["concat_case3_case7_24.mp4"]
    assert [c.status for c in concat] == ["kept", "kept"] and abs(concat[1].start_s - N / 16) <= 2 / 16
    (dark,) = clips["case4_dark_24.mp4"]
    assert dark.status == "rejected" and "too_dark" in dark.reasons and dark.reasons_by_stage["quality"]
    (broken,) = clips["broken.mp4"]
    assert broken.reasons == ["unreadable"]
    for c in concat:
        info = video_info(out / "clips" / f"{c.clip_id}.mp4")
        assert abs(info.num_frames - N) <= 1 and (info.width, info.height) == (896, 512)
    assert not (out / "clips" / f"{dark.clip_id}.mp4").exists()
    s = json.loads((out / "summary.json").read_text())
    assert s["kept"] == 2 and s["rejected"] == 2 and s["reasons"]["unreadable"] == 1 and s["reasons"]["too_dark"] == 1
    assert "too_dark" in (out / "summary.txt").read_text()
    assert first.stats["scenes"].processed == 4 and first.stats["quality"].processed == 3

    manifest = (out / "manifest.jsonl").read_bytes()
    import kaleido_s2v.video_io as video_io

    opened, real_open = [], video_io._open  # every decode and probe opens the file here
    monkeypatch.setattr(video_io, "_open", lambda path: opened.append(path) or real_open(path))
    again = run_pipeline(inputs, out, ["scenes", "quality"], CFG)
    monkeypatch.setattr(video_io, "_open", real_open)
    assert again.stats["scenes"].processed == 0 and again.stats["quality"].processed == 0
    assert again.stats["scenes"].cached == 4 and again.stats["quality"].cached == 3
    assert (out / "manifest.jsonl").read_bytes() == manifest  # idempotent
    assert opened == []  # no video decoded again (counted, not timed: a time ratio depends on the machine's load)

    # new quality settings: only quality runs again, and its old reasons are withdrawn
    looser = {**CFG, "quality": {"min_clip_s": 1.0, "min_luma": 5.0, "min_sharpness": 0.0, "min_motion": 0.0}}
    third = run_pipeline(inputs, out, ["scenes", "quality"], looser)
    assert third.stats["scenes"].processed == 0 and third.stats["quality"].processed == 3
    (dark,) = _by_source(third.clips)["case4_dark_24.mp4"]
    assert dark.status == "kept" and dark.reasons == []
    assert (out / "clips" / f"{dark.clip_id}.mp4").is_file()


def test_interrupted_run_resumes_where_it_stopped(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = QualityStage.process
    calls = []

    def flaky(self, clip):
        calls.append(clip.clip_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, clip)

    monkeypatch.setattr(QualityStage, "process", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(inputs, out, ["scenes", "quality"], CFG, checkpoint_s=0.0, write_clips=False)
    monkeypatch.setattr(QualityStage, "process", real)
    saved = read_manifest(out / "manifest.jsonl")
    assert sum("quality" in c.stages_done for c in saved) == 1  # the first clip's work was saved
    res = run_pipeline(inputs, out, ["scenes", "quality"], CFG, write_clips=False)
    assert res.stats["scenes"].processed == 0 and res.stats["quality"].processed == 2


def test_subset_without_scenes_uses_whole_videos(inputs, tmp_path):
    res = run_pipeline(inputs, tmp_path / "o", ["quality"], CFG, write_clips=False)
    by = _by_source(res.clips)
    (whole,) = by["concat_case3_case7_24.mp4"]
    assert whole.start_s == 0 and abs(whole.end_s - 2 * N / 16) < 1e-3 and whole.kept
    assert by["broken.mp4"][0].reasons == ["unreadable"]


def test_inputs_resolution(tmp_path, inputs):
    lst = tmp_path / "videos.txt"
    lst.write_text("# my videos\n" + str(inputs / "broken.mp4") + "\n")
    assert resolve_inputs(lst) == [str((inputs / "broken.mp4").resolve())]
    with pytest.raises(UserInputError, match="does not exist"):
        resolve_inputs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="holds no videos"):
        resolve_inputs(tmp_path / "empty")
    bad = tmp_path / "bad.txt"
    bad.write_text("missing.mp4\n")
    with pytest.raises(UserInputError, match="missing.mp4"):
        resolve_inputs(bad)


def test_rejected_clips_skip_later_stages(tmp_path):
    from kaleido_s2v.video_io import write_video

    frames = np.zeros((20, 64, 64, 3), np.uint8)  # black, static
    write_video(tmp_path / "in" / "black.mp4", frames, fps=16)
    res = run_pipeline(tmp_path / "in", tmp_path / "o", ["quality", "subjects"], {"quality": {"min_clip_s": 0.5}})
    (c,) = res.clips
    assert c.status == "rejected" and "subjects" not in c.stages_done and res.stats["subjects"].processed == 0
