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


def test_every_example_clip_is_sharp_and_its_blurred_copy_blurry(examples_dir, tmp_path):
    """The calibration of docs/curate.md: shallow depth of field is kept; Gaussian sigma 3 px at 512p is not."""
    import cv2

    from kaleido_s2v.video_io import read_video

    stage = build_stage("quality", {"min_clip_s": 0.5})
    videos = sorted(examples_dir.glob("case*/*.mp4"))
    assert len(videos) >= 9
    for v in videos:
        frames = read_video(v, max_frames=32)[::8]  # the 4 frames the stage samples from the first 2 s at 2 fps
        sigma = 3.0 * min(frames.shape[1:3]) / 512
        blurred = write_video(tmp_path / f"{v.parent.name}.mp4",
                              np.stack([cv2.GaussianBlur(f, (0, 0), sigma) for f in frames]), fps=2)
        sharp, soft = stage.process(_clip(v, 2.0)), stage.process(_clip(blurred, 2.0))
        s, b = sharp.fields["quality"]["sharpness"], soft.fields["quality"]["sharpness"]
        assert "blurry" not in sharp.reasons and s > 2 * stage.min_sharpness, (v.parent.name, s)
        assert "blurry" in soft.reasons and b < stage.min_sharpness / 2, (v.parent.name, b)


def _shallow_focus(scale, amp=20.0, block=4):
    """Grey 512*scale square: 4 px random blocks (at 512p), sharp in the top-left quarter, sigma-6 blur elsewhere."""
    import cv2

    tex = np.kron(np.random.default_rng(0).uniform(-amp, amp, (512 // block,) * 2), np.ones((block * scale,) * 2))
    frame = cv2.GaussianBlur(tex, (0, 0), 6.0 * scale)
    r = 256 * scale
    frame[:r, :r] = tex[:r, :r]
    return np.repeat(np.clip(frame + 128, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def test_sharp_subject_on_soft_background_is_kept_at_any_resolution(tmp_path):
    import cv2

    stage = build_stage("quality", {"min_clip_s": 0.1, "min_motion": 0.0})
    scores = {}
    for scale in (1, 2):
        f = _shallow_focus(scale)
        sharp = write_video(tmp_path / f"sharp{scale}.mp4", np.stack([f] * 3), fps=16)
        soft = write_video(tmp_path / f"soft{scale}.mp4", np.stack([cv2.GaussianBlur(f, (0, 0), 3.0 * scale)] * 3),
                           fps=16)
        kept, blurred = stage.process(_clip(sharp, 3 / 16)), stage.process(_clip(soft, 3 / 16))
        assert kept.status == "kept", kept.fields["quality"]
        assert blurred.reasons == ["blurry"], blurred.fields["quality"]
        scores[scale] = kept.fields["quality"]["sharpness"]
    assert scores[2] == pytest.approx(scores[1], rel=0.1)  # 512 vs 1024 px: the same score within 10 %
