"""Transformer forward speed: Kaleido vs diffusers Wan, measured in one run (ratios, not absolute times).

CPU (default), a small config:
  1. 0 references: KaleidoTransformer3DModel vs WanTransformer3DModel, same weights   (expect <= 1.03x)
  2. 3 references vs Wan on a video with 3 more frames (same token count): the cost of
     reference handling + R-RoPE                                                       (expect <= 1.03x)
GPU (`--real`, needs CUDA): the 14B config with random bf16 weights at 512x896, 81 frames, 3 references:
seconds per forward, peak memory, achieved TFLOP/s against the counted FLOPs.

    python benchmarks/bench_transformer.py [--repeats 15] [--threads 1] [--callgrind] [--real]

--callgrind counts instructions instead (valgrind, one thread): load-independent, for overheads of a few percent.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kaleido_s2v import KaleidoTransformer3DModel

SMALL = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=64, freq_dim=256, ffn_dim=256, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
)  # fmt: skip


def transformer_flops(tokens: int, text_tokens: int, dim: int, ffn: int, layers: int) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add); norms, RoPE and embeddings are negligible."""
    self_proj = 4 * 2 * tokens * dim * dim  # q, k, v, out
    self_attn = 2 * 2 * tokens * tokens * dim  # QK^T and AV
    cross_proj = 2 * 2 * tokens * dim * dim + 2 * 2 * text_tokens * dim * dim  # q, out; k, v on the text
    cross_attn = 2 * 2 * tokens * text_tokens * dim
    mlp = 2 * 2 * tokens * dim * ffn
    return layers * (self_proj + self_attn + cross_proj + cross_attn + mlp)


def timed(fn, sync=lambda: None) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(fns: dict, repeats: int, sync=lambda: None) -> dict:
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, sync))
    return {k: statistics.median(v) for k, v in times.items()}


# The CPU cases, as code: run in this process for timings, or in callgrind's own process for instruction counts.
CPU_SETUP = f"""
import torch
from diffusers import WanTransformer3DModel
from kaleido_s2v import KaleidoTransformer3DModel
torch.set_grad_enabled(False)
torch.manual_seed(0)
wan = WanTransformer3DModel(**{SMALL!r}).eval()
# one model per geometry, as in a real run (every step repeats its video's geometry, so the positions and their
# cos/sin are computed once per video); each case below reruns the same geometry
kal = KaleidoTransformer3DModel(**{SMALL!r}).eval()
kal.load_state_dict(wan.state_dict(), strict=True)
kal_refs = KaleidoTransformer3DModel(**{SMALL!r}).eval()
kal_refs.load_state_dict(wan.state_dict(), strict=True)
T, H, W, N = 4, 16, 24, 3
x = torch.randn(1, 16, T, H, W)
x_long = torch.randn(1, 16, T + N, H, W)
refs = torch.randn(1, 16, N, H, W)
t = torch.tensor([500.0])
text = torch.randn(1, 64, 64)
"""
CPU_CASES = {
    "wan": "wan(x, t, text)",
    "kaleido_0ref": "kal(x, t, text)",
    "wan_T+3": "wan(x_long, t, text)",
    "kaleido_3ref": "kal_refs(x, t, text, reference_latents=refs)",
}


def print_ratios(per_forward: dict, what: str) -> None:
    print(f"ratio 0 refs / Wan                       : {per_forward['kaleido_0ref'] / per_forward['wan']:.3f}x {what}"
          "  (expect <= 1.03)")
    print(f"ratio 3 refs / Wan with same token count : {per_forward['kaleido_3ref'] / per_forward['wan_T+3']:.3f}x "
          f"{what}  (expect <= 1.03)")


def cpu(repeats: int) -> None:
    scope: dict = {}
    exec(CPU_SETUP, scope)
    calls = {k: compile(stmt, k, "eval") for k, stmt in CPU_CASES.items()}
    med = interleaved({k: (lambda c=c: eval(c, scope)) for k, c in calls.items()}, repeats)
    T, H, W, N = (scope[k] for k in "THWN")
    print(f"CPU, {torch.get_num_threads()} threads, config {SMALL['num_layers']} layers x {4 * 32} wide, "
          f"{T * (H // 2) * (W // 2)} video tokens, {N} refs of {(H // 2) * (W // 2)} tokens; median of {repeats}")
    for k, v in med.items():
        print(f"  {k:14s} {v * 1e3:8.2f} ms")
    print_ratios(med, "time")


def callgrind(number: int) -> None:
    """Instructions per forward under valgrind's callgrind (torch.utils.benchmark): one thread, the same count
    whatever else the machine runs, so small overheads show on a busy machine where timings are noise."""
    import os
    import sys

    from torch.utils.benchmark import Timer

    # the Timer runs `python` from PATH in a child process: make it this interpreter's (the virtualenv's)
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    counts = {}
    for k, stmt in CPU_CASES.items():
        stats = Timer(stmt, setup=CPU_SETUP, num_threads=1).collect_callgrind(number=number, collect_baseline=False)
        counts[k] = stats.counts(denoise=True) / number
        print(f"  {k:14s} {counts[k] / 1e6:10.1f} M instructions per forward", flush=True)
    print_ratios(counts, "instructions")


@torch.no_grad()
def real(repeats: int) -> None:
    assert torch.cuda.is_available(), "--real needs a CUDA GPU"
    dev = torch.device("cuda")
    with torch.device("meta"):
        model = KaleidoTransformer3DModel()  # the 14B release config
    model = model.to_empty(device=dev).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    T, H, W, N = 21, 64, 112, 3  # 81 frames at 512x896
    x = torch.randn(1, 16, T, H, W, device=dev, dtype=torch.bfloat16)
    refs = torch.randn(1, 16, N, H, W, device=dev, dtype=torch.bfloat16)
    t = torch.tensor([500.0], device=dev)
    text = torch.randn(1, 512, 4096, device=dev, dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    med = interleaved({"fwd": lambda: model(x, t, text, reference_latents=refs)}, repeats, torch.cuda.synchronize)
    tokens = (T + N) * (H // 2) * (W // 2)
    flops = transformer_flops(tokens, 512, 5120, 13824, 40)
    print(f"GPU {torch.cuda.get_device_name()}: 14B ({n_params / 1e9:.2f}B params) bf16, 512x896x81, {N} refs, "
          f"{tokens} tokens")  # fmt: skip
    print(f"  seconds per forward : {med['fwd']:.3f}")
    print(f"  peak memory         : {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"  FLOPs per forward   : {flops / 1e15:.3f} PFLOP")
    print(f"  achieved            : {flops / med['fwd'] / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--real", action="store_true", help="the 14B config on a CUDA GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)")
    parser.add_argument("--callgrind", action="store_true", help="count instructions per forward under valgrind "
                        "(needs valgrind; minutes; steady on a busy machine) instead of timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.real:
        real(args.repeats)
    elif args.callgrind:
        callgrind(number=3)
    else:
        cpu(args.repeats)
