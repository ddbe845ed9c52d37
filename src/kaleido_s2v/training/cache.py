"""The latent cache (`kaleido-s2v train --build-cache`): every sample encoded once (first window, no dropout) by
the frozen VAE and text encoder, so that training reads latents instead of decoding videos."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..distributed import Runtime, init_runtime
from ..errors import UserInputError
from .components import check_model, load_frozen_components, owned_folder
from .config import TrainConfig
from .data import VideoDataset, discover_samples

logger = logging.getLogger(__name__)
CACHE_MADE_BY = "kaleido-s2v train --build-cache"  # the marker of a latent cache (--cache-dir)


def build_cache(cfg: TrainConfig, *, progress: bool = True, overwrite: bool = False) -> dict:
    """Encode every sample once (first window, no dropout) into `data.cache_dir`; ranks split the samples.

    Checked before the cache folder is made, as `train`; `overwrite`: also write into a folder it did not make.
    """
    from ..fileio import claim_folder

    cfg.validate()
    if not cfg.data.cache_dir:
        raise UserInputError("--build-cache needs --cache-dir: the folder to write the latents to")
    cache = Path(cfg.data.cache_dir)
    claim_folder(cache, "--cache-dir", CACHE_MADE_BY, overwrite=overwrite)
    check_model(cfg, need_transformer=False)
    samples = discover_samples(cfg.data.path, cfg.data.max_references)
    VideoDataset(samples, cfg.data).check_readable(f"--data '{cfg.data.path}'")
    rt = init_runtime()
    with owned_folder(cache, CACHE_MADE_BY, rt):
        rt.barrier()
        return _build_cache(cfg, rt, cache, samples, progress)


def _build_cache(cfg: TrainConfig, rt: Runtime, cache: Path, samples: list, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from ..fileio import atomic_path
    from ..latents import encode_references, encode_video
    from ..text import encode_text
    from .data import cache_meta

    d = cfg.data
    frozen = load_frozen_components(cfg.model.path, rt.device)

    def text_states(caption: str) -> torch.Tensor:
        states = encode_text(frozen["tokenizer"], frozen["text_encoder"], [caption],
                             max_sequence_length=d.max_sequence_length, device="cpu", dtype=torch.float32)[0]
        n = int((states.abs().sum(-1) > 0).nonzero().max()) + 1 if states.abs().sum() > 0 else 0
        return states[:n].clone()  # trimmed: the rows after the prompt are zeros

    if rt.is_main:
        with atomic_path(cache / "empty_text.pt") as tmp:
            torch.save(text_states(""), tmp)
    written, skipped, bad = 0, 0, []
    mine = VideoDataset(samples[rt.rank :: rt.dims.world_size], d)
    for i, s in enumerate(tqdm(mine.samples, desc="cache", disable=not (progress and rt.is_main))):
        dst = cache / f"{s.clip_id}.pt"
        if dst.is_file():
            skipped += 1
            continue
        try:
            item = mine.load(i, rng=None)  # the first window, no dropout
            entry = dict(
                latents=encode_video(frozen["vae"], item["pixels"][None].to(rt.device))[0].cpu(),
                text=text_states(item["caption"]),
                ref_latents=[
                    r[0].cpu() for r in encode_references(frozen["vae"], item["references"], d.height, d.width)
                ],
            )
        except Exception as e:  # bad sample: log and go on
            logger.warning("cache: skipping sample %s: %s", s.clip_id, e)
            bad.append(s.clip_id)
            continue
        with atomic_path(dst) as tmp:
            torch.save(entry, tmp)
        written += 1
    rt.barrier()
    if rt.is_main:
        (cache / "cache.json").write_text(json.dumps(cache_meta(d, cfg.model.path), indent=2))
    return dict(cache_dir=str(cache), written=written, already_cached=skipped, bad=bad, samples=len(samples))
