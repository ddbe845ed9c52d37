"""The toy world's evaluator: which reference subjects appear, do they move as told, do reference backgrounds leak.

It knows the world: subject colours are saturated with separated hues and backgrounds are pale, so a pixel's
subject colour is a hue lookup. For each subject of a case it checks, frame by frame,

- presence: the largest blob of the subject's colour covers >= `presence` × the area that colour has in a clean
  render of the case's scene (characters: the accent colour too, next to the body);
- shape: the blob's shape descriptors are nearest to those of the expected shape (prototypes rendered by the
  same renderer at the same pixel size, through the same labelling);
- motion: the blob's centroid / area trajectory agrees with the caption's motion (direction, range, growth).

A subject is recalled when colour (+ shape) is found in at least half of the frames. Background leak compares
the video's background pixels (those far from any saturated pixel) with the case's own background and with
every reference's background (the crop source's or the cross-pair's; white for segment / redux): it leaks when
some reference background is closer than the prompt's one.

The shuffled control scores each video against another case's scene and references (a seeded derangement):
what recall and leak look like when the video has nothing to do with the references.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .catalogue import COLOURS, SHAPES, hue_of
from .render import background_pair, render
from .scene import Background, Scene, Subject, Track

COLOUR_NAMES = tuple(COLOURS)
_HUES = np.asarray([hue_of(COLOURS[c]) for c in COLOUR_NAMES], np.float32)
MIN_CHROMA = 55  # subject pixels (darkest texture shade has >= 75); backgrounds have <= 40
BG_MAX_CHROMA = 45
MAX_HUE_DIST = 20.0
LEAK_MAX_DIST = 20.0  # background distance (0..255) under which a reference background counts as shown


# --- pixels -------------------------------------------------------------------------------------------------


def colour_labels(frames: np.ndarray, min_chroma: float = MIN_CHROMA, max_hue_dist: float = MAX_HUE_DIST):
    """(..., H, W, 3) uint8 -> (..., H, W) int8: index into COLOUR_NAMES, -1 where no subject colour."""
    rgb = np.asarray(frames, np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    safe = np.maximum(chroma, 1e-6)
    hue = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = hue * 60.0
    dist = np.abs(hue[..., None] - _HUES)
    dist = np.minimum(dist, 360.0 - dist)
    label = dist.argmin(-1).astype(np.int8)
    ok = (chroma >= min_chroma) & (dist.min(-1) <= max_hue_dist)
    return np.where(ok, label, np.int8(-1))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a 2-D boolean mask (min-label propagation, vectorised)."""
    h, w = mask.shape
    if not mask.any():
        return mask.copy()
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        nb = np.minimum.reduce([p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
        new = np.where(mask, nb, big)
        if np.array_equal(new, lab):
            break
        lab = new
    counts = np.bincount(lab[mask])
    return lab == counts.argmax()


_PERIOD = {"circle": 360.0, "square": 90.0, "triangle": 120.0, "star": 72.0, "ring": 360.0}  # rotational symmetry
_ANGLE_STEP = 7.5


@functools.lru_cache(maxsize=1)
def _unit_areas() -> dict[str, float]:
    """Area of each plain shape at radius 1 (measured on a fine render)."""
    out = {}
    for shape in SHAPES:
        track = Track(Subject(shape, "red"), "still", x=0.5, y=0.5, size=0.4)
        _, alpha = render(Scene(200, 200, 1, 16.0, _GREY, (track,)), 0.0)
        out[shape] = float(alpha[0].sum()) / (0.4 * 200) ** 2
    return out


_GREY = Background("room", ((128, 128, 128), (128, 128, 128)))


@functools.lru_cache(maxsize=256)
def _templates(shape: str, radius_q: int) -> np.ndarray:
    """Binary masks (angles, T, T) of a shape of radius radius_q/2 px, centred on the middle pixel."""
    radius = radius_q / 2.0
    half = int(np.ceil(1.2 * radius)) + 1
    size = 2 * half + 1
    angles = np.arange(0.0, _PERIOD[shape] if shape not in ("circle", "ring") else 1.0, _ANGLE_STEP)
    out = []
    for angle in angles:
        track = Track(Subject(shape, "red"), "still", x=0.5, y=0.5, size=radius / size, angle=float(angle))
        _, alpha = render(Scene(size, size, 1, 16.0, _GREY, (track,)), 0.0, ss=2)
        out.append(alpha[0] >= 0.5)
    return np.stack(out)


def shape_scores(blob: np.ndarray) -> dict[str, float]:
    """Best IoU of the blob with each plain shape, over rotations, at the radius that gives the blob's area."""
    ys, xs = np.nonzero(blob)
    area = len(ys)
    if area < 6:
        return dict.fromkeys(SHAPES, 0.0)
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    scores = {}
    for shape, unit in _unit_areas().items():
        radius_q = max(4, int(round(2.0 * np.sqrt(area / unit))))
        tpl = _templates(shape, radius_q)
        half = tpl.shape[1] // 2
        window = np.zeros(tpl.shape[1:], bool)
        y0, x0 = cy - half, cx - half
        sy0, sx0 = max(y0, 0), max(x0, 0)
        sy1, sx1 = min(y0 + tpl.shape[1], blob.shape[0]), min(x0 + tpl.shape[2], blob.shape[1])
        window[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = blob[sy0:sy1, sx0:sx1]
        inter = np.logical_and(tpl, window).sum(axis=(1, 2))
        union = np.logical_or(tpl, window).sum(axis=(1, 2)) + (area - window.sum())
        scores[shape] = float((inter / np.maximum(union, 1)).max())
    return scores


def classify_shape(blob: np.ndarray, expected: str | None = None, margin: float = 0.03) -> str:
    """The ring is the one shape whose centroid is not on it (thin rings erode too much for IoU after H.264);
    the others are told apart by template IoU. With `expected`, that shape wins if its IoU is within `margin`
    of the best (4:2:0 chroma makes colour blobs blocky at 2-pixel steps, which blurs close calls)."""
    ys, xs = np.nonzero(blob)
    if len(ys) == 0:
        return "none"
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    if blob[max(cy - 1, 0) : cy + 2, max(cx - 1, 0) : cx + 2].mean() < 0.5:
        return "ring"
    scores = shape_scores(blob)
    scores.pop("ring")
    best = max(scores, key=scores.get)
    if expected in scores and scores[expected] >= scores[best] - margin:
        return expected
    return best


# --- backgrounds ------------------------------------------------------------------------------------------------


def background_mask(frames: np.ndarray) -> np.ndarray:
    """(F, H, W) True for pixels that are clearly background: low chroma and not next to a saturated pixel."""
    rgb = frames.astype(np.int16)
    sat = (rgb.max(-1) - rgb.min(-1)) >= BG_MAX_CHROMA
    near = sat.copy()
    for axis in (1, 2):
        for shift in (1, 2, -1, -2):
            near |= np.roll(sat, shift, axis=axis)
    return ~near


def background_distance(frames: np.ndarray, mask: np.ndarray, image: np.ndarray, block: int = 4) -> float:
    """Mean |block colour(video) - block colour(image)| over background pixels, in 0..255 units."""
    f, h, w = mask.shape
    h, w = h // block * block, w // block * block
    m = mask[:, :h, :w, None].astype(np.float32)
    v = frames[:, :h, :w].astype(np.float32) * m
    b = np.broadcast_to(image[None, :h, :w], v.shape).astype(np.float32) * m

    def blocks(a):
        return a.reshape(f, h // block, block, w // block, block, a.shape[-1]).sum(axis=(2, 4))

    n = blocks(m)[..., 0]
    valid = n >= block * block / 4
    if not valid.any():
        return float("nan")
    diff = np.abs(blocks(v) - blocks(b)).mean(-1) / np.maximum(n, 1)
    return float((diff * n)[valid].sum() / n[valid].sum())


def _background_image(bg: Background | None, scene: Scene, height: int, width: int) -> np.ndarray:
    _, lo = background_pair(bg, (0.0, 0.0, width / height, 1.0), height, width, 4)
    return lo


# --- motion ------------------------------------------------------------------------------------------------------


def motion_agrees(track: Track, centroids: np.ndarray, areas: np.ndarray, height: int) -> bool:
    """Does a measured centroid (x, y) / area trajectory (present frames only, in time order) match the motion?"""
    if len(centroids) < 2:
        return False
    d = centroids[-1] - centroids[0]
    amount = track.amount * height
    rng = centroids.max(0) - centroids.min(0)
    m = track.motion
    if m == "left":
        return d[0] <= -0.3 * amount
    if m == "right":
        return d[0] >= 0.3 * amount
    if m == "up":
        return d[1] <= -0.3 * amount
    if m == "down":
        return d[1] >= 0.3 * amount
    if m == "bounce":
        return rng[1] >= 0.3 * amount
    if m == "orbit":
        return rng[0] >= 0.6 * amount and rng[1] >= 0.6 * amount
    if m == "grow":
        return areas[-1] >= 1.3 * areas[0]
    if m == "shrink":
        return areas[-1] <= 0.77 * areas[0]
    # spin, still: the subject stays where it is
    return float(np.hypot(*rng)) <= max(0.08 * height, 0.5 * track.size * height)


# --- scoring ------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _expected_labels(scene: Scene, height: int, width: int, frames: int) -> np.ndarray:
    """Colour labels of a clean render of the scene at the video's size and frame count."""
    times = [k / (frames - 1) if frames > 1 else 0.0 for k in range(frames)]
    clean = np.stack([render(scene, t, height, width)[0] for t in times])
    return colour_labels(np.clip(clean + 0.5, 0, 255).astype(np.uint8))


@dataclass
class SubjectScore:
    phrase: str
    colour_frames: float  # fraction of frames where the colour (and accent) blob is present
    shape_frames: float  # fraction of frames where it is present with the right shape (characters: accent next to body)
    colour_found: bool
    found: bool
    motion_ok: bool | None  # None when not found


@dataclass
class CaseScore:
    clip_id: str
    colour_recall: float
    recall: float
    motion: float | None  # fraction of found subjects whose motion agrees
    bg_target: float  # background distance to the prompt's background
    bg_refs: list[float] = field(default_factory=list)  # ... to each reference's background
    leak: bool | None = None  # None when no reference has a background different from the prompt's
    subjects: list[SubjectScore] = field(default_factory=list)


def score_video(
    frames: np.ndarray,
    scene: Scene,
    ref_backgrounds: list[Background | None] | None = None,
    *,
    clip_id: str = "",
    presence: float = 0.3,
    leak_max_dist: float = LEAK_MAX_DIST,
) -> CaseScore:
    """Score one video (F, H, W, 3) uint8 against the scene it should show and its references' backgrounds."""
    frames = np.asarray(frames)
    nf, h, w = frames.shape[:3]
    times = [k / (nf - 1) if nf > 1 else 0.0 for k in range(nf)]
    labels = colour_labels(frames)
    expected = _expected_labels(scene, h, w, nf)
    subjects = []
    for track in scene.tracks:
        sub = track.subject
        idx = [COLOUR_NAMES.index(c) for c in sub.colours]
        want = [max(float(np.mean(np.sum(expected == i, axis=(1, 2)))), 4.0) for i in idx]
        col_ok, shp_ok, cents, areas = [], [], [], []
        for k in range(nf):
            blobs = [largest_component(labels[k] == i) for i in idx]
            sizes = [int(b.sum()) for b in blobs]
            present = all(s >= presence * e for s, e in zip(sizes, want))
            good = False
            if present:
                ya, xa = np.nonzero(np.logical_or.reduce(blobs))  # all parts: near the centre of rotation
                cents.append(np.asarray([xa.mean(), ya.mean()]))
                areas.append(sum(sizes))
                if sub.is_character:  # the accent part must sit on this body: look for it next to the body only
                    ys, xs = np.nonzero(blobs[0])
                    radius = track.size * track.pose(times[k])[3] * h
                    yy, xx = np.mgrid[0:h, 0:w]
                    near = np.hypot(yy - ys.mean(), xx - xs.mean()) <= 2.0 * radius
                    accent = largest_component((labels[k] == idx[1]) & near)
                    good = int(accent.sum()) >= presence * want[1]
                else:
                    good = classify_shape(blobs[0], sub.shape) == sub.shape
            col_ok.append(present)
            shp_ok.append(good)
        colour_found = np.mean(col_ok) >= 0.5
        found = np.mean(shp_ok) >= 0.5
        motion_ok = bool(motion_agrees(track, np.asarray(cents), np.asarray(areas), h)) if colour_found else None
        subjects.append(SubjectScore(sub.phrase(), float(np.mean(col_ok)), float(np.mean(shp_ok)), bool(colour_found),
                                     bool(found), motion_ok))
    n = max(len(subjects), 1)
    motions = [s.motion_ok for s in subjects if s.motion_ok is not None]

    mask = background_mask(frames)
    bg_target = background_distance(frames, mask, _background_image(scene.background, scene, h, w))
    others = [b for b in (ref_backgrounds or []) if b != scene.background]
    bg_refs = [background_distance(frames, mask, _background_image(b, scene, h, w)) for b in others]
    # a leak: some reference background is both closer than the prompt's and close in absolute terms (a video
    # whose colours are merely washed out is far from every background and is not called a leak)
    leak = bool(min(bg_refs) < min(bg_target, leak_max_dist)) if bg_refs else None
    return CaseScore(
        clip_id=clip_id,
        colour_recall=sum(s.colour_found for s in subjects) / n,
        recall=sum(s.found for s in subjects) / n,
        motion=float(np.mean(motions)) if motions else None,
        bg_target=bg_target,
        bg_refs=bg_refs,
        leak=leak,
        subjects=subjects,
    )


def _summary(scores: list[CaseScore]) -> dict:
    def mean(vals):
        vals = [float(v) for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "cases": len(scores),
        "recall": mean(s.recall for s in scores),
        "colour_recall": mean(s.colour_recall for s in scores),
        "motion": mean(s.motion for s in scores),
        "leak_rate": mean(s.leak for s in scores),
        "bg_target": mean(s.bg_target for s in scores),
    }


def case_from_record(record: dict) -> tuple[Scene, list[Background | None]]:
    from .world import background_from_dict

    scene = Scene.from_dict(record["scene"])
    return scene, [background_from_dict(r.get("background")) for r in record.get("references", [])]


def shuffled(n: int, seed: int = 0) -> list[int]:
    """A seeded derangement: video k is scored against case perm[k] != k."""
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, np.int64)
    perm[order] = np.roll(order, -1)
    return [int(p) for p in perm]


def evaluate(records: list[dict], videos: list[np.ndarray], *, control_seed: int = 0, presence: float = 0.3) -> dict:
    """Matched scores and the shuffled-reference control for videos[k] made for records[k] (scenes.jsonl rows)."""
    cases = [case_from_record(r) for r in records]
    matched = [score_video(v, s, b, clip_id=r["clip_id"], presence=presence)
               for v, r, (s, b) in zip(videos, records, cases)]
    report = {"matched": _summary(matched), "control": None, "per_case": [asdict(s) for s in matched]}
    if len(records) > 1:
        perm = shuffled(len(records), control_seed)
        control = [score_video(v, *cases[p], clip_id=f"{records[k]['clip_id']}~{records[p]['clip_id']}",
                               presence=presence) for k, (v, p) in enumerate(zip(videos, perm))]
        report["control"] = _summary(control)
    return report


def evaluate_folder(cases_dir, videos_dir=None, *, control_seed: int = 0, limit: int | None = None,
                    progress: bool = False) -> dict:
    """Read scenes.jsonl from `cases_dir` (the first `limit` cases) and `<clip_id>.mp4` from `videos_dir`
    (default: the ground truth)."""
    from tqdm import tqdm

    from ..errors import UserInputError
    from ..video_io import read_video
    from .world import read_scenes

    records = read_scenes(cases_dir)[:limit]
    videos_dir = Path(videos_dir) if videos_dir else Path(cases_dir) / "videos"
    videos = []
    for r in tqdm(records, desc="reading videos", disable=not progress):
        path = videos_dir / f"{r['clip_id']}.mp4"
        if not path.is_file():
            raise UserInputError(f"video '{path}' not found: generate one <clip_id>.mp4 per case into {videos_dir}")
        videos.append(read_video(path))
    report = evaluate(records, videos, control_seed=control_seed)
    report["videos"] = str(videos_dir)
    return report
