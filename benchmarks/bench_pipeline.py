"""KaleidoPipeline vs diffusers WanPipeline: same tiny components, same transformer weights, no references.

Both run the same number of steps with CFG at the same size; the ratio (median over repeats, measured in this
one run) is the overhead of Kaleido's pipeline and transformer over Wan's when no reference is given.
Expect <= 1.05x. Usage: python benchmarks/bench_pipeline.py [--repeats 11] [--steps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(seed: int = 0):
    from diffusers import WanPipeline, WanTransformer3DModel

    from kaleido_s2v.pipeline import KaleidoPipeline
    from kaleido_s2v.tiny import tiny_components

    components = tiny_components(seed=seed)
    kaleido = KaleidoPipeline(**components)
    config = {k: v for k, v in components["transformer"].config.items() if not k.startswith("_")}
    config.pop("ref_rope"), config.pop("ref_rope_offset")
    wan_transformer = WanTransformer3DModel(**config)
    wan_transformer.load_state_dict(components["transformer"].state_dict(), strict=True)
    wan = WanPipeline(
        tokenizer=components["tokenizer"],
        text_encoder=components["text_encoder"],
        vae=components["vae"],
        scheduler=type(components["scheduler"]).from_config(components["scheduler"].config),
        transformer=wan_transformer,
    )
    for p in (kaleido, wan):
        p.set_progress_bar_config(disable=True)
    return kaleido, wan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=112)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = least noisy on shared CPUs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    kaleido, wan = build()
    kw = dict(height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
              guidance_scale=6.0, negative_prompt="", output_type="np")

    def run_kaleido():
        return kaleido("a cat", None, generator=torch.Generator().manual_seed(0), **kw).frames

    def run_wan():
        return wan(prompt="a cat", generator=torch.Generator().manual_seed(0), **kw).frames

    run_kaleido(), run_wan()  # warm-up
    times = {"kaleido": [], "wan": []}
    for r in range(args.repeats):  # interleaved, alternating order, so that load changes hit both alike
        order = (("kaleido", run_kaleido), ("wan", run_wan))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"size {args.height}x{args.width}x{args.frames}, {args.steps} steps with CFG, {args.repeats} repeats, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print(f"WanPipeline      median {med['wan']:.3f} s  (min {min(times['wan']):.3f})")
    print(f"KaleidoPipeline  median {med['kaleido']:.3f} s  (min {min(times['kaleido']):.3f})")
    print(f"ratio Kaleido/Wan: median {med['kaleido'] / med['wan']:.3f}x, "
          f"min {min(times['kaleido']) / min(times['wan']):.3f}x   (target <= 1.05x)")


if __name__ == "__main__":
    main()
