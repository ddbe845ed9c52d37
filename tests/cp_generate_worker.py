"""Run under `torchrun --nproc_per_node K`: a tiny pipeline with context parallelism on CPU (gloo).

`cp_generate_worker.py OUT [kaleido|magref]`: rank 0 saves the video (float32 array) to OUT. Without torchrun,
`generate(Runtime(), family)` is the 1-process reference.
"""

import sys

import numpy as np
import torch

from kaleido_s2v.distributed import Runtime, enable_context_parallel, init_runtime, shutdown


def reference(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def generate(info: Runtime, family: str = "kaleido") -> np.ndarray:
    if family == "magref":
        from kaleido_s2v.magref import MagrefPipeline
        from kaleido_s2v.tiny import tiny_magref_components

        pipe = MagrefPipeline(**tiny_magref_components(seed=0))
        # diffusers' own Wan `_cp_plan`. 64x96 px -> 4x6 patches x 3 latent frames = 72 tokens: even shards, as
        # at the release's 480x832 (32,760 tokens divide by 1-8 ranks); uneven ones need NCCL (gloo's all_gather
        # takes equal sizes only, diffusers' `_all_gather_anything` does not pad)
        size = dict(height=64, width=96)
        kwargs = dict(layout="grid", layout_seed=3, **size)
    else:
        from kaleido_s2v.pipeline import KaleidoPipeline
        from kaleido_s2v.tiny import tiny_components

        pipe = KaleidoPipeline(**tiny_components(seed=0))
        # 48x80 px -> latent 6x10 -> 3x5 patches = 15 tokens per frame; 3 latent frames + 2 refs -> 75 tokens
        # (odd), so the ranks hold 38 and 37 tokens
        kwargs = dict(height=48, width=80)
    pipe.set_progress_bar_config(disable=True)
    enable_context_parallel(pipe.transformer, info)  # no-op for one process
    return pipe(
        "two subjects meet",
        [reference(1, 30, 70), reference(2, 64, 40)],
        num_frames=9,
        num_inference_steps=3,
        max_sequence_length=64,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).frames


def main(out_path: str, family: str) -> None:
    torch.set_num_threads(1)
    info = init_runtime("cpu")
    assert info.world_size > 1, "run me under torchrun"
    video = generate(info, family)
    if info.is_main:
        np.save(out_path, video)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "kaleido")
