"""Transformer forward speed: Kaleido vs diffusers Wan, measured in one run (ratios, not absolute times).

CPU (default), a small config:
  1. 0 references: KaleidoTransformer3DModel vs WanTransformer3DModel, same weights   (expect <= 1.03x)
  2. 3 references vs Wan on a video with 3 more frames (same token count): the cost of
     reference handling + R-RoPE                                                       (expect <= 1.03x)
GPU (`--real`, needs CUDA): the 14B config with random bf16 weights at 512x896, 81 frames, 3 references:
seconds per forward, peak memory, achieved TFLOP/s against the counted FLOPs.

    python benchmarks/bench_transformer.py [--repeats 15] [--real]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import WanTransformer3DModel

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


@torch.no_grad()
def cpu(repeats: int) -> None:
    torch.manual_seed(0)
    wan = WanTransformer3DModel(**SMALL).eval()
    kal = KaleidoTransformer3DModel(**SMALL).eval()
    kal.load_state_dict(wan.state_dict(), strict=True)
    T, H, W, N = 4, 16, 24, 3
    x = torch.randn(1, 16, T, H, W)
    x_long = torch.randn(1, 16, T + N, H, W)
    refs = torch.randn(1, 16, N, H, W)
    t = torch.tensor([500.0])
    text = torch.randn(1, 64, 64)
    med = interleaved(
        {
            "wan": lambda: wan(x, t, text),
            "kaleido_0ref": lambda: kal(x, t, text),
            "wan_T+3": lambda: wan(x_long, t, text),
            "kaleido_3ref": lambda: kal(x, t, text, reference_latents=refs),
        },
        repeats,
    )
    tokens = T * (H // 2) * (W // 2)
    print(f"CPU, {torch.get_num_threads()} threads, config {SMALL['num_layers']} layers x {4 * 32} wide, "
          f"{tokens} video tokens, {N} refs of {(H // 2) * (W // 2)} tokens; median of {repeats}")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:14s} {v * 1e3:8.2f} ms")
    print(f"ratio 0 refs / Wan                       : {med['kaleido_0ref'] / med['wan']:.3f}x  (expect <= 1.03)")
    print(f"ratio 3 refs / Wan with same token count : {med['kaleido_3ref'] / med['wan_T+3']:.3f}x  (expect <= 1.03)")


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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    real(args.repeats) if args.real else cpu(args.repeats)
