"""Every bad input of every subcommand: one line, exit code 2, no traceback, nothing written, user files untouched.

`CASES` is the inventory behind the table in docs/errors.md; `python tests/test_bad_input.py` rewrites that table
from the messages the cases actually produce (paths shown as WORK/...). Each case runs the real entry point
in-process inside a work folder full of user files; afterwards every file and folder there (and in the shared
model folder) must be exactly as before, byte for byte, with nothing added.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PROMPT = ["--prompt", "The red striped circle moves to the left."]


@dataclass(frozen=True)
class Bad:
    id: str
    what: str  # the bad input, in words (docs/errors.md)
    argv: Callable  # World -> argv of `kaleido-s2v` (or of `python -m kaleido_s2v.toy` when toy=True)
    expect: str  # a part of the one-line message
    setup: Callable | None = None  # (World, monkeypatch) -> None: more user files, a patched limit
    toy: bool = False
    needs_no_cuda: bool = False


class World:
    """The user's folder (also the current folder), shared tiny Kaleido and MAGREF model folders and training data."""

    def __init__(self, root: Path, model: Path, data: Path, magref: Path):
        self.root, self.model, self.data, self.magref = root, model, data, magref

    def __call__(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def model_copy(self, name: str = "m") -> Path:
        dst = self.root / name
        shutil.copytree(self.model, dst)
        return dst

    @property
    def readonly(self) -> str:
        """A folder nobody may write in: /sys for root (permissions do not stop root), else a chmod 555 one."""
        if os.geteuid() == 0:
            return "/sys"
        path = self.root / "readonly"
        path.mkdir(exist_ok=True)
        path.chmod(0o555)
        return str(path)


def user_files(root: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / "img.png")
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / "pic.mp4", format="PNG")
    (root / "bad.png").write_bytes(b"not an image")
    (root / "notes.json").write_text('{"mine": true}\n')
    (root / "notes.txt").write_text("my notes\n")
    (root / "clip.mp4").write_bytes(b"my own video")
    (root / "project" / ".git").mkdir(parents=True)
    (root / "project" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "project" / "readme.md").write_text("# my project\n")
    (root / "empty").mkdir()


def _release(w: World, name: str = "rel") -> str:
    """An official-release layout for the transformer (file names only: these cases fail before any is read)."""
    root = w.root / name
    (root / "model" / "1").mkdir(parents=True)
    (root / "model" / "latest").write_text("1\n")
    (root / "model" / "1" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    return str(root)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _model_with(change: Callable[[Path], None]) -> Callable:
    def setup(w: World, mp) -> None:
        change(w.model_copy())

    return setup


def _write(name: str, text: str | bytes) -> Callable:
    def setup(w: World, mp) -> None:
        path = w.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())

    return setup


def _jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _eval_cases(w: World, mp) -> None:
    (w.root / "videos").mkdir()
    (w.root / "videos" / "a.mp4").write_bytes(b"a video")
    (w.root / "cases.jsonl").write_text(_jsonl({"id": "a", "video": "a.mp4", "prompt": "p", "references": ["img.png"]}))


def _small_bomb(w: World, mp) -> None:
    mp.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # img.png has 48 x 48 = 2304 > 2 x 500 pixels


def _closed_port() -> int:
    """A local port nothing listens on (an --enhancer-url that cannot connect, without leaving the machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gen(*args) -> Callable:
    return lambda w: ["generate", *PROMPT, *args]


TRAIN_SIZES = ["--height", "32", "--width", "32", "--frames", "5", "--max-sequence-length", "16", "--max-steps", "1"]


def _magref(*args) -> Callable:
    return lambda w: ["generate", "--model", str(w.magref), *PROMPT, *args]


def _train(*args, model: str | None = None, data: str | None = None, output: str = "run") -> Callable:
    return lambda w: ["train", "--model", model or str(w.model), "--data", data or str(w.data), "--output", output,
                      *TRAIN_SIZES, *args]


def _corrupt_data(w: World, mp) -> None:
    shutil.copytree(w.data, w.root / "data")
    for video in (w.root / "data" / "videos").iterdir():
        video.write_bytes(b"not a video")


G, B = "generate", "generate --batch"
CASES: list[Bad] = [
    # --- generate: references and prompt
    Bad("g-ref-missing", "a --ref that does not exist", _gen("--ref", "nope.png"), "does not exist"),
    Bad("g-ref-folder", "a folder given as --ref", lambda w: ["generate", *PROMPT, "--ref", w("project")], "is a folder"),
    Bad("g-ref-corrupt", "a --ref that is not an image", _gen("--ref", "bad.png"), "is not a readable image"),
    Bad("g-ref-bomb", "a decompression-bomb image (more pixels than PIL's limit)", _gen("--ref", "img.png"),
        "PIL's safety limit", setup=_small_bomb),
    Bad("g-ref-too-many", "five --ref images", _gen(*["--ref", "img.png"] * 5), "--ref: 5 reference images"),
    Bad("g-prompt-empty", "an empty prompt", lambda w: ["generate", "--prompt", "  "], "the prompt is empty"),
    Bad("g-prompt-bytes", "a prompt with bytes that are not UTF-8", lambda w: ["generate", "--prompt", "a \udcff ball"],
        "not valid UTF-8"),
    Bad("g-no-prompt", "neither --prompt nor --batch", lambda w: ["generate"], "give --prompt TEXT"),
    Bad("g-max-refs-0", "--max-references 0", _gen("--max-references", "0"), "--max-references 0: must be at least 1"),
    # --- generate: numbers
    Bad("g-seed-negative", "--seed -1", _gen("--seed", "-1"), "--seed -1: give an integer from 0 to 2**64 - 1"),
    Bad("g-seed-huge", "--seed 2**64", _gen("--seed", str(2**64)), "give an integer from 0 to 2**64 - 1"),
    Bad("g-steps-0", "--steps 0", _gen("--steps", "0"), "--steps 0: must be at least 1"),
    Bad("g-height-0", "--height 0", _gen("--height", "0"), "--height 0"),
    Bad("g-width-odd", "--width not a multiple of the model's VAE stride x patch", _gen("--width", "100"),
        "multiples of 8"),
    Bad("g-frames-0", "--frames 0", _gen("--frames", "0"), "--frames 0: must be of the form 4k+1"),
    Bad("g-frames-6", "--frames 6", _gen("--frames", "6"), "--frames 6: must be of the form 4k+1"),
    Bad("g-fps-0", "--fps 0", _gen("--fps", "0"), "--fps 0: must be at least 1"),
    Bad("g-msl-0", "--max-sequence-length 0", _gen("--max-sequence-length", "0"), "--max-sequence-length 0"),
    Bad("g-guidance-negative", "--guidance -1", _gen("--guidance", "-1"), "--guidance -1.0: must be at least 0"),
    Bad("g-guidance-nan", "--guidance nan", _gen("--guidance", "nan"), "--guidance nan: must be at least 0"),
    # --- generate: device and memory
    Bad("g-device-unknown", "an unknown --device", _gen("--device", "gpu0"), "--device 'gpu0' is not a device"),
    Bad("g-device-cuda", "--device cuda without a GPU", _gen("--device", "cuda"), "no CUDA device", needs_no_cuda=True),
    Bad("g-offload-cpu", "--cpu-offload on the CPU", _gen("--cpu-offload", "--device", "cpu"), "need a CUDA --device"),
    Bad("g-offload-both", "--cpu-offload with --group-offload", _gen("--cpu-offload", "--group-offload"),
        "exclude each other"),
    Bad("g-convert-builtin", "--convert without --model", _gen("--convert"), "--convert needs --model"),
    # --- generate: outputs
    Bad("g-out-suffix", "-o not ending in .mp4", _gen("-o", "out.avi"), "must end in .mp4"),
    Bad("g-out-exists", "-o naming a video the user made", _gen("-o", "clip.mp4"), "'clip.mp4' already exists"),
    Bad("g-out-sidecar", "-o whose .json sidecar name is a user's file", _gen("-o", "notes.mp4"),
        "sidecar 'notes.json' already exists"),
    Bad("g-out-is-ref", "-o naming one of the reference images", _gen("--ref", "pic.mp4", "-o", "pic.mp4"),
        "is also an input"),
    Bad("g-out-dir-named-mp4", "-o naming a folder called x.mp4", _gen("-o", "x.mp4"), "is a folder",
        setup=lambda w, mp: (w.root / "x.mp4").mkdir()),
    Bad("g-out-parent-file", "-o under a file", _gen("-o", "notes.txt/out.mp4"), "is a file, not a folder"),
    Bad("g-out-readonly", "-o in a folder that cannot be written", lambda w: ["generate", *PROMPT, "-o",
        f"{w.readonly}/out.mp4"], "cannot write in"),
    # --- generate: model folders
    Bad("g-model-missing", "--model that does not exist", _gen("--model", "nope"), "--model 'nope' does not exist"),
    Bad("g-model-file", "--model naming a file", _gen("--model", "notes.txt"), "is a file"),
    Bad("g-model-not-model", "--model naming an unrelated folder", _gen("--model", "project"), "not a model folder"),
    Bad("g-model-truncated", "a truncated safetensors file in --model", _gen("--model", "m"),
        "is not a complete safetensors file",
        setup=_model_with(lambda m: _truncate(next((m / "transformer").glob("*.safetensors"))))),
    Bad("g-model-empty-weights", "an empty safetensors file in --model", _gen("--model", "m"),
        "is not a complete safetensors file",
        setup=_model_with(lambda m: next((m / "vae").glob("*.safetensors")).write_bytes(b""))),
    Bad("g-model-bad-config", "a corrupt config.json in --model", _gen("--model", "m"), "config.json is not valid JSON",
        setup=_model_with(lambda m: (m / "text_encoder" / "config.json").write_text("{not json"))),
    Bad("g-model-bad-index", "a corrupt model_index.json", _gen("--model", "m"), "model_index.json is not valid JSON",
        setup=_model_with(lambda m: (m / "model_index.json").write_text(""))),
    Bad("g-model-no-vae", "--model without its vae/", _gen("--model", "m"), "missing",
        setup=_model_with(lambda m: shutil.rmtree(m / "vae"))),
    Bad("g-model-no-weights", "--model whose transformer/ has no weights", _gen("--model", "m"), "has no *.safetensors",
        setup=_model_with(lambda m: [p.unlink() for p in (m / "transformer").glob("*.safetensors")])),
    Bad("g-model-bad-defaults", "a corrupt generation_defaults.json", _gen("--model", "m"),
        "generation_defaults.json is not valid JSON",
        setup=_model_with(lambda m: (m / "generation_defaults.json").write_text("[1, 2"))),
    # --- generate --batch
    Bad("b-missing", "--batch that does not exist", lambda w: ["generate", "--batch", "nope.txt"], "does not exist"),
    Bad("b-empty", "an empty --batch file", lambda w: ["generate", "--batch", "cases.txt"], "has no cases",
        setup=_write("cases.txt", "\n# nothing\n")),
    Bad("b-bytes", "a --batch file that is not UTF-8", lambda w: ["generate", "--batch", "cases.txt"],
        "not a readable UTF-8 text file", setup=_write("cases.txt", b"a \xff ball@@img.png\n")),
    Bad("b-out-dotdot", "a batch output with '..'", lambda w: ["generate", "--batch", "cases.jsonl"],
        "cases.jsonl:2: \"output\" '../x.mp4' leaves --out-dir",
        setup=_write("cases.jsonl", _jsonl({"prompt": "a", "references": ["img.png"]},
                                           {"prompt": "b", "references": ["img.png"], "output": "../x.mp4"}))),
    Bad("b-out-absolute", "an absolute batch output", lambda w: ["generate", "--batch", "cases.jsonl"],
        "cases.jsonl:1: \"output\" '/tmp/x.mp4' leaves --out-dir",
        setup=_write("cases.jsonl", _jsonl({"prompt": "a", "references": ["img.png"], "output": "/tmp/x.mp4"}))),
    Bad("b-seed", "a batch line with a seed out of range (after a good line)",
        lambda w: ["generate", "--batch", "cases.jsonl"], "cases.jsonl:2: \"seed\" -3",
        setup=_write("cases.jsonl", _jsonl({"prompt": "a", "references": ["img.png"], "seed": 1},
                                           {"prompt": "b", "references": ["img.png"], "seed": -3}))),
    Bad("b-json", "a batch line that is not JSON", lambda w: ["generate", "--batch", "cases.jsonl"],
        "cases.jsonl:1: invalid JSON", setup=_write("cases.jsonl", "{\"prompt\": \n")),
    Bad("b-key", "a batch line with an unknown key", lambda w: ["generate", "--batch", "cases.jsonl"],
        "unknown keys ['steps']", setup=_write("cases.jsonl", _jsonl({"prompt": "a", "steps": 3}))),
    Bad("b-duplicate", "two batch lines with one output", lambda w: ["generate", "--batch", "cases.jsonl"],
        "is already used by line 1", setup=_write("cases.jsonl", _jsonl(
            {"prompt": "a", "references": ["img.png"], "output": "v.mp4"},
            {"prompt": "b", "references": ["img.png"], "output": "v.mp4"}))),
    Bad("b-out-exists", "a batch output that is a user's file", lambda w: ["generate", "--batch", "cases.jsonl",
        "--out-dir", "."], "cases.jsonl:1: output 'clip.mp4' already exists",
        setup=_write("cases.jsonl", _jsonl({"prompt": "a", "references": ["img.png"], "output": "clip.mp4"}))),
    Bad("b-manifest-user", "--out-dir holding the user's manifest.jsonl", lambda w: ["generate", "--batch",
        "cases.txt", "--out-dir", "o"], "manifest 'o/manifest.jsonl' already exists",
        setup=lambda w, mp: (_write("cases.txt", "a ball@@img.png\n")(w, mp), _write("o/manifest.jsonl", "{}\n")(w, mp))),
    Bad("b-out-dir-file", "--out-dir naming a file", lambda w: ["generate", "--batch", "cases.txt", "--out-dir",
        "notes.txt"], "--out-dir 'notes.txt' is a file", setup=_write("cases.txt", "a ball@@img.png\n")),
    Bad("b-and-prompt", "--batch with --prompt", lambda w: ["generate", "--batch", "cases.txt", *PROMPT],
        "replaces --prompt/--ref", setup=_write("cases.txt", "a ball@@img.png\n")),
    # --- generate --enhance-prompt and prompt (docs/prompts.md; more in tests/test_prompts*.py)
    Bad("g-enh-none", "--enhance-prompt without an enhancer", _gen("--enhance-prompt"), "needs an enhancer"),
    Bad("g-enh-no-switch", "--enhancer without --enhance-prompt", _gen("--enhancer", "project"),
        "--enhancer configures --enhance-prompt: add --enhance-prompt"),
    Bad("g-enh-missing", "an --enhancer folder that does not exist", _gen("--enhance-prompt", "--enhancer", "nope"),
        "--enhancer 'nope' does not exist"),
    Bad("g-enh-unrelated", "an --enhancer folder that is not a model", _gen("--enhance-prompt", "--enhancer",
        "project"), "not a transformers model folder (no config.json), not a chat model"),
    Bad("g-enh-video-model", "the video model given as --enhancer", lambda w: _gen("--enhance-prompt", "--enhancer",
        str(w.model))(w), "is a diffusers pipeline folder (a video model), not a chat model"),
    Bad("g-enh-not-chat", "a text encoder (umT5) given as --enhancer", lambda w: _gen("--enhance-prompt",
        "--enhancer", str(w.model / "text_encoder"))(w), "holds a umt5, not a chat model"),
    Bad("g-enh-no-template", "an --enhancer base model without a chat template",
        _gen("--enhance-prompt", "--enhancer", "lm"), "has no chat template",
        setup=lambda w, mp: (_write("lm/config.json", '{"model_type": "qwen2"}')(w, mp),
                             _write("lm/model.safetensors", b"x")(w, mp))),
    Bad("g-enh-both", "--enhancer with --enhancer-url", _gen("--enhance-prompt", "--enhancer", "project",
        "--enhancer-url", "http://127.0.0.1:1/v1"), "exclude each other"),
    Bad("g-enh-model-no-url", "--enhancer-model without --enhancer-url", _gen("--enhance-prompt", "--enhancer",
        "project", "--enhancer-model", "m"), "add --enhancer-url"),
    Bad("g-enh-url-no-model", "--enhancer-url without --enhancer-model", _gen("--enhance-prompt", "--enhancer-url",
        "http://127.0.0.1:1/v1"), "--enhancer-url needs --enhancer-model NAME"),
    Bad("g-enh-url-scheme", "an --enhancer-url that is not http(s)", _gen("--enhance-prompt", "--enhancer-url",
        "ftp://host/v1", "--enhancer-model", "m"), "is not an http(s) URL"),
    Bad("g-enh-url-device", "--enhancer-device with --enhancer-url", _gen("--enhance-prompt", "--enhancer-url",
        "http://127.0.0.1:1/v1", "--enhancer-model", "m", "--enhancer-device", "cpu"),
        "--enhancer-device places a local --enhancer model"),
    Bad("g-enh-unreachable", "an --enhancer-url nothing listens on", lambda w: _gen("--enhance-prompt",
        "--enhancer-url", f"http://127.0.0.1:{_closed_port()}/v1", "--enhancer-model", "m")(w), "cannot connect",
        setup=lambda w, mp: mp.setattr("kaleido_s2v.prompts.endpoint.BACKOFF_SECONDS", (0.0,))),
    Bad("g-enh-seed", "--enhancer-seed -1", _gen("--enhance-prompt", "--enhancer", "project", "--enhancer-seed",
        "-1"), "--enhancer-seed -1: give an integer"),
    Bad("g-enh-system", "an --enhancer-system file that does not exist", _gen("--enhance-prompt", "--enhancer-url",
        "http://127.0.0.1:1/v1", "--enhancer-model", "m", "--enhancer-system", "nope.txt"),
        "--enhancer-system 'nope.txt' cannot be read"),
    Bad("g-enh-quirk", "--enhance-prompt with --official-prompt-quirk", _gen("--enhance-prompt", "--enhancer",
        "project", "--official-prompt-quirk"), "--official-prompt-quirk reproduces the release's samples"),
    Bad("b-enh-cache-user", "--out-dir holding the user's prompt_cache.json", lambda w: ["generate", "--batch",
        "cases.txt", "--out-dir", "o", "--enhance-prompt", "--enhancer-url", f"http://127.0.0.1:{_closed_port()}/v1",
        "--enhancer-model", "m"], "prompt cache 'o/prompt_cache.json' already exists",
        setup=lambda w, mp: (_write("cases.txt", "a ball@@img.png\n")(w, mp), _write("o/prompt_cache.json", "{}\n")(w, mp))),
    Bad("p-prompt-empty", "prompt with an empty --prompt", lambda w: ["prompt", "--prompt", " ", "--enhancer",
        "project"], "--prompt: the prompt is empty"),
    Bad("p-ref-missing", "prompt with a --ref that does not exist", lambda w: ["prompt", "--prompt", "a fox",
        "--ref", "nope.png", "--enhancer-url", "http://127.0.0.1:1/v1", "--enhancer-model", "m"],
        "--ref image 'nope.png' does not exist"),
    Bad("p-no-enhancer", "prompt without an enhancer", lambda w: ["prompt", "--prompt", "a fox"],
        "needs an enhancer"),
    # --- convert
    Bad("c-src-missing", "--src that does not exist", lambda w: ["convert", "--src", "nope", "--dst", "out"],
        "no such folder"),
    Bad("c-src-file", "a .pth file given as --src", lambda w: ["convert", "--src", "weights.pth", "--dst", "out"],
        "is a file; give the release folder that holds it", setup=_write("weights.pth", b"x")),
    Bad("c-src-unrelated", "--src naming an unrelated folder", lambda w: ["convert", "--src", "project", "--dst", "out"],
        "not a Kaleido release"),
    Bad("c-src-incomplete", "an incomplete release", lambda w: ["convert", "--src", _release(w), "--dst", "out"],
        "incomplete official Kaleido release"),
    Bad("c-only", "--only with an unknown component", lambda w: ["convert", "--src", _release(w), "--dst", "out",
        "--only", "unet"], "--only unet"),
    Bad("c-dst-user", "--dst naming the user's folder", lambda w: ["convert", "--src", _release(w), "--dst", "project",
        "--only", "transformer"], "already exists and was not made by kaleido-s2v convert"),
    Bad("c-dst-file", "--dst naming a file", lambda w: ["convert", "--src", _release(w), "--dst", "notes.txt",
        "--only", "transformer"], "is a file: give a folder"),
    Bad("c-dst-inside-src", "--dst inside the source", lambda w: ["convert", "--src", _release(w), "--dst",
        w("rel", "out"), "--only", "transformer"], "must be outside the source folder"),
    Bad("c-dst-holds-src", "--dst holding the source", lambda w: ["convert", "--src", _release(w, "up/rel"), "--dst",
        w("up"), "--only", "transformer", "--overwrite"], "holds the source folder"),
    Bad("c-dst-cwd", "--dst naming the current folder (even with --overwrite)", lambda w: ["convert", "--src",
        _release(w), "--dst", ".", "--only", "transformer", "--overwrite"], "is (or contains) the current folder",
        setup=lambda w, mp: mp.chdir(w.root / "project")),
    Bad("c-dst-readonly", "--dst in a folder that cannot be written", lambda w: ["convert", "--src", _release(w),
        "--dst", f"{w.readonly}/out", "--only", "transformer"], "cannot write in"),
    Bad("c-dst-parent-file", "--dst under a file", lambda w: ["convert", "--src", _release(w), "--dst",
        "notes.txt/out", "--only", "transformer"], "is a file, not a folder"),
    # --- generate: MAGREF (tiny model folder MAGREF)
    Bad("g-layout-kaleido", "--layout on a Kaleido model", _gen("--layout", "grid"),
        "--layout/--layout-seed place references on MAGREF's canvas"),
    Bad("g-magref-layout-seed", "--layout-seed without --layout grid", _magref("--ref", "img.png", "--layout-seed", "1"),
        "--layout-seed shuffles the grid layout"),
    Bad("g-magref-frames", "--frames 1 for MAGREF (4 frames are dropped)", _magref("--ref", "img.png", "--frames", "1"),
        "--frames 1: this model needs at least 5"),
    Bad("g-magref-no-ref", "a MAGREF model without --ref", _magref(), "no reference image"),
    Bad("g-magref-quirk", "--official-prompt-quirk for MAGREF", _magref("--ref", "img.png", "--official-prompt-quirk"),
        "--official-prompt-quirk reproduces Kaleido's release script"),
    Bad("g-magref-distill", "--sampler distill for MAGREF", _magref("--ref", "img.png", "--sampler", "distill"),
        "--sampler distill is the Wan2.1 T2V distillation grid for Kaleido models"),
    Bad("g-lora-missing", "a --lora file that does not exist", _gen("--lora", "nope.safetensors:0.5"),
        "no file 'nope.safetensors'"),
    Bad("g-lora-not-lora", "a --lora file that is not a LoRA (a picture renamed)", _gen("--lora", "img.png"),
        "--lora"),
    Bad("g-magcache-uncalibrated", "--cache magcache on a grid without ratios", _gen("--cache", "magcache", "--steps",
        "7"), "no calibration for 7 steps of the official sampler"),
    Bad("g-magcache-calibrate-builtin", "--cache magcache-calibrate on the built-in model",
        _gen("--cache", "magcache-calibrate"), "stores the ratios in the model folder: give --model DIR"),
    Bad("g-attention-backend", "an --attention-backend this machine lacks", _gen("--attention-backend", "nope"),
        "--attention-backend 'nope' is not usable on this machine"),
    Bad("g-magref-key", "a MAGREF prompt-file key that is a path", lambda w: ["generate", "--model", str(w.magref),
        "--batch", "prompts.txt"], "prompts.txt:1: key '../x' cannot name a video file",
        setup=_write("prompts.txt", "../x@@a prompt@@img.png\n")),
    Bad("tr-magref-cache", "train a MAGREF model from the latent cache", lambda w: _train(
        "--cache-dir", "cache", model=str(w.magref))(w), "--cache-dir: the latent cache holds Kaleido's"),
    Bad("tr-magref-ref-rope", "train a MAGREF model with --ref-rope", lambda w: _train(
        "--ref-rope", "shift_hw", model=str(w.magref))(w), "--ref-rope/--ref-rope-offset choose Kaleido's"),
    # --- train (more in tests/test_train_inputs.py)
    Bad("tr-lr", "train --lr -1", _train("--lr", "-1"), "--lr -1.0 must be a positive number"),
    Bad("tr-frames", "train --frames 8", _train("--frames", "8"), "--frames 8"),
    Bad("tr-max-steps", "train --max-steps 0", _train("--max-steps", "0"), "--max-steps 0"),
    Bad("tr-decay", "train --decay-steps longer than the run", _train("--decay-steps", "5", "--warmup-steps", "0"),
        "--decay-steps 5"),
    Bad("tr-config-key", "a train --config with an unknown key", _train("--config", "c.yaml"),
        "unknown config key 'run.max_stepz'", setup=_write("c.yaml", "run:\n  max_stepz: 3\n")),
    Bad("tr-model-truncated", "train --model with a truncated safetensors file", _train(model="m"),
        "is not a complete safetensors file",
        setup=_model_with(lambda m: _truncate(next((m / "transformer").glob("*.safetensors"))))),
    Bad("tr-data-corrupt", "training data where every video is corrupt",
        _train(data="data"), "none of its 3 samples can be read",
        setup=_corrupt_data),
    Bad("tr-resume", "train --resume naming a folder that is not a checkpoint", _train("--resume", "project"),
        "--resume 'project' is not a checkpoint folder"),
    Bad("tr-output-user", "train --output naming the user's folder", _train(output="project"),
        "already exists and was not made by kaleido-s2v train"),
    Bad("tr-output-file", "train --output naming a file", _train(output="notes.txt"), "is a file: give a folder"),
    Bad("tr-output-parent-file", "train --output under a file", _train(output="notes.txt/run"),
        "is a file, not a folder"),
    Bad("tr-output-readonly", "train --output in a folder that cannot be written",
        lambda w: _train(output=f"{w.readonly}/run")(w), "cannot write in"),
    Bad("tr-cache-user", "train --build-cache --cache-dir naming the user's folder",
        _train("--build-cache", "--cache-dir", "project"), "already exists and was not made by kaleido-s2v train"),
    # --- curate
    Bad("cu-input-missing", "--input that does not exist", lambda w: ["curate", "--input", "nope", "--output", "c"],
        "does not exist"),
    Bad("cu-input-not-video", "--input naming a file that is not a video",
        lambda w: ["curate", "--input", "img.png", "--output", "c"], "is not a video"),
    Bad("cu-input-no-videos", "--input folder without videos", lambda w: ["curate", "--input", "project", "--output",
        "c"], "holds no videos"),
    Bad("cu-list-missing", "an --input list naming a missing video", lambda w: ["curate", "--input", "list.txt",
        "--output", "c"], "names 'gone.mp4', which does not exist", setup=_write("list.txt", "gone.mp4\n")),
    Bad("cu-output-is-input", "--output equal to --input", lambda w: ["curate", "--input", "vids", "--output", "vids"],
        "overlaps --input", setup=_write("vids/clip.mp4", b"x")),
    Bad("cu-output-in-input", "--output inside --input", lambda w: ["curate", "--input", "vids", "--output",
        "vids/out"], "overlaps --input", setup=_write("vids/clip.mp4", b"x")),
    Bad("cu-output-user", "--output naming the user's folder", lambda w: ["curate", "--input", "clip.mp4", "--output",
        "project"], "already exists and was not made by kaleido-s2v curate"),
    Bad("cu-output-file", "--output naming a file", lambda w: ["curate", "--input", "clip.mp4", "--output",
        "notes.txt"], "is a file: give a folder"),
    Bad("cu-output-readonly", "--output in a folder that cannot be written", lambda w: ["curate", "--input",
        "clip.mp4", "--output", f"{w.readonly}/c"], "cannot write in"),
    Bad("cu-output-parent-file", "--output under a file", lambda w: ["curate", "--input", "clip.mp4", "--output",
        "notes.txt/c"], "is a file, not a folder"),
    Bad("cu-stage", "an unknown stage", lambda w: ["curate", "--input", "clip.mp4", "--output", "c", "--stages",
        "scenes,sharpen"], "sharpen"),
    Bad("cu-config", "a --config that does not parse", lambda w: ["curate", "--input", "clip.mp4", "--output", "c",
        "--config", "bad.yaml"], "cannot be parsed", setup=_write("bad.yaml", "quality: [\n")),
    Bad("cu-workers", "--workers 0", lambda w: ["curate", "--input", "clip.mp4", "--output", "c", "--workers", "0"],
        "--workers must be >= 1"),
    # --- evaluate
    Bad("e-cases-missing", "--cases that does not exist", lambda w: ["evaluate", "--cases", "nope.jsonl", "--videos",
        "empty", "--output", "o"], "does not exist"),
    Bad("e-cases-binary", "--cases naming a file that is not text", lambda w: ["evaluate", "--cases", "img.png",
        "--videos", "empty", "--output", "o"], "is not UTF-8 text"),
    Bad("e-output-user", "--output naming the user's folder", lambda w: ["evaluate", "--cases", "cases.jsonl",
        "--videos", "videos", "--output", "project"], "already exists and was not made by kaleido-s2v evaluate",
        setup=_eval_cases),
    Bad("e-output-file", "--output naming a file", lambda w: ["evaluate", "--cases", "cases.jsonl", "--videos",
        "videos", "--output", "notes.txt"], "is a file: give a folder", setup=_eval_cases),
    Bad("e-output-parent-file", "--output under a file", lambda w: ["evaluate", "--cases", "cases.jsonl", "--videos",
        "videos", "--output", "notes.txt/o"], "is a file, not a folder", setup=_eval_cases),
    Bad("e-output-readonly", "--output in a folder that cannot be written", lambda w: ["evaluate", "--cases",
        "cases.jsonl", "--videos", "videos", "--output", f"{w.readonly}/o"], "cannot write in", setup=_eval_cases),
    Bad("e-batch-size", "--batch-size 0", lambda w: ["evaluate", "--cases", "cases.jsonl", "--videos", "videos",
        "--output", "o", "--batch-size", "0"], "--batch-size must be >= 1", setup=_eval_cases),
    Bad("e-params", "--params that is not JSON", lambda w: ["evaluate", "--cases", "cases.jsonl", "--videos", "videos",
        "--output", "o", "--params", "{oops"], "--params '{oops'", setup=_eval_cases),
    Bad("e-device", "an unknown --device", lambda w: ["evaluate", "--cases", "cases.jsonl", "--videos", "videos",
        "--output", "o", "--device", "tpu9"], "--device", setup=_eval_cases),
    # --- the toy world and the built-in model's recipe (python -m kaleido_s2v.toy)
    Bad("t-data-cwd", "make-data --out .", lambda w: ["make-data", "--out", ".", "--num", "2"],
        "is (or contains) the current folder", toy=True),
    Bad("t-data-user", "make-data --out naming a project folder (with .git)",
        lambda w: ["make-data", "--out", "project", "--num", "2"], "already exists and was not made by", toy=True),
    Bad("t-eval-user", "make-eval --out naming the user's folder", lambda w: ["make-eval", "--out", "project", "--num",
        "2"], "already exists and was not made by", toy=True),
    Bad("t-data-readonly", "make-data --out in a folder that cannot be written", lambda w: ["make-data", "--out",
        f"{w.readonly}/d", "--num", "2"], "cannot write in", toy=True),
    Bad("t-data-parent-file", "make-data --out under a file", lambda w: ["make-data", "--out", "notes.txt/d", "--num",
        "2"], "is a file, not a folder", toy=True),
    Bad("t-data-seed", "make-data --seed -1", lambda w: ["make-data", "--out", "d", "--num", "2", "--seed", "-1"],
        "--seed -1", toy=True),
    Bad("t-data-fps-0", "make-data --fps 0", lambda w: ["make-data", "--out", "d", "--num", "2", "--fps", "0"],
        "fps=0.0", toy=True),
    Bad("t-data-num-0", "make-data --num 0", lambda w: ["make-data", "--out", "d", "--num", "0"], "--num 0", toy=True),
    Bad("t-recipe-key", "a recipe with a missing key", lambda w: ["init-model", "--out", "m2", "--recipe", "r.yaml"],
        "has no 'vae_training.steps'", toy=True, setup=lambda w, mp: _recipe_without(w, "vae_training", "steps")),
    Bad("t-recipe-type", "a recipe with a wrong type", lambda w: ["init-model", "--out", "m2", "--recipe", "r.yaml"],
        "'data.num' must be int", toy=True, setup=lambda w, mp: _recipe_with(w, "data", "num", "many")),
    Bad("t-recipe-missing", "a recipe that does not exist", lambda w: ["init-model", "--out", "m2", "--recipe",
        "nope.yaml"], "does not exist", toy=True),
    Bad("t-init-user", "init-model --out naming the user's folder", lambda w: ["init-model", "--out", "project"],
        "already exists and was not made by", toy=True),
    Bad("t-gen-model-missing", "generate --model that does not exist (never the Hub)",
        lambda w: ["generate", "--model", "nope", "--cases", "empty", "--out", "v"], "does not exist", toy=True),
    Bad("t-gen-model-truncated", "generate --model with a truncated safetensors file", lambda w: ["generate",
        "--model", "m", "--cases", "empty", "--out", "v"], "is not a complete safetensors file", toy=True,
        setup=_model_with(lambda m: _truncate(next((m / "vae").glob("*.safetensors"))))),
    Bad("t-gen-steps-0", "generate --steps 0", lambda w: ["generate", "--model", "m", "--cases", "empty", "--out",
        "v", "--steps", "0"], "--steps 0: must be at least 1", toy=True),
    Bad("t-gen-out-user", "generate --out naming the user's folder", lambda w: ["generate", "--model", str(w.model),
        "--cases", "cases", "--out", "project"], "already exists and was not made by", toy=True,
        setup=_write("cases/scenes.jsonl", "")),
    Bad("t-gen-cases-bad", "generate --cases with a corrupt scenes.jsonl", lambda w: ["generate", "--model",
        str(w.model), "--cases", "cases", "--out", "v"], "scenes.jsonl:1: not a case", toy=True,
        setup=_write("cases/scenes.jsonl", "{\"clip_id\": \"../../x\"}\n")),
    Bad("t-vae-not-toy", "train-vae on a model folder init-model did not make", lambda w: ["train-vae", "--model",
        str(w.model)], "was not made by kaleido_s2v.toy init-model: this command rewrites its vae/", toy=True),
    Bad("t-report-folder", "evaluate --report naming a folder", lambda w: ["evaluate", "--cases", "empty", "--report",
        "project"], "is a folder: give a file name", toy=True),
    Bad("t-report-readonly", "evaluate --report in a folder that cannot be written", lambda w: ["evaluate",
        "--cases", "empty", "--report", f"{w.readonly}/r.json"], "cannot write in", toy=True),
    Bad("t-report-exists", "evaluate --report naming the user's file", lambda w: ["evaluate", "--cases", "empty",
        "--report", "notes.json"], "'notes.json' already exists", toy=True),
    Bad("t-config-exists", "train-config --out naming the user's file", lambda w: ["train-config", "--model", "m",
        "--data", "d", "--output", "r", "--out", "notes.txt"], "'notes.txt' already exists", toy=True),
    Bad("t-assemble-user", "assemble --out naming the user's folder", lambda w: ["assemble", "--model", str(w.model),
        "--transformer", str(w.model / "transformer"), "--out", "project"], "already exists and was not made by",
        toy=True),
    Bad("t-work-user", "reproduce --work naming the user's folder", lambda w: ["reproduce", "--work", "project"],
        "already exists and was not made by", toy=True),
    Bad("t-work-file", "reproduce --work naming a file", lambda w: ["reproduce", "--work", "notes.txt"],
        "is a file: give a folder", toy=True),
]


def _recipe(w: World) -> dict:
    import yaml

    return yaml.safe_load((REPO / "src/kaleido_s2v/toy/recipe.yaml").read_text())


def _recipe_without(w: World, section: str, key: str) -> None:
    import yaml

    r = _recipe(w)
    del r[section][key]
    (w.root / "r.yaml").write_text(yaml.safe_dump(r))


def _recipe_with(w: World, section: str, key: str, value) -> None:
    import yaml

    r = _recipe(w)
    r[section][key] = value
    (w.root / "r.yaml").write_text(yaml.safe_dump(r))


def snapshot(*roots: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under the roots."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = None if p.is_dir() else p.read_bytes()
    return out


def run_entry(bad: Bad, argv: list[str], capsys) -> tuple[int, str, str, str]:
    """(exit code, stdout, stderr, program name) of one case, run like the installed commands run."""
    from kaleido_s2v.cli import main
    from kaleido_s2v.toy.__main__ import PROG
    from kaleido_s2v.toy.__main__ import main as toy_main

    prog = f"{PROG} {argv[0]}" if bad.toy else f"kaleido-s2v {argv[0]}"
    rc = (toy_main if bad.toy else main)(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err, prog


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from kaleido_s2v.pipeline import KaleidoPipeline
    from kaleido_s2v.tiny import tiny_components

    path = tmp_path_factory.mktemp("shared") / "tiny-kaleido"
    KaleidoPipeline(**tiny_components(seed=0)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_magref(tmp_path_factory) -> Path:
    from kaleido_s2v import MagrefPipeline
    from kaleido_s2v.tiny import tiny_magref_components

    path = tmp_path_factory.mktemp("shared") / "tiny-magref"
    MagrefPipeline(**tiny_magref_components(seed=0)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    from tests.test_training import write_synthetic_data

    return write_synthetic_data(tmp_path_factory.mktemp("shared") / "data")


@pytest.fixture
def world(tmp_path, tiny_model, train_data, tiny_magref, monkeypatch) -> World:
    root = tmp_path / "work"
    root.mkdir()
    user_files(root)
    monkeypatch.chdir(root)
    return World(root, tiny_model, train_data, tiny_magref)


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(bad, world, monkeypatch, capsys):
    if bad.needs_no_cuda:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    if bad.setup is not None:
        bad.setup(world, monkeypatch)
    argv = bad.argv(world)
    before = snapshot(world.root, world.model, world.data)
    rc, out, err, prog = run_entry(bad, argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert bad.expect in lines[0], lines[0]
    assert "Traceback" not in out + err
    after = snapshot(world.root, world.model, world.data)
    assert sorted(after) == sorted(before), "files or folders were added or removed"
    changed = [p for p in before if before[p] != after[p]]
    assert not changed, f"changed: {changed}"


def test_docs_table_lists_every_case():
    doc = (REPO / "docs" / "errors.md").read_text(encoding="utf-8")
    missing = [c.id for c in CASES if f"| `{c.id}` |" not in doc]
    assert not missing, f"docs/errors.md lacks {missing}: regenerate the table with `python {Path(__file__).name}`"


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def _doc_table() -> str:
    """The markdown table of docs/errors.md, from running every case (paths relative to the work folder)."""
    import tempfile

    class Capture:
        def readouterr(self):
            out, err = sys.stdout.getvalue(), sys.stderr.getvalue()
            sys.stdout.seek(0), sys.stdout.truncate(), sys.stderr.seek(0), sys.stderr.truncate()
            return type("Cap", (), {"out": out, "err": err})

    import io

    from kaleido_s2v import MagrefPipeline
    from kaleido_s2v.pipeline import KaleidoPipeline
    from kaleido_s2v.tiny import tiny_components, tiny_magref_components
    from tests.test_training import write_synthetic_data

    rows = ["| case | command | bad input | message (exit code 2) |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "shared" / "tiny-kaleido"
        KaleidoPipeline(**tiny_components(seed=0)).save_pretrained(model)
        magref = Path(tmp) / "shared" / "tiny-magref"
        MagrefPipeline(**tiny_magref_components(seed=0)).save_pretrained(magref)
        data = write_synthetic_data(Path(tmp) / "shared" / "data")
        for k, bad in enumerate(CASES):
            root = Path(tmp) / f"w{k}" / "work"
            root.mkdir(parents=True)
            user_files(root)
            with pytest.MonkeyPatch.context() as mp:
                mp.chdir(root)
                w = World(root, model, data, magref)
                if bad.setup is not None:
                    bad.setup(w, mp)
                real = sys.stdout, sys.stderr
                sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
                try:
                    rc, _, err, prog = run_entry(bad, bad.argv(w), Capture())
                finally:
                    sys.stdout, sys.stderr = real
            message = err.strip().removeprefix(f"{prog}: error: ").replace(str(root), "WORK").replace(str(model), "MODEL").replace(str(magref), "MAGREF")
            message = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", message)  # a closed port, new each run
            message = message.replace(str(data), "DATA").replace(str(Path(tmp)), "TMP").replace(str(REPO), "REPO").replace("|", "\\|")
            command = prog.replace("python -m kaleido_s2v.toy", "toy").replace("kaleido-s2v ", "")
            rows.append(f"| `{bad.id}` | {command} | {bad.what} | {message if rc == 2 else f'EXIT {rc}: {message}'} |")
    return "\n".join(rows) + "\n"


TABLE_MARK = "<!-- the table below is written by `python tests/test_bad_input.py` -->\n"

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))  # `tests.test_training`
    doc = REPO / "docs" / "errors.md"
    head = doc.read_text(encoding="utf-8").split(TABLE_MARK)[0]
    doc.write_text(head + TABLE_MARK + "\n" + _doc_table(), encoding="utf-8")
