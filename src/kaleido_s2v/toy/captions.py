"""Templated captions from a scene spec: subjects in track order (= reference order), their motions, the place.

"The red striped circle moves to the left while the blue square bounces on a sandy floor."

Style "no-colour" leaves the subjects' colours out ("The striped circle moves to the left while the square
bounces ..."): only the references then say which subject is which colour, so a model must use them.
"""

from __future__ import annotations

from .catalogue import MOTIONS
from .scene import Scene

CAPTION_STYLES = ("full", "no-colour")


def caption(scene: Scene, style: str = "full") -> str:
    if style not in CAPTION_STYLES:
        raise ValueError(f"caption style {style!r}: choose one of {CAPTION_STYLES}")
    parts = [f"{t.subject.phrase(colours=style == 'full')} {MOTIONS[t.motion]}" for t in scene.tracks]
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
