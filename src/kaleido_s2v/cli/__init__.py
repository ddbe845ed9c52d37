"""`kaleido-s2v` command line: one module per subcommand, imported only when that subcommand runs.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`, and keeps heavy imports
inside `run` so that `--help` stays fast. `UserInputError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

# name -> (module, one-line help). Order is the order shown by --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("kaleido_s2v.cli.generate", "generate a video from reference images and a prompt"),
    "convert": ("kaleido_s2v.cli.convert", "convert the official Kaleido / Wan2.1 release to a diffusers folder"),
    "train": ("kaleido_s2v.cli.train", "fine-tune (full or LoRA) on S2V data, one process to many nodes"),
    "curate": ("kaleido_s2v.cli.curate", "build S2V training data from raw videos"),
    "evaluate": ("kaleido_s2v.cli.evaluate", "score generated videos (S2V consistency, decoupling, quality, ...)"),
    "info": ("kaleido_s2v.cli.info", "print versions, devices and the available R-RoPE variants"),
}


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
        if args.command is None:
            parser.print_help()
            return 0
    name, rest = argv[0], argv[1:]
    module = import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"kaleido-s2v {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)

    from kaleido_s2v.errors import UserInputError

    try:
        return int(module.run(args) or 0)
    except UserInputError as e:
        print(f"kaleido-s2v {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kaleido-s2v {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
