"""The toy evaluator: perfect on ground truth, and it notices wrong subjects, missing subjects and leaked backgrounds."""

import json
from collections import deque

import numpy as np
import pytest

from kaleido_s2v.toy.catalogue import BACKGROUNDS, COLOURS, DARK_SHADE, SHAPES
from kaleido_s2v.toy.evaluator import (
    COLOUR_NAMES,
    case_from_record,
    classify_shape,
    colour_labels,
    evaluate,
    evaluate_folder,
    largest_component,
    motion_agrees,
    score_video,
    shuffled,
)
from kaleido_s2v.toy.render import jitter_palette, render, render_clip
from kaleido_s2v.toy.scene import Background, Scene, Subject, Track
from kaleido_s2v.toy.world import WorldConfig, make_eval_cases, read_scenes
from kaleido_s2v.video_io import read_video, write_video


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """8 evaluation cases (2 of each reference kind) with their decoded ground-truth videos."""
    out = tmp_path_factory.mktemp("toy") / "cases"
    make_eval_cases(out, 8, seed=11, cfg=WorldConfig(), progress=False)
    records = read_scenes(out)
    videos = [read_video(out / r["video"]) for r in records]
    return out, records, videos


def _codec(frames, path):
    write_video(path, frames, fps=16)
    return read_video(path)


# --- on the ground truth and on wrong clips --------------------------------------------------------------------


def test_ground_truth_is_perfect_and_the_shuffled_control_is_clearly_lower(cases):
    out, records, _ = cases
    report = evaluate_folder(out)
    m, c = report["matched"], report["control"]
    assert m["cases"] == 8
    assert m["recall"] == 1.0 and m["colour_recall"] == 1.0 and m["motion"] == 1.0
    assert m["leak_rate"] == 0.0 and m["bg_target"] < 4.0
    assert c["recall"] <= 0.3 and c["colour_recall"] <= 0.5 and c["bg_target"] > 10 * m["bg_target"]
    assert [x["clip_id"] for x in report["per_case"]] == [r["clip_id"] for r in records]


def test_another_cases_video_is_not_recalled(cases):
    _, records, videos = cases
    scores = []
    for i, record in enumerate(records):
        scene, bgs = case_from_record(record)
        other = videos[(i + 1) % len(videos)]
        s = score_video(other, scene, bgs)
        other_colours = {c for t in case_from_record(records[(i + 1) % len(records)])[0].tracks for c in t.subject.colours}
        for subject, track in zip(s.subjects, scene.tracks):
            if not set(track.subject.colours) & other_colours:  # nothing of this subject's colours in that video
                assert not subject.colour_found and not subject.found
        scores.append(s.recall)
    assert np.mean(scores) < 0.35


def test_a_removed_subject_is_missed(cases, tmp_path):
    _, records, _ = cases
    multi = [r for r in records if len(r["scene"]["tracks"]) >= 2]
    assert multi
    for record in multi[:2]:
        scene, bgs = case_from_record(record)
        video = _codec(render_clip(scene.without(0))[0], tmp_path / "removed.mp4")
        s = score_video(video, scene, bgs)
        assert not s.subjects[0].found and not s.subjects[0].colour_found
        assert all(x.found for x in s.subjects[1:])
        assert s.recall == pytest.approx((len(scene.tracks) - 1) / len(scene.tracks))


def test_a_reference_background_in_the_video_is_a_leak(cases, tmp_path):
    _, records, videos = cases
    leaky = [r for r in records if r["ref_type"] in ("crop", "crosspair")]
    assert {r["ref_type"] for r in leaky} == {"crop", "crosspair"}
    for record in leaky:
        scene, bgs = case_from_record(record)
        for bg in {b for b in bgs if b is not None}:
            assert bg.style != scene.background.style
            video = _codec(render_clip(scene.with_background(bg))[0], tmp_path / "leak.mp4")
            s = score_video(video, scene, bgs)
            assert s.leak is True and min(s.bg_refs) < 0.5 * s.bg_target
            assert s.recall == 1.0  # the subjects are all there: only the background is wrong
        gt = score_video(videos[records.index(record)], scene, bgs)
        assert gt.leak is False


def test_white_background_counts_as_a_leak_of_white_references(tmp_path):
    track = Track(Subject("circle", "green"), "right", x=0.3, y=0.5, size=0.18, amount=0.3)
    scene = Scene(64, 64, 9, 16.0, Background("grass", BACKGROUNDS["grass"][1]), (track,))
    white = _codec(render_clip(scene, background=None)[0], tmp_path / "white.mp4")
    s = score_video(white, scene, [None])
    assert s.leak is True and s.recall == 1.0 and s.motion == 1.0
    assert score_video(_codec(render_clip(scene)[0], tmp_path / "gt.mp4"), scene, [None]).leak is False


def test_wrong_motion_is_noticed(tmp_path):
    track = Track(Subject("square", "blue", "striped"), "left", x=0.7, y=0.5, size=0.15, amount=0.35)
    scene = Scene(64, 64, 9, 16.0, Background("sky", BACKGROUNDS["sky"][1]), (track,))
    backwards = _codec(render_clip(scene)[0][::-1], tmp_path / "back.mp4")  # it moves to the right instead
    s = score_video(backwards, scene, [])
    assert s.recall == 1.0 and s.motion == 0.0 and s.leak is None


def test_cli_evaluate(cases, tmp_path, capsys):
    from kaleido_s2v.toy.__main__ import main

    out, records, _ = cases
    assert main(["evaluate", "--cases", str(out), "--json", "--report", str(tmp_path / "r.json")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["matched"]["recall"] == 1.0 and "per_case" not in summary
    assert len(json.loads((tmp_path / "r.json").read_text())["per_case"]) == len(records)
    assert main(["evaluate", "--cases", str(out), "--limit", "2", "--report", str(tmp_path / "r2.json")]) == 0
    assert [c["clip_id"] for c in json.loads((tmp_path / "r2.json").read_text())["per_case"]] == [
        r["clip_id"] for r in records[:2]]
    assert main(["evaluate", "--cases", str(out), "--videos", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


# --- building blocks -------------------------------------------------------------------------------------------------


def test_colour_labels_know_subject_colours_and_ignore_backgrounds():
    for i, name in enumerate(COLOUR_NAMES):
        rgb = np.asarray(COLOURS[name], np.float64)
        px = np.stack([rgb, rgb * DARK_SHADE]).round().astype(np.uint8)[None]
        assert colour_labels(px).tolist() == [[i, i]], name
    rng = np.random.default_rng(0)
    bg = [c for s in BACKGROUNDS for _ in range(20) for c in jitter_palette(s, rng)]
    bg += [(255, 255, 255), (0, 0, 0), (128, 128, 128)]
    assert np.all(colour_labels(np.asarray(bg, np.uint8)[None]) == -1)


def _bfs_largest(mask):
    seen, best = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        comp, queue = [], deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    p = (y + dy, x + dx)
                    if 0 <= p[0] < mask.shape[0] and 0 <= p[1] < mask.shape[1] and mask[p] and not seen[p]:
                        seen[p] = True
                        queue.append(p)
        best = comp if len(comp) > len(best) else best
    return len(best)


def test_largest_component_matches_a_plain_flood_fill():
    rng = np.random.default_rng(0)
    for density in (0.2, 0.35, 0.5, 0.6):
        mask = rng.random((24, 31)) < density
        got = largest_component(mask)
        assert got.sum() == _bfs_largest(mask) and np.all(mask[got])
    assert not largest_component(np.zeros((5, 5), bool)).any()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_shapes_are_told_apart_on_clean_renders(shape):
    for radius_px, angle in [(7, 0.0), (9, 33.0), (12, 71.0), (16, 140.0)]:
        track = Track(Subject(shape, "purple"), "still", x=0.5, y=0.5, size=radius_px / 48, angle=angle)
        scene = Scene(48, 48, 1, 16.0, Background("room", BACKGROUNDS["room"][1]), (track,))
        rgb, _ = render(scene, 0.0)
        blob = largest_component(colour_labels(np.clip(rgb + 0.5, 0, 255).astype(np.uint8)) == 6)
        assert classify_shape(blob) == shape, (radius_px, angle)


def test_motion_agreement_rules():
    t = Track(Subject("circle", "red"), "down", x=0.5, y=0.3, size=0.1, amount=0.3)
    down = np.array([[32, 20], [32, 30], [32, 39]], float)
    assert motion_agrees(t, down, np.ones(3), 64) and not motion_agrees(t, down[::-1], np.ones(3), 64)
    grow = Track(Subject("circle", "red"), "grow", x=0.5, y=0.5, size=0.1)
    assert motion_agrees(grow, down[:1].repeat(3, 0), np.array([50, 80, 120]), 64)
    assert not motion_agrees(grow, down[:1].repeat(3, 0), np.array([120, 80, 50]), 64)
    assert not motion_agrees(t, down[:1], np.ones(1), 64)  # one frame says nothing about motion


def test_shuffle_is_a_seeded_derangement():
    for n in (2, 3, 10):
        perm = shuffled(n, seed=n)
        assert sorted(perm) == list(range(n)) and all(p != k for k, p in enumerate(perm))
        assert perm == shuffled(n, seed=n)


def test_evaluate_scores_videos_in_memory(cases):
    _, records, videos = cases
    report = evaluate(records[:3], videos[:3])
    assert report["matched"]["recall"] == 1.0 and report["control"]["cases"] == 3
    assert evaluate(records[:1], videos[:1])["control"] is None
