"""Templated captions from a scene spec: subjects in track order (= reference order), their motions, the place.

"The red striped circle moves to the left while the blue square bounces on a sandy floor."
"""

from __future__ import annotations

from .catalogue import MOTIONS
from .scene import Scene


def caption(scene: Scene) -> str:
    parts = [f"{t.subject.phrase()} {MOTIONS[t.motion]}" for t in scene.tracks]
    if not parts:
        body = "nothing happens"
    elif len(parts) == 1:
        body = parts[0]
    elif len(parts) == 2:
        body = f"{parts[0]} while {parts[1]}"
    else:
        body = ", ".join(parts[:-1]) + f" and {parts[-1]}"
    text = f"{body} {scene.background.phrase()}."
    return text[0].upper() + text[1:]
