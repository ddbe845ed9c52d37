"""Flags and values that mean the same in every subcommand: one spelling, one check, one message.

Canonical spellings: `--quiet` (hides progress bars; `--no-progress` is a hidden alias), `--overwrite`,
`--frames`, dtype names `bf16`/`fp16`/`fp32` (`bfloat16`/`float16`/`float32` accepted as aliases).
"""

from __future__ import annotations

import argparse

from ..errors import UserInputError

DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def add_quiet(parser, help: str = "no progress bars") -> None:
    parser.add_argument("--quiet", action="store_true", help=help)
    parser.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)


def package_logging() -> None:
    """This package's progress notes (INFO) on stderr; the libraries' INFO chatter (e.g. temporary paths) not."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kaleido_s2v").setLevel(logging.INFO)


def hide_library_progress() -> None:
    """--quiet: also the loading bars of diffusers and transformers."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def add_overwrite(parser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} even if this command did not make it (default: refuse)")


def add_dtype(parser, choices: tuple[str, ...], default: str, help: str, flag: str = "--dtype") -> None:
    def dtype(text: str) -> str:
        return DTYPE_ALIASES.get(text, text)

    parser.add_argument(flag, type=dtype, choices=choices, default=default, help=help)


def parse_device(text: str | None, flag: str = "--device"):
    """A `torch.device` for `--device` (None/"auto": CUDA when available, else the CPU), checked to exist here."""
    import torch

    if text is None or text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UserInputError(f"{flag} {text!r} is not a device: give cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"{flag} {text}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        accelerator = getattr(torch, device.type, None)
        if accelerator is None or not getattr(accelerator, "is_available", lambda: False)():
            raise UserInputError(f"{flag} {text}: no {device.type} device is available here; use cpu or cuda")
    return device
