import json

import numpy as np
import pytest

from kaleido_s2v.curation.runner import run_pipeline
from kaleido_s2v.video_io import write_video

pytest.importorskip("ray.data")

CFG = {"scenes": {"min_clip_s": 0.5, "min_scene_len": 4}, "quality": {"min_clip_s": 0.5, "min_sharpness": 50.0}}


def _inputs(d):
    rng = np.random.default_rng(0)
    for k in range(3):
        shots = [np.repeat(rng.integers(0, 255, (1, 64, 96, 3), dtype=np.uint8), 12, axis=0) for _ in range(2)]
        frames = np.concatenate(shots)
        frames = np.clip(frames.astype(int) + rng.integers(-20, 20, frames.shape), 0, 255).astype(np.uint8)
        if k == 2:
            frames //= 8  # too dark
        write_video(d / f"v{k}.mp4", frames, fps=16)
    (d / "broken.mp4").write_bytes(b"nope")
    return d


def _records(path):
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    for r in recs:
        r.pop("timings")
    return recs


def test_ray_with_two_workers_gives_the_local_manifest(tmp_path):
    from kaleido_s2v.curation.ray_driver import RayExecutor

    inp = tmp_path / "in"
    inp.mkdir()
    _inputs(inp)
    local = run_pipeline(inp, tmp_path / "local", ["scenes", "quality"], CFG)
    ex = RayExecutor(workers=2)
    try:
        ray_res = run_pipeline(inp, tmp_path / "ray", ["scenes", "quality"], CFG, executor=ex)
        again = run_pipeline(inp, tmp_path / "ray", ["scenes", "quality"], CFG, executor=ex)
    finally:
        ex.shutdown()
    assert ray_res.summary["executor"] == "ray"
    # exact across processes: the scores come from decoded uint8 frames through OpenCV/numpy code whose results do
    # not depend on threads (per-pixel work, sequential float64/float32 sums), rounded to 3-6 decimals
    assert _records(tmp_path / "ray" / "manifest.jsonl") == _records(tmp_path / "local" / "manifest.jsonl")
    assert local.summary["reasons"] == ray_res.summary["reasons"] and ray_res.summary["reasons"]["too_dark"] == 2
    assert again.stats["scenes"].processed == 0 and again.stats["quality"].processed == 0
    assert again.stats["write_clips"].processed == 0
    kept = sorted(p.name for p in (tmp_path / "local" / "clips").iterdir())
    assert kept and kept == sorted(p.name for p in (tmp_path / "ray" / "clips").iterdir())  # written by Ray tasks


@pytest.mark.slow
def test_model_stage_runs_as_an_actor_pool_with_batches(tmp_path):
    """caption (a model stage) under Ray: 2 actors, batches of 2, the same captions as the local loop."""
    from kaleido_s2v.curation.ray_driver import RayExecutor

    from .tiny_models import save_tiny_llava

    inp = tmp_path / "in"
    inp.mkdir()
    _inputs(inp)
    cfg = {**CFG, "caption": {"model": str(save_tiny_llava(tmp_path / "llava")), "num_frames": 2, "batch_size": 2,
                              "max_new_tokens": 5, "device": "cpu"}}
    stages = ["scenes", "quality", "caption"]
    run_pipeline(inp, tmp_path / "local", stages, cfg, write_clips=False)
    ex = RayExecutor(workers=2)
    try:
        res = run_pipeline(inp, tmp_path / "ray", stages, cfg, executor=ex, write_clips=False)
    finally:
        ex.shutdown()
    assert res.stats["caption"].processed == 4
    # exact: greedy token ids; the tiny captioner's smallest top-2 logit gap here (2e-3) dwarfs float noise (~1e-8)
    assert _records(tmp_path / "ray" / "manifest.jsonl") == _records(tmp_path / "local" / "manifest.jsonl")


@pytest.mark.slow
def test_cli_workers_flag_uses_ray(tmp_path, capsys):
    from kaleido_s2v.cli import main

    inp = tmp_path / "in"
    inp.mkdir()
    _inputs(inp)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(CFG))
    rc = main(["curate", "--input", str(inp), "--output", str(tmp_path / "o"), "--config", str(cfg),
               "--workers", "2", "--json", "--no-clips"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["executor"] == "ray"
