"""What every enhancer is: a chat model shown the system prompt, the user's prompt and (if it can see) the references.

An `Enhancer` answers one request at a time (`answer`) and says what it is twice: `record()` for sidecars and
manifests (kind, folder or URL, model), `identity()` for the prompt cache (the record plus what changes its answers:
config hash, sampling). Heavy state (a local model) loads on first use and goes with `close()`; `with enhancer:`
closes it too.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import UserInputError

SYSTEM_PROMPT_FILE = "prompt_system.txt"  # in kaleido_s2v/data/
MAX_IMAGE_SIDE = 1024  # references are shrunk to this longest side: a phone photo would be ~16k VLM tokens / 20 MB


@dataclass(frozen=True)
class Answer:
    text: str
    truncated: bool = False  # the model stopped at its token limit (the last sentence may be cut)


class Enhancer(ABC):
    flag: str  # the command-line flag that named it, for messages
    sees_images: bool  # False: a text-only model, shown only the prompt

    @abstractmethod
    def answer(self, system: str, user: str, images: list) -> Answer:
        """The model's raw answer to one request (`images`: PIL RGB, ignored by a text-only model)."""

    @abstractmethod
    def record(self) -> dict:
        """What ran, for sidecars and manifests: {"kind", "path" or "url", "model", "sees_images", "seed"}."""

    def identity(self) -> dict:
        """Everything that changes the answers (the prompt cache's key): by default the record."""
        return self.record()

    def close(self) -> None:
        """Release what `answer` loaded (a no-op for an endpoint)."""
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def system_prompt(path: str | Path | None = None) -> str:
    """The system prompt: the shipped `kaleido_s2v/data/prompt_system.txt`, or the user's file (`--enhancer-system`)."""
    if path is None:
        return resources.files("kaleido_s2v").joinpath("data", SYSTEM_PROMPT_FILE).read_text(encoding="utf-8").strip()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"--enhancer-system '{path}' cannot be read as UTF-8 text "
                             f"({type(e).__name__}): give a text file holding the system prompt") from None
    if not text:
        raise UserInputError(f"--enhancer-system '{path}' is empty: write the system prompt in it")
    return text


def user_message(prompt: str, num_references: int, sees_images: bool) -> str:
    """The user turn's text (the images, if any, come before it in the same turn)."""
    if num_references == 0:
        refs = "Reference images: none."
    elif sees_images:
        refs = f"Reference images: {num_references}, shown above in order (reference 1 first)."
    else:
        refs = f"Reference images: {num_references} (not shown to you)."
    return f"{refs}\nUser prompt: {prompt.strip()}"


def enhancer_images(references, flag: str = "--ref") -> list:
    """The references as the enhancer sees them: RGB (transparency on white, as the video model reads them),
    longest side at most `MAX_IMAGE_SIDE`, not padded to the video's size. Errors name `flag`."""
    from PIL import Image

    from ..references import load_reference

    out = []
    for j, ref in enumerate(references):
        image = load_reference(ref, f"{flag} image {j + 1}" if len(references) > 1 else f"{flag} image").copy()
        image.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE), Image.Resampling.LANCZOS)
        out.append(image)
    return out


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
