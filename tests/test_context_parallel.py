"""Context parallelism (diffusers Ulysses) on 2 CPU processes (gloo) gives the single-process result."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def test_ulysses_two_processes_match_one_process(tmp_path):
    worker = Path(__file__).with_name("cp_transformer_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["infer_got"].shape == (2, 16, 3, 8, 6)
        torch.testing.assert_close(r["infer_got"], r["infer_expected"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["train_got"], r["train_expected"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["grad_got"], r["grad_expected"], rtol=1e-4, atol=1e-6)
        assert r["grad_expected"].abs().max() > 0
