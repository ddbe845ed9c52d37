"""`python -m kaleido_s2v.toy make-data | make-eval | evaluate`: the procedural S2V world from the command line."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import UserInputError


def _world_args(p: argparse.ArgumentParser, default_mix: str) -> None:
    p.add_argument("--out", required=True, help="output folder (written atomically; replaced if it exists)")
    p.add_argument("--num", type=int, required=True, help="number of clips")
    p.add_argument("--seed", type=int, default=0, help="clip i depends only on (seed, i)")
    p.add_argument("--size", type=int, default=64, help="frame height in pixels (and width unless --width)")
    p.add_argument("--width", type=int, default=None, help="frame width in pixels (default: --size)")
    p.add_argument("--frames", type=int, default=9, help="frames per clip")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--ref-size", type=int, default=64, help="reference images are square, this many pixels")
    p.add_argument("--min-subjects", type=int, default=1)
    p.add_argument("--max-subjects", type=int, default=3)
    p.add_argument("--mix", default=default_mix, help=f"reference kinds crop:segment:crosspair:redux (default {default_mix})")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def _config(args):
    from .world import WorldConfig

    return WorldConfig(
        height=args.size,
        width=args.width or args.size,
        frames=args.frames,
        fps=args.fps,
        min_subjects=args.min_subjects,
        max_subjects=args.max_subjects,
        ref_size=args.ref_size,
    )


def _make(args, writer) -> int:
    from .world import parse_mix

    summary = writer(args.out, args.num, args.seed, _config(args), parse_mix(args.mix), progress=not args.json)
    if args.json:
        print(json.dumps(summary))
    else:
        kinds = ", ".join(f"{k} {v}" for k, v in summary["ref_types"].items())
        print(f"wrote {args.num} clips to {args.out} ({kinds})")
    return 0


def _make_data(args) -> int:
    from .world import make_dataset

    return _make(args, make_dataset)


def _make_eval(args) -> int:
    from .world import make_eval_cases

    return _make(args, make_eval_cases)


def _evaluate(args) -> int:
    from pathlib import Path

    from ..fileio import write_text_atomic
    from .evaluator import evaluate_folder

    report = evaluate_folder(args.cases, args.videos, control_seed=args.control_seed, progress=not args.json)
    if args.report:
        write_text_atomic(args.report, json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "per_case"}))
        return 0

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    print(f"{'':10s} {'recall':>8s} {'colour':>8s} {'motion':>8s} {'leak':>8s} {'bg dist':>8s}")
    for name in ("matched", "control"):
        s = report[name]
        if s is not None:
            print(f"{name:10s} {fmt(s['recall']):>8s} {fmt(s['colour_recall']):>8s} {fmt(s['motion']):>8s} "
                  f"{fmt(s['leak_rate']):>8s} {fmt(s['bg_target']):>8s}")
    print(f"{report['matched']['cases']} cases, videos from {Path(report['videos'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .world import EVAL_MIX, TRAIN_MIX

    parser = argparse.ArgumentParser(prog="python -m kaleido_s2v.toy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-data", help="write a training folder (videos/, labels/, references/, manifest.jsonl)")
    _world_args(p, ":".join(map(str, TRAIN_MIX)))
    p.set_defaults(func=_make_data)
    p = sub.add_parser("make-eval", help="write evaluation cases (same layout; crops come from other backgrounds)")
    _world_args(p, ":".join(map(str, EVAL_MIX)))
    p.set_defaults(func=_make_eval)
    p = sub.add_parser("evaluate", help="score <clip_id>.mp4 videos against the cases, with a shuffled control")
    p.add_argument("--cases", required=True, help="folder written by make-eval (or make-data)")
    p.add_argument("--videos", default=None, help="folder of <clip_id>.mp4 (default: the cases' ground truth)")
    p.add_argument("--control-seed", type=int, default=0, help="seed of the shuffled-reference control")
    p.add_argument("--report", default=None, help="write the full report (per case) as JSON here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_evaluate)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserInputError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
