"""`kaleido-s2v generate`: reference images + prompt -> mp4 (+ JSON sidecar), one case or a batch file.

Argument parsing around `kaleido_s2v.batch`: every input is checked and every output claimed before the model
loads. Under `torchrun --nproc_per_node K -m kaleido_s2v generate ...` each video's token sequence is sharded over
the K ranks (context parallelism) and rank 0 writes; `--split-cases` makes the ranks share a batch instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kaleido_s2v.cli.options import (
    ENHANCER_FLAGS,
    add_dtype,
    add_enhancer_options,
    add_memory_options,
    add_overwrite,
    add_quiet,
    add_speed_options,
)
from kaleido_s2v.errors import UserInputError, check_at_least, check_seed

DTYPES = ("bf16", "fp16", "fp32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        '  kaleido-s2v generate --prompt "a red ball rolls" -o demo.mp4            # built-in small model, CPU\n'
        '  kaleido-s2v generate --model Kaleido-diffusers --prompt "..." --ref a.png --ref b.png -o out.mp4\n'
        "  kaleido-s2v generate --model DIR --batch cases.txt --out-dir outs/     # lines: prompt@@img1@@img2\n"
        '  kaleido-s2v generate --model MAGREF-diffusers --prompt "..." --ref a.png --layout grid -o out.mp4\n'
        "  kaleido-s2v evaluate --cases outs/manifest.jsonl --models models.yaml -o scores/   # score the batch\n"
        '  kaleido-s2v generate --model DIR --prompt "a fox pushes a toy car" --ref fox.png --ref car.png \\\n'
        "      --enhance-prompt --enhancer Qwen2.5-VL-7B-Instruct     # rewrite the prompt first (docs/prompts.md)\n"
        "  torchrun --nproc_per_node 8 -m kaleido_s2v generate --model DIR ...    # context parallel on 8 GPUs\n"
        "see docs/generate.md for memory recipes (24 GB GPUs) and multi-GPU use."
    )
    io = parser.add_argument_group("model and inputs")
    io.add_argument("--model", metavar="DIR", help="diffusers-format Kaleido or MAGREF folder, or an official release "
                    "with --convert (default: the built-in model)")
    io.add_argument("--convert", action="store_true", help="convert an official release folder given to --model")
    io.add_argument("--prompt", help="the caption of the video")
    io.add_argument("--ref", action="append", default=[], metavar="IMAGE", help="reference image (repeatable)")
    io.add_argument("--negative-prompt", help="default: the model's (Kaleido's release: Wan2.1's minus one phrase; "
                    "MAGREF's: 'camera shake,' + Wan2.1's)")
    io.add_argument("-o", "--output", default="output.mp4", help="output video (.mp4); a .json sidecar goes beside")
    io.add_argument("--batch", metavar="FILE", help="one case per line: prompt@@img1@@img2 (MAGREF: "
                    "key@@prompt@@img1@@img2, writing <key>.mp4; paths relative to FILE) "
                    "or JSONL {prompt, references, seed?, output?, negative_prompt?}")
    io.add_argument("--out-dir", metavar="DIR", help="output folder of --batch (default: <FILE stem>_videos/), with "
                    "manifest.jsonl for `kaleido-s2v evaluate --cases`")
    io.add_argument("--keep-going", action="store_true",
                    help="skip bad --batch lines instead of stopping (exit code 3 when any was skipped)")
    io.add_argument("--split-cases", action="store_true",
                    help="under torchrun: ranks share the --batch cases instead of sharding each video")
    io.add_argument("--max-references", type=int, help="refuse more references than this (default: Kaleido 4, "
                    "MAGREF 8)")
    io.add_argument("--official-prompt-quirk", action="store_true",
                    help="encode the whole `prompt@@path1@@path2` line as the release's script did")
    add_overwrite(io, "an existing output video or .json sidecar")

    s = parser.add_argument_group("sampling (defaults: the model's; Kaleido's release 512x896, 81 frames, 50 steps, "
                                  "CFG 6, 16 fps; MAGREF's 480x832, 81 -> 77 frames, 40 steps, CFG 5, 15 fps)")
    s.add_argument("--height", type=int)
    s.add_argument("--width", type=int)
    s.add_argument("--frames", type=int, help="number of frames, 4k+1 (both releases: 81)")
    s.add_argument("--num-frames", dest="frames", type=int, help=argparse.SUPPRESS)
    s.add_argument("--steps", type=int, help="denoising steps")
    s.add_argument("--guidance", type=float, help="CFG scale (1: no guidance)")
    s.add_argument("--seed", type=int, help="random seed (default: random, recorded in the sidecar)")
    s.add_argument("--fps", type=int, help="frame rate of the mp4")
    s.add_argument("--max-sequence-length", type=int, help="text tokens (default: the model's; release: 512)")
    s.add_argument("--layout", choices=("release", "grid"), help="MAGREF: where references go on the canvas: "
                   "release (default; three columns, the weights' commit) or grid (1-8 blocks)")
    s.add_argument("--layout-seed", type=int, help="MAGREF --layout grid: shuffle the blocks reproducibly "
                   "(default: references in order)")

    d = parser.add_argument_group("device and memory")
    d.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    add_dtype(d, ("auto", *DTYPES), "auto", "auto: bf16 on CUDA, fp32 on CPU")
    add_memory_options(d)
    f = parser.add_argument_group("speed (docs/generate.md#speed)")
    from kaleido_s2v.speed import CACHE_MODES

    add_speed_options(f, CACHE_MODES)
    d.add_argument("--text-encoder-device", choices=("gpu", "cpu"), default="gpu",
                   help="where the prompts are encoded before the transformer loads: gpu (the --device; the text "
                   "encoder is freed afterwards) or cpu (as the releases' --t5_cpu)")
    add_enhancer_options(parser, "--enhance-prompt")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    add_quiet(parser)


def _magcache(args, model, steps: int) -> list[float] | None:
    """MagCache's ratios for this run (`--cache magcache`), or the check that a calibration may be written."""
    if args.cache == "magcache":
        from kaleido_s2v.generation import magcache_ratios

        return magcache_ratios(model, steps)
    if args.cache == "magcache-calibrate":
        if model.builtin:
            raise UserInputError("--cache magcache-calibrate stores the ratios in the model folder: give --model DIR "
                                 "(the built-in model's folder is part of the package)")
        from kaleido_s2v import speed
        from kaleido_s2v.fileio import claim_file

        claim_file(model.model_dir / speed.CALIBRATION_FILE, "--cache magcache-calibrate", overwrite=args.overwrite,
                   made_by=speed.MADE_BY)
    return None


def _capturing(calibrating: bool):
    import contextlib

    from kaleido_s2v.speed import capturing_magcache_ratios

    return capturing_magcache_ratios() if calibrating else contextlib.nullcontext([])


def _store_calibration(model_dir, args, steps: int, captured: list[list[float]]) -> None:
    """The mean of the ratio lists the run measured (every case and CFG branch), into the model folder."""
    import numpy as np

    from kaleido_s2v.fileio import path_text
    from kaleido_s2v.speed import write_magcache_ratios

    lists = [r for r in captured if len(r) == steps]
    if not lists:
        raise UserInputError("--cache magcache-calibrate: diffusers reported no ratios for this run; nothing stored")
    path = write_magcache_ratios(model_dir, args.sampler, steps, list(np.mean(lists, axis=0)), args.overwrite)
    print(f"stored MagCache ratios for {steps} steps of the {args.sampler} sampler in {path_text(path)}",
          file=sys.stderr)


def _family_options(args, family) -> dict:
    """The family's own pipeline arguments from their flags (MAGREF's --layout, --layout-seed)."""
    if args.official_prompt_quirk and family.name != "kaleido":
        raise UserInputError(f"--official-prompt-quirk reproduces Kaleido's release script: drop it for this "
                             f"{family.name.upper()} model")
    if "layout" not in family.options:
        if args.layout is not None or args.layout_seed is not None:
            raise UserInputError("--layout/--layout-seed place references on MAGREF's canvas: drop them for a "
                                 f"{family.name.capitalize()} model")
        return {}
    if args.layout_seed is not None and args.layout != "grid":
        raise UserInputError("--layout-seed shuffles the grid layout (the release layout has no shuffle): add "
                             "--layout grid or drop --layout-seed")
    return {"layout": args.layout or "release", "layout_seed": args.layout_seed}


def _cases(args, builtin: bool, settings: dict, family):
    """Every case, checked and its outputs claimed (bad batch lines skipped with --keep-going), and the manifest."""
    from kaleido_s2v import batch

    check = dict(max_references=args.max_references, builtin=builtin, overwrite=args.overwrite, family=family)
    if args.batch is None:
        if args.prompt is None:
            raise UserInputError("give --prompt TEXT (and --ref IMAGE ...), or --batch FILE")
        if args.out_dir is not None:
            raise UserInputError("--out-dir applies to --batch; for one video give -o/--output FILE.mp4")
        case = batch.single_case(args.prompt, args.ref, args.output, seed=args.seed,
                                 negative_prompt=args.negative_prompt, official_prompt_quirk=args.official_prompt_quirk)
        return [batch.prepare_case(case, settings, **check)], [], None
    if args.prompt is not None or args.ref:
        raise UserInputError("--batch FILE replaces --prompt/--ref: give one or the other")
    cases, skipped, decoded = [], [], {}
    out_dir = Path(args.out_dir) if args.out_dir else batch.default_out_dir(args.batch)
    entries = batch.batch_cases(args.batch, out_dir, seed=args.seed, negative_prompt=args.negative_prompt,
                                official_prompt_quirk=args.official_prompt_quirk, keyed=family.keyed_batch)
    for entry in entries:
        try:
            if isinstance(entry, UserInputError):
                raise entry
            cases.append(batch.prepare_case(entry, settings, inputs=[args.batch], decoded=decoded, **check))
        except UserInputError as e:
            if not args.keep_going:
                raise
            skipped.append(str(e))
            print(f"kaleido-s2v generate: warning: {e} (skipped)", file=sys.stderr)
    if not cases:
        raise UserInputError(f"--batch '{args.batch}': no valid case to generate")
    return cases, skipped, batch.claim_manifest(out_dir, args.overwrite)


def _enhancer(args):
    """--enhance-prompt's (enhancer, system prompt), checked but not loaded; None without the switch."""
    if not args.enhance_prompt:
        given = [f"--{name.replace('_', '-')}" for name in ENHANCER_FLAGS if getattr(args, name) is not None]
        if given:
            raise UserInputError(f"{given[0]} configures --enhance-prompt: add --enhance-prompt, or drop it")
        return None
    if args.official_prompt_quirk:
        raise UserInputError("--official-prompt-quirk reproduces the release's samples from their own prompts: drop "
                             "it, or --enhance-prompt")
    from kaleido_s2v.cli.options import enhancer_from_args

    return enhancer_from_args(args)


def _enhance(args, enhancing, cases, manifest, folder, settings: dict, rt, progress: bool) -> dict:
    """Every case's prompt rewritten (under torchrun rank 0 asks, every rank gets the captions), the enhancer freed
    before any part of the video model loads; a batch keeps the captions in <--out-dir>/prompt_cache.json."""
    from kaleido_s2v import batch
    from kaleido_s2v.prompts import enhance_cases, tokenizer_counter

    enhancer, system = enhancing
    return enhance_cases(cases, enhancer, cache_dir=manifest.parent if manifest is not None else None,
                         made_by=batch.MADE_BY, overwrite=args.overwrite, system=system,
                         count_tokens=tokenizer_counter(folder), limit=settings["max_sequence_length"],
                         progress=progress, runtime=rt)


def _encode_prompts(folder, cases, settings: dict, negative_prompt: str, device, dtype) -> dict:
    """The cases' texts encoded with the folder's text encoder on `device`, which is then freed (umT5-xxl is 11 GB
    in bf16: off the GPU before the transformer loads, as the releases' `--t5_cpu` and diffusers' recipe)."""
    import gc

    import torch

    from kaleido_s2v import batch
    from kaleido_s2v.model_folder import load_text_encoder

    tokenizer, text_encoder = load_text_encoder(folder, "--model", device, dtype)
    embeddings = batch.encode_prompts(tokenizer, text_encoder, cases, settings, negative_prompt)
    del tokenizer, text_encoder
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return embeddings


def run(args: argparse.Namespace) -> int:
    from kaleido_s2v import batch
    from kaleido_s2v.cli import EXIT_SKIPPED
    from kaleido_s2v.cli.options import parse_device
    from kaleido_s2v.fileio import path_text
    from kaleido_s2v.generation import MEMORY_FLAGS, check_run_options, choose_model, load_generation_pipeline

    if args.model is None and args.convert:
        raise UserInputError("--convert needs --model DIR (an official release folder)")
    check_seed(args.seed)
    check_seed(args.layout_seed, "--layout-seed")
    enhancing = _enhancer(args)
    device = parse_device(args.device)
    memory = {k: getattr(args, k) for k in MEMORY_FLAGS}
    check_run_options(device, cpu_offload=args.cpu_offload, group_offload=args.group_offload,
                      attention_backend=args.attention_backend, loras=args.lora)
    model = choose_model(args.model, args.sampler, convert=args.convert)
    family = model.family
    if args.max_references is None:
        args.max_references = family.max_references
    check_at_least(args.max_references, "--max-references", 1)

    # 1. Settings (flags > the sampler's > the model's generation_defaults.json > its family release's), all checked
    flags = dict(height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
                 guidance_scale=args.guidance, max_sequence_length=args.max_sequence_length, fps=args.fps)
    settings, fps = batch.resolve_settings(flags, model.defaults, model.size_multiple, family.min_frames)
    settings.update(_family_options(args, family))
    settings.update(model.pipeline_options)
    mag_ratios = _magcache(args, model, settings["num_inference_steps"])
    cases, skipped, manifest = _cases(args, model.builtin, settings, family)

    # 2. Processes, device, model
    from kaleido_s2v.distributed import enable_context_parallel, init_runtime, shutdown
    from kaleido_s2v.vision.common import resolve_dtype

    rt = init_runtime(device)
    ok = False
    try:
        split = args.split_cases and args.batch is not None and rt.distributed
        progress = (split or rt.is_main) and not args.quiet
        if not progress:
            from kaleido_s2v.cli.options import hide_library_progress

            hide_library_progress()
        dtype = resolve_dtype(args.dtype, rt.device)
        rewritten = (_enhance(args, enhancing, cases, manifest, model.folder, settings, rt, progress) if enhancing
                     else None)
        embeddings, text_device, text_seconds = None, "pipeline", None
        if model.folder is not None:  # the prompts first (each distinct text once), then the text encoder is freed
            import time

            import torch

            text_device = torch.device("cpu") if args.text_encoder_device == "cpu" else rt.device
            start = time.perf_counter()
            embeddings = _encode_prompts(model.folder, batch.cases_of_rank(cases, rt, split), settings,
                                         model.defaults["negative_prompt"], text_device, dtype)
            text_seconds = round(time.perf_counter() - start, 3)
        pipe, loaded = load_generation_pipeline(
            model, rt.device, dtype, text_encoder=False, loras=args.lora, memory=memory,
            cache=args.cache, compile=args.compile, attention_backend=args.attention_backend,
            num_inference_steps=settings["num_inference_steps"], mag_ratios=mag_ratios)
        if not split:
            enable_context_parallel(pipe.transformer, rt)
        pipe.set_progress_bar_config(disable=not progress, leave=False)

        # 3. Generate
        record = {**loaded, "text_encoder_device": str(text_device), "text_encoder_seconds": text_seconds,
                  "enhancer_seconds": rewritten["seconds"] if rewritten else None,
                  "max_references": args.max_references}
        calibrating = args.cache == "magcache-calibrate"
        with _capturing(calibrating) as captured:
            results = batch.generate_cases(pipe, cases, settings, fps=fps, runtime=rt, split=split,
                                           negative_prompt=model.defaults["negative_prompt"],
                                           max_references=args.max_references, record=record, model=model.name,
                                           manifest=manifest, progress=progress,
                                           announce=not args.json, embeddings=embeddings)
        if calibrating and rt.is_main:
            _store_calibration(model.model_dir, args, settings["num_inference_steps"], captured)
        ok = True
    finally:
        shutdown(barrier=ok)
    if not (split or rt.is_main):
        return 0
    if args.json:
        print(json.dumps({"videos": results, "skipped": skipped, "model": model.name, "prompts": rewritten,
                          "manifest": path_text(manifest) if manifest else None}, indent=2))
    elif len(cases) > 1 or skipped:
        print(f"wrote {len(results)} videos to {path_text(cases[0].output.parent)}"
              + (f"; skipped {len(skipped)} bad lines (exit code {EXIT_SKIPPED})" if skipped else ""), file=sys.stderr)
    return EXIT_SKIPPED if skipped else 0
