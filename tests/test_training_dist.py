"""Multi-process training on CPU (torchrun, gloo): FSDP2 and context parallel match one process on the same data.

The same global batch and the same per-slot noise make the runs comparable: 2 ranks x batch 2 (FSDP2) or a
context-parallel pair x batch 1 against 1 process x batch 4 (or 1).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.test_training import read_metrics, toy_config, write_synthetic_data, write_tiny_pipeline


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_dist")
    return write_tiny_pipeline(root / "model"), write_synthetic_data(root / "data")


def torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "kaleido_s2v", "train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def common(model, data, out, steps):
    return ["--recipe", "toy_cpu", "--model", str(model), "--data", str(data), "--output", str(out), "--height", "32",
            "--width", "32", "--max-steps", str(steps), "--save-every", str(steps), "--no-progress"]


def final_weights(out, name="transformer"):
    return load_file(out / "final" / name / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.load below, in this one process on purpose
def test_fsdp2_two_ranks_match_one_process(tmp_path, dirs):
    import torch.distributed.checkpoint as dcp

    from kaleido_s2v.training.components import load_transformer
    from kaleido_s2v.training.trainer import train

    model, data = dirs
    # 2 samples per rank from clips with 1, 2, 3 references; with seed 3 rank 0 draws reference counts that need
    # 2, 2, 1 forwards and rank 1 1, 2, 2: where they differ every sample runs alone on both ranks (equal
    # collectives), so rank 0 logs 2 forwards in step 3. With an EMA of the weights (each rank averages its shards)
    torchrun(2, *common(model, data, tmp_path / "fsdp", 3), "--batch-size", "2", "--ema-decay", "0.5", "--seed", "3")
    cfg = toy_config(model, data, tmp_path / "one", max_steps=3, save_every=3, batch_size=4)
    cfg.optim.ema_decay, cfg.run.seed = 0.5, 3
    train(cfg, progress=False)

    fsdp, one = read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "one")
    assert [m["loss"] for m in fsdp] == pytest.approx([m["loss"] for m in one], rel=1e-5)
    assert [m["forwards"] for m in fsdp] == [2, 2, 2]
    assert_same_weights(final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "one"))
    assert_same_weights(final_weights(tmp_path / "fsdp", "transformer_ema"),
                        final_weights(tmp_path / "one", "transformer_ema"))

    # bucketed batches (one reference count per global batch): one forward per rank and step under FSDP too
    torchrun(2, *common(model, data, tmp_path / "fsdp-b", 2), "--batch-size", "2", "--bucket-by-references")
    cfg = toy_config(model, data, tmp_path / "one-b", max_steps=2, save_every=2, batch_size=4)
    cfg.data.bucket_by_references = True
    train(cfg, progress=False)
    fsdp_b, one_b = read_metrics(tmp_path / "fsdp-b"), read_metrics(tmp_path / "one-b")
    assert [m["forwards"] for m in fsdp_b] == [1, 1] and [m["forwards"] for m in one_b] == [1, 1]
    assert [m["loss"] for m in fsdp_b] == pytest.approx([m["loss"] for m in one_b], rel=1e-5)
    assert_same_weights(final_weights(tmp_path / "fsdp-b"), final_weights(tmp_path / "one-b"))

    # the sharded checkpoint (2 ranks) loads into a plain single-process model
    plain = load_transformer(model)
    state = {"model": plain.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path / "fsdp" / "checkpoint-3"))
    assert_same_weights(state["model"], final_weights(tmp_path / "one"))


@pytest.mark.slow
def test_context_parallel_pair_matches_one_process(tmp_path, dirs):
    """cp 2 (Ulysses over the [references | video] tokens, FSDP over both ranks) == 1 process, batch 1."""
    from kaleido_s2v.training.trainer import train

    model, data = dirs
    torchrun(2, *common(model, data, tmp_path / "cp", 3), "--batch-size", "1", "--cp-degree", "2")
    train(toy_config(model, data, tmp_path / "one", max_steps=3, save_every=3, batch_size=1), progress=False)
    cp, one = read_metrics(tmp_path / "cp"), read_metrics(tmp_path / "one")
    assert [m["grad_norm"] for m in cp] == pytest.approx([m["grad_norm"] for m in one], rel=1e-4)
    assert_same_weights(final_weights(tmp_path / "cp"), final_weights(tmp_path / "one"))


@pytest.mark.slow
def test_fsdp2_resume_and_lora(tmp_path, dirs):
    """Under FSDP2: resume from a sharded checkpoint is exact; LoRA trains and exports the same as one process."""
    from kaleido_s2v.training.trainer import train

    model, data = dirs
    args = common(model, data, tmp_path / "a", 4)
    torchrun(2, *args, "--batch-size", "1", "--save-every", "2")
    torchrun(2, *common(model, data, tmp_path / "b", 2), "--batch-size", "1")
    torchrun(2, *common(model, data, tmp_path / "b", 4), "--batch-size", "1", "--resume", "latest")
    # exact: resume is exact by design (docs/train.md); a and b are both 2-rank torchruns, OMP_NUM_THREADS=1
    assert [m["loss"] for m in read_metrics(tmp_path / "a")] == [m["loss"] for m in read_metrics(tmp_path / "b")]
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"), atol=0)

    torchrun(2, *common(model, data, tmp_path / "lora", 2), "--batch-size", "1", "--lora-rank", "4", "--lr", "1e-2")
    cfg = toy_config(model, data, tmp_path / "lora1", max_steps=2, save_every=2, batch_size=2)
    cfg.lora.rank, cfg.optim.lr = 4, 1e-2
    train(cfg, progress=False)
    a = load_file(tmp_path / "lora" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "lora1" / "final" / "pytorch_lora_weights.safetensors")
    assert_same_weights(a, b)


@pytest.mark.slow
def test_fsdp2_with_compile_matches_one_process(tmp_path, dirs, cpp_compiler):
    """--compile before fully_shard (torchtitan's order): 2 ranks with compiled blocks = 1 eager process."""
    from kaleido_s2v.training.trainer import train

    model, data = dirs
    torchrun(2, *common(model, data, tmp_path / "fsdp-c", 2), "--batch-size", "2", "--bucket-by-references",
             "--compile")
    cfg = toy_config(model, data, tmp_path / "one", max_steps=2, save_every=2, batch_size=4)
    cfg.data.bucket_by_references = True
    train(cfg, progress=False)
    compiled, one = read_metrics(tmp_path / "fsdp-c"), read_metrics(tmp_path / "one")
    assert [m["loss"] for m in compiled] == pytest.approx([m["loss"] for m in one], rel=1e-4)
    assert_same_weights(final_weights(tmp_path / "fsdp-c"), final_weights(tmp_path / "one"), atol=1e-4)
