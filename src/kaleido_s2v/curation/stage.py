"""The stage contract, after NeMo Curator's `ProcessingStage`.

A stage is a dataclass whose thresholds are fields. `inputs()` / `outputs()` declare the clip fields it reads
and writes (a test checks the declaration against what `process` really does), `setup()` loads models once per
worker, and `process(clip)` returns the clip, with `clip.reject(reason)` called for every drop. No stage imports
Ray: `ray_driver` wraps plain-task stages in `map_batches` functions and stages with `uses_model = True` in
actor pools.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..errors import UserInputError
from .tasks import Clip, Video

# fields that change how or where a stage runs, not what it computes: excluded from the fingerprint
RUNTIME_FIELDS = {"output_dir", "device", "dtype", "batch_size", "num_gpus"}


@dataclass
class Stage:
    name: ClassVar[str] = ""
    uses_model: ClassVar[bool] = False  # True: Ray runs it in an actor pool (setup once per actor)
    needs_pool: ClassVar[bool] = False  # True: needs every clip's record first (cross-clip stages)

    output_dir: str = field(default="", repr=False)
    batch_size: int = 1
    num_gpus: float = 0.0

    def inputs(self) -> list[str]:
        """Clip fields this stage reads (beyond the window: source, start_s, end_s)."""
        return []

    def outputs(self) -> list[str]:
        """Clip fields this stage writes."""
        return []

    def check(self) -> None:
        """Raise `UserInputError` for a configuration that cannot work (e.g. a model folder not set)."""

    def setup(self) -> None:
        """Load models; called once per worker before the first `process`."""

    def process(self, clip: Clip) -> Clip:
        raise NotImplementedError

    def process_batch(self, clips: list[Clip]) -> list[Clip]:
        """Model stages override this to batch; the default maps `process`."""
        return [self.process(c) for c in clips]

    def set_pool(self, records: list[Clip]) -> None:
        """Cross-clip stages (`needs_pool`) get every clip of the run before processing."""

    def fingerprint(self) -> str:
        cfg = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in RUNTIME_FIELDS}
        blob = json.dumps({"stage": self.name, **cfg}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    # helpers
    def subjects_dir(self, clip: Clip) -> Path:
        if not self.output_dir:
            raise UserInputError(f"stage '{self.name}' writes files but has no output folder: pass --output")
        d = Path(self.output_dir) / "subjects" / clip.clip_id
        d.mkdir(parents=True, exist_ok=True)
        return d

    def require_model(self, value: str | None, key: str = "model") -> None:
        if not value:
            raise UserInputError(
                f"stage '{self.name}' needs a local model folder: set '{self.name}: {{{key}: /path/to/folder}}' "
                "in --config"
            )
        if not Path(value).is_dir():
            raise UserInputError(f"stage '{self.name}': model folder '{value}' does not exist: check {self.name}.{key}")


@dataclass
class SplitStage(Stage):
    """A stage that turns a source `Video` into clips (`scenes`)."""

    def split(self, video: Video) -> list[Clip]:
        raise NotImplementedError
