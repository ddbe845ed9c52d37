"""Training data: the official folder layout and the curation manifest, decoded to pixels or read from a latent cache.

Every random choice of a sample (window start, text/reference dropout, noise, σ) comes from its *slot key*
(seed, step, global slot in the step), never from a process-local RNG: a run is reproducible, resumes
exactly at any step, and gives the same samples and noise for any number of processes with the same
global batch.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserInputError

logger = logging.getLogger(__name__)

REFERENCE_NAMES = ("ref1.png", "ref2.png", "ref3.png")  # the release reads exactly these names, in order
CACHE_VERSION = 1


@dataclass
class Sample:
    clip_id: str
    video: Path
    caption: str
    references: list[Path] = field(default_factory=list)
    start_s: float = 0.0
    end_s: float | None = None


# ---------------------------------------------------------------------------------------------- discovery
def _folder_samples(root: Path, max_references: int) -> list[Sample]:
    samples = []
    for video in sorted((root / "videos").glob("*.mp4")):
        clip_id = video.stem
        label = root / "labels" / f"{clip_id}.txt"
        caption = ""
        if label.is_file():
            lines = label.read_text(encoding="utf-8", errors="replace").splitlines()
            caption = lines[0].strip() if lines else ""
        else:
            logger.warning("sample %s: no %s, training it with an empty caption", clip_id, label)
        ref_dir = root / "references" / clip_id
        refs = [ref_dir / n for n in REFERENCE_NAMES[:max_references] if (ref_dir / n).is_file()]
        samples.append(Sample(clip_id, video, caption, refs))
    return samples


def _manifest_samples(manifest: Path, max_references: int) -> list[Sample]:
    base = manifest.parent
    samples = []
    try:
        text = manifest.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"--data '{manifest}' cannot be read as a UTF-8 manifest.jsonl ({type(e).__name__}): "
                             "give the manifest kaleido-s2v curate wrote") from None
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if rec.get("status", "kept") == "rejected":
                continue
            video = Path(rec["video"])
            refs = [Path(r) for r in rec.get("references", [])][:max_references]
            samples.append(
                Sample(
                    clip_id=str(rec.get("clip_id") or f"{video.stem}-{line_no}"),
                    video=video if video.is_absolute() else base / video,
                    caption=str(rec.get("caption") or ""),
                    references=[r if r.is_absolute() else base / r for r in refs],
                    start_s=float(rec.get("start_s") or 0.0),
                    end_s=None if rec.get("end_s") is None else float(rec["end_s"]),
                )
            )
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("%s line %d skipped: %s", manifest, line_no, e)
    return samples


def discover_samples(data: str | os.PathLike, max_references: int = 3) -> list[Sample]:
    """Samples of a data folder (videos/ labels/ references/), a manifest.jsonl, or a folder holding one.

    A `kaleido-s2v curate` output folder holds both its per-clip `manifest.jsonl` and the training set's
    `train_manifest.jsonl`: the latter is the one to train on.
    """
    path = Path(data)
    if path.is_dir() and not (path / "videos").is_dir():
        for name in ("train_manifest.jsonl", "manifest.jsonl"):
            if (path / name).is_file():
                path = path / name
                break
    if path.is_file():
        samples = _manifest_samples(path, max_references)
    elif (path / "videos").is_dir():
        samples = _folder_samples(path, max_references)
    else:
        raise UserInputError(
            f"--data '{data}' is neither a manifest.jsonl nor a folder with videos/<id>.mp4 (plus labels/<id>.txt and "
            "references/<id>/ref1.png..ref3.png): point it at one"
        )
    if not samples:
        raise UserInputError(f"--data '{data}' holds no training samples: add videos or kept manifest records")
    return samples


# ---------------------------------------------------------------------------------------------- randomness
def slot_seed(seed: int, step: int, slot: int, stream: int) -> int:
    """A 63-bit seed for one sample slot of one step; `stream` separates data decisions from noise."""
    return int(np.random.SeedSequence([seed, step, slot, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def slot_generator(seed: int, step: int, slot: int) -> torch.Generator:
    return torch.Generator().manual_seed(slot_seed(seed, step, slot, 1))


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The seeded order of one epoch (cached: a step's slots read the same one or two epochs)."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def step_indices(step: int, num_samples: int, global_batch: int, seed: int) -> list[int]:
    """Dataset indices of the `global_batch` slots of `step`: epochs of seeded permutations, read in order."""
    out = []
    for c in range(step * global_batch, (step + 1) * global_batch):
        epoch, pos = divmod(c, num_samples)
        out.append(int(epoch_permutation(seed, epoch, num_samples)[pos]))
    return out


def bucketed_batches(buckets: Sequence[int], global_batch: int, seed: int) -> Iterator[list[int]]:
    """Endless global batches whose samples share a bucket key (e.g. their reference count).

    The same seeded epoch permutations as `step_indices`, read in order; each index joins its bucket's pending
    batch, emitted when full. Pending batches carry over epochs, so every sample is used, small buckets too.
    """
    pending: dict[int, list[int]] = {}
    epoch = 0
    while True:
        for i in epoch_permutation(seed, epoch, len(buckets)):
            batch = pending.setdefault(buckets[i], [])
            batch.append(int(i))
            if len(batch) == global_batch:
                yield batch
                pending[buckets[i]] = []
        epoch += 1


@dataclass(frozen=True)
class SlotKey:
    index: int  # dataset index
    step: int
    slot: int  # position in the global batch of the step
    seed: int


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields, for each (step, micro-batch), this data-parallel rank's list of `SlotKey`s.

    Global slot g = (micro·dp_size + dp_rank)·batch_size + b: the same sample and noise land on the same
    slot whatever the process count, so 1 process with batch 2 equals 2 processes with batch 1. With
    `buckets` (one key per sample), every global batch is drawn from one bucket (`bucketed_batches`).
    """

    def __init__(self, num_samples, *, batch_size, grad_accum, dp_rank, dp_size, seed, start_step, max_steps,
                 buckets: Sequence[int] | None = None):
        if buckets is not None and len(buckets) != num_samples:
            raise ValueError(f"{len(buckets)} bucket keys for {num_samples} samples")
        self.n, self.b, self.accum = num_samples, batch_size, grad_accum
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.start_step, self.max_steps = start_step, max_steps
        self.buckets = buckets

    @property
    def global_batch(self) -> int:
        return self.b * self.dp_size * self.accum

    def __len__(self) -> int:
        return (self.max_steps - self.start_step) * self.accum

    def __iter__(self) -> Iterator[list[SlotKey]]:
        if self.buckets is not None:  # replay the stream up to the start step (cheap: indices only)
            stream = itertools.islice(bucketed_batches(self.buckets, self.global_batch, self.seed), self.start_step, None)
        for step in range(self.start_step, self.max_steps):
            if self.buckets is None:
                indices = step_indices(step, self.n, self.global_batch, self.seed)
            else:
                indices = next(stream)
            for micro in range(self.accum):
                slots = [(micro * self.dp_size + self.dp_rank) * self.b + j for j in range(self.b)]
                yield [SlotKey(indices[g], step, g, self.seed) for g in slots]


# ---------------------------------------------------------------------------------------------- pixels
def resize_center_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (3, F, height, width) in [−1, 1]: bicubic resize to cover, centre crop."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top : top + height, left : left + width].clamp(0, 255)
    return (x / 127.5 - 1.0).permute(1, 0, 2, 3).contiguous()


def load_clip(sample: Sample, *, num_frames: int, fps: float, rng: np.random.Generator | None) -> np.ndarray:
    """`num_frames` frames at exactly `fps` from the sample's window; random start when the window is longer
    (`rng`; None = the window's start); short clips padded with the last frame (as the release)."""
    from ..video_io import read_video, video_info

    info = video_info(sample.video)
    end = info.duration if sample.end_s is None else min(sample.end_s, info.duration)
    span = num_frames / fps
    slack = max(0.0, end - sample.start_s - span)
    start = sample.start_s + (float(rng.uniform(0.0, slack)) if rng is not None and slack > 0 else 0.0)
    frames = read_video(sample.video, fps=fps, start_s=start, end_s=min(end, start + span + 0.5 / fps),
                        max_frames=num_frames)
    if len(frames) < num_frames:
        frames = np.concatenate([frames, np.repeat(frames[-1:], num_frames - len(frames), axis=0)])
    return frames


class VideoDataset(torch.utils.data.Dataset):
    """Decoded samples: dict(clip_id, pixels (3, F, H, W) in [−1, 1], caption, references [PIL], slot).

    A sample that cannot be read is logged and replaced by the next index (deterministically), never fatal.
    """

    max_retries = 16

    def __init__(self, samples: list[Sample], cfg):  # cfg: DataConfig
        self.samples, self.cfg = samples, cfg

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, rng: np.random.Generator | None) -> dict:
        from ..references import load_reference

        s = self.samples[index]
        frames = load_clip(s, num_frames=self.cfg.num_frames, fps=self.cfg.fps, rng=rng)
        refs = [load_reference(p, f"sample {s.clip_id} reference") for p in s.references]
        return dict(clip_id=s.clip_id, pixels=resize_center_crop(frames, self.cfg.height, self.cfg.width),
                    caption=s.caption, references=refs)

    def check_readable(self, what: str) -> None:
        """At least one sample loads (else no step could run): a `UserInputError` naming `what` (the data) if not."""
        first = None
        for index, s in enumerate(self.samples):
            try:
                self.load(index, rng=None)
                return
            except Exception as e:  # whatever the decoder raises
                first = first or f"{s.clip_id}: {_first_line(e)}"
        raise UserInputError(f"{what}: none of its {len(self.samples)} samples can be read (first: {first}): "
                             "check the videos and references")

    def __getitem__(self, key: SlotKey) -> dict:
        rng = np.random.default_rng(slot_seed(key.seed, key.step, key.slot, 0))
        text_drop = rng.random() < self.cfg.text_dropout
        ref_drop = rng.random() < self.cfg.reference_dropout
        attempts = min(self.max_retries, len(self.samples))
        for attempt in range(attempts):
            index = (key.index + attempt) % len(self.samples)
            try:
                item = self.load(index, rng)
                break
            except Exception as e:  # a bad sample must never stop a run
                logger.warning("skipping sample %s: %s", self.samples[index].clip_id, _first_line(e))
        else:
            raise UserInputError(f"{attempts} consecutive samples (from {self.samples[key.index].clip_id} on) could "
                                 "not be read: check the data")
        self.drop(item, text=text_drop, references=ref_drop)
        item["slot"] = key
        return item

    def drop(self, item: dict, *, text: bool, references: bool) -> None:
        if text:
            item["caption"] = ""  # the release's ucg value
        if references:
            item["references"] = []


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__


class CachedDataset(VideoDataset):
    """Samples from a latent cache: dict(clip_id, latents (C, T, h, w), text (L, D), ref_latents [(C, 1, h, w)])."""

    def __init__(self, samples: list[Sample], cfg, cache_dir: str | os.PathLike, model: str | os.PathLike = ""):
        super().__init__(samples, cfg)
        self.cache_dir = Path(cache_dir)
        check_cache(self.cache_dir, cfg, model)
        try:
            self.empty_text = torch.load(self.cache_dir / "empty_text.pt", weights_only=True)
        except Exception as e:  # missing, truncated, not a tensor file
            raise UserInputError(f"--cache-dir '{cache_dir}': empty_text.pt cannot be read ({_first_line(e)}): "
                                 "rebuild the cache with --build-cache") from None

    def _text(self, states: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.cfg.max_sequence_length, states.shape[-1], dtype=states.dtype)
        out[: len(states)] = states
        return out

    def load(self, index: int, rng) -> dict:
        s = self.samples[index]
        path = self.cache_dir / f"{s.clip_id}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not in the cache: rebuild it with --build-cache")
        entry = torch.load(path, weights_only=True)
        return dict(clip_id=s.clip_id, latents=entry["latents"], text=self._text(entry["text"]),
                    ref_latents=list(entry["ref_latents"]))

    def drop(self, item: dict, *, text: bool, references: bool) -> None:
        if text:
            item["text"] = self._text(self.empty_text)
        if references:
            item["ref_latents"] = []


def cache_meta(cfg, model: str | os.PathLike = "") -> dict:
    """What a latent cache depends on: sizes, frame rate, text length and the model folder (VAE, T5)."""
    return dict(version=CACHE_VERSION, height=cfg.height, width=cfg.width, num_frames=cfg.num_frames, fps=cfg.fps,
                max_sequence_length=cfg.max_sequence_length, max_references=cfg.max_references,
                model=str(Path(model).resolve()) if model else "")


def check_cache(cache_dir: Path, cfg, model: str | os.PathLike = "") -> None:
    meta_path = cache_dir / "cache.json"
    if not meta_path.is_file():
        raise UserInputError(f"--cache-dir '{cache_dir}' has no cache.json: build it with "
                             "`kaleido-s2v train --build-cache`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise UserInputError(f"--cache-dir '{cache_dir}': its cache.json is damaged: rebuild the cache with "
                             "--build-cache")
    want = cache_meta(cfg, model)
    diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if diff:
        raise UserInputError(
            f"--cache-dir '{cache_dir}' was built with different settings {diff} (cache, now): rebuild it or fix "
            "the flags"
        )
