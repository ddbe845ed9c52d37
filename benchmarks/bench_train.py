"""Training throughput and peak memory: the tiny CPU run, fp32 baseline vs gradient checkpointing vs bf16 vs
batches bucketed by reference count vs compiled blocks (`--compile`, fp32 and bf16).

    .venv/bin/python benchmarks/bench_train.py [--steps 12] [--size 96] [--frames 9] [--heads 4] [--ffn 512]
        [--batch 4] [--bucketed]

Each variant runs `kaleido_s2v.training.train` in its own process (so peak RSS is per variant) on the same
synthetic data from a latent cache (no decoding in the loop; clips with 1, 2 or 3 references); samples/s is the median over the steps after
the first two (`--steps` ≥ 12 keeps the compiled variants' one-off compiles, one per reference count, out of
the median); activation memory is what autograd saves for backward in one forward (saved-tensor hooks);
the process peak RSS is printed too. Ratios are against the fp32 baseline measured in the same run.

With a CUDA GPU, `--gpu` instead times one forward+backward of a bf16 KaleidoTransformer3DModel with the 14B
architecture (`--layers` fewer if it does not fit) with gradient checkpointing: tokens/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "fp32": dict(mixed_precision="fp32", gradient_checkpointing=False),
    "fp32+checkpointing": dict(mixed_precision="fp32", gradient_checkpointing=True),
    "bf16 autocast": dict(mixed_precision="bf16", gradient_checkpointing=False),
    "fp32+bucketed": dict(mixed_precision="fp32", gradient_checkpointing=False, bucket_by_references=True),
    "fp32+compile": dict(mixed_precision="fp32", gradient_checkpointing=False, compile=True),
    "bf16+compile": dict(mixed_precision="bf16", gradient_checkpointing=False, compile=True),
}


def bench_model(args) -> dict:
    return dict(num_layers=4, num_attention_heads=args.heads, attention_head_dim=32, ffn_dim=args.ffn)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args) -> None:
    """One variant: train from the cache, print a JSON line with samples/s and memory."""
    from kaleido_s2v.training.config import toy_cpu
    from kaleido_s2v.training.trainer import train

    variant = VARIANTS[args.variant]
    cfg = toy_cpu()
    cfg.model.path, cfg.data.path, cfg.data.cache_dir = args.model, args.data, args.cache
    cfg.data.height = cfg.data.width = args.size
    cfg.data.num_frames = args.frames
    cfg.run.output = args.output
    cfg.run.max_steps, cfg.run.save_every, cfg.run.batch_size, cfg.run.tensorboard = args.steps, 10**6, args.batch, False
    cfg.data.bucket_by_references = variant.get("bucket_by_references", args.bucketed)
    cfg.parallel.mixed_precision = variant["mixed_precision"]
    cfg.parallel.gradient_checkpointing = variant["gradient_checkpointing"]
    cfg.parallel.compile = variant.get("compile", False)
    import torch

    torch.set_num_threads(args.threads)
    train(cfg, progress=False)
    metrics = [json.loads(line) for line in (Path(args.output) / "metrics.jsonl").read_text().splitlines()]
    sps = statistics.median(m["samples_per_s"] for m in metrics[2:])
    print(json.dumps(dict(samples_per_s=sps, peak_rss_mib=_rss_mib(), activation_mib=saved_activation_mib(cfg))))


def saved_activation_mib(cfg) -> float:
    """MiB of tensors autograd keeps for backward in one training forward (what checkpointing trades for compute).

    Counted with saved-tensor hooks (unique storages), on the run's batch with 2 references: deterministic,
    unlike the process RSS of a shared CPU machine.
    """
    import torch

    from kaleido_s2v.training.components import load_transformer
    from kaleido_s2v.training.objective import flow_matching_loss

    model = load_transformer(cfg.model.path).train()
    if cfg.parallel.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    h, w = cfg.data.height // 8, cfg.data.width // 8
    t = (cfg.data.num_frames - 1) // 4 + 1
    b = cfg.run.batch_size
    x0, noise = torch.randn(b, 16, t, h, w), torch.randn(b, 16, t, h, w)
    refs = [torch.randn(b, 16, 1, h, w) for _ in range(2)]
    text = torch.randn(b, cfg.data.max_sequence_length, model.config.text_dim)
    seen: dict[int, int] = {}

    def pack(x):
        seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    bf16 = cfg.parallel.mixed_precision == "bf16"
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = flow_matching_loss(model, x0, noise, torch.full((b,), 0.5), text, refs)
    loss.backward()
    return sum(seen.values()) / 2**20


def prepare(tmp: Path, size: int, frames: int, model_kwargs: dict) -> tuple[Path, Path, Path]:
    import numpy as np
    from PIL import Image

    from kaleido_s2v.tiny import tiny_components
    from kaleido_s2v.training.cache import build_cache
    from kaleido_s2v.training.config import toy_cpu
    from kaleido_s2v.video_io import write_video

    model, data, cache = tmp / "model", tmp / "data", tmp / "cache"
    for name, component in tiny_components(0, **model_kwargs).items():
        component.save_pretrained(model / name)
    rng = np.random.default_rng(0)
    for i in range(12):
        write_video(data / "videos" / f"c{i}.mp4", (rng.random((frames + 4, size, size, 3)) * 255).astype(np.uint8))
        (data / "labels").mkdir(parents=True, exist_ok=True)
        (data / "labels" / f"c{i}.txt").write_text(f"clip {i}")
        (data / "references" / f"c{i}").mkdir(parents=True, exist_ok=True)
        for j in range(1 + i % 3):
            Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(
                data / "references" / f"c{i}" / f"ref{j + 1}.png")
    cfg = toy_cpu()
    cfg.model.path, cfg.data.path, cfg.data.cache_dir = str(model), str(data), str(cache)
    cfg.data.height = cfg.data.width = size
    cfg.data.num_frames = frames
    build_cache(cfg, progress=False)
    return model, data, cache


def gpu(args) -> None:
    import torch

    from kaleido_s2v.transformer import KaleidoTransformer3DModel

    torch.manual_seed(0)
    dev = torch.device("cuda")
    with torch.device(dev):  # the default config is the 14B architecture; random weights built on the GPU
        model = KaleidoTransformer3DModel(num_layers=args.layers).to(torch.bfloat16)
    model.enable_gradient_checkpointing()
    lat_t, lat_h, lat_w = 21, 60, 104  # 81 frames at 480x832
    x = torch.randn(1, 16, lat_t, lat_h, lat_w, device=dev, dtype=torch.bfloat16)
    refs = [torch.randn(1, 16, 1, lat_h, lat_w, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    text = torch.randn(1, 512, 4096, device=dev, dtype=torch.bfloat16)
    tokens = (lat_t + len(refs)) * (lat_h // 2) * (lat_w // 2)
    times = []
    for _ in range(3):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(x, torch.tensor([500.0], device=dev), text, refs, return_dict=False)[0]
        out.float().square().mean().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    dt = min(times[1:])
    print(f"14B architecture, {args.layers} layers, bf16, gradient checkpointing, {tokens} tokens (81 frames 480x832 "
          f"+ 3 refs): {tokens / dt:,.0f} tokens/s, {dt:.2f} s/step, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--heads", type=int, default=4, help="attention heads of 32 dims (8: the 256-wide model)")
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--bucketed", action="store_true", help="every variant draws batches of one reference count")
    p.add_argument("--gpu", action="store_true", help="time the 14B architecture on a CUDA GPU")
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    for name in ("model", "data", "cache", "output"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return child(args)
    if args.gpu:
        return gpu(args)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, data, cache = prepare(tmp, args.size, args.frames, bench_model(args))
        results = {}
        for name in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", name, "--model", str(model), "--data", str(data),
                   "--cache", str(cache), "--output", str(tmp / name.replace(" ", "_").replace("+", "_")),
                   "--steps", str(args.steps), "--size", str(args.size), "--frames", str(args.frames),
                   "--threads", str(args.threads), "--heads", str(args.heads), "--ffn", str(args.ffn),
                   "--batch", str(args.batch), *(["--bucketed"] if args.bucketed else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"variant {name} failed:\n{proc.stderr[-3000:]}")
            out = proc.stdout.strip().splitlines()[-1]
            results[name] = json.loads(out)
    base = results["fp32"]
    print(f"tiny CPU training ({bench_model(args)}, {args.size}x{args.size}, {args.frames} frames, 1-3 refs, "
          f"batch {args.batch}{', bucketed' if args.bucketed else ''}, {args.threads} threads)")
    print(f"{'variant':<22}{'samples/s':>10}{'ratio':>8}{'activations MiB':>17}{'ratio':>8}{'process peak MiB':>18}")
    for name, r in results.items():
        print(f"{name:<22}{r['samples_per_s']:>10.2f}{r['samples_per_s'] / base['samples_per_s']:>8.2f}"
              f"{r['activation_mib']:>17.2f}{r['activation_mib'] / base['activation_mib']:>8.2f}"
              f"{r['peak_rss_mib']:>18.1f}")


if __name__ == "__main__":
    main()
