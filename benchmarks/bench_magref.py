"""MagrefPipeline vs diffusers WanImageToVideoPipeline: the same tiny components, one reference image.

Measured: wall time of a whole `__call__` (text encoding, CLIP, canvas VAE encode, the denoising loop with CFG 5,
and, in the "decode" variant, the VAE decode), median over interleaved repeats after a warm-up. The baseline is
diffusers' own `WanImageToVideoPipeline` built from THE SAME module objects (`tiny_magref_components(seed=0)`:
the Wan2.1 I2V `WanTransformer3DModel` with 36 input channels, the CLIP vision model, the VAE, umT5) plus a
`CLIPImageProcessor(size=28, crop_size=28)`; MagrefPipeline gets the same image as its single reference. Both run
two transformer forwards per step (cond + uncond), so the work per step is the same network and the ratio
MagrefPipeline / WanImageToVideoPipeline measures the pipeline's own overhead: expect <= 1.05x. The number of
transformer forwards (and VAE / CLIP calls) per run is counted and printed to show the work is the same.

It also prints the transformer token counts of the two designs at release sizes (pure arithmetic): Kaleido
512x896, 81 frames, 3 references -> 21*32*56 + 3*32*56 = 37,632 + 5,376 = 43,008 tokens; MAGREF 480x832, 81
frames -> 21*30*52 = 32,760 (its canvas is channel-concatenated, no extra tokens).

    python benchmarks/bench_magref.py [--height 64 --width 96 --frames 9 --steps 4 --repeats 11 --threads 1]
                                      [--no-decode] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter

import numpy as np
import torch

PROMPT = "a red cube and a blue ball on a table"
NEGATIVE = ""


def transformer_tokens(height: int, width: int, frames: int, refs: int = 0, stride: int = 8, patch: int = 2,
                       temporal_stride: int = 4) -> int:
    """Tokens of the video (1 + (F−1)/4 latent frames of (H/16)x(W/16) patches) plus one latent frame per reference."""
    per_frame = (height // stride // patch) * (width // stride // patch)
    return ((frames - 1) // temporal_stride + 1) * per_frame + refs * per_frame


def release_token_counts() -> dict:
    kaleido_video = transformer_tokens(512, 896, 81)
    kaleido = transformer_tokens(512, 896, 81, refs=3)
    magref = transformer_tokens(480, 832, 81)
    assert kaleido == 43_008 and kaleido_video == 37_632, (kaleido, kaleido_video)
    assert magref == 32_760, magref
    return {"kaleido_512x896x81_3refs": kaleido, "kaleido_video_only": kaleido_video,
            "kaleido_reference_tokens": kaleido - kaleido_video, "magref_480x832x81": magref,
            "ratio_kaleido_over_magref": kaleido / magref}


def count_calls(module, name: str, counter: Counter, seconds: Counter, method: str = "forward") -> None:
    """Wrap `module.<method>` (an instance attribute, so `module(...)` goes through it) with a call counter and a
    wall-time accumulator (the wrapped modules never call one another, so the times do not overlap)."""
    inner = getattr(module, method)

    def counted(*args, **kwargs):
        counter[name] += 1
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start

    setattr(module, method, counted)


def build(seed: int = 0):
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor

    from kaleido_s2v import MagrefPipeline
    from kaleido_s2v.tiny import tiny_magref_components

    c = tiny_magref_components(seed=seed)
    calls, seconds = Counter(), Counter()
    count_calls(c["transformer"], "transformer", calls, seconds)
    count_calls(c["image_encoder"], "clip", calls, seconds)
    count_calls(c["text_encoder"], "text_encoder", calls, seconds)
    count_calls(c["vae"], "vae_encode", calls, seconds, "encode")
    count_calls(c["vae"], "vae_decode", calls, seconds, "decode")
    magref = MagrefPipeline(**c)
    wan = WanImageToVideoPipeline(
        tokenizer=c["tokenizer"], text_encoder=c["text_encoder"], vae=c["vae"], transformer=c["transformer"],
        image_encoder=c["image_encoder"], transformer_2=None,
        scheduler=type(c["scheduler"]).from_config(c["scheduler"].config),  # own state, same config
        image_processor=CLIPImageProcessor(size=28, crop_size=28),
    )
    for p in (magref, wan):
        p.set_progress_bar_config(disable=True)
    return magref, wan, calls, seconds


def main() -> None:
    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=11, help="timed runs per pipeline (5 is too noisy on a shared CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = least noisy on shared CPUs)")
    parser.add_argument("--no-decode", action="store_true", help="skip the full-decode (output_type='np') variant")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokens = release_token_counts()
    magref, wan, calls, seconds = build()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).resize((args.width, args.height))
    kw = dict(negative_prompt=NEGATIVE, height=args.height, width=args.width, num_frames=args.frames,
              num_inference_steps=args.steps, guidance_scale=5.0)

    def runner(name: str, output_type: str):
        def run():
            g = torch.Generator().manual_seed(0)
            if name == "magref":
                return magref(PROMPT, reference_images=[image], generator=g, output_type=output_type, **kw).frames
            return wan(image=image, prompt=PROMPT, generator=g, output_type=output_type, **kw).frames
        return run

    variants = ["latent"] + ([] if args.no_decode else ["np"])
    results = {}
    for output_type in variants:
        fns = {name: runner(name, output_type) for name in ("magref", "wan")}
        work, shapes = {}, {}
        for name, fn in fns.items():  # warm-up, and one counted run each
            calls.clear()
            out = fn()
            work[name] = dict(calls)
            shapes[name] = list(np.shape(out))
        times = {name: [] for name in fns}
        tf_times = {name: [] for name in fns}  # seconds inside transformer.forward, per run
        for r in range(args.repeats):  # interleaved, alternating order, so that load changes hit both alike
            order = list(fns.items())
            for name, fn in order if r % 2 == 0 else order[::-1]:
                seconds.clear()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
                tf_times[name].append(seconds["transformer"])
        med = {k: statistics.median(v) for k, v in times.items()}
        tf_med = {k: statistics.median(v) for k, v in tf_times.items()}
        rest_med = {k: statistics.median(t - f for t, f in zip(times[k], tf_times[k])) for k in times}
        results[output_type] = {
            "median_s": med, "min_s": {k: min(v) for k, v in times.items()},
            "per_step_s": {k: v / args.steps for k, v in med.items()},
            "transformer_per_step_s": {k: v / args.steps for k, v in tf_med.items()},
            "outside_transformer_s": rest_med,
            "ratio_median": med["magref"] / med["wan"],
            "ratio_transformer_median": tf_med["magref"] / tf_med["wan"],
            "ratio_min": min(times["magref"]) / min(times["wan"]),
            "calls_per_run": work, "output_shape": shapes,
        }

    meta = {"height": args.height, "width": args.width, "frames": args.frames, "steps": args.steps,
            "repeats": args.repeats, "threads": args.threads, "guidance_scale": 5.0, "torch": torch.__version__}
    if args.json:
        print(json.dumps({"config": meta, "results": results, "release_tokens": tokens}, indent=2))
        return
    print(f"size {args.height}x{args.width}x{args.frames}, {args.steps} steps with CFG 5, {args.repeats} repeats, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    for output_type, res in results.items():
        print(f"\noutput_type={output_type!r}")
        print(f"  {'pipeline':<24} {'median s':>8} {'min s':>7} {'s/step':>7} {'transf. s/step':>14} "
              f"{'rest s':>7}  calls per run (output shape)")
        for name, label in (("wan", "WanImageToVideoPipeline"), ("magref", "MagrefPipeline")):
            work = ", ".join(f"{k} {v}" for k, v in sorted(res["calls_per_run"][name].items()))
            print(f"  {label:<24} {res['median_s'][name]:>8.3f} {res['min_s'][name]:>7.3f} "
                  f"{res['per_step_s'][name]:>7.4f} {res['transformer_per_step_s'][name]:>14.4f} "
                  f"{res['outside_transformer_s'][name]:>7.3f}  {work} "
                  f"({'x'.join(map(str, res['output_shape'][name]))})")
        print(f"  ratio Magref/Wan: median {res['ratio_median']:.3f}x, min {res['ratio_min']:.3f}x, "
              f"transformer time {res['ratio_transformer_median']:.3f}x   (target <= 1.05x)")
    print(f"\ntokens at release sizes: Kaleido 512x896x81 + 3 refs = {tokens['kaleido_video_only']:,} video + "
          f"{tokens['kaleido_reference_tokens']:,} reference = {tokens['kaleido_512x896x81_3refs']:,}; "
          f"MAGREF 480x832x81 = {tokens['magref_480x832x81']:,} (canvas in channels); "
          f"ratio {tokens['ratio_kaleido_over_magref']:.3f}")


if __name__ == "__main__":
    main()
