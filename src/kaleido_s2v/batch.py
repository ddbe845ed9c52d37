"""The batch runner: cases (one `--prompt`, or a batch file), checked whole before any model loads, then generated
on one GPU, with context parallelism, or split over ranks; each video is written atomically with its sidecar, and
a batch's `manifest.jsonl` lists every video for `kaleido-s2v evaluate --cases`.

`kaleido-s2v generate` is argument parsing around these functions; from Python:

    cases, skipped = batch_cases("cases.txt", "videos/", ...)    # or [single_case(...)]
    settings = resolve_settings({...}, defaults, size_multiple)
    for case in cases: prepare_case(case, settings, ...)        # decodes each reference once, claims the outputs
    results = generate_cases(pipe, cases, settings, runtime=rt, manifest=...)

The pipeline's own rules (sizes, prompt, reference count) are its `check_sizes` / `check_request`, called here with
the flags' names; the batch adds only what a command line promises on top: 4k+1 frames exactly (the pipeline rounds),
a reference for every case of a real model, outputs that may be written.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserInputError, check_at_least, check_seed, check_text
from .fileio import claim_file, file_signed_by, path_text, write_text_atomic

MADE_BY = "kaleido-s2v generate"  # the signature of every sidecar and manifest: a rerun may replace what carries it
MANIFEST = "manifest.jsonl"
DEFAULT_REFERENCE = "builtin:default-reference"
SETTING_FLAGS = {"height": "--height", "width": "--width", "num_frames": "--frames", "num_inference_steps": "--steps",
                 "guidance_scale": "--guidance", "max_sequence_length": "--max-sequence-length", "fps": "--fps"}
BATCH_KEYS = ("prompt", "references", "seed", "output", "negative_prompt")


@dataclass
class Case:
    prompt: str
    references: list = field(default_factory=list)  # paths as given (or PIL images)
    labels: list[str] = field(default_factory=list)  # how each reference is recorded (sidecar, manifest)
    output: Path = Path("output.mp4")
    seed: int | None = None
    negative_prompt: str | None = None
    encoded_prompt: str | None = None  # set with --official-prompt-quirk
    original_prompt: str | None = None  # the user's prompt, when `prompt` is its rewrite (--enhance-prompt)
    enhancer: dict | None = None  # what rewrote it (`prompts.Enhancer.record()`)
    source: str = "--prompt"  # "FILE:LINE" for batch cases
    images: list = field(default_factory=list)  # the references, decoded once and fitted (`prepare_case`)


# ---------------------------------------------------------------------------------------------------- reading
def parse_batch_file(path: str | os.PathLike, keyed: bool = False) -> list[tuple[int, dict[str, Any] | UserInputError]]:
    """Parse a batch file -> [(line number, case fields or the error for that line)].

    Official format: `prompt@@img1@@img2` per line (Kaleido's); `keyed`: `key@@prompt@@img1@@img2` (MAGREF's
    prompt files), the key naming the output `<key>.mp4`. JSONL: one object per line with `prompt`, `references`
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
        raise UserInputError(f"--batch '{path}' has no cases: write one `{_official_form(keyed)}` per line")
    jsonl = path.suffix == ".jsonl" or content[0][1].startswith("{")
    out = []
    for i, line in content:
        try:
            fields = _parse_jsonl_line(line) if jsonl else _parse_official_line(line, keyed)
            fields["references"] = [str(p if Path(p).is_absolute() else base / p) for p in fields["references"]]
            out.append((i, fields))
        except UserInputError as e:
            out.append((i, UserInputError(f"{path}:{i}: {e}")))
    return out


def _official_form(keyed: bool) -> str:
    return "key@@prompt@@img1.png@@img2.png" if keyed else "prompt@@img1.png@@img2.png"


def _parse_official_line(line: str, keyed: bool = False) -> dict[str, Any]:
    parts = [part.strip() for part in line.split("@@")]
    output = None
    if keyed:
        if len(parts) < 2:
            raise UserInputError(f"no '@@' after the key: write {_official_form(True)}")
        key, parts = parts[0], parts[1:]
        if not key or key in (".", "..") or any(c in key for c in '/\\:*?"<>|'):
            raise UserInputError(f"key {key!r} cannot name a video file: write {_official_form(True)} with a key "
                                 "of letters, digits, '-', '_' or '.'")
        output = f"{key}.mp4"
    prompt, *refs = parts
    if any(not r for r in refs):
        raise UserInputError(f"empty image path between '@@' separators: write {_official_form(keyed)}")
    return {"prompt": prompt, "references": refs, "labels": refs, "raw_line": line, "output": output}


def _parse_jsonl_line(line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserInputError(f"invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
        raise UserInputError("a JSONL case must be an object like {\"prompt\": ..., \"references\": [...]}")
    unknown = set(obj) - set(BATCH_KEYS)
    if unknown:
        raise UserInputError(f"unknown keys {sorted(unknown)}: use {', '.join(BATCH_KEYS)}")
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


def single_case(prompt: str, references, output, *, seed=None, negative_prompt=None,
                official_prompt_quirk: bool = False) -> Case:
    """The case of `--prompt ... --ref ... -o X.mp4`."""
    if not str(output).endswith(".mp4"):
        raise UserInputError(f"--output '{path_text(output)}' must end in .mp4")
    refs = list(references)
    case = Case(prompt=prompt, references=refs, labels=[path_text(Path(r).resolve()) for r in refs],
                output=Path(output), seed=check_seed(seed), negative_prompt=negative_prompt)
    if official_prompt_quirk:
        from .pipeline import official_prompt

        case.encoded_prompt = official_prompt(prompt, refs)
    return case


def default_out_dir(batch: str | os.PathLike) -> Path:
    return Path(batch).with_name(f"{Path(batch).stem}_videos")


def batch_cases(batch: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, seed=None,
                negative_prompt=None, official_prompt_quirk: bool = False, keyed: bool = False
                ) -> list[Case | UserInputError]:
    """The cases of a batch file, each with its output inside `out_dir` (default `<FILE stem>_videos/`), or the
    error of its line (`prepare_case` checks the rest). `keyed`: see `parse_batch_file`."""
    batch = Path(batch)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(batch)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"--out-dir '{path_text(out_dir)}' is a file: give a folder")
    cases, outputs = [], {}
    for line_no, fields in parse_batch_file(batch, keyed):
        if isinstance(fields, UserInputError):
            cases.append(fields)
            continue
        where = f"{batch}:{line_no}"
        output = out_dir / (fields.get("output") or f"case{line_no:04d}.mp4")
        if output in outputs:
            cases.append(UserInputError(f"{where}: output '{output.name}' is already used by line {outputs[output]}"))
            continue
        outputs[output] = line_no
        case = Case(prompt=fields["prompt"], references=fields["references"],
                    labels=[path_text(r) for r in fields["references"]], output=output,
                    seed=fields.get("seed") if fields.get("seed") is not None else seed,
                    negative_prompt=fields.get("negative_prompt") or negative_prompt, source=where)
        if official_prompt_quirk:
            from .pipeline import official_prompt

            case.encoded_prompt = fields.get("raw_line") or official_prompt(case.prompt, fields["labels"])
        cases.append(case)
    return cases


# ---------------------------------------------------------------------------------------------------- checking
def resolve_settings(flags: dict[str, Any], defaults: dict[str, Any], size_multiple: int, min_frames: int = 1
                     ) -> tuple[dict, int]:
    """Sampling settings (flags over the model's defaults; a flag of None is not given, 0 never means "default")
    and the fps, every value checked, named by its flag. `min_frames`: the family's (MAGREF drops 4 frames)."""
    from .pipeline import check_sizes

    settings = {k: defaults[k] if flags.get(k) is None else flags[k] for k in SETTING_FLAGS}
    fps = settings.pop("fps")
    check_at_least(fps, "--fps", 1)
    check_at_least(settings["max_sequence_length"], "--max-sequence-length", 1, "the release uses 512")
    check_at_least(settings["guidance_scale"], "--guidance", 0, "1 turns guidance off; the release uses 6")
    check_sizes(settings["height"], settings["width"], settings["num_inference_steps"], size_multiple,
                names={k: SETTING_FLAGS[k] for k in ("height", "width", "num_inference_steps")})
    frames = settings["num_frames"]
    if frames < 1 or (frames - 1) % 4:  # the pipeline rounds with a warning; a command line gives what it was told
        lo = max(1, (frames - 1) // 4 * 4 + 1)
        raise UserInputError(f"--frames {frames}: must be of the form 4k+1 (e.g. {lo} or {lo + 4}; the release uses 81)")
    if frames < min_frames:
        raise UserInputError(f"--frames {frames}: this model needs at least {min_frames} (its first {min_frames - 1} "
                             "decoded frames are dropped; the release uses 81)")
    return settings, fps


def claim_video(path: Path, flag: str, overwrite: bool, inputs) -> None:
    """A video and its .json sidecar may be written: both new, a pair this command wrote, or --overwrite."""
    sidecar = path.with_suffix(".json")
    ours = file_signed_by(sidecar, MADE_BY)
    claim_file(path, flag, overwrite=overwrite or ours, inputs=inputs)
    claim_file(sidecar, f"{flag} sidecar", overwrite=overwrite, made_by=MADE_BY, inputs=inputs)


def prepare_case(case: Case, settings: dict, *, max_references: int, builtin: bool, overwrite: bool = False,
                 inputs=(), decoded: dict | None = None, family=None) -> Case:
    """Check one case and claim its outputs; decode each reference once, fitted to the video size when the
    model `family` (`model_folder.Family`, default Kaleido's) wants it so (`decoded`: a cache shared by the cases
    of a batch, keyed by path). The built-in model gets its default reference."""
    from .model_folder import KALEIDO
    from .pipeline import check_request
    from .references import fit_reference, load_reference

    family = family or KALEIDO

    single = case.source == "--prompt"
    ref_flag = "--ref" if single else f"{case.source}: reference"
    check_text(case.prompt, "--prompt" if single else f"{case.source}: the prompt")
    check_text(case.negative_prompt, "--negative-prompt" if single else f"{case.source}: the negative prompt")
    if case.prompt.strip() and not case.references and not builtin:
        raise UserInputError(f"{case.source}: no reference image: give at least one (--ref IMAGE)")
    check_request(case.prompt, case.negative_prompt, len(case.references), max_references,
                  names={"prompt": f"{case.source}: the prompt", "reference_images": ref_flag,
                         "max_references": "--max-references"}, note=family.reference_note)
    if not case.references:
        from .builtin import default_reference_image

        case.references, case.labels = [default_reference_image()], [DEFAULT_REFERENCE]
    decoded = {} if decoded is None else decoded
    case.images = []
    for j, ref in enumerate(case.references):
        key = os.fspath(ref) if isinstance(ref, (str, os.PathLike)) else None
        if key is None or key not in decoded:
            name = f"{ref_flag} image {j + 1}" if len(case.references) > 1 else f"{ref_flag} image"
            image = load_reference(ref, name)
            if family.fits_references:
                image = fit_reference(image, settings["height"], settings["width"])
            if key is None:
                case.images.append(image)
                continue
            decoded[key] = image
        case.images.append(decoded[key])
    paths = [r for r in case.references if isinstance(r, (str, os.PathLike))]
    claim_video(case.output, "--output" if single else f"{case.source}: output", overwrite, [*inputs, *paths])
    return case


def claim_manifest(out_dir: Path, overwrite: bool) -> Path:
    path = Path(out_dir) / MANIFEST
    claim_file(path, "--out-dir manifest", overwrite=overwrite, made_by=MADE_BY)
    return path


# ---------------------------------------------------------------------------------------------------- running
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


def cases_of_rank(cases: list[Case], runtime=None, split: bool = False) -> list[Case]:
    """The cases this rank generates: all of them, or its share with `split` (`--split-cases`)."""
    return cases[runtime.rank :: runtime.world_size] if split and runtime is not None else cases


def _encoded_text(case: Case) -> str:
    return case.encoded_prompt or case.prompt


def encode_prompts(tokenizer, text_encoder, cases: list[Case], settings: dict, negative_prompt: str | None
                   ) -> dict[str, Any]:
    """Every distinct prompt of `cases` (and, under CFG, every distinct negative prompt) encoded once ->
    {text: (1, max_sequence_length, D) on the CPU}, for `generate_cases(embeddings=...)`: the text encoder can
    then be freed before the transformer loads (or run on the CPU), and a batch encodes each text once."""
    import torch

    from .text import encode_text

    texts = {_encoded_text(c): None for c in cases}
    if settings["guidance_scale"] > 1.0:
        texts.update({(negative_prompt if c.negative_prompt is None else c.negative_prompt): None for c in cases})
    with torch.no_grad():
        return {text: encode_text(tokenizer, text_encoder, [text], settings["max_sequence_length"], "cpu")
                for text in texts}


def _broadcast_seed(seed: int, device) -> int:
    """Rank 0's seed, so a random seed is the same on every rank of a context-parallel run (any 64-bit seed)."""
    import torch.distributed as dist

    box = [seed]
    dist.broadcast_object_list(box, src=0, device=device)
    return int(box[0])


def generate_cases(pipe, cases: list[Case], settings: dict, *, fps: int, runtime=None, split: bool = False,
                   negative_prompt: str | None = None, max_references: int | None = None, record: dict | None = None,
                   model: str = "", manifest: Path | None = None, progress: bool = True, announce: bool = False,
                   embeddings: dict | None = None, callback_on_step_end=None) -> list[dict]:
    """Generate every case (`split`: this rank's share of them) and write video + sidecar; returns one summary
    per video written here. `record`: more settings for the sidecars (memory flags, dtype, ...); `manifest`: where
    rank 0 lists every video of the run; `embeddings`: the cases' texts already encoded (`encode_prompts`), for a
    pipeline without its text encoder; `callback_on_step_end`: the pipelines' per-step callback (progress; an
    exception raised there stops the run before that case's video is written)."""
    import torch
    from tqdm.auto import tqdm

    from . import library_versions
    from .distributed import Runtime
    from .release import MAX_REFERENCES
    from .speed import ForwardCounter, StageTimer
    from .video_io import write_video

    rt = runtime or Runtime()
    sharded = rt.distributed and not split
    writes = split or rt.is_main
    mine = cases_of_rank(cases, rt, split)
    versions = library_versions()
    counter, timer = ForwardCounter(pipe.transformer), StageTimer(pipe, rt.device)
    results = []
    for case in tqdm(mine, desc="videos", unit="video", disable=not progress or len(mine) < 2):
        seed = case.seed if case.seed is not None else random.randrange(2**31)
        if sharded:
            seed = _broadcast_seed(seed, rt.device)
        negative = negative_prompt if case.negative_prompt is None else case.negative_prompt
        if embeddings is None:
            text = dict(prompt=_encoded_text(case), negative_prompt=negative)
        else:  # encoded before the transformer loaded (`encode_prompts`)
            text = dict(prompt_embeds=embeddings[_encoded_text(case)],
                        negative_prompt_embeds=embeddings.get(negative) if settings["guidance_scale"] > 1.0 else None)
        start = time.perf_counter()
        with counter.counting(), timer.timing():
            frames = pipe(
                reference_images=case.images or case.references,
                **text,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np",
                max_references=max_references or MAX_REFERENCES,
                callback_on_step_end=callback_on_step_end,
                **settings,
            ).frames[0]
        seconds = time.perf_counter() - start
        if not writes:
            continue
        write_video(case.output, (frames * 255.0).round().clip(0, 255).astype("uint8"), fps=fps)
        used = {**settings, "fps": fps, "world_size": rt.world_size, "context_parallel": sharded, **(record or {})}
        sidecar = case.output.with_suffix(".json")
        write_text_atomic(sidecar, json.dumps({
            "made_by": MADE_BY,
            "video": path_text(case.output),
            "prompt": case.prompt,
            "original_prompt": case.original_prompt,
            "enhancer": case.enhancer,
            "encoded_prompt": case.encoded_prompt or case.prompt,
            "negative_prompt": negative,
            "negative_prompt_is_default": case.negative_prompt is None,
            "references": case.labels,
            "seed": seed,
            "settings": used,
            "model": model,
            "source": path_text(case.source),
            "versions": versions,
            "seconds": round(seconds, 3),
            "transformer_forwards": counter.record(),
            "stages": timer.record(),
        }, indent=2, ensure_ascii=False) + "\n")
        results.append({"video": path_text(case.output), "sidecar": path_text(sidecar), "seed": seed,
                        "seconds": round(seconds, 3), "source": path_text(case.source),
                        "row": _manifest_row(case, seed, negative, used, manifest)})
        if announce and len(cases) == 1:
            print(f"wrote {path_text(case.output)} ({seconds:.1f} s)", file=sys.stderr)
    if manifest is not None:
        _write_manifest(manifest, results, rt, split)
    for r in results:
        r.pop("row")
    return results


def _manifest_row(case: Case, seed: int, negative: str, settings: dict, manifest: Path | None) -> dict | None:
    """One `evaluate --cases` line: the video relative to the manifest's folder, the reference files."""
    if manifest is None:
        return None
    video = os.path.relpath(case.output, manifest.parent)
    rewritten = {"original_prompt": case.original_prompt, "enhancer": case.enhancer} if case.enhancer else {}
    return {"id": Path(video).with_suffix("").as_posix(), "video": Path(video).as_posix(), "prompt": case.prompt,
            **rewritten, "references": [label for label in case.labels if label != DEFAULT_REFERENCE],
            "seed": seed, "negative_prompt": negative, "settings": settings, "source": path_text(case.source)}


def _write_manifest(path: Path, results: list[dict], rt, split: bool) -> None:
    rows = [r["row"] for r in results]
    if split and rt.distributed:  # every rank wrote its share: rank 0 lists them all
        import torch.distributed as dist

        everyone = [None] * rt.world_size
        dist.all_gather_object(everyone, rows)
        rows = [row for part in everyone for row in part]
    if rt.is_main:
        rows.sort(key=lambda row: row["id"])
        write_text_atomic(path, f"# made_by: {MADE_BY}\n" + "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                                                   for row in rows))
