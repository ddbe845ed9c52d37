"""`kaleido-s2v prompt` and `generate --enhance-prompt`, end to end with the built-in model (64x64, 9 frames,
2 steps): against an OpenAI-compatible server on 127.0.0.1 and with a tiny random Qwen2-VL folder."""

from __future__ import annotations

import json
import sys
import weakref

import numpy as np
import pytest
from PIL import Image

from kaleido_s2v.cli import main
from kaleido_s2v.prompts import endpoint as endpoint_module
from tests.test_prompts import ChatServer, closed_port, write_tiny_vlm

FAST = ["--steps", "2", "--seed", "0", "--quiet"]
CAPTION = "A small orange fox in a green coat pushes a red toy car across a wooden floor."


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return write_tiny_vlm(tmp_path_factory.mktemp("enhancers") / "tiny-qwen2-vl")


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(endpoint_module, "BACKOFF_SECONDS", (0.0,))
    s = ChatServer()
    s.reply = s.answer(f'Caption: "{CAPTION}"')
    yield s
    s.close()


@pytest.fixture
def refs(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("fox.png", "car.png"):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(tmp_path / name)
    return ["--ref", str(tmp_path / "fox.png"), "--ref", str(tmp_path / "car.png")]


def _endpoint(server) -> list[str]:
    return ["--enhancer-url", server.url, "--enhancer-model", "test"]


def test_prompt_prints_the_caption_or_json(server, refs, capsys):
    assert main(["prompt", "--prompt", "a fox pushes a toy car", *refs, *_endpoint(server)]) == 0
    assert capsys.readouterr().out == CAPTION + "\n"
    assert main(["prompt", "--prompt", "a fox pushes a toy car", *refs, *_endpoint(server), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["original"] == "a fox pushes a toy car" and out["enhanced"] == CAPTION
    assert out["enhancer"]["kind"] == "endpoint" and out["enhancer"]["model"] == "test" and out["seconds"] >= 0
    assert len([p for p in server.requests[0]["messages"][1]["content"] if p["type"] == "image_url"]) == 2


def test_prompt_failures_are_one_line_exit_2(server, refs, capsys):
    server.reply = ChatServer.answer("   ")
    assert main(["prompt", "--prompt", "a fox", *refs, *_endpoint(server)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty answer" in err[0]
    assert main(["prompt", "--prompt", "a fox", "--ref", "nope.png", *_endpoint(server)]) == 2
    assert "--ref image 'nope.png' does not exist" in capsys.readouterr().err
    assert len(server.requests) == 1  # the missing reference stopped the second run before any request


def test_prompt_with_a_local_vlm_is_deterministic(vlm, refs, capsys):
    args = ["prompt", "--prompt", "a fox pushes a toy car", *refs, "--enhancer", str(vlm), "--enhancer-max-tokens",
            "12", "--enhancer-device", "cpu", "--quiet"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.strip()


def test_generate_enhances_the_prompt_and_records_both(server, refs, tmp_path):
    out = tmp_path / "fox.mp4"
    assert main(["generate", "--prompt", "a fox pushes a toy car", *refs, "--enhance-prompt", *_endpoint(server),
                 *FAST, "-o", str(out)]) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["prompt"] == side["encoded_prompt"] == CAPTION
    assert side["original_prompt"] == "a fox pushes a toy car"
    assert side["enhancer"] == {"kind": "endpoint", "url": server.url + "/chat/completions", "model": "test",
                                "sees_images": True, "seed": None}
    assert side["settings"]["enhancer_seconds"] >= 0
    (body,) = server.requests
    assert len([p for p in body["messages"][1]["content"] if p["type"] == "image_url"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["car.png", "fox.json", "fox.mp4", "fox.png"]  # no cache


def test_generate_batch_enhances_every_case_first_and_a_rerun_uses_the_cache(server, refs, tmp_path, capsys):
    fox, car = refs[1], refs[3]
    (tmp_path / "cases.txt").write_text(f"a fox pushes a toy car@@{fox}@@{car}\na fox sleeps@@{fox}\n")
    out_dir = tmp_path / "outs"
    args = ["generate", "--batch", str(tmp_path / "cases.txt"), "--out-dir", str(out_dir), "--enhance-prompt",
            *_endpoint(server), *FAST, "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompts"]["enhanced"] == 2 and summary["prompts"]["cached"] == 0
    rows = [json.loads(line) for line in (out_dir / "manifest.jsonl").read_text().splitlines()[1:]]
    assert [r["original_prompt"] for r in rows] == ["a fox pushes a toy car", "a fox sleeps"]
    assert [r["prompt"] for r in rows] == [CAPTION, CAPTION] and rows[0]["enhancer"]["model"] == "test"
    side = json.loads((out_dir / "case0002.json").read_text())
    assert side["original_prompt"] == "a fox sleeps" and side["prompt"] == CAPTION
    cache = json.loads((out_dir / "prompt_cache.json").read_text())
    assert cache["made_by"] == "kaleido-s2v generate" and len(cache["entries"]) == 2
    assert len(server.requests) == 2

    assert main([*args, "--overwrite"]) == 0  # the rerun asks nothing
    assert json.loads(capsys.readouterr().out)["prompts"] == {"enhanced": 0, "cached": 2,
                                                             "seconds": pytest.approx(0, abs=1)}
    assert len(server.requests) == 2
    assert main(args) == 0  # and without --overwrite: every file there is the command's own
    assert len(server.requests) == 2


def test_generate_with_a_local_vlm_frees_it_before_the_video_model_loads(vlm, refs, tmp_path, monkeypatch):
    from transformers import Qwen2VLForConditionalGeneration

    import kaleido_s2v.model_folder as model_folder

    seen, models, alive_at_load = [], [], []
    generate, load_text_encoder = Qwen2VLForConditionalGeneration.generate, model_folder.load_text_encoder

    def spy(self, **kwargs):
        seen.append(kwargs)
        models.append(weakref.ref(self))
        return generate(self, **kwargs)

    def loading_text_encoder(*args, **kwargs):
        alive_at_load.append([m() is not None for m in models])
        return load_text_encoder(*args, **kwargs)

    monkeypatch.setattr(Qwen2VLForConditionalGeneration, "generate", spy)
    monkeypatch.setattr(model_folder, "load_text_encoder", loading_text_encoder)
    out = tmp_path / "fox.mp4"
    assert main(["generate", "--prompt", "a fox pushes a toy car", *refs, "--enhance-prompt", "--enhancer", str(vlm),
                 "--enhancer-max-tokens", "12", *FAST, "-o", str(out)]) == 0
    assert seen[0]["image_grid_thw"].shape[0] == 2  # the model saw both references
    assert alive_at_load == [[False]]  # freed before the text encoder (and the transformer) loaded
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["original_prompt"] == "a fox pushes a toy car" and side["prompt"].strip()
    assert side["prompt"] == side["encoded_prompt"] != side["original_prompt"]
    assert side["enhancer"]["kind"] == "local" and side["enhancer"]["sees_images"] is True


def test_generate_connects_only_to_the_enhancer_url(server, refs, tmp_path):
    attempts, recording = [], [True]

    def hook(event, args):
        if event == "socket.connect" and recording[0]:
            attempts.append(args[1])

    sys.addaudithook(hook)  # cannot be removed: gated by `recording`
    try:
        assert main(["generate", "--prompt", "a fox", *refs, "--enhance-prompt", *_endpoint(server), *FAST,
                     "-o", str(tmp_path / "a.mp4")]) == 0
    finally:
        recording[0] = False
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    assert attempts and all(a == ("127.0.0.1", port) for a in attempts), attempts


def test_generate_with_an_unreachable_enhancer_writes_nothing(refs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(endpoint_module, "BACKOFF_SECONDS", (0.0,))
    (tmp_path / "cases.txt").write_text(f"a fox@@{refs[1]}\n")
    assert main(["generate", "--batch", str(tmp_path / "cases.txt"), "--enhance-prompt", "--enhancer-url",
                 f"http://127.0.0.1:{closed_port()}/v1", "--enhancer-model", "m", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot connect" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["car.png", "cases.txt", "fox.png"]


@pytest.mark.slow
def test_torchrun_rank0_asks_once_and_every_rank_gets_the_caption(server, refs, tmp_path):
    import os
    import subprocess

    (tmp_path / "cases.txt").write_text(f"a fox pushes a toy car@@{refs[1]}\na fox sleeps@@{refs[3]}\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "kaleido_s2v", "generate", "--batch", str(tmp_path / "cases.txt"), "--out-dir", str(tmp_path / "o"),
           "--split-cases", "--enhance-prompt", *_endpoint(server), *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(server.requests) == 2  # rank 0 only, once per case
    for name in ("case0001.json", "case0002.json"):  # one written by each rank
        side = json.loads((tmp_path / "o" / name).read_text())
        assert side["prompt"] == CAPTION and side["original_prompt"].startswith("a fox")
