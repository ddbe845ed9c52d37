"""`kaleido-s2v app`: a local web page (Gradio, the `[app]` extra) over the same batch runner as `generate`.

Every flag is checked before the model loads (a port in use, a bad --auth, an output folder that is not ours: one
line, exit 2); the model then loads once and the page is served until Ctrl-C. See docs/app.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
import time
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
from kaleido_s2v.errors import UserInputError

DEFAULT_OUTPUT_DIR = "kaleido_app_outputs"
MAX_UPLOAD_MB = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kaleido_s2v.app.runner import APP_CACHE_MODES

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  kaleido-s2v app                                   # built-in model on the CPU, http://127.0.0.1:7860\n"
        "  kaleido-s2v app --model Kaleido-14B-S2V-Diffusers --cache fbcache\n"
        "  kaleido-s2v app --host 0.0.0.0 --auth me:secret   # reachable from other machines, with a password\n"
        "see docs/app.md for the /generate API (gradio_client)."
    )
    s = parser.add_argument_group("serving")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    s.add_argument("--auth", metavar="USER:PASS", help="ask for this user name and password")
    s.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                   help=f"where the videos and sidecars go, the only folder served (default ./{DEFAULT_OUTPUT_DIR}/)")
    add_overwrite(s, "(write into) an existing --output-dir")
    s.add_argument("--max-upload-mb", type=int, default=MAX_UPLOAD_MB,
                   help=f"refuse uploads larger than this (default {MAX_UPLOAD_MB} MB)")
    s.add_argument("--no-examples", action="store_true", help="hide the built-in model's examples")
    m = parser.add_argument_group("model (loaded once at start-up; default: the built-in model)")
    m.add_argument("--model", metavar="DIR", help="diffusers-format Kaleido or MAGREF folder")
    m.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    add_dtype(m, ("auto", "bf16", "fp16", "fp32"), "auto", "auto: bf16 on CUDA, fp32 on CPU")
    m.add_argument("--max-references", type=int, help="refuse more references than this (default: the model's)")
    add_memory_options(m)
    f = parser.add_argument_group("speed (as `generate`; applied once, for every request)")
    add_speed_options(f, APP_CACHE_MODES)  # magcache-calibrate writes the model folder: generate's alone
    add_enhancer_options(parser).description = ("with an enhancer, the page offers \"Enhance the prompt first\" "
                                                "and /generate takes enhance_prompt=True")
    add_quiet(parser, "no start-up notes")


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UserInputError("--auth must be USER:PASS (a user name, a colon, a password; neither empty)")
    return user, password


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """The address can be bound now (Gradio would otherwise fail after the model loaded)."""
    if not 1 <= port <= 65535:
        raise UserInputError(f"--port {port}: give a port from 1 to 65535 (default 7860)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise UserInputError(f"--host {host!r} is not an address of this machine: give e.g. 127.0.0.1 or "
                             "0.0.0.0") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            fix = f"another port, e.g. --port {port + 1}" if e.errno in (98, 48, 10048) else "another --host/--port"
            raise UserInputError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}): give {fix}") from None


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    from importlib.util import find_spec

    if find_spec("gradio") is None:
        raise UserInputError("the app needs Gradio: pip install 'kaleido-s2v[app]' (or `make app`)")
    auth = parse_auth(args.auth)
    if args.max_upload_mb < 1:
        raise UserInputError(f"--max-upload-mb {args.max_upload_mb}: must be at least 1")
    check_port(args.host, args.port)
    from kaleido_s2v.app.runner import MADE_BY, AppOptions, Runner
    from kaleido_s2v.fileio import claim_folder, output_folder, path_text

    output_dir = Path(args.output_dir)
    claim_folder(output_dir, "--output-dir", MADE_BY, overwrite=args.overwrite, accept=("kaleido-s2v generate",))
    options = AppOptions(model=args.model, output_dir=output_dir, device=args.device, dtype=args.dtype,
                         max_references=args.max_references, sampler=args.sampler, cache=args.cache,
                         attention_backend=args.attention_backend, loras=args.lora, compile=args.compile,
                         cpu_offload=args.cpu_offload, group_offload=args.group_offload, vae_tiling=args.vae_tiling,
                         layerwise_fp8=args.layerwise_fp8)
    if any(getattr(args, name) is not None for name in ENHANCER_FLAGS):
        from kaleido_s2v.cli.options import enhancer_from_args

        options.enhancer, options.enhancer_system = enhancer_from_args(args)
    runner = Runner(options)
    if not is_loopback(args.host) and auth is None:
        print(f"kaleido-s2v app: warning: --host {args.host} serves this page, and the GPU behind it, to every "
              "machine that can reach this one, without a password: add --auth USER:PASS", file=sys.stderr)
    with output_folder(output_dir, MADE_BY):
        loaded = runner.load()
        from kaleido_s2v.app.server import build_demo, launch

        demo = build_demo(runner, examples=not args.no_examples)
        try:
            _, url, _ = launch(demo, runner, host=args.host, port=args.port, auth=auth,
                               max_upload_mb=args.max_upload_mb, quiet=True)
        except OSError as e:  # the port was taken in the meantime
            raise UserInputError(f"--port {args.port}: cannot listen on {args.host}:{args.port} ({e}): give "
                                 "another port") from None
        if not args.quiet:
            print(f"kaleido-s2v app: serving {url} ({'the built-in model' if runner.builtin else runner.model_name}"
                  f" on {runner.device}, loaded in {loaded:.1f} s; ready {time.perf_counter() - start:.1f} s after "
                  f"start); videos go to {path_text(output_dir.resolve())}; Ctrl-C stops", file=sys.stderr, flush=True)
        demo.block_thread()
    return 0
