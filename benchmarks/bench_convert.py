"""Memory bound of `kaleido-s2v convert`: peak anonymous memory must not grow with the checkpoint size.

Writes fake official Kaleido releases (the real SAT pickle layout, `{'module': ..., 'args': Namespace}` with
`model.diffusion_model.*` keys and a few frozen-T5 `conditioner.*` keys; fewer but wide layers, random bf16
weights) at two sizes, converts each in a subprocess with a small --max-shard-size, and samples
/proc/<pid>/status (RssAnon, VmRSS) while it runs. Baselines measured in the same run:
  - `imports`: a process that only imports torch/diffusers and builds the model on the meta device
    (the converter's constant floor);
  - `naive`: `torch.load` without mmap, map the names, `safetensors.save_file` per shard (what a
    straightforward converter does) — its peak grows with the checkpoint.
Nothing is left on disk afterwards.

    .venv/bin/python benchmarks/bench_convert.py [--sizes 0.5 1.5] [--width 2048] [--max-shard-size 256MB]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

GB = 1e9

GENERATE = textwrap.dedent(
    """
    import argparse, sys, torch
    from kaleido_s2v.checkpoints import keymap
    from kaleido_s2v.tiny import tiny_transformer_config
    from kaleido_s2v.transformer import KaleidoTransformer3DModel
    root, width, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cfg = tiny_transformer_config(num_attention_heads=width // 128, attention_head_dim=128, ffn_dim=4 * width,
                                  text_dim=4096, num_layers=layers)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in keymap.diffusers_to_sat(KaleidoTransformer3DModel(**cfg).state_dict()).items()}
    g = torch.Generator().manual_seed(0)
    module = {k: torch.empty(s, dtype=torch.bfloat16).normal_(generator=g) for k, s in shapes.items()}
    module.update({f"conditioner.embedders.0.model.blocks.{i}.w": torch.zeros(64) for i in range(8)})
    import pathlib
    p = pathlib.Path(root) / "model" / "1"
    p.mkdir(parents=True)
    torch.save({"module": module, "args": argparse.Namespace(seed=0), "iteration": 1}, p / "mp_rank_00_model_states.pt")
    (pathlib.Path(root) / "model" / "latest").write_text("1")
    """
)

IMPORTS_ONLY = textwrap.dedent(
    """
    import torch, diffusers, transformers, safetensors
    from kaleido_s2v.transformer import KaleidoTransformer3DModel
    from kaleido_s2v.tiny import tiny_transformer_config
    with torch.device("meta"):
        KaleidoTransformer3DModel(**tiny_transformer_config(num_attention_heads=16, attention_head_dim=128,
                                                            ffn_dim=8192, text_dim=4096, num_layers=2))
    """
)

NAIVE = textwrap.dedent(
    """
    import argparse, sys, torch
    from safetensors.torch import save_file
    from kaleido_s2v.checkpoints import keymap
    src, dst, shard = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with torch.serialization.safe_globals([argparse.Namespace]):
        sd = torch.load(src, map_location="cpu", weights_only=True)["module"]  # everything in memory
    dit = {k[len(keymap.SAT_PREFIX):]: v for k, v in sd.items() if k.startswith(keymap.SAT_PREFIX)}
    out = {k: v.contiguous() for k, v in keymap.source_to_diffusers(dit, "official").items()}
    part, size, n = {}, 0, 0
    for k, v in out.items():
        part[k] = v; size += v.nbytes
        if size >= shard:
            save_file(part, f"{dst}/{n}.safetensors"); part, size, n = {}, 0, n + 1
    if part:
        save_file(part, f"{dst}/{n}.safetensors")
    """
)


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def measure(cmd: list[str], interval: float = 0.01) -> dict:
    """Run `cmd`, sampling /proc/<pid>/status; peak RssAnon and VmRSS (VmHWM where the kernel reports it)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "VmRSS": 0, "VmHWM": 0}
    while proc.poll() is None:
        for k, v in _status(proc.pid).items():
            peak[k] = max(peak[k], v)
        time.sleep(interval)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {
        "seconds": time.perf_counter() - start,
        "peak_anon": peak["RssAnon"],
        "peak_rss": max(peak["VmRSS"], peak["VmHWM"]),
        "stdout": out,
    }


def layers_for(size_gb: float, width: int) -> int:
    per_layer = (8 * width * width + 2 * width * 4 * width) * 2  # bf16: attention 8·D², FFN 2·D·4D
    fixed = (width * 4096 + 7 * width * width) * 2
    return max(1, round((size_gb * GB - fixed) / per_layer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.5, 1.5], help="checkpoint sizes in GB")
    parser.add_argument("--width", type=int, default=2048, help="model width (multiple of 128)")
    parser.add_argument("--max-shard-size", default="256MB")
    parser.add_argument("--dtype", default="keep", help="--dtype for the conversion (fp32 adds a copy per tensor)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive (non-streaming) baseline")
    parser.add_argument("--workdir", default=None, help="where to write the fake checkpoints (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from kaleido_s2v.checkpoints.shards import parse_size

    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    rows = []
    try:
        floor = measure([py, "-c", IMPORTS_ONLY])
        for size in args.sizes:
            layers = layers_for(size, args.width)
            src = work / f"release-{size}"
            t0 = time.perf_counter()
            subprocess.run([py, "-c", GENERATE, str(src), str(args.width), str(layers)], check=True)
            ckpt = src / "model/1/mp_rank_00_model_states.pt"
            ckpt_bytes = ckpt.stat().st_size
            gen_s = time.perf_counter() - t0
            dst = work / f"out-{size}"
            r = measure(
                [
                    py,
                    "-m",
                    "kaleido_s2v",
                    "convert",
                    "--src",
                    str(src),
                    "--dst",
                    str(dst),
                    "--only",
                    "transformer",
                    "--max-shard-size",
                    args.max_shard_size,
                    "--dtype",
                    args.dtype,
                    "--json",
                ]
            )
            full = json.loads(r["stdout"])
            summary = full["components"]["transformer"]
            shutil.rmtree(dst)
            row = dict(
                size_gb=ckpt_bytes / GB,
                layers=layers,
                tensors=summary["tensors"],
                shards=len(summary["shards"]),
                generate_s=gen_s,
                seconds=r["seconds"],
                convert_s=full["seconds"],
                gb_per_s=ckpt_bytes / GB / full["write_seconds"],
                peak_anon_gb=r["peak_anon"] / GB,
                peak_rss_gb=r["peak_rss"] / GB,
            )
            if not args.no_naive:
                (work / "naive").mkdir()
                n = measure([py, "-c", NAIVE, str(ckpt), str(work / "naive"), str(parse_size(args.max_shard_size))])
                shutil.rmtree(work / "naive")
                row.update(naive_seconds=n["seconds"], naive_peak_anon_gb=n["peak_anon"] / GB)
            rows.append(row)
            shutil.rmtree(src)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {"floor_anon_gb": floor["peak_anon"] / GB, "max_shard_size": args.max_shard_size, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"constant floor (imports + meta model, no conversion): peak RssAnon {result['floor_anon_gb']:.3f} GB")
    print(f"--max-shard-size {args.max_shard_size} --dtype {args.dtype}, width {args.width}, cpus {os.cpu_count()}")
    print("wall s: whole subprocess incl. imports; conv s: convert() itself; GB/s: checkpoint bytes / write phase")
    head = f"{'ckpt GB':>8} {'layers':>6} {'shards':>6} {'wall s':>7} {'conv s':>7} {'GB/s':>6} {'anon GB':>8}"
    head += f" {'anon-floor':>10}"
    head += f" {'RSS GB':>7}"
    if not args.no_naive:
        head += f" {'naive anon GB':>13} {'naive/ours':>10} {'naive s':>8}"
    print(head)
    for r in rows:
        line = (
            f"{r['size_gb']:8.2f} {r['layers']:6d} {r['shards']:6d} {r['seconds']:7.1f} {r['convert_s']:7.1f} "
            f"{r['gb_per_s']:6.2f} "
            f"{r['peak_anon_gb']:8.3f} {r['peak_anon_gb'] - result['floor_anon_gb']:10.3f} {r['peak_rss_gb']:7.3f}"
        )
        if "naive_peak_anon_gb" in r:
            line += (
                f" {r['naive_peak_anon_gb']:13.3f} {r['naive_peak_anon_gb'] / r['peak_anon_gb']:10.2f}"
                f" {r['naive_seconds']:8.1f}"
            )
        print(line)
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        print(
            f"checkpoint x{b['size_gb'] / a['size_gb']:.2f} -> "
            f"peak anonymous memory x{b['peak_anon_gb'] / a['peak_anon_gb']:.2f}"
            + (
                f" (naive x{b['naive_peak_anon_gb'] / a['naive_peak_anon_gb']:.2f})"
                if "naive_peak_anon_gb" in a
                else ""
            )
        )


if __name__ == "__main__":
    main()
