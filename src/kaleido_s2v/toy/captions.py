"""Templated captions from a scene spec: subjects in track order (= reference order), their motions, the place.

"The red striped circle moves to the left while the blue square bounces on a sandy floor."

Style "no-colour" leaves the subjects' colours out ("The striped circle moves to the left while the square
bounces ..."): only the references then say which subject is which colour, so a model must use them.
Style "mixed" (training data) picks one of the two per clip, half and half: a model trained on full captions
alone can draw every subject from the text and learns to ignore references that disagree with it.
"""

from __future__ import annotations

import numpy as np

from .catalogue import MOTIONS
from .scene import Scene

CAPTION_STYLES = ("full", "no-colour", "mixed")


def caption(scene: Scene, style: str = "full", rng: np.random.Generator | None = None) -> str:
    """`rng` picks the style of a "mixed" caption (its own stream, so the scene does not depend on the style)."""
    if style not in CAPTION_STYLES:
        raise ValueError(f"caption style {style!r}: choose one of {CAPTION_STYLES}")
    if style == "mixed":
        if rng is None:
            raise ValueError('caption style "mixed" needs an rng')
        style = "no-colour" if rng.random() < 0.5 else "full"
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
