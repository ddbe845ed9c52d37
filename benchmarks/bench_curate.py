"""Throughput of `kaleido-s2v curate --stages scenes,quality` on the official example videos.

Prints clips per minute per CPU core for the local loop (1 core) and for Ray Data with 1 and 2 workers
(one CPU each), and the ratio 2 workers / 1 worker. Inputs: the 9 example videos of ../shared/testdata plus
their concatenation (real cuts), so every run splits and scores the same 18 clips. Clip files are not written
(H.264 encoding would dominate); set --write-clips to include it.

    .venv/bin/python benchmarks/bench_curate.py [--testdata DIR] [--repeat 1] [--write-clips]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from kaleido_s2v.curation.runner import run_pipeline
from kaleido_s2v.video_io import read_video, write_video

ROOT = Path(__file__).resolve().parents[1]
CFG = {"scenes": {"min_clip_s": 1.0}, "quality": {"min_clip_s": 1.0}}


def prepare(testdata: Path, d: Path) -> Path:
    videos = sorted(testdata.glob("case*/*.mp4"))
    if not videos:
        raise SystemExit(f"no example videos under {testdata}")
    inp = d / "in"
    inp.mkdir()
    for v in videos:
        (inp / f"{v.parent.name}.mp4").symlink_to(v)
    write_video(inp / "all_cases.mp4", np.concatenate([read_video(v) for v in videos]), fps=16)
    return inp


def timed(inp: Path, out: Path, executor=None, write_clips=False) -> tuple[int, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    res = run_pipeline(inp, out, ["scenes", "quality"], CFG, executor=executor, write_clips=write_clips)
    return len(res.clips), time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--testdata", default=str(ROOT.parent / "shared" / "testdata" / "kaleido_examples"))
    p.add_argument("--write-clips", action="store_true")
    p.add_argument("--skip-ray", action="store_true")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores visible (shared machines make absolute numbers noisy)")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        inp = prepare(Path(args.testdata), d)
        n, wall, cpu = timed(inp, d / "local", write_clips=args.write_clips)
        local = n / (wall / 60)
        print(f"local loop : {n} clips in {wall:6.1f} s wall ({cpu:5.1f} s CPU in this process) "
              f"-> {local:6.1f} clips/min/core")
        if args.skip_ray:
            return
        from kaleido_s2v.curation.ray_driver import RayExecutor

        rates = {}
        for workers in (1, 2):
            ex = RayExecutor(workers=workers)
            try:
                timed(inp, d / f"warm{workers}", executor=ex)  # start the worker processes once
                n, wall, _ = timed(inp, d / f"ray{workers}", executor=ex, write_clips=args.write_clips)
            finally:
                ex.shutdown()
            rates[workers] = n / (wall / 60)
            print(f"ray x{workers}     : {n} clips in {wall:6.1f} s wall -> {rates[workers]:6.1f} clips/min "
                  f"({rates[workers] / workers:6.1f} clips/min/core)")
        print(f"ray 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x   ray 1 worker / local loop: "
              f"{rates[1] / local:.2f}x")


if __name__ == "__main__":
    main()
