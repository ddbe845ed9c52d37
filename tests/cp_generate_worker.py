"""Run under `torchrun --nproc_per_node K`: tiny KaleidoPipeline with context parallelism on CPU (gloo).

Rank 0 saves the video (float32 array) to argv[1]. Without torchrun, `generate()` is the 1-process reference.
"""

import sys

import numpy as np
import torch

from kaleido_s2v.distributed import Runtime, enable_context_parallel, init_runtime, shutdown
from kaleido_s2v.pipeline import KaleidoPipeline
from kaleido_s2v.tiny import tiny_components


def reference(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def generate(info: Runtime) -> np.ndarray:
    pipe = KaleidoPipeline(**tiny_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    enable_context_parallel(pipe.transformer, info)  # no-op for one process
    # 48x80 px -> latent 6x10 -> 3x5 patches = 15 tokens per frame; 3 latent frames + 2 refs -> 75 tokens (odd),
    # so the ranks hold 38 and 37 tokens.
    return pipe(
        "two subjects meet",
        [reference(1, 30, 70), reference(2, 64, 40)],
        height=48,
        width=80,
        num_frames=9,
        num_inference_steps=3,
        max_sequence_length=64,
        generator=torch.Generator().manual_seed(0),
    ).frames


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    info = init_runtime("cpu")
    assert info.world_size > 1, "run me under torchrun"
    video = generate(info)
    if info.is_main:
        np.save(out_path, video)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
