"""Enhanced prompts remembered across runs, so that a rerun of a batch does not ask the model (or pay an API) again.

One JSON file beside the batch's videos (`<out-dir>/prompt_cache.json`), signed `made_by` like the sidecars: it
is read only when it carries that signature, and written atomically, only after every prompt of the run was
enhanced (a failed run writes nothing). The key of an entry is the sha256 of everything that decides the answer:
the prompt, each reference's bytes, the enhancer's identity (folder + config hash, or URL + model; sampling) and
the system prompt's text.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..fileio import claim_file, file_signed_by, path_text, write_text_atomic

CACHE_FILE = "prompt_cache.json"
VERSION = 1  # bump when the key's recipe changes


def reference_digest(ref) -> str:
    """A reference's content hash: its file's bytes, or an in-memory image's pixels (the built-in default)."""
    from .base import file_sha256

    if isinstance(ref, (str, os.PathLike)):
        return file_sha256(ref)
    from ..references import load_reference

    image = load_reference(ref)
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


def cache_key(prompt: str, references, identity: dict, system: str) -> str:
    blob = json.dumps({"version": VERSION, "prompt": prompt, "references": [reference_digest(r) for r in references],
                       "enhancer": identity, "system": hashlib.sha256(system.encode()).hexdigest()},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class PromptCache:
    """{key: {"prompt", "enhanced"}} in one signed JSON file; `claim` it before any work, `save` after."""

    def __init__(self, path: str | os.PathLike, made_by: str):
        self.path, self.made_by = Path(path), made_by
        self.entries: dict[str, dict] = {}
        self.changed = False

    def claim(self, overwrite: bool = False) -> PromptCache:
        """Check the file may be written (new, ours, or `overwrite`), then read it if it is ours."""
        claim_file(self.path, "--out-dir prompt cache", overwrite=overwrite, made_by=self.made_by)
        if file_signed_by(self.path, self.made_by):
            entries = json.loads(self.path.read_text(encoding="utf-8")).get("entries")
            self.entries = {k: v for k, v in (entries if isinstance(entries, dict) else {}).items()
                            if isinstance(v, dict) and isinstance(v.get("enhanced"), str) and v["enhanced"].strip()}
        else:
            self.changed = self.path.exists()  # someone else's file, replaced with --overwrite
        return self

    def get(self, key: str) -> str | None:
        entry = self.entries.get(key)
        return entry["enhanced"] if entry else None

    def put(self, key: str, prompt: str, enhanced: str) -> None:
        self.entries[key] = {"prompt": prompt, "enhanced": enhanced}
        self.changed = True

    def save(self) -> None:
        if self.changed:
            write_text_atomic(self.path, json.dumps({"made_by": self.made_by, "version": VERSION,
                                                     "entries": self.entries}, indent=1, ensure_ascii=False) + "\n")
            self.changed = False

    def __repr__(self) -> str:
        return f"PromptCache({path_text(self.path)}, {len(self.entries)} entries)"
