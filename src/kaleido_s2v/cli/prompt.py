"""`kaleido-s2v prompt`: print the prompt `generate --enhance-prompt` would generate with (docs/prompts.md).

The user's prompt and references go to a chat model (a local folder, or an OpenAI-compatible endpoint) that
rewrites the prompt in the long caption style the model was trained on; the caption goes to stdout (`--json`: the
original, the caption, the enhancer, the seconds taken). Nothing is written.
"""

from __future__ import annotations

import argparse
import json
import time

from kaleido_s2v.cli.options import add_enhancer_options, add_quiet
from kaleido_s2v.errors import UserInputError, check_text

IMPORTS = ("torch", "transformers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        '  kaleido-s2v prompt --prompt "a fox pushes a toy car" --ref fox.png --ref car.png --enhancer Qwen2.5-VL-7B-Instruct\n'
        '  kaleido-s2v prompt --prompt "..." --ref a.png --enhancer-url http://127.0.0.1:8000/v1 '
        "--enhancer-model Qwen/Qwen2.5-VL-7B-Instruct\n"
        "see docs/prompts.md for the system prompt, models and servers."
    )
    parser.add_argument("--prompt", required=True, help="the user's prompt")
    parser.add_argument("--ref", action="append", default=[], metavar="IMAGE",
                        help="reference image, repeatable, in the order generate gets them")
    parser.add_argument("--model", metavar="DIR", help="the video model the prompt is for: its tokenizer and "
                        "max_sequence_length bound the caption (default: 512 text-encoder tokens, estimated from "
                        "the word count)")
    add_enhancer_options(parser)
    parser.add_argument("--json", action="store_true", help="print {original, enhanced, enhancer, seconds} as JSON")
    add_quiet(parser)


def run(args: argparse.Namespace) -> int:
    from kaleido_s2v.cli.options import enhancer_from_args, hide_library_progress, package_logging
    from kaleido_s2v.prompts import enhance_prompt, tokenizer_counter
    from kaleido_s2v.prompts.base import enhancer_images
    from kaleido_s2v.prompts.rewrite import DEFAULT_LIMIT

    package_logging()
    if args.quiet:
        hide_library_progress()
    if not args.prompt.strip():
        raise UserInputError("--prompt: the prompt is empty: describe the video to generate")
    check_text(args.prompt, "--prompt")
    enhancer, system = enhancer_from_args(args)
    images = enhancer_images(args.ref, "--ref")  # every reference checked before a model loads
    count, limit = tokenizer_counter(None), DEFAULT_LIMIT
    if args.model is not None:
        from kaleido_s2v.model_folder import facts, resolve_model_folder

        folder = resolve_model_folder(args.model, "--model")
        count, limit = tokenizer_counter(folder), facts(folder).sampling_defaults["max_sequence_length"]
    start = time.perf_counter()
    with enhancer:
        enhanced = enhance_prompt(args.prompt, args.ref, enhancer, system=system, count_tokens=count, limit=limit,
                                  images=images if enhancer.sees_images else [])
    seconds = round(time.perf_counter() - start, 3)
    if args.json:
        print(json.dumps({"original": args.prompt, "enhanced": enhanced, "enhancer": enhancer.record(),
                          "references": args.ref, "seconds": seconds}, indent=2, ensure_ascii=False))
    else:
        print(enhanced)
    return 0
