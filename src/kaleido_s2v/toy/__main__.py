"""`python -m kaleido_s2v.toy <command>`: the procedural S2V world and the built-in model's recipe (docs/toy.md)."""

from __future__ import annotations

import argparse
import json
import sys

from ..cli.options import add_dtype, add_overwrite
from ..errors import check_at_least, check_seed

PROG = "python -m kaleido_s2v.toy"


def _world_args(p: argparse.ArgumentParser, default_mix: str) -> None:
    p.add_argument("--out", required=True, help="output folder (written atomically; a rerun replaces what an earlier "
                   "run wrote)")
    add_overwrite(p, "--out")
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
    p.add_argument("--caption-style", default="full", choices=["full", "no-colour", "mixed"],
                   help="no-colour: captions leave subject colours to the references; mixed: half of the clips each")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def _config(args):
    from .world import WorldConfig

    return WorldConfig(
        height=args.size,
        width=args.size if args.width is None else args.width,
        frames=args.frames,
        fps=args.fps,
        min_subjects=args.min_subjects,
        max_subjects=args.max_subjects,
        ref_size=args.ref_size,
        caption_style=args.caption_style,
    )


def _make(args, writer) -> int:
    from .world import parse_mix

    check_seed(args.seed)
    summary = writer(args.out, args.num, args.seed, _config(args), parse_mix(args.mix), progress=not args.json,
                     overwrite=args.overwrite)
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

    from ..fileio import claim_file, write_text_atomic
    from .evaluator import evaluate_folder
    from .model import MADE_BY

    if args.report:
        claim_file(args.report, "--report", overwrite=args.overwrite, made_by=MADE_BY["evaluate"])
    check_seed(args.control_seed, "--control-seed")
    check_at_least(args.limit, "--limit", 1)
    report = evaluate_folder(args.cases, args.videos, control_seed=args.control_seed, limit=args.limit,
                             progress=not args.json)
    if args.report:
        write_text_atomic(args.report, json.dumps({"made_by": MADE_BY["evaluate"], **report}, indent=1) + "\n")
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


def _init_model(args) -> int:
    from .model import init_model, load_recipe

    check_seed(args.seed)
    out = init_model(args.out, load_recipe(args.recipe), args.seed, overwrite=args.overwrite)
    print(json.dumps({"model": str(out)}) if args.json else f"wrote a randomly initialised model to {out}")
    return 0


def _train_vae(args) -> int:
    from .model import load_recipe, train_vae

    check_at_least(args.steps, "--steps", 0)
    s = train_vae(args.model, load_recipe(args.recipe), steps=args.steps, progress=not args.json)
    print(json.dumps(s) if args.json else f"trained the VAE for {s['steps']} steps in {s['seconds']:.0f} s; "
          f"last loss {s['last']['loss'] if s['last'] else float('nan'):.4f}")
    return 0


def _train_text(args) -> int:
    from .model import load_recipe, train_text

    check_at_least(args.steps, "--steps", 0)
    s = train_text(args.model, args.data, load_recipe(args.recipe), steps=args.steps, progress=not args.json)
    print(json.dumps(s) if args.json else f"trained the text encoder for {s['steps']} steps on {s['captions']} "
          f"captions in {s['seconds']:.0f} s; masked-byte accuracy {s['accuracy'] or float('nan'):.3f}")
    return 0


def _train_config(args) -> int:
    from ..fileio import claim_file, write_text_atomic
    from .model import MADE_BY, load_recipe, train_config

    if args.out:
        claim_file(args.out, "--out", overwrite=args.overwrite, made_by=MADE_BY["train-config"])
    text = train_config(load_recipe(args.recipe), model=args.model, data=args.data, output=args.output)
    if args.out:
        write_text_atomic(args.out, text)
    else:
        print(text, end="")
    return 0


def _generate(args) -> int:
    from .model import generate_cases

    check_seed(args.seed)
    check_seed(args.shuffle_refs, "--shuffle-refs")
    check_at_least(args.steps, "--steps", 1)
    check_at_least(args.limit, "--limit", 1)
    check_at_least(args.guidance, "--guidance", 0)
    summary = generate_cases(args.model, args.cases, args.out, steps=args.steps, guidance=args.guidance,
                             seed=args.seed, limit=args.limit, shuffle_refs=args.shuffle_refs,
                             progress=not args.json, overwrite=args.overwrite)
    print(json.dumps(summary) if args.json else f"wrote {summary['cases']} videos to {summary['videos']}")
    return 0


def _assemble(args) -> int:
    from .model import assemble

    print(f"wrote {assemble(args.model, args.transformer, args.out, transformer_dtype=args.transformer_dtype, overwrite=args.overwrite)}")
    return 0


def _reproduce(args) -> int:
    from ..cli.options import package_logging
    from .model import load_recipe
    from .reproduce import reproduce

    package_logging()
    s = reproduce(args.work, load_recipe(args.recipe), progress=not args.json,
                  log=(lambda msg: print(msg, file=sys.stderr)) if args.json else print, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(s))
    else:
        m, c = s["matched"], s["control"]
        scores = ", ".join(f"{k} {'-' if m[k] is None else f'{m[k]:.2f}'}" for k in ("recall", "colour_recall", "motion", "leak_rate"))
        print(f"weights in {s['weights']}; {m['cases']} eval cases: {scores} "
              f"(shuffled control: recall {c['recall']:.2f}, colour_recall {c['colour_recall']:.2f})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .world import EVAL_MIX, TRAIN_MIX

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
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
    p.add_argument("--limit", type=int, default=None, help="only the first N cases (as `generate --limit`)")
    p.add_argument("--report", default=None, help="write the full report (per case) as JSON here")
    add_overwrite(p, "--report")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_evaluate)

    recipe_help = "recipe YAML (default: the shipped kaleido_s2v/toy/recipe.yaml)"
    p = sub.add_parser("init-model", help="write a randomly initialised pipeline folder at the recipe's sizes")
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", default=None, help=recipe_help)
    p.add_argument("--seed", type=int, default=None, help="init seed (default: the recipe's)")
    add_overwrite(p, "--out")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_init_model)
    p = sub.add_parser("train-vae", help="train the folder's VAE on the toy world and store its latent statistics")
    p.add_argument("--model", required=True, help="folder written by init-model (its vae/ is replaced)")
    p.add_argument("--recipe", default=None, help=recipe_help)
    p.add_argument("--steps", type=int, default=None, help="override vae_training.steps")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_train_vae)
    p = sub.add_parser("train-text", help="train the folder's text encoder on the training captions (masked LM)")
    p.add_argument("--model", required=True, help="folder written by init-model (its text_encoder/ is replaced)")
    p.add_argument("--data", required=True, help="training folder written by make-data (its captions)")
    p.add_argument("--recipe", default=None, help=recipe_help)
    p.add_argument("--steps", type=int, default=None, help="override text_training.steps")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_train_text)
    p = sub.add_parser("train-config", help="write the `kaleido-s2v train --config` YAML for the transformer")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="folder written by make-data")
    p.add_argument("--output", required=True, help="the training run's folder")
    p.add_argument("--recipe", default=None, help=recipe_help)
    p.add_argument("--out", default=None, help="YAML file to write (default: print)")
    add_overwrite(p, "--out")
    p.set_defaults(func=_train_config)
    p = sub.add_parser("assemble", help="the model folder with a trained transformer (a run's final/transformer)")
    p.add_argument("--model", required=True)
    p.add_argument("--transformer", required=True)
    p.add_argument("--out", required=True)
    add_dtype(p, ("fp32", "fp16"), "fp32", "storage precision of the transformer's weights (fp16: half the bytes; "
              "loads as fp32)", flag="--transformer-dtype")
    add_overwrite(p, "--out")
    p.set_defaults(func=_assemble)
    p = sub.add_parser("reproduce", help="every stage above in one call: data, model, cache, transformer, weights, "
                       "evaluation (resumes: a second call only finishes what is missing)")
    p.add_argument("--work", required=True, help="work folder (data/, model/, cache/, run/, weights/, report.json)")
    p.add_argument("--recipe", default=None, help=recipe_help)
    p.add_argument("--json", action="store_true", help="print the summary as JSON (stage lines go to stderr)")
    add_overwrite(p, "--work")
    p.set_defaults(func=_reproduce)
    p = sub.add_parser("generate", help="generate <clip_id>.mp4 for every case of a make-eval folder with a model")
    p.add_argument("--model", required=True, help="a pipeline folder (e.g. from assemble)")
    p.add_argument("--cases", required=True)
    p.add_argument("--out", required=True, help="folder for the videos (then: evaluate --videos)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's generation defaults)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the first N cases")
    p.add_argument("--shuffle-refs", type=int, default=None, metavar="SEED",
                   help="control: give each case another case's references (seeded derangement)")
    add_overwrite(p, "--out")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_generate)
    return parser


def main(argv=None) -> int:
    from ..cli import guarded

    args = build_parser().parse_args(argv)
    return guarded(f"{PROG} {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
