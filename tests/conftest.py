import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# torch.compile's kernel cache is keyed too loosely to share between CPUs with other instruction sets (an AVX-512
# cache read under AVX2 gave NaN losses): every session compiles into its own folder.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="kaleido-inductor-"))

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTDATA = Path(os.environ.get("KALEIDO_TESTDATA", REPO_ROOT.parent / "shared" / "testdata"))
EXAMPLES = TESTDATA / "kaleido_examples"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run ~10x faster on one thread than on two contended ones; torch is imported lazily."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def examples_dir() -> Path:
    """../shared/testdata/kaleido_examples (official Kaleido outputs); skips when absent."""
    if not EXAMPLES.is_dir():
        pytest.skip(f"test media not found at {EXAMPLES}")
    return EXAMPLES


@pytest.fixture
def cpp_compiler() -> str:
    """The C++ compiler torch.compile's CPU kernels need (inductor's own search); skips when there is none."""
    from kaleido_s2v.training.parallelize import cpp_compiler

    compiler = cpp_compiler()
    if compiler is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    return compiler


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """(tiny pipeline folder, synthetic training data folder), for the trainer's tests."""
    from tests.test_training import write_synthetic_data, write_tiny_pipeline

    root = tmp_path_factory.mktemp("train")
    return write_tiny_pipeline(root / "model"), write_synthetic_data(root / "data")
