"""The scene spec: what a toy clip contains, as plain data (JSON round-trip), and how subjects move.

Coordinates are in units of the frame height: x in [0, width/height], y in [0, 1], y down. A subject's
`size` is its radius in the same units; motions are functions of the clip time t in [0, 1]
(frame k of F is at t = k / (F - 1)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from .catalogue import ACCENT_NOUN, CHARACTERS, MOTIONS, SHAPES


@dataclass(frozen=True)
class Subject:
    shape: str  # a key of SHAPES or CHARACTERS
    colour: str  # body colour, a key of COLOURS
    texture: str = "plain"
    accent: str | None = None  # characters only: colour of the hat / roof

    @property
    def is_character(self) -> bool:
        return self.shape in CHARACTERS

    @property
    def colours(self) -> tuple[str, ...]:
        return (self.colour, self.accent) if self.accent else (self.colour,)

    def phrase(self, colours: bool = True) -> str:
        """'the red striped circle', 'the green figure with a red hat' (without colours: 'the striped circle')."""
        texture = "" if self.texture == "plain" else f"{self.texture} "
        body = f"{self.colour} " if colours else ""
        if self.is_character:
            accent = f"{self.accent} " if colours else ""
            return f"the {body}{texture}{self.shape} with a {accent}{ACCENT_NOUN[self.shape]}"
        return f"the {body}{texture}{self.shape}"

    def __post_init__(self):
        if self.shape not in SHAPES and self.shape not in CHARACTERS:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.is_character != (self.accent is not None):
            raise ValueError(f"{self.shape!r}: characters need an accent colour, plain shapes must not have one")


@dataclass(frozen=True)
class Track:
    """One subject in one clip: where it starts and how it moves."""

    subject: Subject
    motion: str  # a key of MOTIONS
    x: float  # start centre
    y: float
    size: float  # radius, in frame heights
    amount: float = 0.0  # travel (left/right/up/down), hop height (bounce), orbit radius
    angle: float = 0.0  # start rotation, degrees
    spin: float = 0.0  # total rotation over the clip (spin), degrees
    cycles: int = 1  # bounce hops
    direction: int = 1  # orbit direction (+1 clockwise in image coordinates, -1 counter-clockwise)

    def __post_init__(self):
        if self.motion not in MOTIONS:
            raise ValueError(f"unknown motion {self.motion!r}")

    def pose(self, t: float) -> tuple[float, float, float, float]:
        """(x, y, angle in degrees, scale) at clip time t in [0, 1]."""
        x, y, angle, scale = self.x, self.y, self.angle, 1.0
        m = self.motion
        if m == "left":
            x -= self.amount * t
        elif m == "right":
            x += self.amount * t
        elif m == "up":
            y -= self.amount * t
        elif m == "down":
            y += self.amount * t
        elif m == "bounce":
            y -= self.amount * abs(math.sin(math.pi * self.cycles * t))
        elif m == "spin":
            angle += self.spin * t
        elif m == "grow":
            scale = 1.0 + 0.6 * t
        elif m == "shrink":
            scale = 1.0 - 0.45 * t
        elif m == "orbit":
            # starts at (x, y) on a circle of radius `amount` whose centre is to its left
            a = 2.0 * math.pi * t * self.direction
            x = self.x - self.amount + self.amount * math.cos(a)
            y = self.y + self.amount * math.sin(a)
        return x, y, angle, scale


@dataclass(frozen=True)
class Background:
    style: str  # a key of BACKGROUNDS
    colours: tuple[tuple[int, int, int], ...]  # jittered palette
    seed: int = 0  # for noisy styles

    def phrase(self) -> str:
        from .catalogue import BACKGROUNDS

        return BACKGROUNDS[self.style][0]


@dataclass(frozen=True)
class Scene:
    height: int
    width: int
    frames: int
    fps: float
    background: Background
    tracks: tuple[Track, ...] = field(default_factory=tuple)  # caption order = reference order
    z_order: tuple[int, ...] = ()  # drawing order (indices into tracks), back to front

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def times(self) -> list[float]:
        n = self.frames
        return [k / (n - 1) if n > 1 else 0.0 for k in range(n)]

    def drawing_order(self) -> tuple[int, ...]:
        return self.z_order or tuple(range(len(self.tracks)))

    def with_background(self, background: Background) -> Scene:
        return replace(self, background=background)

    def without(self, index: int) -> Scene:
        """The same scene with track `index` removed."""
        tracks = tuple(t for i, t in enumerate(self.tracks) if i != index)
        order = tuple(j - (j > index) for j in self.drawing_order() if j != index)
        return replace(self, tracks=tracks, z_order=order)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        bg = d["background"]
        background = Background(bg["style"], tuple(tuple(int(v) for v in c) for c in bg["colours"]), int(bg["seed"]))
        tracks = tuple(Track(**{**t, "subject": Subject(**t["subject"])}) for t in d["tracks"])
        return cls(
            height=int(d["height"]),
            width=int(d["width"]),
            frames=int(d["frames"]),
            fps=float(d["fps"]),
            background=background,
            tracks=tracks,
            z_order=tuple(d.get("z_order") or ()),
        )
