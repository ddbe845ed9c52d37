"""`kaleido-s2v generate`: reference images + prompt -> mp4 (+ JSON sidecar), one case or a batch file.

Every input is validated before the model loads, so bad input costs nothing and leaves no file. Under
`torchrun --nproc_per_node K -m kaleido_s2v generate ...` the transformer's sequence is sharded over the K
ranks (context parallelism) and rank 0 writes; `--split-cases` makes the ranks share a batch instead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaleido_s2v.cli.options import add_dtype, add_overwrite, add_quiet, check_at_least, check_seed
from kaleido_s2v.errors import UserInputError
from kaleido_s2v.fileio import claim_file, file_signed_by, path_text

PROG = "kaleido-s2v generate"
MADE_BY = PROG  # the signature in every sidecar: a video whose sidecar carries it may be replaced by a rerun
DTYPES = ("bf16", "fp16", "fp32")
DEFAULT_REFERENCE = "builtin:default-reference"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        '  kaleido-s2v generate --prompt "a red ball rolls" -o demo.mp4            # built-in small model, CPU\n'
        '  kaleido-s2v generate --model Kaleido-diffusers --prompt "..." --ref a.png --ref b.png -o out.mp4\n'
        "  kaleido-s2v generate --model DIR --batch cases.txt --out-dir outs/     # lines: prompt@@img1@@img2\n"
        "  torchrun --nproc_per_node 8 -m kaleido_s2v generate --model DIR ...    # context parallel on 8 GPUs\n"
        "see docs/generate.md for memory recipes (24 GB GPUs) and multi-GPU use."
    )
    io = parser.add_argument_group("model and inputs")
    io.add_argument("--model", metavar="DIR", help="diffusers-format Kaleido folder (default: the built-in model)")
    io.add_argument("--convert", action="store_true", help="convert an official release folder given to --model")
    io.add_argument("--prompt", help="the caption of the video")
    io.add_argument("--ref", action="append", default=[], metavar="IMAGE", help="reference image (repeatable)")
    io.add_argument("--negative-prompt", help="default: the model's generation default, else the release's (Wan2.1's, minus one phrase)")
    io.add_argument("-o", "--output", default="output.mp4", help="output video (.mp4); a .json sidecar goes beside")
    io.add_argument("--batch", metavar="FILE", help="one case per line: prompt@@img1@@img2 (paths relative to FILE) "
                    "or JSONL {prompt, references, seed?, output?, negative_prompt?}")
    io.add_argument("--out-dir", metavar="DIR", help="output folder of --batch (default: <FILE stem>_videos/)")
    io.add_argument("--keep-going", action="store_true",
                    help="skip bad --batch lines instead of stopping (exit code 3 when any was skipped)")
    io.add_argument("--split-cases", action="store_true",
                    help="under torchrun: ranks share the --batch cases instead of sharding each video")
    io.add_argument("--max-references", type=int, default=4, help="refuse more references than this (default 4)")
    io.add_argument("--official-prompt-quirk", action="store_true",
                    help="encode the whole `prompt@@path1@@path2` line as the release's script did")
    add_overwrite(io, "an existing output video or .json sidecar")

    s = parser.add_argument_group("sampling (defaults: the model's; the release's are 512x896, 81 frames, 50 steps)")
    s.add_argument("--height", type=int)
    s.add_argument("--width", type=int)
    s.add_argument("--frames", type=int, help="number of frames, 4k+1 (release: 81)")
    s.add_argument("--num-frames", dest="frames", type=int, help=argparse.SUPPRESS)
    s.add_argument("--steps", type=int, help="denoising steps (release: 50)")
    s.add_argument("--guidance", type=float, help="CFG scale (release: 6)")
    s.add_argument("--seed", type=int, help="random seed (default: random, recorded in the sidecar)")
    s.add_argument("--fps", type=int, help="frame rate of the mp4 (release: 16)")
    s.add_argument("--max-sequence-length", type=int, help="text tokens (default: the model's; release: 512)")

    d = parser.add_argument_group("device and memory")
    d.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    add_dtype(d, ("auto", *DTYPES), "auto", "auto: bf16 on CUDA, fp32 on CPU")
    d.add_argument("--cpu-offload", action="store_true", help="model CPU offload (whole components move to GPU)")
    d.add_argument("--group-offload", action="store_true", help="block-level group offload (lowest GPU memory)")
    d.add_argument("--vae-tiling", action="store_true", help="decode the video in tiles")
    d.add_argument("--layerwise-fp8", action="store_true", help="store transformer weights in fp8, compute in bf16")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    add_quiet(parser)


# ---------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    prompt: str
    references: list = field(default_factory=list)  # paths or PIL images
    labels: list[str] = field(default_factory=list)  # how each reference is recorded in the sidecar
    output: Path = Path("output.mp4")
    seed: int | None = None
    negative_prompt: str | None = None
    encoded_prompt: str | None = None  # set with --official-prompt-quirk
    source: str = "--prompt"  # "FILE:LINE" for batch cases


def _where(path: Path, line_no: int) -> str:
    return f"{path}:{line_no}"


def parse_batch_file(path: str | os.PathLike) -> list[tuple[int, dict[str, Any] | UserInputError]]:
    """Parse a batch file -> [(line number, case fields or the error for that line)].

    Official format: `prompt@@img1@@img2` per line. JSONL: one object per line with `prompt`, `references`
    and optional `seed`, `output`, `negative_prompt`. Relative image paths are relative to the file's folder.
    Blank lines and lines starting with `#` are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--batch '{path}' does not exist: give a text file with one case per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"--batch '{path}' is not a readable UTF-8 text file ({e})") from e
    base = path.resolve().parent
    content = [(i, ln.strip()) for i, ln in enumerate(lines, 1) if ln.strip() and not ln.strip().startswith("#")]
    if not content:
        raise UserInputError(f"--batch '{path}' has no cases: write one `prompt@@img1@@img2` per line")
    jsonl = path.suffix == ".jsonl" or content[0][1].startswith("{")
    out = []
    for i, line in content:
        try:
            fields = _parse_jsonl_line(line) if jsonl else _parse_official_line(line)
            fields["references"] = [str(p if Path(p).is_absolute() else base / p) for p in fields["references"]]
            out.append((i, fields))
        except UserInputError as e:
            out.append((i, UserInputError(f"{_where(path, i)}: {e}")))
    return out


def _parse_official_line(line: str) -> dict[str, Any]:
    prompt, *refs = (part.strip() for part in line.split("@@"))
    if any(not r for r in refs):
        raise UserInputError("empty image path between '@@' separators: write prompt@@img1.png@@img2.png")
    return {"prompt": prompt, "references": refs, "labels": refs, "raw_line": line}


def _parse_jsonl_line(line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserInputError(f"invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
        raise UserInputError("a JSONL case must be an object like {\"prompt\": ..., \"references\": [...]}")
    unknown = set(obj) - {"prompt", "references", "seed", "output", "negative_prompt"}
    if unknown:
        raise UserInputError(f"unknown keys {sorted(unknown)}: use prompt, references, seed, output, negative_prompt")
    prompt, refs = obj.get("prompt"), obj.get("references", [])
    if not isinstance(prompt, str):
        raise UserInputError("\"prompt\" must be a string")
    if isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        raise UserInputError("\"references\" must be a list of image paths")
    seed = check_seed(obj.get("seed"), '"seed"')
    output = obj.get("output")
    if output is not None:
        if not isinstance(output, str) or not output.endswith(".mp4"):
            raise UserInputError(f"\"output\" must be a file name ending in .mp4, got {output!r}")
        if Path(output).is_absolute() or ".." in Path(output).parts:
            raise UserInputError(f"\"output\" {output!r} leaves --out-dir: give a name relative to it, without '..'")
    negative = obj.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise UserInputError("\"negative_prompt\" must be a string")
    return {"prompt": prompt, "references": refs, "labels": refs, "seed": seed, "output": output,
            "negative_prompt": negative}


def _check_text(text: str | None, what: str) -> None:
    """Text goes into the tokenizer and the JSON sidecar: it must be valid Unicode (argv may carry raw bytes)."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserInputError(f"{what} is not valid UTF-8 text: write it in UTF-8") from None


def _check_case(case: Case, max_references: int, builtin: bool, where: str, ref_flag: str) -> Case:
    """Validate one case (prompt, reference files and count) and fill in the built-in default reference.

    `where` names the case in messages ("--prompt" or "FILE:LINE"), `ref_flag` its references ("--ref" or
    "FILE:LINE: reference").
    """
    from kaleido_s2v.references import load_reference

    single = where == "--prompt"
    _check_text(case.prompt, "--prompt" if single else f"{where}: the prompt")
    _check_text(case.negative_prompt, "--negative-prompt" if single else f"{where}: the negative prompt")
    if not case.prompt.strip():
        raise UserInputError(f"{where}: the prompt is empty: describe the video to generate")
    if not case.references:
        if not builtin:
            raise UserInputError(f"{where}: no reference image: give at least one (--ref IMAGE)")
        from kaleido_s2v.builtin import default_reference_image

        case.references, case.labels = [default_reference_image()], [DEFAULT_REFERENCE]
    if len(case.references) > max_references:
        raise UserInputError(
            f"{ref_flag}: {len(case.references)} reference images, more than the limit {max_references}: give fewer "
            "(the model was trained with at most 3) or raise --max-references"
        )
    for j, ref in enumerate(case.references):
        if isinstance(ref, (str, os.PathLike)):
            load_reference(ref, f"{ref_flag} image {j + 1}" if len(case.references) > 1 else f"{ref_flag} image")
    return case


def _check_sizes(height: int, width: int, frames: int, steps: int, multiple: int = 16) -> None:
    """`multiple`: the model's VAE stride × patch size (`model_folder.size_multiple`)."""
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise UserInputError(
            f"--height {height} / --width {width}: both must be positive multiples of {multiple} for this model "
            f"(VAE stride x patch size{'; e.g. 512x896' if multiple == 16 else ''})"
        )
    if frames < 1 or (frames - 1) % 4:
        lo = max(1, (frames - 1) // 4 * 4 + 1)
        raise UserInputError(
            f"--frames {frames}: must be of the form 4k+1 (e.g. {lo} or {lo + 4}; the release uses 81)"
        )
    check_at_least(steps, "--steps", 1, "the release uses 50")


def claim_video(path: Path, flag: str, overwrite: bool, inputs) -> None:
    """A video and its .json sidecar may be written: both new, a pair this command wrote, or --overwrite."""
    sidecar = path.with_suffix(".json")
    ours = file_signed_by(sidecar, MADE_BY)
    claim_file(path, flag, overwrite=overwrite or ours, inputs=inputs)
    claim_file(sidecar, f"{flag} sidecar", overwrite=overwrite, made_by=MADE_BY, inputs=inputs)


# ---------------------------------------------------------------------------------------------------- model
def apply_memory_options(pipe, device, *, cpu_offload=False, group_offload=False, vae_tiling=False,
                         layerwise_fp8=False) -> None:
    """diffusers' memory recipes, then placement on `device` (see docs/generate.md)."""
    import torch

    if layerwise_fp8:  # before offloading, as diffusers recommends
        pipe.transformer.enable_layerwise_casting(
            storage_dtype=torch.float8_e4m3fn, compute_dtype=pipe.transformer.dtype
        )
    if vae_tiling:
        pipe.vae.enable_tiling()
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    elif group_offload:
        pipe.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=device.type == "cuda",
            exclude_modules=["vae"],  # small; placed on `device`
        )
    else:
        pipe.to(device)


# ---------------------------------------------------------------------------------------------------- run
def _build_cases(args, builtin: bool) -> tuple[list[Case], list[str]]:
    """All cases, validated, their outputs claimed; bad batch lines raise (or, with --keep-going, are skipped and
    returned as messages)."""
    if args.batch is None:
        if args.prompt is None:
            raise UserInputError("give --prompt TEXT (and --ref IMAGE ...), or --batch FILE")
        if args.out_dir is not None:
            raise UserInputError("--out-dir applies to --batch; for one video give -o/--output FILE.mp4")
        if not str(args.output).endswith(".mp4"):
            raise UserInputError(f"--output '{path_text(args.output)}' must end in .mp4")
        refs = list(args.ref)
        case = Case(prompt=args.prompt, references=refs, labels=[path_text(Path(r).resolve()) for r in refs],
                    output=Path(args.output), seed=args.seed, negative_prompt=args.negative_prompt)
        if args.official_prompt_quirk:
            from kaleido_s2v.pipeline import official_prompt

            case.encoded_prompt = official_prompt(args.prompt, refs)
        _check_case(case, args.max_references, builtin, "--prompt", "--ref")
        claim_video(case.output, "--output", args.overwrite, inputs=refs)
        return [case], []

    if args.prompt is not None or args.ref:
        raise UserInputError("--batch FILE replaces --prompt/--ref: give one or the other")
    batch = Path(args.batch)
    out_dir = Path(args.out_dir) if args.out_dir else batch.with_name(f"{batch.stem}_videos")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"--out-dir '{path_text(out_dir)}' is a file: give a folder")
    cases, skipped, outputs = [], [], {}
    for line_no, fields in parse_batch_file(batch):
        try:
            if isinstance(fields, UserInputError):
                raise fields
            where = _where(batch, line_no)
            output = out_dir / (fields.get("output") or f"case{line_no:04d}.mp4")
            if output in outputs:
                raise UserInputError(f"{where}: output '{output.name}' is already used by line {outputs[output]}")
            outputs[output] = line_no
            case = Case(
                prompt=fields["prompt"],
                references=fields["references"],
                labels=[path_text(r) for r in fields["references"]],
                output=output,
                seed=fields.get("seed") if fields.get("seed") is not None else args.seed,
                negative_prompt=fields.get("negative_prompt") or args.negative_prompt,
                source=where,
            )
            if args.official_prompt_quirk:
                from kaleido_s2v.pipeline import official_prompt

                case.encoded_prompt = fields.get("raw_line") or official_prompt(case.prompt, fields["labels"])
            _check_case(case, args.max_references, builtin, where, f"{where}: reference")
            claim_video(output, f"{where}: output", args.overwrite, inputs=[batch, *case.references])
            cases.append(case)
        except UserInputError as e:
            if not args.keep_going:
                raise
            skipped.append(str(e))
            print(f"{PROG}: warning: {e} (skipped)", file=sys.stderr)
    if not cases:
        raise UserInputError(f"--batch '{path_text(batch)}': no valid case to generate")
    return cases, skipped


def _settings(args, defaults: dict, multiple: int) -> tuple[dict, int]:
    """Sampling settings (flags over the model's defaults) and fps, every value checked; 0 is never "default"."""

    def pick(flag_value, key):
        return defaults[key] if flag_value is None else flag_value

    settings = dict(
        height=pick(args.height, "height"),
        width=pick(args.width, "width"),
        num_frames=pick(args.frames, "num_frames"),
        num_inference_steps=pick(args.steps, "num_inference_steps"),
        guidance_scale=pick(args.guidance, "guidance_scale"),
        max_sequence_length=pick(args.max_sequence_length, "max_sequence_length"),
    )
    fps = pick(args.fps, "fps")
    check_at_least(fps, "--fps", 1)
    check_at_least(settings["max_sequence_length"], "--max-sequence-length", 1, "the release uses 512")
    check_at_least(settings["guidance_scale"], "--guidance", 0, "1 turns guidance off; the release uses 6")
    _check_sizes(settings["height"], settings["width"], settings["num_frames"], settings["num_inference_steps"],
                 multiple)
    return settings, fps


def run(args: argparse.Namespace) -> int:
    from kaleido_s2v.cli import EXIT_SKIPPED
    from kaleido_s2v.cli.options import parse_device

    builtin = args.model is None
    if builtin and args.convert:
        raise UserInputError("--convert needs --model DIR (an official release folder)")
    check_at_least(args.max_references, "--max-references", 1)
    check_seed(args.seed)
    if args.cpu_offload and args.group_offload:
        raise UserInputError("--cpu-offload and --group-offload exclude each other: pick one")
    device = parse_device(args.device)
    if (args.cpu_offload or args.group_offload) and device.type == "cpu":
        raise UserInputError("--cpu-offload/--group-offload move weights to a GPU: they need a CUDA --device")
    from kaleido_s2v.model_folder import resolve_model_folder

    model_dir = None if builtin else resolve_model_folder(args.model, "--model", auto_convert=args.convert)

    # 1. Settings: flags > the model's generation_defaults.json > the release's
    from kaleido_s2v.builtin import builtin_generation_defaults, builtin_model_description, builtin_model_dir
    from kaleido_s2v.model_folder import generation_defaults, size_multiple
    from kaleido_s2v.release import GENERATION_DEFAULTS

    defaults = {**GENERATION_DEFAULTS, **(builtin_generation_defaults() if builtin else generation_defaults(model_dir))}
    settings, fps = _settings(args, defaults, size_multiple(builtin_model_dir() if builtin else model_dir))

    # 2. Cases: every input checked and every output claimed before anything heavy happens
    cases, skipped = _build_cases(args, builtin)

    # 3. Processes, device, model
    import torch
    from tqdm.auto import tqdm

    from kaleido_s2v.distributed import enable_context_parallel, init_runtime, shutdown
    from kaleido_s2v.video_io import write_video

    default_negative = defaults["negative_prompt"]
    dist_info = init_runtime(device)
    device = dist_info.device
    split_cases = args.split_cases and args.batch is not None and dist_info.distributed
    if split_cases:
        cases = cases[dist_info.rank :: dist_info.world_size]
    writes = split_cases or dist_info.is_main
    progress = writes and not args.quiet
    if not progress:
        from kaleido_s2v.cli.options import hide_library_progress

        hide_library_progress()

    from kaleido_s2v.vision.common import resolve_dtype

    dtype = resolve_dtype(args.dtype, device)
    if builtin:
        from kaleido_s2v.builtin import load_builtin_pipeline

        pipe = load_builtin_pipeline(dtype=dtype)
        model_name = builtin_model_description()
    else:
        from kaleido_s2v.model_folder import load_pipeline

        pipe = load_pipeline(model_dir, "--model", dtype=dtype)
        model_name = path_text(model_dir.resolve())
    apply_memory_options(pipe, device, cpu_offload=args.cpu_offload, group_offload=args.group_offload,
                         vae_tiling=args.vae_tiling, layerwise_fp8=args.layerwise_fp8)
    if dist_info.distributed and not split_cases:
        enable_context_parallel(pipe.transformer, dist_info)
    pipe.set_progress_bar_config(disable=not progress, leave=False)

    # 4. Generate
    results = []
    from kaleido_s2v import library_versions
    from kaleido_s2v.fileio import write_text_atomic

    versions = library_versions()
    memory = {k: getattr(args, k) for k in ("cpu_offload", "group_offload", "vae_tiling", "layerwise_fp8")}
    bar = tqdm(cases, desc="videos", unit="video", disable=not progress or len(cases) < 2)
    ok = False
    try:
        for case in bar:
            seed = case.seed if case.seed is not None else random.randrange(2**31)
            if dist_info.distributed and not split_cases:
                seed = _broadcast_seed(seed, device)
            negative = default_negative if case.negative_prompt is None else case.negative_prompt
            start = time.perf_counter()
            frames = pipe(
                prompt=case.encoded_prompt or case.prompt,
                reference_images=case.references,
                negative_prompt=negative,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np",
                max_references=args.max_references,
                **settings,
            ).frames[0]
            seconds = time.perf_counter() - start
            if not writes:
                continue
            video = (frames * 255.0).round().clip(0, 255).astype("uint8")
            write_video(case.output, video, fps=fps)
            sidecar = case.output.with_suffix(".json")
            record = {
                "made_by": MADE_BY,
                "video": path_text(case.output),
                "prompt": case.prompt,
                "encoded_prompt": case.encoded_prompt or case.prompt,
                "negative_prompt": negative,
                "negative_prompt_is_default": case.negative_prompt is None,
                "references": case.labels,
                "seed": seed,
                "settings": {
                    **settings,
                    "fps": fps,
                    "dtype": str(dtype).removeprefix("torch."),
                    "device": str(device),
                    "world_size": dist_info.world_size,
                    "context_parallel": dist_info.distributed and not split_cases,
                    "max_references": args.max_references,
                    **memory,
                },
                "model": model_name,
                "source": path_text(case.source),
                "versions": versions,
                "seconds": round(seconds, 3),
            }
            write_text_atomic(sidecar, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
            results.append({"video": path_text(case.output), "sidecar": path_text(sidecar), "seed": seed,
                            "seconds": round(seconds, 3), "source": path_text(case.source)})
            if not args.json and len(cases) == 1:
                print(f"wrote {path_text(case.output)} ({seconds:.1f} s)", file=sys.stderr)
        ok = True
    finally:
        bar.close()
        shutdown(barrier=ok)
    if args.json and writes:
        print(json.dumps({"videos": results, "skipped": skipped, "model": model_name}, indent=2))
    elif writes and (len(cases) > 1 or skipped):
        print(f"wrote {len(results)} videos to {path_text(cases[0].output.parent)}"
              + (f"; skipped {len(skipped)} bad lines (exit code {EXIT_SKIPPED})" if skipped else ""), file=sys.stderr)
    return EXIT_SKIPPED if skipped else 0


def _broadcast_seed(seed: int, device) -> int:
    """Rank 0's seed, so a random seed is the same on every rank of a context-parallel run (any 64-bit seed)."""
    import torch.distributed as dist

    box = [seed]
    dist.broadcast_object_list(box, src=0, device=device)
    return int(box[0])
