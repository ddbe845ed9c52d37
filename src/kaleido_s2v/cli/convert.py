"""`kaleido-s2v convert`: official Kaleido-14B-S2V (or Wan2.1, or MAGREF) release -> diffusers pipeline folder."""

from __future__ import annotations

import argparse
import json

from .options import add_dtype, add_overwrite, add_quiet

IMPORTS = ("torch", "diffusers", "transformers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert the official Kaleido-14B-S2V release (model/latest + model/<iter>/mp_rank_00_model_states.pt, "
        "Wan2.1_VAE.pth, umt5-xxl/) or an original Wan2.1 release (diffusion_pytorch_model*.safetensors, "
        "Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/) into a folder that "
        "KaleidoPipeline.from_pretrained loads; or the MAGREF release (a Wan2.1 image-to-video checkpoint: the same "
        "files + config.json with model_type i2v + models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth) into a "
        "folder that MagrefPipeline.from_pretrained loads. Streams tensors (memory ~ one tensor), strict key "
        "checks, atomic output."
    )
    parser.add_argument("--src", required=True, help="the release folder")
    parser.add_argument("--dst", required=True, help="output folder (written atomically): new, empty, or one an earlier "
                        "convert wrote")
    parser.add_argument(
        "--src-format",
        choices=["auto", "official", "wan", "magref"],
        default="auto",
        help="source layout (default: detected from the file names)",
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="LIST",
        help="comma-separated subset of transformer,vae,text_encoder,tokenizer (MAGREF: also image_encoder; "
        "default: all)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    add_dtype(parser, ("keep", "bf16", "fp16", "fp32"), "keep",
              "weights dtype (default keep: as stored; Kaleido bf16; MAGREF: DiT fp32, umT5 bf16, CLIP fp16)")
    parser.add_argument(
        "--attention-head-dim",
        type=int,
        default=None,
        help="DiT attention head dim (not stored in the weights; default: width / num_heads of MAGREF's "
        "config.json, else 128: Kaleido/Wan2.1 14B and 1.3B)",
    )
    parser.add_argument(
        "--image-encoder-head-dim",
        type=int,
        default=None,
        help="MAGREF's CLIP ViT attention head dim (not stored in the weights; default 80: ViT-H/14, width 1280, "
        "16 heads)",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load .pt/.pth files with full unpickling (can run code!); only for files from a source you trust",
    )
    add_overwrite(parser, "--dst")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_quiet(parser)


def run(args: argparse.Namespace) -> int:
    from kaleido_s2v.checkpoints.converter import SUMMARY_FILE, convert

    summary = convert(
        args.src,
        args.dst,
        only=args.only,
        max_shard_size=args.max_shard_size,
        dtype=args.dtype,
        attention_head_dim=args.attention_head_dim,
        image_encoder_head_dim=args.image_encoder_head_dim,
        trust_pickle=args.trust_pickle,
        src_format=args.src_format,
        progress=not args.quiet and not args.json,
        overwrite=args.overwrite,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"converted {summary['source']} ({summary['source_format']}) -> {summary['destination']} "
          f"({summary['pipeline']})")
    for name, comp in summary["components"].items():
        if "shards" not in comp:
            print(f"  {name:13} {comp['class']} ({len(comp['files'])} files)")
            continue
        gb = comp["bytes"] / 1e9
        unused = "non-DiT" if name == "transformer" else "unused"
        skipped = f", skipped {comp['skipped_keys']} {unused} keys" if comp.get("skipped_keys") else ""
        print(
            f"  {name:13} {comp['tensors']} tensors, {comp['parameters']:,} parameters, {'/'.join(comp['dtype'])}, "
            f"{gb:.3f} GB in {len(comp['shards'])} shard(s){skipped}"
        )
        for shard in comp["shards"]:
            print(f"      {shard['file']}  {shard['bytes']:>14,} B  sha256 {shard['sha256']}")
    print(f"  scheduler     {summary['scheduler']}")
    print(f"summary: {summary['destination']}/{SUMMARY_FILE} ({summary['seconds']} s)")
    return 0
