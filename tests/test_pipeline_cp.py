"""Context parallelism (Ulysses) with 2 CPU processes over gloo gives the 1-process video, for both families."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _torchrun(args, timeout=300):
    res = subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, env=ENV, timeout=timeout, cwd=HERE)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.parametrize("family,shape", [("kaleido", (1, 9, 48, 80, 3)), ("magref", (1, 5, 64, 96, 3))])
def test_two_process_context_parallel_equals_one_process(tmp_path, family, shape):
    """Kaleido: its own `_cp_plan` with uneven shards; MAGREF: diffusers' `WanTransformer3DModel._cp_plan`."""
    import importlib.util

    from kaleido_s2v.distributed import Runtime

    spec = importlib.util.spec_from_file_location("cp_generate_worker", HERE / "cp_generate_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)

    _torchrun([str(HERE / "cp_generate_worker.py"), str(tmp_path / "cp2.npy"), family])
    expected = worker.generate(Runtime(), family)
    got = np.load(tmp_path / "cp2.npy")
    assert got.shape == expected.shape == shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_cpu_shims_are_scoped():
    from kaleido_s2v.distributed import cpu_accelerator_shim

    before = torch.accelerator.device_count()
    with cpu_accelerator_shim():
        assert torch.accelerator.device_count() == 1
    assert torch.accelerator.device_count() == before


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from kaleido_s2v.pipeline import KaleidoPipeline
    from kaleido_s2v.tiny import tiny_components

    path = tmp_path_factory.mktemp("cp") / "tiny"
    KaleidoPipeline(**tiny_components(seed=0)).save_pretrained(path)
    return path


@pytest.mark.slow
def test_torchrun_generate_cli_matches_single_process_and_only_rank0_writes(model_dir, tmp_path):
    ref = tmp_path / "ref.png"
    _write_ref(ref)
    common = ["generate", "--model", str(model_dir), "--prompt", "p", "--ref", str(ref), "--height", "48", "--width",
              "80", "--frames", "9", "--steps", "2", "--seed", "4", "--max-sequence-length", "32"]
    _torchrun(["-m", "kaleido_s2v", *common, "-o", str(tmp_path / "cp" / "v.mp4")])
    single = subprocess.run([sys.executable, "-m", "kaleido_s2v", *common, "-o", str(tmp_path / "one" / "v.mp4")],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    from kaleido_s2v.video_io import read_video

    a, b = read_video(tmp_path / "cp" / "v.mp4"), read_video(tmp_path / "one" / "v.mp4")
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    side = json.loads((tmp_path / "cp" / "v.json").read_text())
    assert side["settings"]["world_size"] == 2 and side["settings"]["context_parallel"]
    assert sorted(p.name for p in (tmp_path / "cp").iterdir()) == ["v.json", "v.mp4"]


@pytest.mark.slow
def test_torchrun_split_cases(model_dir, tmp_path):
    ref = tmp_path / "ref.png"
    _write_ref(ref)
    batch = tmp_path / "cases.txt"
    batch.write_text("".join(f"case {i}@@ref.png\n" for i in range(3)))
    _torchrun(["-m", "kaleido_s2v", "generate", "--model", str(model_dir), "--batch", str(batch), "--out-dir",
               str(tmp_path / "o"), "--split-cases", "--height", "32", "--width", "32", "--frames", "1", "--steps",
               "1", "--max-sequence-length", "16"])
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == [f"case000{i}.{ext}" for i in (1, 2, 3) for ext in ("json", "mp4")]
    worlds = {json.loads((tmp_path / "o" / f"case000{i}.json").read_text())["settings"]["context_parallel"]
              for i in (1, 2, 3)}
    assert worlds == {False}


def _write_ref(path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(path)
