"""`kaleido-s2v` command line: one module per subcommand, imported only when that subcommand runs.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`, and keeps heavy imports
inside `run` so that `--help` stays fast; `IMPORTS` names the heavy libraries it needs (loaded up front, see
`guarded`). Exit codes (docs/errors.md): 0 done, 2 bad input (one line on stderr, nothing written),
3 done but some inputs were skipped (`--keep-going`), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from importlib import import_module
from importlib.util import find_spec

EXIT_BAD_INPUT = 2
EXIT_SKIPPED = 3  # --keep-going skipped some inputs; what could be done was done
EXIT_INTERRUPTED = 130

# name -> (module, one-line help). Order is the order shown by --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("kaleido_s2v.cli.generate", "generate a video from reference images and a prompt"),
    "prompt": ("kaleido_s2v.cli.prompt", "rewrite a prompt in the training-caption style with a chat model"),
    "convert": ("kaleido_s2v.cli.convert", "convert the official Kaleido / Wan2.1 release to a diffusers folder"),
    "train": ("kaleido_s2v.cli.train", "fine-tune (full or LoRA) on S2V data, one process to many nodes"),
    "curate": ("kaleido_s2v.cli.curate", "build S2V training data from raw videos"),
    "evaluate": ("kaleido_s2v.cli.evaluate", "score generated videos (S2V consistency, decoupling, quality, ...)"),
    "app": ("kaleido_s2v.cli.app", "serve a local web page (Gradio) and API that generate videos"),
    "info": ("kaleido_s2v.cli.info", "print versions, devices and the available R-RoPE variants"),
}
# Libraries whose import runs C++ that calls back into Python (pybind11): a Ctrl-C landing inside it can abort
# the process ("terminate called after throwing pybind11::error_already_set", exit 134) instead of raising.
HEAVY_IMPORTS = ("torch", "diffusers", "transformers", "onnxruntime")


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, then raise it as `KeyboardInterrupt` at a safe point."""
    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


def preload(modules) -> None:
    """Import the heavy libraries a command needs (those installed) with Ctrl-C held back."""
    with deferred_sigint():
        for name in modules:
            if find_spec(name) is not None:
                import_module(name)


def guarded(prog: str, run: Callable[[], int], imports=HEAVY_IMPORTS) -> int:
    """Run a command the way every entry point does: offline, heavy imports first, errors as one line."""
    from kaleido_s2v.errors import UserInputError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from local folders only: never the Hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        preload(imports)
        return int(run() or 0)
    except UserInputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _top_parser() -> argparse.ArgumentParser:
    from kaleido_s2v import __version__

    parser = argparse.ArgumentParser(
        prog="kaleido-s2v",
        description="Kaleido multi-subject reference-to-video generation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
        + "\n\nrun `kaleido-s2v COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"kaleido-s2v {__version__}")
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        args = parser.parse_args(argv[:1])  # prints help/version or an "invalid choice" error (exit 2)
        if args.command is None:  # no subcommand: the usage, and the exit code of any other usage error
            parser.print_help(sys.stderr)
            return EXIT_BAD_INPUT
    name, rest = argv[0], argv[1:]
    module = import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"kaleido-s2v {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return guarded(f"kaleido-s2v {name}", lambda: module.run(args), getattr(module, "IMPORTS", HEAVY_IMPORTS))


if __name__ == "__main__":
    sys.exit(main())
