"""The GPU suite, prepared to run unattended on one GPU (an H200: about 8 minutes; the device tool's 15-minute
budget leaves time for a rerun). With `--dry-run` the same code path runs on the CPU with a tiny config (CI runs
it: tests/test_gpu_suite.py).

What it measures, on the 14B Kaleido architecture with random bf16 weights at the release size (512×896, 81 frames,
3 references: 43,008 tokens):
  1. seconds per transformer forward and achieved TFLOP/s against the counted matmul FLOPs
     (`bench_transformer.transformer_flops`), for every attention backend usable here (`kaleido_s2v.speed`);
  2. the same with `--compile` (diffusers' regional compilation of the repeated blocks);
  3. peak device memory of one forward with the weights resident / under block-level group offload / in fp8
     storage (`enable_layerwise_casting`);
  4. one full 4-step distill sample (`--sampler distill`: shift 5, no CFG) through `KaleidoPipeline` with a
     full-size random VAE and precomputed prompt embeddings (no text encoder), seconds end to end.
Writes one JSON (`--out`, default gpu_suite.json) and, with `--results FILE`, appends a dated table to it.

    python benchmarks/gpu_suite.py --out $OUT/gpu_suite.json --results benchmarks/RESULTS.md
    python benchmarks/gpu_suite.py --dry-run --out /tmp/gpu_suite.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transformer import transformer_flops  # noqa: E402

RELEASE = dict(frames=21, height=64, width=112, refs=3, text_tokens=512)  # latent sizes: 81 frames, 512x896
MADE_BY = "benchmarks/gpu_suite.py"
TINY = dict(frames=3, height=8, width=12, refs=2, text_tokens=16)


def build_transformer(dry_run: bool, device, dtype):
    from kaleido_s2v import KaleidoTransformer3DModel
    from kaleido_s2v.tiny import tiny_transformer_config

    with torch.device("meta"):
        model = KaleidoTransformer3DModel(**tiny_transformer_config()) if dry_run else KaleidoTransformer3DModel()
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def inputs(model, sizes: dict, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    c, t = model.config.in_channels, sizes["frames"]
    x = torch.randn(1, c, t, sizes["height"], sizes["width"], generator=g).to(device, dtype)
    refs = torch.randn(1, c, sizes["refs"], sizes["height"], sizes["width"], generator=g).to(device, dtype)
    text = torch.randn(1, sizes["text_tokens"], model.config.text_dim, generator=g).to(device, dtype)
    return x, refs, text


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_forward(model, args, device, repeats: int) -> float:
    x, refs, text = args
    t = torch.tensor([500.0], device=device)
    with torch.no_grad():
        model(x, t, text, reference_latents=refs)  # warm-up (and compilation)
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            model(x, t, text, reference_latents=refs)
            sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gib(device, fn) -> float | None:
    if device.type != "cuda":
        fn()
        return None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same code path on the CPU with a tiny config")
    parser.add_argument("--out", default="gpu_suite.json")
    parser.add_argument("--results", default=None, help="append a dated table to this markdown file")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace an --out file this suite did not write")
    args = parser.parse_args()
    from kaleido_s2v.errors import UserInputError
    from kaleido_s2v.fileio import claim_file

    try:  # checked before minutes of device time are spent: a file the suite did not write is kept
        claim_file(args.out, "--out", overwrite=args.overwrite, made_by=MADE_BY)
    except UserInputError as e:
        raise SystemExit(f"gpu_suite.py: error: {e}") from None

    from kaleido_s2v.speed import attention_backends

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_suite.py needs a CUDA GPU (or --dry-run)")
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    sizes = TINY if dry else RELEASE
    repeats = args.repeats or (2 if dry else 5)
    started = time.perf_counter()
    report = {"made_by": MADE_BY, "date": datetime.date.today().isoformat(), "dry_run": dry, "device": (
        torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"),
        "torch": torch.__version__, "sizes": sizes}

    model = build_transformer(dry, device, dtype)
    cfg = model.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    tokens = (sizes["frames"] + sizes["refs"]) * (sizes["height"] // 2) * (sizes["width"] // 2)
    flops = transformer_flops(tokens, sizes["text_tokens"], dim, cfg.ffn_dim, cfg.num_layers)
    report.update(params_b=sum(p.numel() for p in model.parameters()) / 1e9, tokens=tokens, pflop_per_forward=flops / 1e15)
    x = inputs(model, sizes, device, dtype)

    # 1. attention backends (the CUDA-only ones are skipped on the CPU dry run)
    backends = {}
    for name in attention_backends():
        if dry and name != "native":
            continue
        try:
            model.set_attention_backend(name)
            s = seconds_per_forward(model, x, device, repeats)
            backends[name] = {"seconds": s, "tflops": flops / s / 1e12}
        except Exception as e:  # a backend that is installed but cannot run this shape/dtype: recorded, not fatal
            backends[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    model.set_attention_backend("native")
    report["attention_backends"] = backends

    # 2. compiled blocks
    try:
        model.compile_repeated_blocks(fullgraph=True)
        s = seconds_per_forward(model, x, device, repeats)
        report["compile"] = {"seconds": s, "tflops": flops / s / 1e12}
    except Exception as e:
        report["compile"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    del model
    gc.collect()

    # 3. memory recipes (fresh models: compile and hooks do not carry over)
    def forward(m):
        with torch.no_grad():
            m(x[0], torch.tensor([500.0], device=device), x[2], reference_latents=x[1])

    def peak_of(prepare) -> float | None:
        """Peak memory of one forward of a fresh model that `prepare` set up (it is freed afterwards)."""
        holder = [prepare()]
        try:
            return peak_gib(device, lambda: forward(holder[0]))
        finally:
            holder.clear()
            gc.collect()

    def offloaded():
        from diffusers.hooks import apply_group_offloading

        model = build_transformer(dry, torch.device("cpu"), dtype)
        apply_group_offloading(model, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, use_stream=True)
        return model

    def fp8_storage():
        model = build_transformer(dry, device, dtype)
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        return model

    memory = {"resident": peak_of(lambda: build_transformer(dry, device, dtype))}
    if device.type == "cuda":
        memory["group_offload"] = peak_of(offloaded)
    memory["fp8_storage"] = peak_of(fp8_storage)
    report["peak_memory_gib"] = memory

    # 4. one 4-step distill sample through the pipeline (random full-size VAE, no text encoder)
    from diffusers import AutoencoderKLWan

    from kaleido_s2v import KaleidoPipeline
    from kaleido_s2v.release import DISTILL_SHIFT
    from kaleido_s2v.tiny import tiny_scheduler, tiny_vae

    vae = (tiny_vae(0) if dry else AutoencoderKLWan()).to(device)
    pipe = KaleidoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=build_transformer(dry, device, dtype),
                           scheduler=tiny_scheduler())
    pipe.set_progress_bar_config(disable=True)
    stride = pipe.vae_scale_factor_spatial
    embeds = torch.randn(1, sizes["text_tokens"], pipe.transformer.config.text_dim).to(device, dtype)
    ref_latents = torch.randn(1, 16, sizes["refs"], sizes["height"], sizes["width"]).to(device, dtype)
    sync(device)
    start = time.perf_counter()
    video = pipe(prompt_embeds=embeds, reference_latents=ref_latents, height=sizes["height"] * stride,
                 width=sizes["width"] * stride, num_frames=(sizes["frames"] - 1) * 4 + 1, num_inference_steps=4,
                 guidance_scale=1.0, shift=DISTILL_SHIFT, max_sequence_length=sizes["text_tokens"],
                 output_type="np", generator=torch.Generator().manual_seed(0)).frames
    sync(device)
    report["distill_sample"] = {"seconds": time.perf_counter() - start, "frames": int(video.shape[1])}
    report["suite_seconds"] = time.perf_counter() - started

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if args.results:
        rows = [f"| attention `{k}` | {v.get('seconds', float('nan')):.3f} s | {v.get('tflops', float('nan')):.0f} |"
                if "error" not in v else f"| attention `{k}` | {v['error']} | |" for k, v in backends.items()]
        c = report["compile"]
        rows.append(f"| compiled blocks | {c['seconds']:.3f} s | {c['tflops']:.0f} |" if "error" not in c
                    else f"| compiled blocks | {c['error']} | |")
        mem = ", ".join(f"{k} {v:.1f} GiB" for k, v in memory.items() if v is not None) or "not measured (CPU)"
        text = (f"\n## GPU suite — `benchmarks/gpu_suite.py`{' (dry run)' if dry else ''}\n\n{report['date']}, "
                f"{report['device']}, torch {report['torch']}: {report['params_b']:.2f} B parameters, "
                f"{tokens:,} tokens, {report['pflop_per_forward']:.3f} PFLOP per forward.\n\n"
                "| forward | seconds | TFLOP/s |\n|---|---|---|\n" + "\n".join(rows) + "\n\n"
                f"Peak memory of one forward: {mem}. A 4-step distill sample (no CFG, random VAE, no text "
                f"encoder): {report['distill_sample']['seconds']:.1f} s. Suite: {report['suite_seconds']:.0f} s.\n")
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
