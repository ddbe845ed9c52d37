"""Video reading/writing (PyAV) and atomic outputs."""

import numpy as np
import pytest

from kaleido_s2v.errors import UserInputError
from kaleido_s2v.fileio import atomic_path
from kaleido_s2v.video_io import read_video, video_info, write_video


def moving_square(frames=30, h=64, w=96):
    video = np.zeros((frames, h, w, 3), np.uint8)
    for i in range(frames):
        video[i, 16:48, 2 * i : 2 * i + 24] = (230, 40, 40)  # column position encodes the frame index
        video[i, :4, :] = 255
    return video


def column(frame):
    red = (frame[..., 0] > 128) & (frame[..., 1] < 100)
    return int(np.argmax(red.any(axis=0)))


def test_write_read_round_trip(tmp_path):
    video = moving_square()
    path = write_video(tmp_path / "v.mp4", video, fps=30)
    info = video_info(path)
    assert (info.width, info.height, info.num_frames) == (96, 64, 30)
    assert info.fps == pytest.approx(30)
    back = read_video(path)
    assert back.shape == video.shape
    assert np.abs(back.astype(int) - video.astype(int)).mean() < 4  # lossy but close
    assert [column(f) for f in back] == [2 * i for i in range(30)]


def test_resampling_to_16_fps_picks_frames_by_time(tmp_path):
    # A 30 fps clip read at 16 fps: target time k/16 takes the source frame floor(k*30/16) — not k (the
    # official dataset's integer step), and the clip's duration is preserved.
    path = write_video(tmp_path / "v.mp4", moving_square(), fps=30)
    out = read_video(path, fps=16)
    expected = [2 * int(k * 30 / 16) for k in range(16)]
    assert [column(f) for f in out] == expected
    assert len(out) == 16  # 1 s of content at 16 fps


def test_window_and_max_frames(tmp_path):
    path = write_video(tmp_path / "v.mp4", moving_square(), fps=30)
    out = read_video(path, fps=16, start_s=0.5, max_frames=4)
    assert [column(f) for f in out] == [2 * int(15 + k * 30 / 16) for k in range(4)]


def test_window_start_between_source_frames(tmp_path):
    # 30 fps frames at i/30; start 0.51 s lies inside frame 15 ([0.5, 0.533)): targets 0.51 + k/16
    path = write_video(tmp_path / "v.mp4", moving_square(), fps=30)
    out = read_video(path, fps=16, start_s=0.51, max_frames=5)
    assert [column(f) for f in out] == [2 * int((0.51 + k / 16) * 30) for k in range(5)]


def test_float_frames_and_odd_sizes(tmp_path):
    frames = np.random.default_rng(0).random((3, 33, 47, 3)).astype(np.float32)
    path = write_video(tmp_path / "odd.mp4", frames, fps=16)
    assert read_video(path).shape == (3, 34, 48, 3)


def test_bad_videos_give_user_errors(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    with pytest.raises(UserInputError, match="bad.mp4"):
        read_video(bad)


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8)), fps=16)  # wrong shape
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_file_and_dir(tmp_path):
    dst = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_path(dst) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(dst) as tmp:
        tmp.write_text("done")
    assert dst.read_text() == "done"

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    with atomic_path(folder, is_dir=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (folder / "old.txt").exists()  # the old folder stays until the new one is complete
    assert sorted(p.name for p in folder.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out.json"]


@pytest.mark.testdata
def test_reads_the_official_outputs(examples_dir):
    path = examples_dir / "case1" / "101.mp4"
    info = video_info(path)
    assert (info.width, info.height, info.num_frames) == (896, 512, 81)
    assert info.fps == pytest.approx(16)
    frames = read_video(path, fps=16, max_frames=5)
    assert frames.shape == (5, 512, 896, 3) and frames.dtype == np.uint8


def test_read_mapping(tmp_path):
    from kaleido_s2v.fileio import read_mapping

    (tmp_path / "a.yaml").write_text("clip: /models/clip\n")
    (tmp_path / "b.json").write_text('{"dino": "/models/dino"}')
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "bad.yaml").write_text("a: [unclosed\n")
    assert read_mapping(tmp_path / "a.yaml", "models file", "roles") == {"clip": "/models/clip"}
    assert read_mapping(tmp_path / "b.json", "models file", "roles") == {"dino": "/models/dino"}
    assert read_mapping(tmp_path / "empty.yaml", "config", "sections") == {}
    with pytest.raises(UserInputError, match=r"config '.*list.yaml' must be a mapping of sections"):
        read_mapping(tmp_path / "list.yaml", "config", "sections")
    with pytest.raises(UserInputError, match="cannot be parsed"):
        read_mapping(tmp_path / "bad.yaml", "config", "sections")
    with pytest.raises(UserInputError, match="does not exist"):
        read_mapping(tmp_path / "missing.yaml", "config", "sections")


def test_write_video_is_byte_for_byte_repeatable(tmp_path):
    # Seeded generation must give the same file; x264's default intra assembly made ~1 write in 100 differ.
    video = moving_square()
    first = write_video(tmp_path / "0.mp4", video, fps=30).read_bytes()
    for i in range(1, 60):
        # exact: write_video's promise (same frames, same bytes: x264 cpu-independent, sliced threads), one process
        assert write_video(tmp_path / f"{i}.mp4", video, fps=30).read_bytes() == first, f"write {i} differs"


def test_write_video_streams_an_iterable(tmp_path):
    video = moving_square()
    from_array = read_video(write_video(tmp_path / "a.mp4", video, fps=30))
    from_generator = read_video(write_video(tmp_path / "g.mp4", (f for f in video), fps=30))
    assert np.array_equal(from_array, from_generator)  # exact: the same uint8 frames, the same bytes, one decoder
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "empty.mp4", iter(()), fps=30)
    assert not (tmp_path / "empty.mp4").exists() and len(list(tmp_path.iterdir())) == 2
