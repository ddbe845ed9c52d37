import numpy as np
import pytest

from kaleido_s2v.curation.config import build_stage
from kaleido_s2v.curation.tasks import Clip
from kaleido_s2v.video_io import write_video

from .footage import variant

N = 32


def _clip(path, end_s=N / 16):
    return Clip(clip_id="c", source=str(path), start_s=0.0, end_s=end_s, fps=16.0)


@pytest.fixture
def media(examples_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("quality")
    return {k: variant(examples_dir, d, "case3", N, k) for k in ("original", "dark", "blur", "static")}


def test_real_footage_kept_and_degraded_copies_rejected_with_reason(media):
    stage = build_stage("quality", {"min_clip_s": 1.0})
    out = {k: stage.process(_clip(p)) for k, p in media.items()}
    assert out["original"].status == "kept", out["original"].fields["quality"]
    assert "too_dark" in out["dark"].reasons
    assert out["blur"].reasons == ["blurry"]
    assert out["static"].reasons == ["static"]
    q = out["original"].fields["quality"]
    assert q["frames"] == N and q["sharpness"] > 100 and 40 < q["mean_luma"] < 220
    assert out["dark"].fields["quality"]["mean_luma"] < 0.3 * q["mean_luma"]


def test_each_threshold_is_configurable(media):
    clip = build_stage("quality", {"min_sharpness": 0.0, "min_clip_s": 1.0}).process(_clip(media["blur"]))
    assert clip.status == "kept"
    clip = build_stage("quality", {"max_luma": 50.0, "min_luma": 10.0, "min_clip_s": 1.0}).process(
        _clip(media["original"]))
    assert clip.reasons == ["too_bright"]


def test_length_checks(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (24, 64, 64, 3), dtype=np.uint8)
    path = write_video(tmp_path / "noise.mp4", frames, fps=16)
    stage = build_stage("quality", {"min_clip_s": 2.0, "min_sharpness": 0.0})
    assert stage.process(_clip(path, 1.5)).reasons == ["too_short"]
    stage = build_stage("quality", {"min_clip_s": 0.5, "max_clip_s": 1.0, "min_sharpness": 0.0})
    assert stage.process(_clip(path, 1.5)).reasons == ["too_long"]


def test_unreadable_and_contract(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    stage = build_stage("quality")
    clip = stage.process(_clip(bad))
    assert clip.reasons == ["unreadable"] and set(clip.fields) == set(stage.outputs())
