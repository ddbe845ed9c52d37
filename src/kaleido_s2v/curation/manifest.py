"""`OUTPUT/manifest.jsonl` (one line per clip) and the run summary (kept/rejected per reason, stage timings)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..fileio import write_text_atomic
from .tasks import Clip

MANIFEST = "manifest.jsonl"


def read_manifest(path: str | Path) -> list[Clip]:
    path = Path(path)
    if not path.is_file():
        return []
    return [Clip.from_json(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sort_clips(clips: list[Clip]) -> list[Clip]:
    return sorted(clips, key=lambda c: (c.source, c.start_s, c.clip_id))


def write_manifest(path: str | Path, clips: list[Clip]) -> None:
    write_text_atomic(path, "".join(c.to_json() + "\n" for c in sort_clips(clips)))


def summarize(clips: list[Clip], stage_stats: dict[str, dict[str, float]]) -> dict[str, Any]:
    reasons = Counter(r for c in clips for r in c.reasons)
    return {
        "clips": len(clips),
        "kept": sum(c.kept for c in clips),
        "rejected": sum(not c.kept for c in clips),
        "reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "stages": stage_stats,
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"clips {summary['clips']}: kept {summary['kept']}, rejected {summary['rejected']}"]
    if summary["reasons"]:
        lines.append(f"{'reason':<22}{'clips':>8}")
        lines += [f"{r:<22}{n:>8}" for r, n in summary["reasons"].items()]
    lines.append(f"{'stage':<12}{'processed':>10}{'cached':>8}{'rejected':>10}{'seconds':>10}")
    for name, st in summary["stages"].items():
        lines.append(f"{name:<12}{int(st.get('processed', 0)):>10}{int(st.get('cached', 0)):>8}"
                     f"{int(st.get('rejected', 0)):>10}{st.get('seconds', 0.0):>10.2f}")
    return "\n".join(lines)


def write_summary(output_dir: str | Path, summary: dict[str, Any]) -> None:
    output_dir = Path(output_dir)
    write_text_atomic(output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(output_dir / "summary.txt", format_summary(summary) + "\n")
