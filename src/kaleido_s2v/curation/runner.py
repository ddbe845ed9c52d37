"""The curation run: inputs -> clips -> stages -> manifest, clips, summary. Resumable and idempotent.

Every stage stamps each clip it handled with a fingerprint of its settings (`clip.stages_done`). A rerun loads
`OUTPUT/manifest.jsonl` and skips every (clip, stage) whose stamp matches; a stage whose settings changed runs
again and withdraws the reasons it and the stages after it gave before. Stages run stage by stage over all
clips (so model stages batch and cross-clip stages see every clip); the manifest is saved after each batch
period, so an interrupted run loses little. The executor is the plain loop below or `ray_driver.RayExecutor`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserInputError
from ..fileio import claim_folder, output_folder
from .config import build_stage
from .manifest import MANIFEST, read_manifest, summarize, write_manifest, write_summary
from .stage import SplitStage, Stage
from .stages import STAGES
from .tasks import Clip, Video, clip_id_for

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"}
CLIP_FPS_KEY = "clip_path"
MADE_BY = "kaleido-s2v curate"


def resolve_inputs(inp: str | Path | list) -> list[str]:
    """A folder (videos found recursively), a video file, or a .txt/.lst file with one path per line."""
    if isinstance(inp, (list, tuple)):
        return sorted({p for x in inp for p in resolve_inputs(x)})
    p = Path(inp)
    if p.is_dir():
        vids = sorted(str(f.resolve()) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
        if not vids:
            raise UserInputError(f"--input folder '{p}' holds no videos ({', '.join(sorted(VIDEO_SUFFIXES))})")
        return vids
    if p.is_file() and p.suffix.lower() in {".txt", ".lst", ".list"}:
        out = []
        for line in p.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                q = Path(line) if Path(line).is_absolute() else p.parent / line
                if not q.exists():
                    raise UserInputError(f"--input list '{p}' names '{line}', which does not exist")
                out.append(str(q.resolve()))
        if not out:
            raise UserInputError(f"--input list '{p}' is empty: give one video path per line")
        return out
    if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
        return [str(p.resolve())]
    if p.is_file():
        raise UserInputError(f"--input '{p}' is not a video ({', '.join(sorted(VIDEO_SUFFIXES))}) nor a .txt list of "
                             "videos: give a folder of videos, a video or a list file")
    raise UserInputError(f"--input '{p}' does not exist: give a folder of videos, a video or a list file")


def check_apart(inputs: str | Path | list, sources: list[str], output_dir: Path) -> None:
    """The output folder may not hold, or be inside, an input: a rerun would take its own clips as sources."""
    out = output_dir.resolve()
    named = [Path(x) for x in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
    for p in [*named, *map(Path, sources)]:
        p = p.resolve()
        if p == out or out in p.parents or (p.is_dir() and p in out.parents):
            raise UserInputError(f"--output '{output_dir}' overlaps --input '{p}': give an output folder outside "
                                 "the inputs (and inputs outside the output)")


@dataclass
class StageStats:
    processed: int = 0
    cached: int = 0
    rejected: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"processed": self.processed, "cached": self.cached, "rejected": self.rejected,
                "seconds": round(self.seconds, 3)}


def later_stages(name: str) -> set[str]:
    order = list(STAGES)
    return set(order[order.index(name):])


def needs_stage(stage: Stage, clip: Clip, fp: str) -> bool:
    """Not yet run with these settings, and not rejected by an earlier stage (its own old reasons don't count)."""
    if clip.stages_done.get(stage.name) == fp:
        return False
    redo = later_stages(stage.name)
    return not any(rs for s, rs in clip.reasons_by_stage.items() if s not in redo)


def apply_stage(stage: Stage, clips: list[Clip], fp: str) -> list[Clip]:
    """Run `stage` on `clips` (all of which need it), with the bookkeeping both executors share."""
    for c in clips:
        c.withdraw(later_stages(stage.name))
    t0 = time.perf_counter()
    out = stage.process_batch(clips)
    dt = (time.perf_counter() - t0) / max(1, len(clips))
    for c in out:
        before = {r for rs in c.reasons_by_stage.values() for r in rs}
        new = [r for r in c.reasons if r not in before]
        if new:
            c.reasons_by_stage[stage.name] = new
        c.stages_done[stage.name] = fp
        c.timings[stage.name] = round(dt, 4)
    return out


class LocalExecutor:
    """Plain sequential loop (tests, one machine)."""

    name = "local"

    def write_clips(self, clips: list[Clip], output_dir: Path, progress: bool = False) -> None:
        from tqdm.auto import tqdm

        for c in tqdm(clips, desc="clips", disable=not progress):
            write_clip(c, output_dir)

    def split(self, stage: SplitStage, sources: list[str], progress: bool = False) -> list[Clip]:
        from tqdm.auto import tqdm

        stage.setup()
        out: list[Clip] = []
        for s in tqdm(sources, desc="scenes", disable=not progress):
            out.extend(stage.split(Video(s)))
        return out

    def run_stage(self, stage: Stage, clips: list[Clip], fp: str, progress: bool = False,
                  on_batch=None) -> list[Clip]:
        from tqdm.auto import tqdm

        if not clips:
            return []
        stage.setup()
        out: list[Clip] = []
        bs = max(1, int(stage.batch_size))
        with tqdm(total=len(clips), desc=stage.name, disable=not progress) as bar:
            for i in range(0, len(clips), bs):
                out.extend(apply_stage(stage, clips[i : i + bs], fp))
                bar.update(len(clips[i : i + bs]))
                if on_batch is not None:
                    on_batch(out)
        return out


def whole_video_clip(source: str) -> Clip:
    from ..video_io import video_info

    clip = Clip(clip_id=clip_id_for(source, 0), source=source, start_s=0.0, end_s=0.0)
    try:
        info = video_info(source)
    except UserInputError as e:
        clip.reject("unreadable")
        clip.reasons_by_stage["input"] = ["unreadable"]
        clip.fields["input_error"] = str(e)
        return clip
    clip.end_s, clip.fps, clip.width, clip.height = round(info.duration, 4), info.fps, info.width, info.height
    return clip


def write_clip(clip: Clip, output_dir: Path) -> None:
    """`OUTPUT/clips/<clip_id>.mp4`: the clip's window cut from the source (native fps), streamed, atomic."""
    from .frames import stream_clip

    dst = output_dir / "clips" / f"{clip.clip_id}.mp4"
    if dst.is_file():
        return
    try:
        stream_clip(clip.source, clip.start_s, clip.end_s, dst, native_fps=clip.fps or 16.0)
    except (UserInputError, ValueError) as e:
        clip.reject("unreadable")
        clip.reasons_by_stage.setdefault("clips", []).append("unreadable")
        clip.fields["clip_error"] = str(e)


@dataclass
class CurateResult:
    clips: list[Clip]
    summary: dict[str, Any]
    stats: dict[str, StageStats] = field(default_factory=dict)


def run_pipeline(
    inputs: str | Path | list,
    output_dir: str | Path,
    stage_names: list[str],
    config: dict[str, dict[str, Any]] | None = None,
    *,
    executor=None,
    progress: bool = False,
    write_clips: bool = True,
    checkpoint_s: float = 30.0,
    overwrite: bool = False,
) -> CurateResult:
    """Run `stage_names` over the inputs into `output_dir`: new, empty, a folder an earlier curate run wrote
    (resumed), or any folder with `overwrite`. Bad input raises before the folder is made."""
    config = config or {}
    output_dir = Path(output_dir)
    sources = resolve_inputs(inputs)
    check_apart(inputs, sources, output_dir)
    stages = [build_stage(n, config.get(n), output_dir) for n in stage_names]  # config errors before any output
    claim_folder(output_dir, "--output", MADE_BY, overwrite=overwrite)
    with output_folder(output_dir, MADE_BY):
        return _run(sources, output_dir, stages, executor or LocalExecutor(), progress, write_clips, checkpoint_s)


def _run(sources: list[str], output_dir: Path, stages: list[Stage], executor, progress: bool, write_clips: bool,
         checkpoint_s: float) -> CurateResult:
    manifest_path = output_dir / MANIFEST

    existing = read_manifest(manifest_path)
    by_source: dict[str, list[Clip]] = {}
    for c in existing:
        by_source.setdefault(c.source, []).append(c)
    stats = {s.name: StageStats() for s in stages}

    # 1. clips: from `scenes`, from the previous run, or one clip per whole video
    clips: list[Clip] = []
    split = stages[0] if stages and isinstance(stages[0], SplitStage) else None
    if split is not None:
        fp = split.fingerprint()
        todo = []
        for s in sources:
            old = by_source.get(s, [])
            if old and all(c.stages_done.get(split.name) == fp for c in old):
                clips.extend(old)
                stats[split.name].cached += len(old)
            else:
                todo.append(s)
        t0 = time.perf_counter()
        new = executor.split(split, todo, progress=progress) if todo else []
        stats[split.name].seconds += time.perf_counter() - t0
        per_video = (time.perf_counter() - t0) / max(1, len(todo))
        for c in new:
            c.stages_done[split.name] = fp
            c.timings[split.name] = round(per_video, 4)
            if c.reasons:
                c.reasons_by_stage[split.name] = list(c.reasons)
        stats[split.name].processed += len(new)
        stats[split.name].rejected += sum(not c.kept for c in new)
        clips.extend(new)
        stages = stages[1:]
    else:
        for s in sources:
            clips.extend(by_source.get(s) or [whole_video_clip(s)])
    known = {c.source for c in clips}
    clips.extend(c for c in existing if c.source not in known)  # earlier inputs stay in the manifest

    def save(_=None, _last=[0.0]):  # noqa: B006 - throttle state
        if time.monotonic() - _last[0] >= checkpoint_s:
            write_manifest(manifest_path, clips)
            _last[0] = time.monotonic()

    write_manifest(manifest_path, clips)

    # 2. the clip stages, in the given order
    extra: dict[str, Any] = {}
    active = set(sources)
    for stage in stages:
        fp = stage.fingerprint()
        mine = [c for c in clips if c.source in active]
        todo = [c for c in mine if needs_stage(stage, c, fp)]
        stats[stage.name].cached += sum(c.stages_done.get(stage.name) == fp for c in mine)
        if stage.needs_pool:
            stage.set_pool([c for c in clips if c.kept])
        t0 = time.perf_counter()
        done = executor.run_stage(stage, todo, fp, progress=progress, on_batch=save) if todo else []
        stats[stage.name].seconds += time.perf_counter() - t0
        stats[stage.name].processed += len(done)
        stats[stage.name].rejected += sum(stage.name in c.reasons_by_stage for c in done)
        done_by_id = {c.clip_id: c for c in done}
        clips = [done_by_id.get(c.clip_id, c) for c in clips]
        if hasattr(stage, "finalize"):
            t0 = time.perf_counter()
            extra[stage.name] = stage.finalize(clips)
            stats[stage.name].seconds += time.perf_counter() - t0
        write_manifest(manifest_path, clips)

    # 3. kept clips as files; files of clips rejected since are removed
    if write_clips:
        t0 = time.perf_counter()
        todo = [c for c in clips if c.source in active and c.kept
                and not (output_dir / "clips" / f"{c.clip_id}.mp4").is_file()]
        executor.write_clips(todo, output_dir, progress=progress)
        for c in clips:
            f = output_dir / "clips" / f"{c.clip_id}.mp4"
            if not c.kept and f.exists():
                f.unlink()
        stats["write_clips"] = StageStats(processed=len(todo), cached=sum(c.kept for c in clips) - len(todo),
                                          seconds=time.perf_counter() - t0)
        write_manifest(manifest_path, clips)

    summary = summarize(clips, {k: v.as_dict() for k, v in stats.items()})
    summary["executor"] = executor.name
    summary.update(extra)  # e.g. export: samples per type
    write_summary(output_dir, summary)
    return CurateResult(clips=clips, summary=summary, stats=stats)
