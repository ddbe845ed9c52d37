"""The batch runner's one-line errors in the page's words: its CLI flags become the page's field labels and the
server's upload paths the names of the files the user uploaded."""

from __future__ import annotations

import os
import re

# CLI flag -> the page's label (server.py uses the same labels)
FIELD_LABELS = {
    "--prompt": "Prompt",
    "--negative-prompt": "Negative prompt",
    "--ref": "Reference",
    "--seed": "Seed",
    "--height": "Height",
    "--width": "Width",
    "--frames": "Frames",
    "--steps": "Steps",
    "--guidance": "Guidance",
    "--fps": "FPS",
}
# the CLI's own phrasing for a single case, said the page's way (before the flags are renamed)
_PHRASES = {"(--ref IMAGE)": "(upload it under Reference images)"}
_SOURCE = "--prompt: "  # a single case's source, in front of some messages
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def page_message(message: str, uploads=()) -> str:
    """`message` with the flags the page has as fields renamed, and each upload's server path as its file name."""
    message = message.removeprefix(_SOURCE)
    for phrase, said in _PHRASES.items():
        message = message.replace(phrase, said)
    for path in uploads:
        path = os.fspath(path)
        message = message.replace(path, os.path.basename(path))
    text = _FLAG.sub(lambda m: FIELD_LABELS.get(m.group(0), m.group(0)), message)
    return text[:1].upper() + text[1:]
