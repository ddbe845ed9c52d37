"""`kaleido-s2v info`: versions, devices and R-RoPE variants (what to paste into a bug report)."""

from __future__ import annotations

import argparse
import json
import platform

IMPORTS = ("torch",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a machine-readable JSON object")


def run(args: argparse.Namespace) -> int:
    import torch

    from kaleido_s2v import library_versions
    from kaleido_s2v.rope import REF_ROPE_VARIANTS

    info = {
        **library_versions(),
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "ref_rope_variants": list(REF_ROPE_VARIANTS),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:18} {v}")
    return 0
