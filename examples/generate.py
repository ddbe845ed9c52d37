"""Generate a video from reference images and a prompt with the library API.

    python examples/generate.py                      # built-in small model, procedural reference, CPU
    python examples/generate.py --model DIR --ref woman.png --ref dress.png --prompt "..."   # a real model
"""

import argparse

import torch

from kaleido_s2v import KaleidoPipeline, write_video
from kaleido_s2v.builtin import builtin_generation_defaults, default_reference_image, load_builtin_pipeline

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="diffusers-format Kaleido folder (default: the built-in small model)")
parser.add_argument("--ref", action="append", default=[], help="reference image (repeatable)")
parser.add_argument("--prompt", default="The red striped circle moves to the left on a sandy floor.")
parser.add_argument("--out", default="example.mp4")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
if args.model:
    pipe = KaleidoPipeline.from_pretrained(args.model, dtype=torch.bfloat16 if device == "cuda" else None)
    settings = {}  # the release's defaults: 512x896, 81 frames, 50 steps, CFG 6
else:
    pipe = load_builtin_pipeline()
    settings = builtin_generation_defaults()
fps = settings.pop("fps", 16)
pipe.to(device)
# pipe.enable_model_cpu_offload()   # on a small GPU instead of .to(device); see docs/generate.md

video = pipe(
    prompt=args.prompt,  # the caption only
    reference_images=args.ref or [default_reference_image()],  # paths, PIL images or arrays; at most 3 advised
    generator=torch.Generator().manual_seed(0),
    **settings,
).frames[0]  # (F, H, W, 3) floats in [0, 1]
write_video(args.out, (video * 255).round().astype("uint8"), fps=fps)
print(f"wrote {args.out}: {video.shape[0]} frames of {video.shape[2]}x{video.shape[1]}")
