import numpy as np
import pytest

from kaleido_s2v.curation.config import build_stage
from kaleido_s2v.curation.stages.scenes import adaptive_cuts, threshold_cuts
from kaleido_s2v.curation.tasks import Video
from kaleido_s2v.video_io import write_video

from .footage import concatenation

N = 40  # frames per case in the concatenation (2.5 s at 16 fps)
CASES = ("case3", "case7", "case4")


@pytest.fixture
def concat(examples_dir, tmp_path_factory):
    return concatenation(examples_dir, tmp_path_factory.mktemp("scenes"), CASES, N)


@pytest.mark.parametrize("detector", ["adaptive", "content"])
def test_cuts_found_at_true_boundaries_on_real_footage(concat, detector):
    stage = build_stage("scenes", {"detector": detector, "min_clip_s": 1.0})
    clips = stage.split(Video(str(concat)))
    assert len(clips) == len(CASES)
    for k, clip in enumerate(clips[1:], start=1):
        assert abs(clip.start_s * 16 - k * N) <= 2, (k, clip.start_s)  # within 2 frames of the true cut
    assert clips[0].start_s == 0.0 and abs(clips[-1].end_s - len(CASES) * N / 16) < 1e-3
    assert all(c.kept and c.fps == 16.0 and (c.width, c.height) == (896, 512) for c in clips)
    assert [c.fields["scenes"]["shot"] for c in clips] == [0, 1, 2]


def test_cuts_agree_with_pyscenedetect(concat):
    scenedetect = pytest.importorskip("scenedetect")
    theirs = scenedetect.detect(str(concat), scenedetect.AdaptiveDetector())
    their_cuts = [s.get_frames() for s, _ in theirs[1:]]
    ours = build_stage("scenes", {"min_clip_s": 1.0}).split(Video(str(concat)))
    our_cuts = [round(c.start_s * 16) for c in ours[1:]]
    assert len(our_cuts) == len(their_cuts)
    assert all(abs(a - b) <= 1 for a, b in zip(our_cuts, their_cuts)), (our_cuts, their_cuts)


def test_long_shot_is_cut_to_max_length_and_short_tail_rejected(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (1, 64, 96, 3), dtype=np.uint8)
    frames = np.repeat(base, 40, axis=0)  # one 2.5 s shot, no cut
    path = write_video(tmp_path / "one.mp4", frames, fps=16)
    clips = build_stage("scenes", {"min_clip_s": 0.75, "max_clip_s": 1.0}).split(Video(str(path)))
    assert [(c.start_s, c.end_s) for c in clips] == [(0.0, 1.0), (1.0, 2.0), (2.0, 2.5)]
    assert [c.status for c in clips] == ["kept", "kept", "rejected"]
    assert clips[-1].reasons == ["too_short"]


def test_unreadable_video_is_recorded_not_raised(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    (clip,) = build_stage("scenes").split(Video(str(bad)))
    assert clip.status == "rejected" and clip.reasons == ["unreadable"]
    assert "bad.mp4" in clip.fields["scenes"]["error"]


def test_cut_rules_on_hand_made_scores():
    scores = np.array([0, 1, 1.2, 0.8, 40, 1, 1, 0.9, 1.1, 30, 1, 2, 1])
    assert adaptive_cuts(scores, ratio=3.0, window=2, min_content=15.0, min_len=3) == [4, 9]
    assert adaptive_cuts(scores, ratio=3.0, window=2, min_content=15.0, min_len=6) == [9]  # 4 is too near the start
    assert threshold_cuts(scores, threshold=27.0, min_len=1) == [4, 9]
    assert threshold_cuts(scores, threshold=35.0, min_len=1) == [4]


def test_outputs_declaration_matches(tmp_path):
    frames = np.zeros((20, 32, 32, 3), np.uint8)
    frames[10:] = 200
    path = write_video(tmp_path / "two.mp4", frames, fps=16)
    stage = build_stage("scenes", {"min_clip_s": 0.1, "min_scene_len": 2})
    clips = stage.split(Video(str(path)))
    assert len(clips) == 2 and abs(clips[1].start_s - 10 / 16) < 1e-6
    assert all(set(c.fields) == set(stage.outputs()) for c in clips)
