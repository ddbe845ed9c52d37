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

from kaleido_s2v.errors import UserInputError

PROG = "kaleido-s2v generate"
# The release's sampling settings (reference/kaleido-official.md §3).
OFFICIAL_DEFAULTS = dict(
    height=512, width=896, num_frames=81, num_inference_steps=50, guidance_scale=6.0, fps=16, max_sequence_length=512
)
PIPELINE_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
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
    io.add_argument("--keep-going", action="store_true", help="skip bad --batch lines instead of stopping")
    io.add_argument("--split-cases", action="store_true",
                    help="under torchrun: ranks share the --batch cases instead of sharding each video")
    io.add_argument("--max-references", type=int, default=4, help="refuse more references than this (default 4)")
    io.add_argument("--official-prompt-quirk", action="store_true",
                    help="encode the whole `prompt@@path1@@path2` line as the release's script did")

    s = parser.add_argument_group("sampling (defaults: the model's; the release's are 512x896, 81 frames, 50 steps)")
    s.add_argument("--height", type=int)
    s.add_argument("--width", type=int)
    s.add_argument("--frames", type=int, help="number of frames, 4k+1 (release: 81)")
    s.add_argument("--steps", type=int, help="denoising steps (release: 50)")
    s.add_argument("--guidance", type=float, help="CFG scale (release: 6)")
    s.add_argument("--seed", type=int, help="random seed (default: random, recorded in the sidecar)")
    s.add_argument("--fps", type=int, help="frame rate of the mp4 (release: 16)")
    s.add_argument("--max-sequence-length", type=int, help="text tokens (default: the model's; release: 512)")

    d = parser.add_argument_group("device and memory")
    d.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    d.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    d.add_argument("--cpu-offload", action="store_true", help="model CPU offload (whole components move to GPU)")
    d.add_argument("--group-offload", action="store_true", help="block-level group offload (lowest GPU memory)")
    d.add_argument("--vae-tiling", action="store_true", help="decode the video in tiles")
    d.add_argument("--layerwise-fp8", action="store_true", help="store transformer weights in fp8, compute in bf16")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


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
    seed = obj.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise UserInputError(f"\"seed\" must be an integer, got {seed!r}")
    output = obj.get("output")
    if output is not None and (not isinstance(output, str) or not output.endswith(".mp4")):
        raise UserInputError(f"\"output\" must be a file name ending in .mp4, got {output!r}")
    negative = obj.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise UserInputError("\"negative_prompt\" must be a string")
    return {"prompt": prompt, "references": refs, "labels": refs, "seed": seed, "output": output,
            "negative_prompt": negative}


def _check_case(case: Case, max_references: int, builtin: bool, where: str) -> Case:
    """Validate one case (prompt, reference files and count) and fill in the built-in default reference."""
    from kaleido_s2v.references import load_reference

    if not case.prompt.strip():
        raise UserInputError(f"{where}: the prompt is empty: describe the video to generate")
    if not case.references:
        if not builtin:
            raise UserInputError(f"{where}: no reference image: give at least one (--ref IMAGE)")
        from kaleido_s2v.builtin import default_reference_image

        case.references, case.labels = [default_reference_image()], [DEFAULT_REFERENCE]
    if len(case.references) > max_references:
        raise UserInputError(
            f"{where}: {len(case.references)} reference images, more than the limit {max_references}: give fewer "
            "(the model was trained with at most 3) or raise --max-references"
        )
    for j, ref in enumerate(case.references):
        if not isinstance(ref, (str, os.PathLike)):
            continue
        name = f"{where}: reference image {j + 1}" if where != "--prompt" else "--ref image"
        load_reference(ref, name)  # raises UserInputError for missing / unreadable / corrupt files
    return case


def _check_sizes(height: int, width: int, frames: int, steps: int, multiple: int = 16) -> None:
    """`multiple`: the model's VAE stride × patch size (`builtin.size_multiple`)."""
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
    if steps < 1:
        raise UserInputError(f"--steps {steps}: must be at least 1 (the release uses 50)")


def _resolve_model_dir(path: str | os.PathLike, auto_convert: bool = False) -> Path:
    """The diffusers pipeline folder for --model, or UserInputError naming the files expected where.

    An official release folder is handed to `kaleido_s2v.checkpoints.resolve_model_dir` (converted with
    --convert, else the error gives the exact `kaleido-s2v convert` command).
    """
    root = Path(path).expanduser()
    expected = "model_index.json + " + ", ".join(f"{c}/" for c in PIPELINE_COMPONENTS)
    if not root.exists():
        raise UserInputError(f"--model '{root}' does not exist: give a diffusers-format Kaleido folder ({expected})")
    if not root.is_dir():
        raise UserInputError(f"--model '{root}' is a file: give a diffusers-format Kaleido folder ({expected})")
    if not (root / "model_index.json").is_file():
        from kaleido_s2v.checkpoints import resolve_model_dir  # official release folders, or a clear error

        root = Path(resolve_model_dir(root, auto_convert=auto_convert))
    try:
        index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserInputError(f"--model '{root}': model_index.json is not valid JSON ({e}): re-save the pipeline") from e
    missing = []
    for name in PIPELINE_COMPONENTS:
        sub = root / name
        if not isinstance(index.get(name), list) or index[name][0] is None:
            missing.append(f"'{name}' entry in model_index.json")
        elif name == "scheduler":
            if not (sub / "scheduler_config.json").is_file():
                missing.append(f"{sub}/scheduler_config.json")
        elif name == "tokenizer":
            if not sub.is_dir() or not any(sub.iterdir()):
                missing.append(f"{sub}/ (tokenizer files)")
        else:
            if not (sub / "config.json").is_file():
                missing.append(f"{sub}/config.json")
            if not sub.is_dir() or not any(sub.glob("*.safetensors")) and not any(sub.glob("*.bin")):
                missing.append(f"{sub}/*.safetensors (weights)")
    if missing:
        raise UserInputError(f"--model '{root}' is incomplete: missing {', '.join(missing)}")
    return root


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
    """All cases, validated; bad batch lines raise (or are skipped with --keep-going, returned as messages)."""
    if args.batch is None:
        if args.prompt is None:
            raise UserInputError("give --prompt TEXT (and --ref IMAGE ...), or --batch FILE")
        if args.out_dir is not None:
            raise UserInputError("--out-dir applies to --batch; for one video give -o/--output FILE.mp4")
        if not str(args.output).endswith(".mp4"):
            raise UserInputError(f"--output '{args.output}' must end in .mp4")
        refs = list(args.ref)
        case = Case(prompt=args.prompt, references=refs, labels=[str(Path(r).resolve()) for r in refs],
                    output=Path(args.output), seed=args.seed, negative_prompt=args.negative_prompt)
        if args.official_prompt_quirk:
            from kaleido_s2v.pipeline import official_prompt

            case.encoded_prompt = official_prompt(args.prompt, refs)
        return [_check_case(case, args.max_references, builtin, "--prompt")], []

    if args.prompt is not None or args.ref:
        raise UserInputError("--batch FILE replaces --prompt/--ref: give one or the other")
    batch = Path(args.batch)
    out_dir = Path(args.out_dir) if args.out_dir else batch.with_name(f"{batch.stem}_videos")
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
                labels=[str(Path(r)) for r in fields["references"]],
                output=output,
                seed=fields.get("seed") if fields.get("seed") is not None else args.seed,
                negative_prompt=fields.get("negative_prompt") or args.negative_prompt,
                source=where,
            )
            if args.official_prompt_quirk:
                from kaleido_s2v.pipeline import official_prompt

                case.encoded_prompt = fields.get("raw_line") or official_prompt(case.prompt, fields["labels"])
            cases.append(_check_case(case, args.max_references, builtin, where))
        except UserInputError as e:
            if not args.keep_going:
                raise
            skipped.append(str(e))
            print(f"{PROG}: warning: {e} (skipped)", file=sys.stderr)
    if not cases:
        raise UserInputError(f"--batch '{batch}': no valid case to generate")
    return cases, skipped


def run(args: argparse.Namespace) -> int:
    builtin = args.model is None
    if builtin and args.convert:
        raise UserInputError("--convert needs --model DIR (an official release folder)")
    model_dir = None if builtin else _resolve_model_dir(args.model, auto_convert=args.convert)
    if args.max_references < 1:
        raise UserInputError(f"--max-references {args.max_references}: must be at least 1")

    # 1. Settings: flags > the model's generation_defaults.json > the release's
    from kaleido_s2v.builtin import (
        builtin_generation_defaults,
        builtin_model_description,
        builtin_model_dir,
        generation_defaults,
        size_multiple,
    )

    defaults = {**OFFICIAL_DEFAULTS, **(builtin_generation_defaults() if builtin else generation_defaults(model_dir))}
    settings = dict(
        height=args.height or defaults["height"],
        width=args.width or defaults["width"],
        num_frames=args.frames or defaults["num_frames"],
        num_inference_steps=args.steps or defaults["num_inference_steps"],
        guidance_scale=args.guidance if args.guidance is not None else defaults["guidance_scale"],
        max_sequence_length=args.max_sequence_length or defaults["max_sequence_length"],
    )
    fps = args.fps or defaults["fps"]
    if fps < 1:
        raise UserInputError(f"--fps {fps}: must be at least 1")
    _check_sizes(settings["height"], settings["width"], settings["num_frames"], settings["num_inference_steps"],
                 size_multiple(builtin_model_dir() if builtin else model_dir))
    if args.cpu_offload and args.group_offload:
        raise UserInputError("--cpu-offload and --group-offload exclude each other: pick one")

    # 2. Cases: every input checked before anything heavy happens
    cases, skipped = _build_cases(args, builtin)

    # 3. Processes, device, model
    import torch
    from tqdm.auto import tqdm

    from kaleido_s2v.distributed import enable_context_parallel, init_distributed, shutdown_distributed
    from kaleido_s2v.pipeline import KALEIDO_NEGATIVE_PROMPT
    from kaleido_s2v.video_io import write_video

    default_negative = defaults.get("negative_prompt", KALEIDO_NEGATIVE_PROMPT)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    if (args.cpu_offload or args.group_offload) and device.type == "cpu":
        raise UserInputError("--cpu-offload/--group-offload move weights to a GPU: they need a CUDA --device")
    dist_info = init_distributed(device)
    device = dist_info.device
    split_cases = args.split_cases and args.batch is not None and dist_info.enabled
    if split_cases:
        cases = cases[dist_info.rank :: dist_info.world_size]
    writes = split_cases or dist_info.is_main

    from kaleido_s2v.vision.common import resolve_dtype

    dtype = resolve_dtype(args.dtype, device)
    if builtin:
        from kaleido_s2v.builtin import load_builtin_pipeline

        pipe = load_builtin_pipeline(torch_dtype=dtype)
        model_name = builtin_model_description()
    else:
        from kaleido_s2v.pipeline import KaleidoPipeline

        pipe = KaleidoPipeline.from_pretrained(model_dir, torch_dtype=dtype)
        model_name = str(model_dir.resolve())
    apply_memory_options(pipe, device, cpu_offload=args.cpu_offload, group_offload=args.group_offload,
                         vae_tiling=args.vae_tiling, layerwise_fp8=args.layerwise_fp8)
    if dist_info.enabled and not split_cases:
        enable_context_parallel(pipe.transformer, dist_info)
    pipe.set_progress_bar_config(disable=not writes, leave=False)

    # 4. Generate
    results = []
    from kaleido_s2v import library_versions

    versions = library_versions()
    memory = {k: getattr(args, k) for k in ("cpu_offload", "group_offload", "vae_tiling", "layerwise_fp8")}
    bar = tqdm(cases, desc="videos", unit="video", disable=not writes or len(cases) < 2)
    ok = False
    try:
        for case in bar:
            seed = case.seed if case.seed is not None else random.randrange(2**31)
            if dist_info.enabled and not split_cases:
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
                "video": str(case.output),
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
                    "context_parallel": dist_info.enabled and not split_cases,
                    "max_references": args.max_references,
                    **memory,
                },
                "model": model_name,
                "source": case.source,
                "versions": versions,
                "seconds": round(seconds, 3),
            }
            from kaleido_s2v.fileio import write_text_atomic

            write_text_atomic(sidecar, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
            results.append({"video": str(case.output), "sidecar": str(sidecar), "seed": seed,
                            "seconds": round(seconds, 3), "source": case.source})
            if not args.json and len(cases) == 1:
                print(f"wrote {case.output} ({seconds:.1f} s)", file=sys.stderr)
        ok = True
    finally:
        bar.close()
        shutdown_distributed(barrier=ok)
    if args.json and writes:
        print(json.dumps({"videos": results, "skipped": skipped, "model": model_name}, indent=2))
    elif writes and len(cases) > 1:
        print(f"wrote {len(results)} videos to {cases[0].output.parent}" + (f", skipped {len(skipped)} lines"
              if skipped else ""), file=sys.stderr)
    return 0


def _broadcast_seed(seed: int, device) -> int:
    """Rank 0's seed, so a random seed is the same on every rank of a context-parallel run."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())
