"""Reading `--cases` (JSONL) and `--models` (YAML/JSON: role -> local folder)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserInputError
from ..fileio import read_mapping
from .registry import ROLES

REFERENCE_KINDS = ("subject", "face", "scene")


@dataclass(frozen=True)
class Reference:
    path: Path
    label: str | None = None  # subject noun for Grounding DINO ("girl", "toy car"); None -> default label
    kind: str = "subject"  # subject | face | scene (scene references are excluded from the S2V metrics)


@dataclass(frozen=True)
class Case:
    id: str
    video: Path
    prompt: str = ""
    references: tuple[Reference, ...] = field(default_factory=tuple)


def _reference(item, base: Path, where: str) -> Reference:
    if isinstance(item, str):
        item = {"path": item}
    if not isinstance(item, dict) or not isinstance(item.get("path"), str):
        raise UserInputError(f"{where}: a reference must be a path or {{\"path\": ..., \"label\": ...}}")
    kind = item.get("kind", "subject")
    if kind not in REFERENCE_KINDS:
        raise UserInputError(f"{where}: reference kind '{kind}' is not one of {', '.join(REFERENCE_KINDS)}")
    path = Path(item["path"]).expanduser()
    label = item.get("label")
    return Reference(path if path.is_absolute() else base / path, str(label) if label else None, kind)


def read_cases(cases_file: str | os.PathLike, videos_dir: str | os.PathLike) -> list[Case]:
    """One JSON object per line: `id`, `video` (relative to `videos_dir`), `prompt`, `references`.

    A reference is a path (relative to the cases file's folder, or absolute) or an object
    `{"path", "label", "kind"}`; a case may instead give `labels` (one per reference). Files are checked here,
    so a missing video or image stops the run before any model loads.
    """
    cases_file, videos_dir = Path(cases_file), Path(videos_dir)
    if not cases_file.is_file():
        what = "is a folder" if cases_file.is_dir() else "does not exist"
        raise UserInputError(f"cases file '{cases_file}' {what}: give a JSONL file, one case per line")
    if not videos_dir.is_dir():
        raise UserInputError(f"videos folder '{videos_dir}' does not exist: give the folder of generated videos")
    base = cases_file.parent
    cases, seen = [], set()
    try:
        text = cases_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserInputError(f"cases file '{cases_file}' is not UTF-8 text: give a JSONL file, one case per line") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{cases_file}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserInputError(f"{where}: not valid JSON ({e.msg}): one JSON object per line") from e
        if not isinstance(rec, dict) or "id" not in rec or "video" not in rec:
            raise UserInputError(f"{where}: each case needs 'id' and 'video' (and 'prompt', 'references')")
        cid = str(rec["id"])
        if cid in seen:
            raise UserInputError(f"{where}: duplicate case id '{cid}': ids must be unique")
        seen.add(cid)
        refs_raw = rec.get("references", []) or []
        if not isinstance(refs_raw, list):
            raise UserInputError(f"{where}: 'references' must be a list of image paths")
        refs = [_reference(r, base, where) for r in refs_raw]
        labels = rec.get("labels")
        if labels is not None:
            if not isinstance(labels, list) or len(labels) != len(refs):
                raise UserInputError(f"{where}: 'labels' must list one subject noun per reference")
            refs = [Reference(r.path, r.label or (str(lb) if lb else None), r.kind) for r, lb in zip(refs, labels)]
        video = Path(rec["video"]).expanduser()
        video = video if video.is_absolute() else videos_dir / video
        if not video.is_file():
            raise UserInputError(f"{where}: video '{video}' of case '{cid}' does not exist: check --videos")
        for r in refs:
            if not r.path.is_file():
                raise UserInputError(f"{where}: reference image '{r.path}' of case '{cid}' does not exist")
        prompt = rec.get("prompt") or ""
        if not isinstance(prompt, str):
            raise UserInputError(f"{where}: 'prompt' must be a string")
        cases.append(Case(cid, video, prompt, tuple(refs)))
    if not cases:
        raise UserInputError(f"cases file '{cases_file}' has no cases: one JSON object per line")
    return cases


def read_models(models_file: str | os.PathLike | None) -> dict[str, Path]:
    """YAML or JSON mapping role -> local model folder (relative paths are relative to the file's folder)."""
    if models_file is None:
        return {}
    models_file = Path(models_file)
    data = read_mapping(models_file, "models file", "roles to folders, e.g. `clip: /models/clip`")
    out = {}
    for role, folder in data.items():
        if role not in ROLES:
            raise UserInputError(f"models file '{models_file}': unknown role '{role}' (known: {', '.join(ROLES)})")
        if folder in (None, ""):
            continue
        path = Path(str(folder)).expanduser()
        path = path if path.is_absolute() else models_file.parent / path
        if not path.exists():
            raise UserInputError(f"models file '{models_file}': folder for role '{role}' not found: '{path}'")
        out[role] = path
    return out
