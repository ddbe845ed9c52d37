"""The GPU suite's code path, on the CPU (`benchmarks/gpu_suite.py --dry-run`): it runs to the end, writes its JSON
and appends its table, so the unattended GPU run cannot fail on a typo."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out",
                           str(tmp_path / "suite.json"), "--results", str(results)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "suite.json").read_text())
    assert report["dry_run"] and report["tokens"] == (3 + 2) * 4 * 6
    assert report["attention_backends"]["native"]["seconds"] > 0
    assert "seconds" in report["compile"] or "error" in report["compile"]  # no C++ compiler: recorded, not fatal
    assert report["distill_sample"]["frames"] == 9 and set(report["peak_memory_gib"]) >= {"resident", "fp8_storage"}
    text = results.read_text()
    assert text.startswith("# results\n") and "## GPU suite" in text and "| attention `native` |" in text


def test_gpu_suite_keeps_a_file_it_did_not_write(tmp_path):
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": true}\n')
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out", str(mine)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert mine.read_text() == '{"mine": true}\n'
