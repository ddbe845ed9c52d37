"""What the toy world is made of: subject colours, shapes, textures, characters, backgrounds and motions.

Design rule that the evaluator relies on: subject colours are strongly saturated (chroma = max - min
channel >= 75, even in a texture's dark shade) and have well separated hues; backgrounds are pale or
greyish (chroma <= 40). So "is this pixel part of a subject, and of which colour" is a hue lookup that
survives H.264's chroma subsampling.

Shapes are defined in local coordinates: unit radius, y pointing down, centred at the origin. Every
shape is a list of convex primitives (ellipses and convex polygons) with a part role (`body` or
`accent`); a primitive marked `hole` is cut out of the shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# --- subject colours -----------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 205, 25),
    "green": (35, 175, 55),
    "cyan": (20, 190, 205),
    "blue": (40, 75, 225),
    "purple": (145, 50, 210),
    "pink": (235, 55, 170),
}
DARK_SHADE = 0.62  # textures alternate the colour with this multiple of it (same hue, lower value)

TEXTURES = ("plain", "striped", "dotted", "checked")


def hue_of(rgb) -> float:
    """Hue in degrees [0, 360) of one RGB colour (HSV hue)."""
    import colorsys

    r, g, b = (c / 255.0 for c in rgb)
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360.0


# --- shapes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Primitive:
    kind: str  # "ellipse" (params: cx, cy, rx, ry) or "poly" (params: flat vertex list, convex, any winding)
    params: tuple[float, ...]
    role: str = "body"  # "body" | "accent" | "hole"


def _regular(n: int, radius: float, start_deg: float = -90.0) -> tuple[float, ...]:
    pts = []
    for k in range(n):
        a = math.radians(start_deg + 360.0 * k / n)
        pts += [radius * math.cos(a), radius * math.sin(a)]
    return tuple(pts)


def _star_pieces(outer: float = 1.12, inner: float = 0.56) -> list[Primitive]:
    """A five-pointed star as the union of its inner pentagon and five spike triangles (all convex)."""
    pieces = [Primitive("poly", _regular(5, inner, -90.0 + 36.0))]
    for k in range(5):
        a = math.radians(-90.0 + 72.0 * k)
        b0, b1 = math.radians(-90.0 + 72.0 * k - 36.0), math.radians(-90.0 + 72.0 * k + 36.0)
        tip = (outer * math.cos(a), outer * math.sin(a))
        base0 = (inner * math.cos(b0), inner * math.sin(b0))
        base1 = (inner * math.cos(b1), inner * math.sin(b1))
        pieces.append(Primitive("poly", (*tip, *base0, *base1)))
    return pieces


SHAPES: dict[str, list[Primitive]] = {
    "circle": [Primitive("ellipse", (0.0, 0.0, 0.95, 0.95))],
    "square": [Primitive("poly", (-0.8, -0.8, 0.8, -0.8, 0.8, 0.8, -0.8, 0.8))],
    "triangle": [Primitive("poly", _regular(3, 1.15))],
    "star": _star_pieces(),
    "ring": [Primitive("ellipse", (0.0, 0.0, 1.0, 1.0)), Primitive("ellipse", (0.0, 0.0, 0.55, 0.55), "hole")],
}

def _normalised(parts: list[Primitive], extent: float = 1.1) -> list[Primitive]:
    """Move the area centroid to the origin (so a character spins about its centre) and fit within `extent`."""
    total, mx, my = 0.0, 0.0, 0.0
    for p in parts:
        if p.kind == "ellipse":
            cx, cy, rx, ry = p.params
            a = math.pi * rx * ry
        else:
            pts = list(zip(p.params[::2], p.params[1::2]))
            cross = [pts[i - 1][0] * pts[i][1] - pts[i][0] * pts[i - 1][1] for i in range(len(pts))]
            a = sum(cross) / 2
            cx = sum((pts[i - 1][0] + pts[i][0]) * cross[i] for i in range(len(pts))) / (6 * a)
            cy = sum((pts[i - 1][1] + pts[i][1]) * cross[i] for i in range(len(pts))) / (6 * a)
            a = abs(a)
        total, mx, my = total + a, mx + a * cx, my + a * cy
    ox, oy = mx / total, my / total
    reach = 0.0
    for p in parts:
        if p.kind == "ellipse":
            cx, cy, rx, ry = p.params
            reach = max(reach, math.hypot(cx - ox, cy - oy) + max(rx, ry))
        else:
            reach = max(reach, *(math.hypot(x - ox, y - oy) for x, y in zip(p.params[::2], p.params[1::2])))
    k = min(1.0, extent / reach)
    out = []
    for p in parts:
        if p.kind == "ellipse":
            cx, cy, rx, ry = p.params
            params = ((cx - ox) * k, (cy - oy) * k, rx * k, ry * k)
        else:
            params = tuple((v - (ox if i % 2 == 0 else oy)) * k for i, v in enumerate(p.params))
        out.append(Primitive(p.kind, params, p.role))
    return out


# "characters" have parts in two colours: the body colour and an accent colour
CHARACTERS: dict[str, list[Primitive]] = {
    "figure": _normalised([
        Primitive("poly", (-0.45, 0.0, 0.45, 0.0, 0.55, 1.05, -0.55, 1.05)),  # body
        Primitive("ellipse", (0.0, -0.3, 0.3, 0.3)),  # head
        Primitive("poly", (-0.42, -0.52, 0.42, -0.52, 0.0, -1.1), "accent"),  # hat
    ]),
    "house": _normalised([
        Primitive("poly", (-0.72, -0.05, 0.72, -0.05, 0.72, 0.95, -0.72, 0.95)),  # walls
        Primitive("poly", (-0.95, -0.05, 0.95, -0.05, 0.0, -0.95), "accent"),  # roof
    ]),
}
ACCENT_NOUN = {"figure": "hat", "house": "roof"}


def primitives(shape: str) -> list[Primitive]:
    return SHAPES[shape] if shape in SHAPES else CHARACTERS[shape]


# --- backgrounds ----------------------------------------------------------------------------------------------

# style -> (caption phrase, base colours). Colours are jittered per scene; all keep chroma <= 40.
BACKGROUNDS: dict[str, tuple[str, tuple[tuple[int, int, int], ...]]] = {
    "sky": ("under a blue sky", ((165, 195, 230), (232, 238, 248))),
    "sand": ("on a sandy floor", ((228, 222, 205), (205, 185, 150))),
    "grass": ("in a grassy field", ((215, 228, 240), (165, 200, 150))),
    "dusk": ("at dusk", ((180, 170, 205), (235, 205, 195))),
    "night": ("at night", ((28, 32, 62), (60, 62, 88))),
    "checker": ("on a checkered floor", ((205, 205, 205), (120, 120, 125))),
    "stripes": ("in front of a striped wall", ((240, 232, 200), (205, 215, 228))),
    "dots": ("on a dotted wallpaper", ((240, 230, 215), (200, 180, 200))),
    "room": ("in a grey room", ((178, 178, 182), (128, 126, 124))),
    "tiles": ("on a tiled floor", ((200, 222, 230), (150, 165, 175))),
}
MAX_BG_CHROMA = 40

# --- motions ------------------------------------------------------------------------------------------------------

# motion -> caption verb phrase
MOTIONS: dict[str, str] = {
    "left": "moves to the left",
    "right": "moves to the right",
    "up": "moves up",
    "down": "moves down",
    "bounce": "bounces",
    "spin": "spins around",
    "grow": "grows",
    "shrink": "shrinks",
    "orbit": "circles around",
    "still": "stays still",
}
