"""Peak memory of generation with and without the text-encoder recipe (`generate` encodes every distinct prompt
first, frees the text encoder, then loads the rest of the pipeline without it; `--text-encoder-device cpu` keeps
it off the GPU altogether).

Baseline, measured in the same run: the pipeline loaded whole (text encoder included) and called with the prompt,
as `KaleidoPipeline.from_pretrained(...)(prompt, ...)` does. Both run in a fresh subprocess each, on the CPU; the
number is the child's peak resident memory (`ru_maxrss` from `os.wait4`). Two models:
  - `builtin`: the shipped built-in model (15 MB: the recipe cannot matter much there);
  - `wide`: a synthetic Kaleido folder whose text encoder and transformer are both large (random weights,
    `--text-gb`, `--transformer-gb`), standing in for umT5-xxl (11 GB bf16) next to the 14B DiT (28 GB bf16).
Expected: the recipe's peak ~ max(text encoder, rest) + overhead instead of their sum, i.e. close to
baseline − min(text encoder, rest). On a GPU the same recipe frees the text encoder's GPU memory before the
transformer loads (not measured here: no GPU on this machine).

    .venv/bin/python benchmarks/bench_text_encoder.py [--text-gb 1.0] [--transformer-gb 0.8] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

GiB = 1024**3
SIZE = ["--height", "32", "--width", "48", "--frames", "5", "--steps", "2", "--max-sequence-length", "64"]

BASELINE = textwrap.dedent(
    """
    import sys, torch
    from kaleido_s2v.model_folder import load_pipeline
    torch.set_num_threads(1)
    folder, ref = sys.argv[1], sys.argv[2]
    pipe = load_pipeline(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe("The red striped circle moves to the left.", [ref], height=32, width=48, num_frames=5,
         num_inference_steps=2, max_sequence_length=64, generator=torch.Generator().manual_seed(0))
    """
)


def write_wide_model(root: Path, text_gb: float, transformer_gb: float) -> Path:
    """A Kaleido folder with a UMT5 encoder of ~text_gb and a transformer of ~transformer_gb (fp32, random)."""
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    from kaleido_s2v.pipeline import KaleidoPipeline
    from kaleido_s2v.tiny import tiny_scheduler, tiny_tokenizer, tiny_transformer, tiny_vae

    d = 1024
    text_layer = 4 * d * d + 3 * d * 4 * d  # attention + gated FFN, fp32 parameters
    config = UMT5Config(vocab_size=384, d_model=d, d_kv=64, d_ff=4 * d, num_heads=16,
                        num_layers=max(1, round(text_gb * GiB / 4 / text_layer)), relative_attention_num_buckets=32,
                        relative_attention_max_distance=128, dropout_rate=0.0, feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(config).eval()
    block = 8 * d * d + 2 * d * 4 * d  # self + cross attention, FFN
    transformer = tiny_transformer(0, num_attention_heads=16, attention_head_dim=64, ffn_dim=4 * d, text_dim=d,
                                   num_layers=max(1, round(transformer_gb * GiB / 4 / block)))
    pipe = KaleidoPipeline(tokenizer=tiny_tokenizer(), text_encoder=text_encoder, vae=tiny_vae(0),
                           transformer=transformer, scheduler=tiny_scheduler())
    pipe.save_pretrained(root)
    return root


def peak_rss(cmd: list[str]) -> float:
    """Peak resident memory (GiB) of one child process, which must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{err[-2000:]}")
    return usage.ru_maxrss * 1024 / GiB


def measure(folder: Path | None, ref: Path, out: Path) -> dict:
    from kaleido_s2v.builtin import builtin_model_dir

    model = ["--model", str(folder)] if folder is not None else []
    cli = [sys.executable, "-m", "kaleido_s2v", "generate", *model, "--prompt",
           "The red striped circle moves to the left.", "--ref", str(ref), *SIZE, "--seed", "0", "--quiet",
           "--device", "cpu", "--dtype", "fp32"]
    baseline = peak_rss([sys.executable, "-c", BASELINE, str(folder or builtin_model_dir()), str(ref)])
    recipe = peak_rss([*cli, "-o", str(out / "gpu.mp4")])
    on_cpu = peak_rss([*cli, "--text-encoder-device", "cpu", "-o", str(out / "cpu.mp4")])
    return {"baseline_gib": round(baseline, 3), "recipe_gib": round(recipe, 3), "text_encoder_cpu_gib": round(on_cpu, 3),
            "ratio": round(recipe / baseline, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-gb", type=float, default=1.0)
    parser.add_argument("--transformer-gb", type=float, default=0.8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref = tmp / "ref.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(ref)
        (tmp / "out").mkdir()
        results["builtin"] = measure(None, ref, tmp / "out")
        # in a child: ru_maxrss counts the pages a forked child shares with its parent before exec, so the parent
        # must not hold the model it wrote
        wide = tmp / "wide"
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        "from bench_text_encoder import write_wide_model; "
                        f"write_wide_model(__import__('pathlib').Path({str(wide)!r}), {args.text_gb}, "
                        f"{args.transformer_gb})"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sizes = {name: sum(f.stat().st_size for f in (wide / name).glob("*.safetensors")) / GiB
                 for name in ("text_encoder", "transformer")}
        (tmp / "out2").mkdir()
        results["wide"] = {**measure(wide, ref, tmp / "out2"), **{f"{k}_gib": round(v, 3) for k, v in sizes.items()}}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'model':8} {'baseline':>10} {'recipe':>10} {'TE on cpu':>10} {'ratio':>7}")
    for name, r in results.items():
        print(f"{name:8} {r['baseline_gib']:9.3f}G {r['recipe_gib']:9.3f}G {r['text_encoder_cpu_gib']:9.3f}G "
              f"{r['ratio']:6.3f}x")
    w = results["wide"]
    print(f"wide model: text encoder {w['text_encoder_gib']:.2f} GiB, transformer {w['transformer_gib']:.2f} GiB on disk")


if __name__ == "__main__":
    main()
