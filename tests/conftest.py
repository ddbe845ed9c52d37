import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTDATA = Path(os.environ.get("KALEIDO_TESTDATA", REPO_ROOT.parent / "shared" / "testdata"))
EXAMPLES = TESTDATA / "kaleido_examples"


@pytest.fixture
def examples_dir() -> Path:
    """../shared/testdata/kaleido_examples (official Kaleido outputs); skips when absent."""
    if not EXAMPLES.is_dir():
        pytest.skip(f"test media not found at {EXAMPLES}")
    return EXAMPLES
