"""Deterministic scene sampling, paper-style references, and the dataset / evaluation-case writers.

Every clip i of a run with seed s draws from its own generator `default_rng([s, stream, i])`, so clip i is
the same whatever `num` is, and training (stream 0) and evaluation (stream 1) never share scenes.

Reference kinds, as the paper's data pipeline makes them (docs: shared/reference/data-pipeline.md):

| kind        | what the image shows                                                            |
|-------------|---------------------------------------------------------------------------------|
| `crop`      | a crop around the subject from a frame of the source clip, background included   |
| `segment`   | the subject as posed in a frame, cut out and composited on white                |
| `crosspair` | the subject composited on an unrelated background (another style)              |
| `redux`     | the subject on white in another pose: rotation, scale and position changed      |

Training clips take their crops from themselves (as the paper does); evaluation cases take them from a
re-laid-out copy of the scene on another background, so a copied reference background is measurable.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import UserInputError
from ..fileio import atomic_path, claim_folder
from .captions import CAPTION_STYLES, caption
from .catalogue import BACKGROUNDS, CHARACTERS, COLOURS, MOTIONS, SHAPES, TEXTURES
from .render import jitter_palette, render, render_clip
from .scene import Background, Scene, Subject, Track

REF_KINDS = ("crop", "segment", "crosspair", "redux")
TRAIN_MIX = (1, 5, 3, 1)  # the paper's crop : segment : crosspair(inpaint) : redux
EVAL_MIX = (1, 1, 1, 1)
_EXTENT = 1.15  # every shape lies within this many radii of its centre


@dataclass(frozen=True)
class WorldConfig:
    height: int = 64
    width: int = 64
    frames: int = 9
    fps: float = 16.0
    min_subjects: int = 1
    max_subjects: int = 3
    ref_size: int = 64
    character_prob: float = 0.25
    plain_prob: float = 0.4  # texture "plain"; the rest split evenly between the other textures
    caption_style: str = "full"  # "no-colour" leaves colours to the references (captions.py); "mixed": `_caption`

    def __post_init__(self):
        if self.height < 16 or self.width < 16:
            raise UserInputError(f"frame size {self.height}x{self.width} is too small: use at least 16x16")
        if self.frames < 1:
            raise UserInputError(f"frames={self.frames}: give at least 1 frame")
        if self.fps <= 0:
            raise UserInputError(f"fps={self.fps}: give a positive frame rate")
        if self.ref_size < 16:
            raise UserInputError(f"ref_size={self.ref_size}: use at least 16 pixels")
        if self.caption_style not in (*CAPTION_STYLES, "mixed"):
            raise UserInputError(
                f"--caption-style {self.caption_style!r}: choose one of {', '.join(CAPTION_STYLES)}, mixed"
            )
        if not 1 <= self.min_subjects <= self.max_subjects <= len(COLOURS) // 2:
            raise UserInputError(
                f"subjects {self.min_subjects}..{self.max_subjects}: need 1 <= min <= max <= {len(COLOURS) // 2}"
            )


def parse_mix(text: str) -> tuple[int, ...]:
    """'1:5:3:1' -> (1, 5, 3, 1) in REF_KINDS order."""
    try:
        mix = tuple(int(v) for v in text.split(":"))
    except ValueError:
        mix = ()
    if len(mix) != len(REF_KINDS) or min(mix) < 0 or sum(mix) == 0:
        raise UserInputError(f"--mix {text!r}: give four non-negative integers crop:segment:crosspair:redux, e.g. 1:5:3:1")
    return mix


def allocate_kinds(num: int, mix: tuple[int, ...], seed: int) -> list[str]:
    """Exactly the mix's proportions (largest remainder), in a seeded random order."""
    total = sum(mix)
    exact = [num * m / total for m in mix]
    counts = [int(math.floor(e)) for e in exact]
    for j in sorted(range(len(mix)), key=lambda j: exact[j] - counts[j], reverse=True)[: num - sum(counts)]:
        counts[j] += 1
    kinds = [k for k, c in zip(REF_KINDS, counts) for _ in range(c)]
    order = np.random.default_rng([seed, 2]).permutation(num)
    return [kinds[j] for j in order]


# --- scene sampling ------------------------------------------------------------------------------------------


def sample_background(rng: np.random.Generator, exclude: tuple[str, ...] = ()) -> Background:
    styles = [s for s in BACKGROUNDS if s not in exclude]
    style = styles[rng.integers(len(styles))]
    return Background(style, jitter_palette(style, rng), int(rng.integers(2**31)))


def _sample_subject(rng: np.random.Generator, free: list[str], cfg: WorldConfig) -> Subject:
    colour = free.pop(rng.integers(len(free)))
    plain = rng.random() < cfg.plain_prob
    texture = "plain" if plain else TEXTURES[1 + rng.integers(len(TEXTURES) - 1)]
    if rng.random() < cfg.character_prob and free:
        shape = list(CHARACTERS)[rng.integers(len(CHARACTERS))]
        return Subject(shape, colour, texture, accent=free.pop(rng.integers(len(free))))
    return Subject(list(SHAPES)[rng.integers(len(SHAPES))], colour, texture)


def _sample_motion(rng: np.random.Generator, subject: Subject) -> dict:
    motion = list(MOTIONS)[rng.integers(len(MOTIONS))]
    kw: dict = {"motion": motion, "angle": 0.0 if subject.is_character else float(rng.uniform(0, 360))}
    if motion in ("left", "right"):
        kw["amount"] = float(rng.uniform(0.28, 0.42))
    elif motion in ("up", "down"):
        kw["amount"] = float(rng.uniform(0.22, 0.32))
    elif motion == "bounce":
        kw["amount"] = float(rng.uniform(0.16, 0.26))
        kw["cycles"] = int(rng.integers(1, 3))
    elif motion == "orbit":
        kw["amount"] = float(rng.uniform(0.12, 0.17))
        kw["direction"] = int(rng.choice([-1, 1]))
    elif motion == "spin":
        kw["spin"] = float(rng.choice([-1, 1]) * rng.uniform(120, 200))
    return kw


def _path(track: Track, times: np.ndarray) -> np.ndarray:
    """(T, 3): x, y, extent radius along the clip."""
    out = []
    for t in times:
        x, y, _, s = track.pose(float(t))
        out.append((x, y, _EXTENT * track.size * s))
    return np.asarray(out)


def _place(rng: np.random.Generator, track: Track, others: list[np.ndarray], aspect: float, tries: int = 60) -> Track:
    """Pick a start position that keeps the whole path in frame and as far as possible from the others."""
    times = np.linspace(0.0, 1.0, 17)
    probe = _path(replace(track, x=0.0, y=0.0), times)
    lo_x, hi_x = (-(probe[:, 0] - probe[:, 2])).max(), aspect - (probe[:, 0] + probe[:, 2]).max()
    lo_y, hi_y = (-(probe[:, 1] - probe[:, 2])).max(), 1.0 - (probe[:, 1] + probe[:, 2]).max()
    if lo_x > hi_x:  # the path does not fit: centre it
        lo_x = hi_x = (lo_x + hi_x) / 2
    if lo_y > hi_y:
        lo_y = hi_y = (lo_y + hi_y) / 2
    best, best_gap = None, -np.inf
    for _ in range(tries):
        cand = replace(track, x=float(rng.uniform(lo_x, hi_x)), y=float(rng.uniform(lo_y, hi_y)))
        path = _path(cand, times)
        gap = min((np.min(np.hypot(*(path[:, :2] - o[:, :2]).T) - path[:, 2] - o[:, 2]) for o in others), default=1.0)
        if gap > best_gap:
            best, best_gap = cand, gap
        if gap >= 0.02:
            break
    return best


def sample_scene(rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    n = int(rng.integers(cfg.min_subjects, cfg.max_subjects + 1))
    free = list(COLOURS)
    aspect = cfg.width / cfg.height
    size_range = {1: (0.17, 0.22), 2: (0.15, 0.19)}.get(n, (0.13, 0.16))
    tracks, paths = [], []
    for _ in range(n):
        subject = _sample_subject(rng, free, cfg)
        size = float(rng.uniform(*size_range))
        track = Track(subject=subject, x=0.0, y=0.0, size=size, **_sample_motion(rng, subject))
        track = _place(rng, track, paths, aspect)
        tracks.append(track)
        paths.append(_path(track, np.linspace(0.0, 1.0, 17)))
    background = sample_background(rng)
    return Scene(
        height=cfg.height,
        width=cfg.width,
        frames=cfg.frames,
        fps=cfg.fps,
        background=background,
        tracks=tuple(tracks),
        z_order=tuple(int(i) for i in rng.permutation(n)),
    )


def relayout(rng: np.random.Generator, scene: Scene, cfg: WorldConfig) -> Scene:
    """The same subjects, new motions and positions, on a background of another style (a 'source clip')."""
    tracks, paths = [], []
    for t in scene.tracks:
        track = Track(subject=t.subject, x=0.0, y=0.0, size=t.size, **_sample_motion(rng, t.subject))
        track = _place(rng, track, paths, scene.aspect)
        tracks.append(track)
        paths.append(_path(track, np.linspace(0.0, 1.0, 17)))
    bg = sample_background(rng, exclude=(scene.background.style,))
    return replace(scene, tracks=tuple(tracks), background=bg)


# --- references ------------------------------------------------------------------------------------------------


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def render_reference(
    scene: Scene, index: int, kind: str, rng: np.random.Generator, size: int = 64
) -> tuple[np.ndarray, dict]:
    """One square reference image (size, size, 3) uint8 of track `index`, and what it shows.

    The info dict has `kind`, `background` (the Background dict visible in the image, None for white) and
    the frame time or pose used.
    """
    track = scene.tracks[index]
    if kind not in REF_KINDS:
        raise ValueError(f"unknown reference kind {kind!r}")
    if kind in ("crop", "segment"):
        t = float(scene.times()[rng.integers(scene.frames)])
        x, y, angle, scale = track.pose(t)
        extent = _EXTENT * track.size * scale
        if kind == "crop":
            side = min(1.0, scene.aspect, extent * 2 * float(rng.uniform(1.3, 1.7)))
            cx = x + float(rng.uniform(-0.12, 0.12)) * side
            cy = y + float(rng.uniform(-0.12, 0.12)) * side
            x0 = min(max(cx - side / 2, 0.0), scene.aspect - side)
            y0 = min(max(cy - side / 2, 0.0), 1.0 - side)
            rgb, _ = render(scene, t, size, size, view=(x0, y0, x0 + side, y0 + side))
            return _to_uint8(rgb), {"kind": kind, "time": t, "background": _bg_dict(scene.background)}
        side = extent * 2 / float(rng.uniform(0.75, 0.9))
        view = (x - side / 2, y - side / 2, x + side / 2, y + side / 2)
        rgb, _ = render(scene, t, size, size, view=view, background=None, only=[index])
        return _to_uint8(rgb), {"kind": kind, "time": t, "background": None}
    # crosspair and redux: the subject placed anew in a unit square (a full-height view of a background)
    fill = float(rng.uniform(0.5, 0.72) if kind == "crosspair" else rng.uniform(0.4, 0.8))
    scale = fill * 0.5 / (_EXTENT * track.size)
    margin = fill * 0.5
    px, py = (float(rng.uniform(margin, 1.0 - margin)) for _ in range(2))
    if kind == "crosspair":
        angle = track.pose(0.0)[2]
        bg = sample_background(rng, exclude=(scene.background.style,))
    else:
        delta = rng.uniform(-30, 30) if track.subject.is_character else rng.uniform(0, 360)
        angle = track.pose(0.0)[2] + float(delta)
        bg = None
    probe = replace(scene, width=scene.height)  # a square world for the view (0, 0, 1, 1)
    rgb, _ = render(probe, 0.0, size, size, view=(0.0, 0.0, 1.0, 1.0), background=bg, only=[index],
                    poses={index: (px, py, angle, scale)})
    info = {"kind": kind, "pose": [px, py, angle, scale], "background": None if bg is None else _bg_dict(bg)}
    return _to_uint8(rgb), info


def subject_image(subject: Subject, size: int = 128, angle: float = 0.0) -> np.ndarray:
    """A segment-style reference of one subject: centred on white, filling ~80% of a (size, size, 3) image."""
    track = Track(subject, "still", x=0.5, y=0.5, size=0.4 / _EXTENT, angle=angle)
    scene = Scene(height=size, width=size, frames=1, fps=1.0, background=sample_background(np.random.default_rng(0)),
                  tracks=(track,))
    rgb, _ = render(scene, 0.0, view=(0.0, 0.0, 1.0, 1.0), background=None)
    return _to_uint8(rgb)


def _bg_dict(bg: Background) -> dict:
    return {"style": bg.style, "colours": [list(c) for c in bg.colours], "seed": bg.seed}


def background_from_dict(d: dict | None) -> Background | None:
    if d is None:
        return None
    return Background(d["style"], tuple(tuple(int(v) for v in c) for c in d["colours"]), int(d["seed"]))


def make_references(scene: Scene, kind: str, rng: np.random.Generator, size: int, *, crop_source: Scene | None = None):
    """References for every track (track order), all of one kind; crops come from `crop_source` if given."""
    images, infos = [], []
    for i in range(len(scene.tracks)):
        src = crop_source if (kind == "crop" and crop_source is not None) else scene
        img, info = render_reference(src, i, kind, rng, size)
        images.append(img)
        infos.append(info)
    return images, infos


# --- writers --------------------------------------------------------------------------------------------------


def _save_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _caption(scene, cfg: WorldConfig, seed: int, stream: int, index: int) -> str:
    """The clip's caption. Style "mixed" (training data) draws full or no-colour per clip, half and half, from
    its own random stream, so the scene is that of "full": a model trained on full captions alone can draw
    every subject from the text and learns to ignore references that disagree with it."""
    style = cfg.caption_style
    if style == "mixed":
        style = "no-colour" if np.random.default_rng([seed, stream, index]).random() < 0.5 else "full"
    return caption(scene, style)


def training_clip(seed: int, index: int, cfg: WorldConfig, kind: str):
    """(scene, caption, frames (F,H,W,3) uint8, reference images, reference infos) of training clip `index`."""
    rng = np.random.default_rng([seed, 0, index])
    scene = sample_scene(rng, cfg)
    frames, _ = render_clip(scene)
    images, infos = make_references(scene, kind, rng, cfg.ref_size)
    return scene, _caption(scene, cfg, seed, 2, index), frames, images, infos


def eval_case(seed: int, index: int, cfg: WorldConfig, kind: str):
    """Like `training_clip` but crops come from a re-laid-out copy of the scene on another background."""
    rng = np.random.default_rng([seed, 1, index])
    scene = sample_scene(rng, cfg)
    frames, _ = render_clip(scene)
    source = relayout(rng, scene, cfg) if kind == "crop" else None
    images, infos = make_references(scene, kind, rng, cfg.ref_size, crop_source=source)
    return scene, _caption(scene, cfg, seed, 3, index), frames, images, infos


def _write(out, num: int, seed: int, cfg: WorldConfig, mix, make, video_dir: str, progress: bool, made_by: str,
           overwrite: bool) -> dict:
    from tqdm import tqdm

    from ..video_io import write_video

    if num < 1:
        raise UserInputError(f"--num {num}: give at least 1 clip")
    out = Path(out)
    claim_folder(out, "--out", made_by, overwrite=overwrite, replace=True)
    kinds = allocate_kinds(num, tuple(mix), seed)
    manifest, scenes = [], []
    with atomic_path(out, is_dir=True, made_by=made_by, overwrite=overwrite) as tmp:
        for i in tqdm(range(num), desc=f"toy {video_dir}", disable=not progress, unit="clip"):
            clip_id = f"toy{i:06d}"
            scene, text, frames, images, infos = make(seed, i, cfg, kinds[i])
            video = f"{video_dir}/{clip_id}.mp4"
            write_video(tmp / video, frames, fps=cfg.fps)
            (tmp / "labels").mkdir(exist_ok=True)
            (tmp / "labels" / f"{clip_id}.txt").write_text(text + "\n", encoding="utf-8")
            refs = []
            for k, img in enumerate(images, start=1):
                refs.append(f"references/{clip_id}/ref{k}.png")
                _save_png(tmp / refs[-1], img)
            manifest.append({"clip_id": clip_id, "video": video, "caption": text, "references": refs,
                             "status": "kept", "ref_type": kinds[i]})
            infos = [{"path": path, **info} for path, info in zip(refs, infos)]
            scenes.append({"clip_id": clip_id, "video": video, "caption": text, "ref_type": kinds[i],
                           "scene": scene.to_dict(), "references": infos})
        _jsonl(tmp / "manifest.jsonl", manifest)
        _jsonl(tmp / "scenes.jsonl", scenes)
        summary = {"out": str(out), "num": num, "seed": seed, "config": cfg.__dict__,
                   "mix": dict(zip(REF_KINDS, mix)), "ref_types": {k: kinds.count(k) for k in REF_KINDS}}
        (tmp / "world.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def make_dataset(out, num: int, seed: int = 0, cfg: WorldConfig | None = None, mix=TRAIN_MIX, progress=True, *,
                 overwrite: bool = False) -> dict:
    """Training folder: videos/<id>.mp4, labels/<id>.txt, references/<id>/refK.png, manifest.jsonl, scenes.jsonl."""
    return _write(out, num, seed, cfg or WorldConfig(), mix, training_clip, "videos", progress,
                  "kaleido_s2v.toy make-data", overwrite)


def make_eval_cases(out, num: int, seed: int = 0, cfg: WorldConfig | None = None, mix=EVAL_MIX, progress=True, *,
                    overwrite: bool = False) -> dict:
    """Evaluation cases: the same layout (ground-truth videos under videos/), scenes.jsonl holds what to check."""
    return _write(out, num, seed, cfg or WorldConfig(), mix, eval_case, "videos", progress,
                  "kaleido_s2v.toy make-eval", overwrite)


def read_scenes(folder) -> list[dict]:
    """The cases of a make-eval (or make-data) folder; a bad line is one error naming it."""
    path = Path(folder) / "scenes.jsonl"
    if not path.is_file():
        raise UserInputError(f"'{path}' not found: give a folder written by `python -m kaleido_s2v.toy make-eval`")
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            ok = isinstance(r, dict) and re.fullmatch(r"[A-Za-z0-9_.-]+", str(r["clip_id"])) and r["clip_id"] != ".."
            if not ok or not isinstance(r["scene"], dict) or not isinstance(r["references"], list):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise UserInputError(f"{path}:{i}: not a case written by make-eval (clip_id, scene, references): "
                                 "regenerate the folder") from None
        records.append(r)
    return records
