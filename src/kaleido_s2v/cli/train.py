"""`kaleido-s2v train`: flow-matching fine-tuning (full or LoRA), one process or torchrun (FSDP2 + context parallel).

Examples:
  kaleido-s2v train --model Kaleido-14B-diffusers --data data/ --output runs/a --max-steps 5000
  torchrun --nproc_per_node 8 -m kaleido_s2v train --config examples/train_config.yaml
  kaleido-s2v train --model M --data D --cache-dir cache/ --build-cache     # encode once, then train with --cache-dir
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kaleido_s2v.release import REF_ROPE_OFFSET

# flag dest -> (config section, field)
FLAG_FIELDS = {
    "model": ("model", "path"),
    "ref_rope": ("model", "ref_rope"),
    "ref_rope_offset": ("model", "ref_rope_offset"),
    "data": ("data", "path"),
    "height": ("data", "height"),
    "width": ("data", "width"),
    "num_frames": ("data", "num_frames"),
    "fps": ("data", "fps"),
    "max_references": ("data", "max_references"),
    "text_dropout": ("data", "text_dropout"),
    "reference_dropout": ("data", "reference_dropout"),
    "bucket_by_references": ("data", "bucket_by_references"),
    "max_sequence_length": ("data", "max_sequence_length"),
    "cache_dir": ("data", "cache_dir"),
    "num_workers": ("data", "num_workers"),
    "lr": ("optim", "lr"),
    "weight_decay": ("optim", "weight_decay"),
    "grad_clip": ("optim", "grad_clip"),
    "warmup_steps": ("optim", "warmup_steps"),
    "decay_steps": ("optim", "decay_steps"),
    "ema_decay": ("optim", "ema_decay"),
    "cp_degree": ("parallel", "cp_degree"),
    "gradient_checkpointing": ("parallel", "gradient_checkpointing"),
    "mixed_precision": ("parallel", "mixed_precision"),
    "compile": ("parallel", "compile"),
    "lora_rank": ("lora", "rank"),
    "lora_alpha": ("lora", "alpha"),
    "output": ("run", "output"),
    "max_steps": ("run", "max_steps"),
    "batch_size": ("run", "batch_size"),
    "grad_accum": ("run", "grad_accum"),
    "seed": ("run", "seed"),
    "save_every": ("run", "save_every"),
    "resume": ("run", "resume"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    g = parser.add_argument_group("config (flags override the YAML, the YAML overrides the recipe)")
    g.add_argument("--config", help="YAML file with sections model/data/optim/parallel/lora/run (see examples/)")
    g.add_argument("--recipe", help="named base config: default, wan14b_fsdp8, wan14b_fsdp8_cp2, wan14b_lora, toy_cpu, ...")
    g = parser.add_argument_group("inputs and outputs")
    g.add_argument("--model", help="diffusers pipeline folder (transformer/ vae/ text_encoder/ tokenizer/)")
    g.add_argument("--data", help="folder (videos/ labels/ references/) or manifest.jsonl")
    g.add_argument("--output", help="run folder: metrics.jsonl, checkpoint-<step>/, final/")
    g.add_argument("--resume", help="checkpoint-<step> folder to continue from, or 'latest'")
    g.add_argument("--cache-dir", help="latent cache folder (train from it; write it with --build-cache)")
    g.add_argument("--build-cache", action="store_true", help="encode the data into --cache-dir and exit")
    g.add_argument("--overwrite", action="store_true",
                   help="write into an --output folder (--cache-dir with --build-cache) that kaleido-s2v train "
                        "did not make")
    g = parser.add_argument_group("data")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--frames", dest="num_frames", type=int, metavar="FRAMES", help="4k+1 frames per clip (81)")
    g.add_argument("--num-frames", dest="num_frames", type=int, help=argparse.SUPPRESS)  # the old spelling
    g.add_argument("--fps", type=float, help="frames are resampled to exactly this rate (16)")
    g.add_argument("--max-references", type=int, help="references per sample (3)")
    g.add_argument("--text-dropout", type=float, help="probability of an empty caption (0.1)")
    g.add_argument("--reference-dropout", type=float, help="probability of training without references (0)")
    g.add_argument("--bucket-by-references", action=argparse.BooleanOptionalAction, default=None,
                   help="draw each batch from samples with one reference count: one forward per micro-batch (off)")
    g.add_argument("--max-sequence-length", type=int, help="T5 tokens (512)")
    g.add_argument("--num-workers", type=int, help="data loader worker processes (0)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int)
    g.add_argument("--lr", type=float, help="AdamW learning rate (5e-6)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--grad-clip", type=float, help="gradient-norm clip (1.0; 0 = off)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (50)")
    g.add_argument("--decay-steps", type=int, help="linear decay to 0 over the last N steps (0: constant lr)")
    g.add_argument("--ema-decay", type=float,
                   help="keep an EMA of the weights with this decay, e.g. 0.999 (exported as final/transformer_ema)")
    g.add_argument("--batch-size", type=int, help="samples per data-parallel rank and micro-step")
    g.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step")
    g.add_argument("--seed", type=int)
    g.add_argument("--save-every", type=int, help="checkpoint every N steps")
    g = parser.add_argument_group("model and scale")
    g.add_argument("--lora-rank", type=int, help="0 = full fine-tune; >0 = LoRA on attention and FFN projections")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    g.add_argument("--ref-rope", help="train this R-RoPE variant (shift_hw, shift_h, ..., see `kaleido-s2v info`)")
    g.add_argument("--ref-rope-offset", type=int, help=f"R-RoPE spatial offset ({REF_ROPE_OFFSET})")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--mixed-precision", choices=["bf16", "fp32"])
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each transformer block (faster steps after a one-off compile; "
                        "needs a C++ compiler on CPU)")
    g.add_argument("--cp-degree", type=int, help="context-parallel group size under torchrun (1)")
    g = parser.add_argument_group("reporting")
    g.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)  # the old spelling


def config_from_args(args: argparse.Namespace):
    from kaleido_s2v.training.config import default, load_config, recipe

    if args.config:
        cfg = load_config(args.config)
        if args.recipe:
            from kaleido_s2v.errors import UserInputError

            raise UserInputError("give --recipe or --config (a config may name its base with `recipe:`), not both")
    else:
        cfg = recipe(args.recipe) if args.recipe else default()
    for dest, (section, name) in FLAG_FIELDS.items():
        value = getattr(args, dest, None)
        if value is not None:
            setattr(getattr(cfg, section), name, value)
    if cfg.model.ref_rope is not None:
        from kaleido_s2v.errors import UserInputError
        from kaleido_s2v.rope import REF_ROPE_VARIANTS

        if cfg.model.ref_rope not in REF_ROPE_VARIANTS:
            raise UserInputError(f"--ref-rope {cfg.model.ref_rope!r} is unknown: choose one of {', '.join(REF_ROPE_VARIANTS)}")
    return cfg


def run(args: argparse.Namespace) -> int:
    from kaleido_s2v.cli.options import package_logging
    from kaleido_s2v.distributed import shutdown
    from kaleido_s2v.errors import UserInputError
    from kaleido_s2v.training import build_cache, train

    package_logging()
    cfg = config_from_args(args)
    if not cfg.model.path:
        raise UserInputError("--model is required: give a diffusers pipeline folder")
    if not cfg.data.path:
        raise UserInputError("--data is required: give a data folder or a manifest.jsonl")
    try:
        if args.build_cache:
            summary = build_cache(cfg, progress=not args.quiet, overwrite=args.overwrite)
        else:
            summary = train(cfg, progress=not args.quiet, overwrite=args.overwrite)
    finally:
        shutdown(barrier=False)
    if int(os.environ.get("RANK", "0")) == 0:
        if args.json:
            print(json.dumps(summary))
        elif args.build_cache:
            print(f"cache: {summary['written']} written, {summary['already_cached']} already there, "
                  f"{len(summary['bad'])} unreadable -> {summary['cache_dir']}", file=sys.stderr)
        else:
            print(f"trained {summary['steps']} steps, last loss {summary['last'].get('loss', float('nan')):.4f}; "
                  f"final weights in {summary['final']}", file=sys.stderr)
    return 0
