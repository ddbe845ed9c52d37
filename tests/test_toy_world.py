"""The procedural S2V world: determinism, caption/scene agreement, rendered motion, references, dataset layout."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from kaleido_s2v.errors import UserInputError
from kaleido_s2v.toy.captions import caption
from kaleido_s2v.toy.catalogue import BACKGROUNDS, CHARACTERS, COLOURS, MOTIONS, SHAPES, TEXTURES
from kaleido_s2v.toy.render import render, render_clip
from kaleido_s2v.toy.scene import Background, Scene, Subject, Track
from kaleido_s2v.toy.world import (
    REF_KINDS,
    WorldConfig,
    allocate_kinds,
    eval_case,
    make_dataset,
    parse_mix,
    render_reference,
    sample_scene,
    training_clip,
)

CFG = WorldConfig()


def _centroid(alpha):
    ys, xs = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]]
    a = alpha.sum()
    return np.array([(alpha * xs).sum() / a, (alpha * ys).sum() / a]), a


# --- determinism ---------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_different_seed_differs():
    a = training_clip(7, 3, CFG, "segment")
    b = training_clip(7, 3, CFG, "segment")
    assert a[1] == b[1] and a[0] == b[0]
    assert a[2].tobytes() == b[2].tobytes()  # exact: the same seeded numpy rendering, one process
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a[3], b[3]))
    c = training_clip(8, 3, CFG, "segment")
    d = training_clip(7, 4, CFG, "segment")
    assert c[2].tobytes() != a[2].tobytes() and d[2].tobytes() != a[2].tobytes()


def test_scene_json_round_trip():
    scene = sample_scene(np.random.default_rng(1), WorldConfig(width=96))
    again = Scene.from_dict(json.loads(json.dumps(scene.to_dict())))
    assert again == scene
    assert np.array_equal(render_clip(again)[0], render_clip(scene)[0])  # exact: JSON floats round-trip (repr)


# --- captions agree with the scene ------------------------------------------------------------------------------

_MOTION_BY_PHRASE = {v: k for k, v in MOTIONS.items()}
_SUBJECT = re.compile(
    r"the (?P<colour>\w+) (?:(?P<texture>striped|dotted|checked) )?(?P<shape>\w+)"
    r"(?: with a (?P<accent>\w+) (?:hat|roof))? (?P<motion>" + "|".join(map(re.escape, MOTIONS.values())) + ")"
)


def test_caption_names_exactly_the_scene_subjects_and_motions():
    rng = np.random.default_rng(0)
    for _ in range(40):
        scene = sample_scene(rng, CFG)
        text = caption(scene)
        assert "\n" not in text and text[0].isupper() and text.endswith(".")
        assert text.endswith(BACKGROUNDS[scene.background.style][0] + ".")
        found = list(_SUBJECT.finditer(text.lower()))
        assert len(found) == len(scene.tracks), text
        for m, track in zip(found, scene.tracks):
            s = track.subject
            assert m["colour"] == s.colour and m["shape"] == s.shape, text
            assert (m["texture"] or "plain") == s.texture and m["accent"] == s.accent, text
            assert _MOTION_BY_PHRASE[m["motion"]] == track.motion, text
        colours = [c for t in scene.tracks for c in t.subject.colours]
        assert len(colours) == len(set(colours))  # a colour names one subject only


def test_each_named_subject_is_drawn_in_its_colour():
    rng = np.random.default_rng(1)
    for _ in range(10):
        scene = sample_scene(rng, CFG)
        rgb, alphas = render(scene, 0.0)
        for track, alpha in zip(scene.tracks, alphas):
            inside = rgb[alpha > 0.99]
            assert len(inside) > 20
            for c in track.subject.colours:  # the exact palette colour is present on the subject
                assert np.any(np.all(np.abs(inside - np.asarray(COLOURS[c])) < 1, axis=-1)), c


def test_sampled_scenes_cover_the_catalogue():
    rng = np.random.default_rng(2)
    scenes = [sample_scene(rng, CFG) for _ in range(150)]
    tracks = [t for s in scenes for t in s.tracks]
    assert {t.motion for t in tracks} == set(MOTIONS)
    assert {t.subject.shape for t in tracks} == set(SHAPES) | set(CHARACTERS)
    assert {t.subject.texture for t in tracks} == set(TEXTURES)
    assert {s.background.style for s in scenes} == set(BACKGROUNDS)
    assert {len(s.tracks) for s in scenes} == {1, 2, 3}


# --- rendered motion agrees with the caption ---------------------------------------------------------------------


def _one(motion, **kw):
    shape = kw.pop("shape", "triangle")
    track = Track(Subject(shape, "red", "striped"), motion, x=kw.pop("x", 0.5), y=kw.pop("y", 0.5), size=0.15, **kw)
    bg = Background("room", BACKGROUNDS["room"][1])
    return Scene(64, 64, 9, 16.0, bg, (track,))


@pytest.mark.parametrize(
    "motion,kw",
    [
        ("left", {"amount": 0.3, "x": 0.65}),
        ("right", {"amount": 0.3, "x": 0.35}),
        ("up", {"amount": 0.25, "y": 0.65}),
        ("down", {"amount": 0.25, "y": 0.35}),
        ("bounce", {"amount": 0.2, "y": 0.7, "cycles": 1}),
        ("orbit", {"amount": 0.15, "x": 0.65}),
        ("grow", {}),
        ("shrink", {}),
        ("spin", {"spin": 180.0}),
        ("still", {}),
    ],
)
def test_rendered_trajectory_matches_motion(motion, kw):
    scene = _one(motion, **kw)
    _, alphas = render_clip(scene)
    cents, areas = zip(*(_centroid(a[0]) for a in alphas))
    cents, areas = np.array(cents), np.array(areas)
    travel = kw.get("amount", 0.0) * 64
    dx, dy = cents[-1] - cents[0]
    if motion in ("left", "right"):
        assert dx == pytest.approx(travel if motion == "right" else -travel, abs=1.0)
        assert abs(dy) < 0.5 and np.all(np.sign(np.diff(cents[:, 0])) == np.sign(dx))
    elif motion in ("up", "down"):
        assert dy == pytest.approx(travel if motion == "down" else -travel, abs=1.0)
        assert abs(dx) < 0.5 and np.all(np.sign(np.diff(cents[:, 1])) == np.sign(dy))
    elif motion == "bounce":  # one hop: up to the top at mid-clip, back down
        assert cents[4, 1] == pytest.approx(cents[0, 1] - travel, abs=1.0)
        assert abs(dy) < 0.5 and np.ptp(cents[:, 0]) < 0.5
    elif motion == "orbit":  # a full circle of radius `amount`
        assert np.ptp(cents[:, 0]) == pytest.approx(2 * travel, abs=1.5)
        assert np.ptp(cents[:, 1]) == pytest.approx(2 * travel, abs=1.5)  # frames fall on 0°, 45°, 90°, ...
        assert np.hypot(dx, dy) < 0.5
    elif motion in ("grow", "shrink"):
        ratio = 1.6**2 if motion == "grow" else 0.55**2
        assert areas[-1] / areas[0] == pytest.approx(ratio, rel=0.05)
        assert np.ptp(cents, axis=0).max() < 0.5
    else:
        assert np.ptp(cents, axis=0).max() < 0.6  # rotates about its centroid, or does not move
        iou = np.minimum(alphas[0, 0], alphas[4, 0]).sum() / np.maximum(alphas[0, 0], alphas[4, 0]).sum()
        assert (iou < 0.8) if motion == "spin" else (iou == 1.0)


def test_sampled_paths_stay_in_frame():
    rng = np.random.default_rng(3)
    for _ in range(30):
        scene = sample_scene(rng, WorldConfig(width=96))
        for t in scene.times():
            _, alphas = render(scene, t)
            for a in alphas:  # every subject is fully inside the frame, up to anti-aliasing of its edge
                border = a[0].sum() + a[-1].sum() + a[:, 0].sum() + a[:, -1].sum()
                assert a.sum() > 20 and border <= 0.01 * a.sum()


# --- references ----------------------------------------------------------------------------------------------------


def test_mix_is_exact_and_parsed():
    kinds = allocate_kinds(20, (1, 5, 3, 1), seed=0)
    assert [kinds.count(k) for k in REF_KINDS] == [2, 10, 6, 2]
    assert allocate_kinds(20, (1, 5, 3, 1), seed=0) == kinds != allocate_kinds(20, (1, 5, 3, 1), seed=1)
    assert parse_mix("1:5:3:1") == (1, 5, 3, 1)
    for bad in ("1:5:3", "a:b:c:d", "0:0:0:0", "-1:5:3:1"):
        with pytest.raises(UserInputError, match="--mix"):
            parse_mix(bad)


def _has(img, colour):
    return np.any(np.all(np.abs(img.astype(int) - np.asarray(COLOURS[colour])) < 2, axis=-1))


def test_reference_kinds_show_the_subject_on_the_right_background():
    scene = sample_scene(np.random.default_rng(4), CFG)
    style_colours = np.asarray(scene.background.colours)
    for i, track in enumerate(scene.tracks):
        for kind in REF_KINDS:
            img, info = render_reference(scene, i, kind, np.random.default_rng(i), 64)
            assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and info["kind"] == kind
            assert _has(img, track.subject.colour), kind
            corners = img[[0, 0, -1, -1], [0, -1, 0, -1]].astype(int)
            if kind in ("segment", "redux"):
                assert info["background"] is None and np.all(corners == 255)
            elif kind == "crosspair":
                assert info["background"]["style"] != scene.background.style
                assert not np.all(corners == 255)
            else:  # crop: the clip's own background (its two colours or the gradient between them) shows
                assert info["background"]["style"] == scene.background.style
                c0, c1 = style_colours[:2].astype(float)
                f = np.clip(((corners - c0) @ (c1 - c0)) / ((c1 - c0) @ (c1 - c0)), 0, 1)
                d = np.abs(corners - (c0 + f[:, None] * (c1 - c0))).max(-1)
                assert np.sum(d <= 12) >= 2, (kind, corners)  # other subjects may cover some corners


def test_segment_reference_matches_the_subject_at_that_frame():
    """The segment reference is the frame's subject rescaled onto white: same colours, same pixel share."""
    track = Track(Subject("square", "blue", "plain"), "still", x=0.5, y=0.5, size=0.2, angle=0.0)
    scene = Scene(64, 64, 9, 16.0, Background("room", BACKGROUNDS["room"][1]), (track,))
    img, _ = render_reference(scene, 0, "segment", np.random.default_rng(0), 64)
    blue = np.all(img == COLOURS["blue"], axis=-1)
    ys, xs = np.nonzero(blue)
    assert abs(ys.mean() - 31.5) < 1 and abs(xs.mean() - 31.5) < 1  # centred
    side = xs.max() - xs.min() + 1
    assert 0.75 * 64 / 1.15 * 0.8 * 0.95 < side < 0.9 * 64 / 1.15 * 0.8 * 1.05 + 2  # square half-side is 0.8 radii


# --- dataset folder ------------------------------------------------------------------------------------------------


def test_make_dataset_layout_manifest_and_codec_round_trip(tmp_path):
    from kaleido_s2v.toy.evaluator import colour_labels
    from kaleido_s2v.video_io import read_video, video_info

    out = tmp_path / "data"
    summary = make_dataset(out, 10, seed=3, cfg=CFG, progress=False)
    assert summary["ref_types"] == {"crop": 1, "segment": 5, "crosspair": 3, "redux": 1}
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    scenes = [json.loads(x) for x in (out / "scenes.jsonl").read_text().splitlines()]
    assert len(rows) == len(scenes) == 10
    for row, sc in zip(rows, scenes):
        cid = row["clip_id"]
        assert row["status"] == "kept" and row["video"] == f"videos/{cid}.mp4"
        assert (out / "labels" / f"{cid}.txt").read_text().splitlines()[0] == row["caption"] == sc["caption"]
        assert row["references"] == [f"references/{cid}/ref{k + 1}.png" for k in range(len(sc["scene"]["tracks"]))]
        for ref in row["references"]:
            assert Image.open(out / ref).size == (64, 64)
        info = video_info(out / row["video"])
        assert (info.num_frames, info.width, info.height, info.fps) == (9, 64, 64, 16.0)
    # colours survive H.264: decoded labels agree with the rendered ones on subject pixels
    scene = Scene.from_dict(scenes[0]["scene"])
    frames, alphas = render_clip(scene)
    decoded = read_video(out / rows[0]["video"])
    inner = alphas.max(1) > 0.99
    assert np.mean(colour_labels(decoded)[inner] == colour_labels(frames)[inner]) > 0.95
    assert not list(tmp_path.glob(".*tmp*"))


def test_bad_inputs_fail_cleanly(tmp_path):
    with pytest.raises(UserInputError, match="--num"):
        make_dataset(tmp_path / "x", 0, progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserInputError, match="too small"):
        WorldConfig(height=8)
    with pytest.raises(UserInputError, match="subjects"):
        WorldConfig(max_subjects=9)


def test_cli_make_data_and_errors(tmp_path, capsys):
    from kaleido_s2v.toy.__main__ import main

    assert main(["make-data", "--out", str(tmp_path / "d"), "--num", "3", "--seed", "1", "--frames", "5",
                 "--width", "96", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num"] == 3 and summary["config"]["width"] == 96
    assert len(list((tmp_path / "d" / "videos").glob("*.mp4"))) == 3
    assert main(["make-data", "--out", str(tmp_path / "e"), "--num", "3", "--mix", "1:2"]) == 2
    assert "--mix" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_no_colour_captions_leave_colours_to_the_references():
    cfg = WorldConfig(caption_style="no-colour")
    for i in range(12):
        scene, text, _, images, _ = training_clip(5, i, cfg, "segment")
        assert training_clip(5, i, CFG, "segment")[0] == scene  # same scene, only the caption differs
        subjects = text.lower().removesuffix(BACKGROUNDS[scene.background.style][0] + ".")  # "under a blue sky"
        assert not any(c in subjects.split() for c in COLOURS), text
        for track in scene.tracks:
            assert track.subject.phrase(colours=False) in text.lower()
        for img, track in zip(images, scene.tracks):  # the colour is still in the reference
            assert _has(img, track.subject.colour)
    with pytest.raises(UserInputError, match="caption-style"):
        WorldConfig(caption_style="poetic")


def test_mixed_captions_pick_a_style_per_clip_without_changing_the_scene():
    full, bare = CFG, WorldConfig(caption_style="no-colour")
    mixed = WorldConfig(caption_style="mixed")
    styles = []
    for i in range(40):
        scene, text, frames, images, _ = training_clip(5, i, mixed, "segment")
        ref_scene, ref_text, ref_frames, ref_images, _ = training_clip(5, i, full, "segment")
        # exact: the same seeded scene rendered by the same numpy code in one process
        assert scene == ref_scene and np.array_equal(frames, ref_frames)  # the style has its own random stream
        assert all(np.array_equal(a, b) for a, b in zip(images, ref_images))
        bare_text = training_clip(5, i, bare, "segment")[1]
        assert ref_text != bare_text and text in (ref_text, bare_text)
        styles.append(text == bare_text)
        assert training_clip(5, i, mixed, "segment")[1] == text  # deterministic per (seed, index)
    assert 0.25 < np.mean(styles) < 0.75, styles  # both styles, about half each
    assert eval_case(5, 0, mixed, "crop")[1] in (eval_case(5, 0, full, "crop")[1], eval_case(5, 0, bare, "crop")[1])
