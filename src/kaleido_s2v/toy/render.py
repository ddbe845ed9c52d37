"""A small numpy rasteriser for the toy world.

Everything is drawn on a supersampled grid (binary coverage, `SUPERSAMPLE`² samples per pixel) and
box-filtered down, which gives anti-aliased edges and exact per-subject alpha masks. Shapes are unions of
convex primitives evaluated analytically in each subject's local frame, so rendering is resolution
independent: the same scene renders at any size or through any view box (used for crop references).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .catalogue import BACKGROUNDS, COLOURS, DARK_SHADE, MAX_BG_CHROMA, Primitive, primitives
from .scene import Background, Scene, Track

SUPERSAMPLE = 4
View = tuple[float, float, float, float]  # (x0, y0, x1, y1) in scene units (frame heights)


def _grid(view: View, height: int, width: int, ss: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene coordinates of the supersampled pixel centres: X (W*ss,), Y (H*ss,)."""
    x0, y0, x1, y1 = view
    xs = x0 + (np.arange(width * ss, dtype=np.float32) + 0.5) * ((x1 - x0) / (width * ss))
    ys = y0 + (np.arange(height * ss, dtype=np.float32) + 0.5) * ((y1 - y0) / (height * ss))
    return xs, ys


def _downsample(a: np.ndarray, ss: int) -> np.ndarray:
    """Box filter (H*ss, W*ss, ...) -> (H, W, ...)."""
    h, w = a.shape[0] // ss, a.shape[1] // ss
    a = a.reshape(h, ss, w * ss, *a.shape[2:]).sum(axis=1)
    return a.reshape(h, w, ss, *a.shape[2:]).sum(axis=2) * np.float32(1.0 / (ss * ss))


# --- backgrounds ----------------------------------------------------------------------------------------------


def jitter_palette(style: str, rng: np.random.Generator, amount: int = 10) -> tuple[tuple[int, int, int], ...]:
    """The style's base colours with a small per-scene jitter, chroma kept <= MAX_BG_CHROMA."""
    out = []
    for c in BACKGROUNDS[style][1]:
        v = np.clip(np.asarray(c, np.float64) + rng.integers(-amount, amount + 1, 3), 0, 255)
        chroma = v.max() - v.min()
        if chroma > MAX_BG_CHROMA:  # pull towards the grey of the same mean
            v = v.mean() + (v - v.mean()) * (MAX_BG_CHROMA / chroma)
        out.append(tuple(int(round(x)) for x in v))
    return tuple(out)


def _noise(seed: int, xs: np.ndarray, ys: np.ndarray, cells: int = 48) -> np.ndarray:
    """Deterministic value noise in [-1, 1] on a scene-space grid of 1/cells frame heights."""
    table = np.random.default_rng(seed).uniform(-1.0, 1.0, (cells + 1, 4 * cells + 1)).astype(np.float32)
    iy = np.clip((ys * cells).astype(np.int64), 0, cells)
    ix = np.clip((xs * cells).astype(np.int64), 0, 4 * cells)
    return table[iy[:, None], ix[None, :]]


def background_image(bg: Background | None, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(len(ys), len(xs), 3) float32 RGB in [0, 255]; `None` is plain white."""
    h, w = len(ys), len(xs)
    if bg is None:
        return np.full((h, w, 3), 255.0, np.float32)
    c0, c1 = (np.asarray(c, np.float32) for c in bg.colours[:2])
    X, Y = xs[None, :], ys[:, None]
    s = bg.style
    if s in ("sky", "dusk", "night"):
        f = np.clip(Y, 0.0, 1.0) ** (0.8 if s == "dusk" else 1.0)
        img = c0 * (1.0 - f[..., None]) + c1 * f[..., None]
        img = np.broadcast_to(img, (h, w, 3))
    elif s in ("sand", "grass", "room"):
        horizon = {"sand": 0.42, "grass": 0.45, "room": 0.6}[s]
        low = (Y > horizon) & np.ones_like(X, bool)
        img = np.where(low[..., None], c1, c0)
        if s != "room":
            amp = 9.0 if s == "sand" else 7.0
            img = img + (amp * _noise(bg.seed, xs, ys) * low)[..., None]
    elif s == "checker":
        p = 0.125
        odd = (np.floor(X / p) + np.floor(Y / p)) % 2 == 1
        img = np.where(odd[..., None], c1, c0)
    elif s == "stripes":
        odd = (np.floor(X / 0.08) % 2 == 1) & np.ones_like(Y, bool)
        img = np.where(odd[..., None], c1, c0)
    elif s == "dots":
        p, r = 0.16, 0.045
        dx, dy = X - (np.floor(X / p) + 0.5) * p, Y - (np.floor(Y / p) + 0.5) * p
        img = np.where((dx * dx + dy * dy < r * r)[..., None], c1, c0)
    elif s == "tiles":
        p, lw = 0.2, 0.018
        line = ((X % p) < lw) | ((Y % p) < lw)
        img = np.where(line[..., None], c1, c0)
    else:
        raise ValueError(f"unknown background style {s!r}")
    return np.clip(np.asarray(img, np.float32), 0.0, 255.0)


# --- subjects ---------------------------------------------------------------------------------------------------


def _inside(p: Primitive, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if p.kind == "ellipse":
        cx, cy, rx, ry = p.params
        return ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0
    pts = np.asarray(p.params, np.float32).reshape(-1, 2)
    area2 = sum(pts[i - 1, 0] * pts[i, 1] - pts[i, 0] * pts[i - 1, 1] for i in range(len(pts)))  # shoelace
    sign = 1.0 if area2 > 0 else -1.0
    inside = np.ones(u.shape, bool)
    for i in range(len(pts)):
        (ax, ay), (bx, by) = pts[i - 1], pts[i]
        inside &= sign * ((bx - ax) * (v - ay) - (by - ay) * (u - ax)) >= 0.0
    return inside


def _texture(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """True where the dark shade goes."""
    if texture == "striped":
        return np.floor((u + v) / 0.42) % 2 == 1
    if texture == "dotted":
        p = 0.6
        du, dv = u - (np.floor(u / p) + 0.5) * p, v - (np.floor(v / p) + 0.5) * p
        return du * du + dv * dv < 0.17**2
    if texture == "checked":
        return (np.floor(u / 0.5) + np.floor(v / 0.5)) % 2 == 1
    return np.zeros(u.shape, bool)


def _draw_track(canvas: np.ndarray, track: Track, t: float, xs: np.ndarray, ys: np.ndarray, ss: int, pose=None):
    """Paint the subject at time t onto the supersampled canvas in place.

    Returns (binary coverage of the touched patch, (r0, r1, c0, c1) patch bounds in supersampled pixels, aligned
    to multiples of ss), or None when the subject is out of view.
    """
    x, y, angle, scale = pose if pose is not None else track.pose(t)
    r = track.size * scale
    reach = 1.25 * r  # every primitive lies within 1.15 local units
    cols = np.nonzero((xs >= x - reach) & (xs <= x + reach))[0]
    rows = np.nonzero((ys >= y - reach) & (ys <= y + reach))[0]
    if len(cols) == 0 or len(rows) == 0:
        return None
    r0, c0 = rows[0] // ss * ss, cols[0] // ss * ss
    r1, c1 = -(-(rows[-1] + 1) // ss) * ss, -(-(cols[-1] + 1) // ss) * ss
    dx, dy = xs[None, c0:c1] - x, ys[r0:r1, None] - y
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    u, v = (ca * dx + sa * dy) / r, (-sa * dx + ca * dy) / r  # rotate the grid by -angle
    subject = track.subject
    body = np.asarray(COLOURS[subject.colour], np.float32)
    shade = _texture(subject.texture, u, v)
    body_img = np.where(shade[..., None], body * DARK_SHADE, body)
    region = canvas[r0:r1, c0:c1]
    prims = primitives(subject.shape)
    masks = [_inside(p, u, v) for p in prims]
    holes = np.zeros(u.shape, bool)
    for p, m in zip(prims, masks):
        if p.role == "hole":
            holes |= m
    local = np.zeros(u.shape, bool)
    for p, m in zip(prims, masks):
        if p.role == "hole":
            continue
        m = m & ~holes
        local |= m
        colour = np.asarray(COLOURS[subject.accent], np.float32) if p.role == "accent" else body_img
        region[m] = np.broadcast_to(colour, region.shape)[m]
    return local, (r0, r1, c0, c1)


def render(
    scene: Scene,
    t: float,
    height: int | None = None,
    width: int | None = None,
    *,
    view: View | None = None,
    background: Background | None | str = "scene",
    only: list[int] | None = None,
    poses: dict[int, tuple[float, float, float, float]] | None = None,
    ss: int = SUPERSAMPLE,
) -> tuple[np.ndarray, np.ndarray]:
    """Render the scene at clip time t.

    Returns (rgb (H, W, 3) float32 in [0, 255], alphas (n_tracks, H, W) float32 in [0, 1]), where alpha i is
    track i's own coverage (not reduced by occlusion; zero for tracks not drawn). `background="scene"` uses the
    scene's background, `None` white, or pass another Background. `only` limits the drawn tracks; `poses`
    overrides (x, y, angle, scale) per track index.
    """
    height = height or scene.height
    width = width or scene.width
    view = view or (0.0, 0.0, scene.aspect, 1.0)
    xs, ys = _grid(view, height, width, ss)
    bg = scene.background if isinstance(background, str) else background
    hi, lo = background_pair(bg, tuple(float(v) for v in view), height, width, ss)
    canvas, out = hi.copy(), lo.copy()
    alphas = np.zeros((len(scene.tracks), height, width), np.float32)
    patches = []
    for i in scene.drawing_order():
        if only is not None and i not in only:
            continue
        drawn = _draw_track(canvas, scene.tracks[i], t, xs, ys, ss, (poses or {}).get(i))
        if drawn is None:
            continue
        cover, (r0, r1, c0, c1) = drawn
        alphas[i, r0 // ss : r1 // ss, c0 // ss : c1 // ss] = _downsample(cover.astype(np.float32), ss)
        patches.append((r0, r1, c0, c1))
    for r0, r1, c0, c1 in patches:  # only the touched patches need filtering again
        out[r0 // ss : r1 // ss, c0 // ss : c1 // ss] = _downsample(canvas[r0:r1, c0:c1], ss)
    return out, alphas


@functools.lru_cache(maxsize=16)
def background_pair(bg, view, height, width, ss):
    """Backgrounds are static: a clip computes its (supersampled, filtered) background once."""
    hi = background_image(bg, *_grid(view, height, width, ss))
    lo = _downsample(hi, ss)
    hi.flags.writeable = lo.flags.writeable = False
    return hi, lo


def render_clip(scene: Scene, **kw) -> tuple[np.ndarray, np.ndarray]:
    """All frames: (uint8 frames (F, H, W, 3), alphas (F, n_tracks, H, W) float32)."""
    frames, alphas = [], []
    for t in scene.times():
        rgb, a = render(scene, t, **kw)
        frames.append(np.clip(rgb + 0.5, 0, 255).astype(np.uint8))
        alphas.append(a)
    return np.stack(frames), np.stack(alphas)
