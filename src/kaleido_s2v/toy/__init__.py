"""The procedural multi-subject S2V world: scenes, rendering, captions, references, datasets, evaluator.

`python -m kaleido_s2v.toy make-data|make-eval|evaluate --help`; see docs/toy.md.
"""

from .captions import caption
from .scene import Background, Scene, Subject, Track

__all__ = ["Background", "Scene", "Subject", "Track", "caption"]
