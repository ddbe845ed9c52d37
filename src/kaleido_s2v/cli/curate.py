"""`kaleido-s2v curate`: build S2V training data from raw videos (the paper's data pipeline)."""

from __future__ import annotations

import argparse
import json
import sys

from .options import add_overwrite, add_quiet

IMPORTS = ("torch", "cv2")

STAGE_HELP = "scenes,quality,caption,subjects,ground,segment,filter,face,crosspair,inpaint,redux,export"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="folder of videos (searched recursively), a video, or a "
                        ".txt list of video paths")
    parser.add_argument("--output", required=True, help="output folder (manifest.jsonl, clips/, subjects/, ...); "
                        "rerunning into the same folder resumes")
    parser.add_argument("--stages", default="scenes,quality", help=f"comma-separated stages, run in this order; any "
                        f"prefix or subset of {STAGE_HELP} (default: scenes,quality)")
    parser.add_argument("--config", help="YAML/JSON file: stage name -> settings (thresholds, local model folders)")
    parser.add_argument("--executor", choices=["local", "ray"], default=None,
                        help="local: plain loop (default); ray: Ray Data (implied by --ray-address or --workers > 1)")
    parser.add_argument("--ray-address", help="Ray cluster address (e.g. ray://head:10001 or auto); default: a local "
                        "Ray started for this run")
    parser.add_argument("--workers", type=int, default=None, help="Ray: parallel tasks / actors per stage")
    parser.add_argument("--no-clips", action="store_true", help="do not write OUTPUT/clips/<clip_id>.mp4")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    add_overwrite(parser, "--output")
    add_quiet(parser)


def run(args) -> int:
    from kaleido_s2v.curation.config import load_config, parse_stage_list
    from kaleido_s2v.curation.manifest import format_summary
    from kaleido_s2v.curation.runner import run_pipeline
    from kaleido_s2v.errors import UserInputError

    stages = parse_stage_list(args.stages)
    config = load_config(args.config)
    if args.workers is not None and args.workers < 1:
        raise UserInputError(f"--workers must be >= 1, got {args.workers}")
    use_ray = args.executor == "ray" or (args.executor is None and (args.ray_address or (args.workers or 1) > 1))
    executor = None
    if use_ray:
        from kaleido_s2v.curation.ray_driver import RayExecutor

        executor = RayExecutor(address=args.ray_address, workers=args.workers or 1)
    try:
        result = run_pipeline(args.input, args.output, stages, config, executor=executor,
                              progress=not args.quiet and not args.json, write_clips=not args.no_clips,
                              overwrite=args.overwrite)
    finally:
        if executor is not None:
            executor.shutdown()
    if args.json:
        print(json.dumps(result.summary, indent=2))
    else:
        print(format_summary(result.summary), file=sys.stdout)
        print(f"manifest: {args.output}/manifest.jsonl")
    return 0
