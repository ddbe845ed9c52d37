"""Records that flow between curation stages.

A `Clip` is one time window of a source video plus everything the stages learned about it. Stages never
raise for a bad clip: they call `reject(reason)` (a short word such as `too_dark`) and the run goes on, so
every lost clip carries its reason into the manifest and the summary. Records are plain JSON (`to_record` /
`from_record`), which is also the wire format of the Ray driver.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def source_key(source: str | Path) -> str:
    """A stable id for a source video: its stem plus a short hash of its absolute path."""
    p = Path(source).resolve()
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in p.stem)[:40] or "video"
    return f"{stem}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"


def clip_id_for(source: str | Path, index: int) -> str:
    return f"{source_key(source)}-{index:04d}"


@dataclass
class Video:
    """A source video to split into clips (the input of the `scenes` stage)."""

    source: str


@dataclass
class Clip:
    clip_id: str
    source: str
    start_s: float
    end_s: float
    fps: float = 0.0
    width: int = 0
    height: int = 0
    status: str = "kept"  # kept | rejected
    reasons: list[str] = field(default_factory=list)
    # per-stage outputs, e.g. quality={"mean_luma": ..}, caption="...", subjects=[...]
    fields: dict[str, Any] = field(default_factory=dict)
    # stage name -> fingerprint of the stage config that produced its fields (resumability)
    stages_done: dict[str, str] = field(default_factory=dict)
    # stage name -> seconds spent on this clip
    timings: dict[str, float] = field(default_factory=dict)
    # stage name -> the reasons it gave (a rerun of a stage with a new config withdraws them)
    reasons_by_stage: dict[str, list[str]] = field(default_factory=dict)

    @property
    def kept(self) -> bool:
        return self.status == "kept"

    @property
    def duration(self) -> float:
        return max(0.0, self.end_s - self.start_s)

    def reject(self, reason: str) -> None:
        self.status = "rejected"
        if reason not in self.reasons:
            self.reasons.append(reason)

    def withdraw(self, stages: set[str]) -> None:
        """Forget the reasons given by `stages` (they are about to run again) and recompute the status."""
        for s in stages:
            self.reasons_by_stage.pop(s, None)
            self.stages_done.pop(s, None)
        self.reasons = [r for rs in self.reasons_by_stage.values() for r in rs]
        self.reasons = list(dict.fromkeys(self.reasons))
        self.status = "rejected" if self.reasons else "kept"

    def to_record(self) -> dict[str, Any]:
        rec = asdict(self)
        fields = rec.pop("fields")
        rec.update(fields)  # per-stage fields sit at the top level of the manifest line
        rec["_fields"] = sorted(fields)
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Clip:
        rec = dict(rec)
        names = rec.pop("_fields", [])
        fields = {k: rec.pop(k) for k in names if k in rec}
        known = {k: rec[k] for k in cls.__dataclass_fields__ if k in rec and k != "fields"}
        return cls(**known, fields=fields)

    def to_json(self) -> str:
        return json.dumps(self.to_record(), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> Clip:
        return cls.from_record(json.loads(line))
