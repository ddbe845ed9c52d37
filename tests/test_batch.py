"""The batch runner's contract with `evaluate`: `generate --batch ... --out-dir D` writes D/manifest.jsonl, and
`evaluate --cases D/manifest.jsonl` scores those videos against their prompts and reference files."""

import json
from pathlib import Path

from PIL import Image

from kaleido_s2v.batch import MADE_BY, MANIFEST
from kaleido_s2v.cli import main
from kaleido_s2v.evaluation import read_cases
from kaleido_s2v.evaluation.tiny import save_tiny_models

FAST = ["--steps", "1", "--quiet", "--seed", "3"]


def test_generate_batch_then_evaluate_its_manifest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 40), (220, 30, 30)).save("red.png")
    Image.new("RGB", (30, 50), (30, 30, 220)).save("blue.png")
    Path("cases.jsonl").write_text(
        json.dumps({"prompt": "The red striped circle moves to the left.", "references": ["red.png"]}) + "\n"
        + json.dumps({"prompt": "The blue square bounces.", "references": ["blue.png", "red.png"],
                      "output": "sub/blue.mp4", "seed": 9}) + "\n")
    assert main(["generate", "--batch", "cases.jsonl", "--out-dir", "D", *FAST]) == 0
    lines = Path("D", MANIFEST).read_text().splitlines()
    assert lines[0] == f"# made_by: {MADE_BY}"
    rows = [json.loads(ln) for ln in lines[1:]]
    assert [r["id"] for r in rows] == ["case0001", "sub/blue"] and [r["seed"] for r in rows] == [3, 9]
    assert rows[1]["references"] == [str(tmp_path.resolve() / "blue.png"), str(tmp_path.resolve() / "red.png")]
    assert rows[0]["settings"]["num_inference_steps"] == 1

    cases = read_cases(Path("D", MANIFEST), Path("D"))  # what evaluate reads: the videos and the reference files
    assert [c.video for c in cases] == [Path("D/case0001.mp4"), Path("D/sub/blue.mp4")]
    assert [r.path.name for r in cases[1].references] == ["blue.png", "red.png"]

    models = save_tiny_models(tmp_path / "models")
    Path("models.json").write_text(json.dumps({k: str(v) for k, v in models.items()}))
    capsys.readouterr()
    assert main(["evaluate", "--cases", "D/manifest.jsonl", "--models", "models.json", "-o", "S", "--quiet",
                 "--json"]) == 0  # --videos defaults to the manifest's folder
    summary = json.loads(capsys.readouterr().out)
    assert summary["cases"] == 2 and not summary["errors"]
    scores = json.loads(Path("S/scores.json").read_text())
    assert sorted(scores["per_case"]) == ["case0001", "sub/blue"]
    assert "s2v_consistency" in scores["mean"]  # a reference metric ran on the manifest's references

    # a rerun replaces its own manifest (signed), not one the user wrote
    assert main(["generate", "--batch", "cases.jsonl", "--out-dir", "D", *FAST]) == 0
