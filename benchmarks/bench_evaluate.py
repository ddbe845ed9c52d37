"""Seconds per case of `kaleido-s2v evaluate` on CPU with the tiny models, and what sharing the decode saves.

Baseline (same run): every metric evaluated on its own, so each decodes every video again (what a script
looping over metrics would do). Models are loaded once in both, so the ratio isolates the shared decode.

    .venv/bin/python benchmarks/bench_evaluate.py [--cases 3] [--frames 81] [--size 512x896] [--threads 1]
    .venv/bin/python benchmarks/bench_evaluate.py --testdata   # the official Kaleido outputs instead
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _synthetic_cases(root: Path, n: int, frames: int, h: int, w: int) -> Path:
    from PIL import Image

    from kaleido_s2v.video_io import write_video

    lines = []
    for i in range(n):
        rng = np.random.default_rng(i)
        yy, xx = np.mgrid[0:h, 0:w + 2 * frames].astype(np.float32)
        tex = np.clip(128 + 60 * np.sin(xx / (6 + i)) * np.cos(yy / 9) + rng.normal(0, 8, xx.shape), 0, 255)
        video = np.stack([np.repeat(tex[:, 2 * t:2 * t + w, None], 3, 2) for t in range(frames)]).astype(np.uint8)
        write_video(root / f"v{i}.mp4", video, fps=16)
        Image.fromarray(video[0]).save(root / f"r{i}.png")
        lines.append({"id": f"v{i}", "video": f"v{i}.mp4", "prompt": "a textured toy slides to the left",
                      "references": [{"path": f"r{i}.png", "label": "toy"}]})
    (root / "cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in lines))
    return root / "cases.jsonl"


def _testdata_cases(root: Path) -> tuple[Path, Path]:
    examples = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "kaleido_examples"
    lines = []
    for folder in sorted(examples.glob("case*")):
        video = next(folder.glob("*.mp4"))
        refs = sorted(str(p) for p in folder.iterdir() if p.suffix in (".png", ".jpg"))
        lines.append({"id": folder.name, "video": f"{folder.name}/{video.name}", "prompt": "", "references": refs})
    (root / "cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in lines))
    return root / "cases.jsonl", examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", default="512x896", help="HxW of the synthetic videos")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--testdata", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import cv2

        cv2.setNumThreads(args.threads)
    except ImportError:
        pass

    from kaleido_s2v.evaluation import METRICS, evaluate, read_cases
    from kaleido_s2v.evaluation.models import ModelStore
    from kaleido_s2v.evaluation.tiny import save_tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = save_tiny_models(root / "models")
        if args.testdata:
            cases_file, videos = _testdata_cases(root)
        else:
            h, w = (int(v) for v in args.size.split("x"))
            cases_file, videos = _synthetic_cases(root, args.cases, args.frames, h, w), root
        cases = read_cases(cases_file, videos)
        params = {"s2v": {"box_threshold": 0.0, "text_threshold": 0.0, "mask_min_iou": -1.0}}
        store = ModelStore(paths, batch_size=16)
        for role in paths:  # load outside the timed region (both variants share the store)
            store.get(role)
        evaluate(cases[:1], paths, None, params=params, progress=False, models=store)  # warm-up

        t0, c0 = time.perf_counter(), time.process_time()
        shared = evaluate(cases, paths, root / "out", params=params, progress=False, models=store)
        t_shared, c_shared = time.perf_counter() - t0, time.process_time() - c0

        t0, c0 = time.perf_counter(), time.process_time()
        for m in METRICS:
            evaluate(cases, paths, None, metrics=[m], params=params, progress=False, models=store)
        t_separate, c_separate = time.perf_counter() - t0, time.process_time() - c0

    n = len(cases)
    print(f"cases: {n} ({'official Kaleido outputs' if args.testdata else f'{args.frames} frames {args.size}'}), "
          f"torch threads {args.threads}, tiny models, CPU")
    print(f"shared decode (one evaluate run, all metrics): {t_shared / n:8.2f} s/case wall, {c_shared / n:8.2f} s/case "
          f"CPU (decode {shared['run']['decode_seconds'] / n:.2f} s/case wall)")
    print(f"decode per metric (one run per metric):       {t_separate / n:8.2f} s/case wall, "
          f"{c_separate / n:8.2f} s/case CPU")
    print(f"ratio decode-per-metric / shared:              {t_separate / t_shared:8.2f}x wall, "
          f"{c_separate / c_shared:.2f}x CPU")
    print("per metric, s/case:", ", ".join(f"{m} {i['seconds_per_case']:.2f}" for m, i in shared["metrics"].items()))


if __name__ == "__main__":
    main()
