"""Ray Data executor: the only module that imports Ray.

Rows are `{"record": <clip JSON>}` (or `{"source": path}` for `scenes`); heavy artefacts (clips, frames, masks,
references) stay on disk under OUTPUT, which must be a shared filesystem on a cluster. Per stage:

- CPU stages (`uses_model = False`) are `map_batches` **tasks** (`num_cpus=1`, up to `workers` at a time);
- model stages (`uses_model = True`) are **actor pools** of `workers` actors, each calling `stage.setup()` once
  (the model stays loaded) and processing batches of `stage.batch_size` clips, with `num_gpus=stage.num_gpus`;
- `scenes` is a `flat_map` task (one video -> many clips).

The bookkeeping (skip finished work, withdraw reasons, timings) is `runner.apply_stage`, shared with the local
loop, so both executors write the same manifest. `address=None` starts a local Ray with `workers` CPUs;
`address="auto"` or `"ray://host:10001"` joins a cluster (every node needs kaleido-s2v installed).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from .runner import apply_stage, write_clip
from .stage import SplitStage, Stage
from .tasks import Clip, Video


def _split_row(row: dict, stage: SplitStage) -> list[dict]:
    return [{"record": c.to_json()} for c in stage.split(Video(row["source"]))]


def _stage_batch(batch: dict, stage: Stage, fp: str) -> dict:
    clips = [Clip.from_json(s) for s in batch["record"]]
    out = apply_stage(stage, clips, fp)
    return {"record": np.array([c.to_json() for c in out], dtype=object)}


def _write_batch(batch: dict, output_dir: str) -> dict:
    from pathlib import Path

    clips = [Clip.from_json(s) for s in batch["record"]]
    for c in clips:
        write_clip(c, Path(output_dir))
    return {"record": np.array([c.to_json() for c in clips], dtype=object)}


class _StageActor:
    """One per actor: the stage with its model loaded once."""

    def __init__(self, stage: Stage, fp: str):
        self.stage, self.fp = stage, fp
        self.stage.setup()

    def __call__(self, batch: dict) -> dict:
        return _stage_batch(batch, self.stage, self.fp)


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, workers: int = 1):
        import ray

        self.workers = max(1, int(workers))
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            if address:
                ray.init(address=address, **kwargs)
            else:
                # workers import kaleido_s2v from the same environment as the driver
                env = {"env_vars": {"PYTHONWARNINGS": "ignore", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}
                ray.init(num_cpus=self.workers, runtime_env=env, **kwargs)
            self._started = True
        else:
            self._started = False
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    def shutdown(self) -> None:
        import ray

        if self._started and ray.is_initialized():
            ray.shutdown()

    def _tasks(self):
        import ray

        return ray.data.TaskPoolStrategy(size=self.workers)

    def _blocks(self, n: int) -> int:
        return max(1, min(n, self.workers * 4))

    def split(self, stage: SplitStage, sources: list[str], progress: bool = False) -> list[Clip]:
        import ray

        ds = ray.data.from_items([{"source": s} for s in sources], override_num_blocks=self._blocks(len(sources)))
        ds = ds.flat_map(_split_row, fn_kwargs={"stage": stage}, compute=self._tasks(), num_cpus=1)
        return [Clip.from_json(r["record"]) for r in ds.take_all()]

    def write_clips(self, clips: list[Clip], output_dir, progress: bool = False) -> None:
        """Cut the kept clips' files in parallel tasks (a clip that fails to decode comes back rejected)."""
        import ray

        if not clips:
            return
        by_id = {c.clip_id: c for c in clips}
        ds = ray.data.from_items([{"record": c.to_json()} for c in clips], override_num_blocks=self._blocks(len(clips)))
        ds = ds.map_batches(_write_batch, fn_kwargs={"output_dir": str(output_dir)}, batch_size=1,
                            batch_format="numpy", compute=self._tasks(), num_cpus=1)
        for row in ds.iter_rows():
            new = Clip.from_record(json.loads(row["record"]))
            by_id[new.clip_id].__dict__.update(new.__dict__)

    def run_stage(self, stage: Stage, clips: list[Clip], fp: str, progress: bool = False,
                  on_batch=None) -> list[Clip]:
        import ray

        if not clips:
            return []
        by_id = {c.clip_id: c for c in clips}
        ds = ray.data.from_items([{"record": c.to_json()} for c in clips], override_num_blocks=self._blocks(len(clips)))
        bs = max(1, int(stage.batch_size))
        if stage.uses_model:
            ds = ds.map_batches(_StageActor, fn_constructor_kwargs={"stage": stage, "fp": fp}, batch_size=bs,
                                batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=self.workers),
                                num_cpus=1, num_gpus=stage.num_gpus or None)
        else:
            ds = ds.map_batches(_stage_batch, fn_kwargs={"stage": stage, "fp": fp}, batch_size=bs,
                                batch_format="numpy", compute=self._tasks(), num_cpus=1)
        done = []
        for n, row in enumerate(ds.iter_rows(), start=1):
            new = Clip.from_record(json.loads(row["record"]))
            orig = by_id[new.clip_id]
            orig.__dict__.update(new.__dict__)  # results land in the runner's objects (checkpoints see them)
            done.append(orig)
            if on_batch is not None and n % 16 == 0:
                on_batch(done)
        return done
