"""Run under `torchrun --nproc_per_node 2`: Ulysses context parallel vs one process, same tiny model.

Two cases: inference with an odd token count (`ulysses_anything`, uneven shards; diffusers has no backward
for it), and training (forward + backward) with an even token count (plain Ulysses). Writes
`OUT/rank<k>.pt` with single-process and context-parallel outputs and gradients.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig

from kaleido_s2v.distributed import shutdown
from kaleido_s2v.tiny import tiny_transformer


def data(ref_shapes):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 8, 6, generator=g)  # 3*4*3 = 36 video tokens
    t = torch.tensor([900.0, 300.0])
    text = torch.randn(2, 7, 32, generator=g)
    refs = [torch.randn(*s, generator=g) for s in ref_shapes]
    return (x, t, text), refs


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # diffusers sizes its device mesh by torch.accelerator.device_count(), which is 0 on a CPU-only build.
    torch.accelerator.device_count = lambda: 1
    results = {}

    # 1. inference: 36 + 20 + 6 + 3 = 65 tokens, uneven shards
    args, refs = data([(1, 16, 1, 8, 10), (2, 16, 1, 4, 6), (1, 16, 1, 2, 6)])
    single = tiny_transformer(seed=0, num_layers=3).eval()
    model = tiny_transformer(seed=0, num_layers=3).eval()
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2, ulysses_anything=True))
    with torch.no_grad():
        results["infer_expected"] = single(*args, reference_latents=refs).sample
        results["infer_got"] = model(*args, reference_latents=refs).sample

    # 2. training: 36 + 20 + 6 = 62 tokens, even shards, forward and backward
    args, refs = data([(1, 16, 1, 8, 10), (2, 16, 1, 4, 6)])
    single = tiny_transformer(seed=0, num_layers=3)
    model = tiny_transformer(seed=0, num_layers=3)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    for name, m in (("expected", single), ("got", model)):
        out = m(*args, reference_latents=refs).sample
        out.square().mean().backward()
        grad = m.blocks[1].attn1.to_q.weight.grad.clone()
        if name == "got":
            dist.all_reduce(grad)  # each rank holds the gradient through its own tokens
        results[f"train_{name}"], results[f"grad_{name}"] = out.detach(), grad

    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    shutdown()  # barrier first: a rank tearing gloo down while the other still talks aborts it


if __name__ == "__main__":
    main(sys.argv[1])
