"""Flags and values that mean the same in every subcommand: one spelling, one check, one message.

Canonical spellings: `--quiet` (hides progress bars; `--no-progress` is a hidden alias), `--overwrite`,
`--frames`, dtype names `bf16`/`fp16`/`fp32` (`bfloat16`/`float16`/`float32` accepted as aliases).
"""

from __future__ import annotations

import argparse

from ..errors import UserInputError

DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def add_quiet(parser, help: str = "no progress bars") -> None:
    parser.add_argument("--quiet", action="store_true", help=help)
    parser.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)


def package_logging() -> None:
    """This package's progress notes (INFO) on stderr; the libraries' INFO chatter (e.g. temporary paths) not."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kaleido_s2v").setLevel(logging.INFO)


def hide_library_progress() -> None:
    """--quiet: also the loading bars of diffusers and transformers."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def add_overwrite(parser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} even if this command did not make it (default: refuse)")


def add_dtype(parser, choices: tuple[str, ...], default: str, help: str, flag: str = "--dtype") -> None:
    def dtype(text: str) -> str:
        return DTYPE_ALIASES.get(text, text)

    parser.add_argument(flag, type=dtype, choices=choices, default=default, help=help)


def parse_device(text: str | None, flag: str = "--device"):
    """A `torch.device` for `--device` (None/"auto": CUDA when available, else the CPU), checked to exist here."""
    import torch

    if text is None or text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UserInputError(f"{flag} {text!r} is not a device: give cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"{flag} {text}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        accelerator = getattr(torch, device.type, None)
        if accelerator is None or not getattr(accelerator, "is_available", lambda: False)():
            raise UserInputError(f"{flag} {text}: no {device.type} device is available here; use cpu or cuda")
    return device


def add_memory_options(group) -> None:
    """The memory flags of every command that loads a video model (`generation.MEMORY_FLAGS`, docs/generate.md)."""
    group.add_argument("--cpu-offload", action="store_true", help="model CPU offload (whole components move to GPU)")
    group.add_argument("--group-offload", action="store_true", help="block-level group offload (lowest GPU memory)")
    group.add_argument("--vae-tiling", action="store_true", help="decode the video in tiles")
    group.add_argument("--layerwise-fp8", action="store_true",
                       help="store transformer weights in fp8, compute in bf16")


def add_speed_options(group, cache_choices) -> None:
    """The speed flags of every command that loads a video model (docs/generate.md#speed); `cache_choices`: the
    --cache modes that command offers."""
    from ..generation import SAMPLERS

    group.add_argument("--sampler", choices=SAMPLERS, default="official",
                       help="official (the release's grid) or distill: 4 steps, shift 5, no CFG, as Wan2.1 step-"
                       "distillation LoRAs (LightX2V) expect (Kaleido models; --steps/--guidance still apply)")
    group.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                       help="LoRA file (.safetensors; diffusers/PEFT, original Wan (LightX2V, CausVid) or kohya "
                       "keys), repeatable, each with its scale (default 1)")
    group.add_argument("--cache", choices=cache_choices, default="none",
                       help="step caching through diffusers' hooks: fbcache (First Block Cache, threshold 0.05), "
                       "taylorseer (lite), magcache (needs one run of magcache-calibrate for this sampler and step "
                       "count: it stores the ratios in the model folder); the sidecar counts the forwards computed "
                       "and cached")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the repeated transformer blocks (regional)")
    group.add_argument("--attention-backend", metavar="NAME", help="diffusers attention backend (native, flash, "
                       "_flash_3, sage, flex, ...); default: native SDPA")


ENHANCER_FLAGS = ("enhancer", "enhancer_url", "enhancer_model", "enhancer_text_only", "enhancer_seed",
                  "enhancer_device", "enhancer_max_tokens", "enhancer_timeout", "enhancer_retries", "enhancer_system")


def add_enhancer_options(parser, switch: str | None = None):
    """The prompt-optimisation flags of `prompt` and `generate` (docs/prompts.md); `switch`: the flag that turns
    it on (generate's --enhance-prompt), added first. Returns the argument group."""
    g = parser.add_argument_group("prompt optimisation (docs/prompts.md)")
    if switch:
        g.add_argument(switch, action="store_true", help="rewrite each prompt in the long caption style the model "
                       "was trained on, with a chat model that sees the references, before the video model loads")
    g.add_argument("--enhancer", metavar="DIR", help="a local transformers chat model folder: a vision-language "
                   "model (Qwen2.5-VL / Qwen3-VL class; sees the references) or a text-only instruct model")
    g.add_argument("--enhancer-url", metavar="URL", help="an OpenAI-compatible chat endpoint instead, e.g. "
                   "http://127.0.0.1:8000/v1 (vLLM, Ollama, GLM-4.5, GPT-5); key from $KALEIDO_ENHANCER_API_KEY")
    g.add_argument("--enhancer-model", metavar="NAME", help="the model the --enhancer-url server serves")
    g.add_argument("--enhancer-text-only", action="store_true", default=None, help="show the enhancer the prompt "
                   "only, not the references (a text-only model behind --enhancer-url, e.g. GLM-4.5)")
    g.add_argument("--enhancer-seed", type=int, metavar="N", help="sample with this seed (default: greedy / "
                   "temperature 0: the same prompt gives the same caption)")
    g.add_argument("--enhancer-device", metavar="DEV", help="where a local --enhancer runs: cuda, cuda:1, cpu "
                   "(default: cuda when available; bf16 there, fp32 on the CPU; freed before the video model loads)")
    g.add_argument("--enhancer-max-tokens", type=int, metavar="N", help="longest answer in tokens (default: 400 "
                   "for a local model; a server's own limit, as reasoning models count their reasoning in it)")
    g.add_argument("--enhancer-timeout", type=float, metavar="S", help="seconds per --enhancer-url request "
                   "(default 120)")
    g.add_argument("--enhancer-retries", type=int, metavar="N", help="retries of a --enhancer-url request on "
                   "connection errors, timeouts, 429 and 5xx (default 2)")
    g.add_argument("--enhancer-system", metavar="FILE", help="your own system prompt (default: the shipped "
                   "kaleido_s2v/data/prompt_system.txt)")
    return g


def enhancer_from_args(args, default_device=None):
    """(the `prompts.Enhancer` the flags name, checked but not loaded; its system prompt). `default_device`: a
    local model's device when --enhancer-device is not given (default: CUDA when available)."""
    from ..prompts import make_enhancer, system_prompt

    device = args.enhancer_device  # for a server: refused by make_enhancer, before it is looked for
    if args.enhancer_url is None:
        device = parse_device(device, "--enhancer-device") if device is not None else default_device
    enhancer = make_enhancer(args.enhancer, args.enhancer_url, args.enhancer_model, device=device,
                             seed=args.enhancer_seed, max_tokens=args.enhancer_max_tokens,
                             timeout=args.enhancer_timeout, retries=args.enhancer_retries,
                             text_only=bool(args.enhancer_text_only))
    return enhancer, system_prompt(args.enhancer_system)
