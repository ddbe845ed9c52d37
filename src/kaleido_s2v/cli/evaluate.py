"""`kaleido-s2v evaluate`: score generated videos against their references and prompts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserInputError
from .options import add_dtype, add_overwrite, add_quiet


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..evaluation.registry import metrics_help

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (metrics_help() + "\n\nDefault: every metric whose model roles are configured. Outputs: "
                     "OUTPUT/scores.json, scores.csv, report.html. See docs/evaluate.md for every parameter.")
    parser.add_argument("--cases", required=True, type=Path,
                        help="JSONL, one case per line: id, video (relative to --videos), prompt, references "
                             "(paths relative to this file, or {path, label, kind}), optional labels")
    parser.add_argument("--videos", type=Path, default=None,
                        help="folder of the generated videos (default: the --cases file's folder, as for the "
                             "manifest.jsonl that `generate --batch` writes)")
    parser.add_argument("--models", type=Path, default=None,
                        help="YAML/JSON mapping model roles to local folders (see the roles below)")
    parser.add_argument("--output", "-o", required=True, type=Path, help="output folder")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated metric names (default: all whose models are configured)")
    parser.add_argument("--params", default=None,
                        help="JSON object or JSON/YAML file overriding metric parameters, e.g. "
                             "'{\"s2v\": {\"box_threshold\": 0.3}, \"text_alignment\": {\"frames\": 8}}'")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    add_dtype(parser, ("fp32", "fp16", "bf16"), "fp32",
              "model weights dtype (VBench ran CLIP in fp16 on GPU); default fp32")
    parser.add_argument("--batch-size", type=int, default=16, help="images per model forward (default 16)")
    parser.add_argument("--keep-going", action="store_true",
                        help="record a missing/corrupt video or a failing metric in scores.json and continue, "
                             "exit code 3 if any was recorded (default: stop with exit code 2)")
    add_overwrite(parser, "--output")
    parser.add_argument("--json", action="store_true", help="print the mean scores as JSON")
    add_quiet(parser, "hide the progress bar")


def _read_params(value: str | None) -> dict:
    if not value:
        return {}
    from kaleido_s2v.fileio import read_mapping

    if Path(value).is_file():
        data = read_mapping(value, "--params file", "metric names (or 's2v') to parameters")
    else:
        try:
            data = json.loads(value)
        except json.JSONDecodeError as e:
            raise UserInputError(f"--params '{value}' is neither a JSON object nor a readable JSON/YAML file") from e
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UserInputError("--params must map metric names (or 's2v') to objects of parameters")
    return data


def run(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate, read_cases, read_models
    from ..vision.common import resolve_dtype
    from . import EXIT_SKIPPED
    from .options import parse_device

    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    model_paths = read_models(args.models)
    cases = read_cases(args.cases, args.videos if args.videos is not None else args.cases.parent)
    params = _read_params(args.params)
    device = parse_device(args.device)
    scores = evaluate(cases, model_paths, args.output, metrics=metrics, device=str(device), batch_size=args.batch_size,
                      params=params, keep_going=args.keep_going, progress=not args.quiet,
                      dtype=resolve_dtype(args.dtype, device), overwrite=args.overwrite)
    summary = {"output": str(args.output), "cases": len(cases), "mean": scores["mean"],
               "errors": scores["errors"], "seconds_per_case": scores["run"]["seconds_per_case"]}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for m, v in scores["mean"].items():
            print(f"{m:24} {'n/a' if v is None else f'{v:.4f}'}")
        print(f"wrote {args.output / 'scores.json'}, scores.csv, report.html")
        if scores["errors"]:
            print(f"{len(scores['errors'])} case(s) could not be scored (see scores.json 'errors'); "
                  f"exit code {EXIT_SKIPPED}")
    return EXIT_SKIPPED if scores["errors"] else 0
