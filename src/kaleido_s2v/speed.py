"""Speed options shared by every pipeline: step caching, regional compilation and the attention backend — all
diffusers' own mechanisms — and a counter of the transformer forwards a run really computed.

Cache modes go through `transformer.enable_cache` (diffusers' hooks); both pipelines call the two CFG branches under
`cache_context("cond")` / `cache_context("uncond")`, so each branch keeps its own cache, and Kaleido's reference
tokens are inside the cached residuals (they run through the same blocks). Thresholds are diffusers' documented
defaults unless said otherwise:
  - `fbcache`: First Block Cache, threshold 0.05 (the residual change of the first block that allows reusing the
    rest);
  - `taylorseer`: TaylorSeer in diffusers' lite mode (blocks predicted by a first-order Taylor series, refreshed
    every 5 steps after the first 3; the default attention-module mode did not skip on these transformers);
  - `magcache`: MagCache (threshold 0.06, at most 3 consecutive skips, the first 20 % of steps always computed) with
    the model's magnitude ratios, measured once by `magcache-calibrate` and stored in the model folder's
    `cache_calibration.json`, keyed by sampler and step count (ratios are model- and grid-dependent).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .errors import UserInputError

CACHE_MODES = ("none", "fbcache", "taylorseer", "magcache", "magcache-calibrate")
CALIBRATION_FILE = "cache_calibration.json"
MADE_BY = "kaleido-s2v generate"


def calibration_key(sampler: str, steps: int) -> str:
    return f"{sampler}:{steps}"


def read_magcache_ratios(model_dir, sampler: str, steps: int, fix: str | None = None) -> list[float]:
    """The ratios `magcache-calibrate` stored for this sampler and step count, or a one-line error saying how to
    make them (`fix`: another remedy, e.g. for a folder that cannot be written)."""
    import json
    from pathlib import Path

    path = Path(model_dir) / CALIBRATION_FILE if model_dir is not None else None
    data = {}
    if path is not None and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserInputError(f"--cache magcache: '{path}' is not readable JSON ({e}): remove it and calibrate "
                                 "again with --cache magcache-calibrate") from None
    entry = (data.get("magcache") or {}).get(calibration_key(sampler, steps)) if isinstance(data, dict) else None
    if not entry:
        made = sorted((data.get("magcache") or {}) if isinstance(data, dict) else {})
        have = f" (it holds {', '.join(made)})" if made else ""
        fix = fix or f"run once with --cache magcache-calibrate --steps {steps}"
        raise UserInputError(f"--cache magcache: no calibration for {steps} steps of the {sampler} sampler in "
                             f"{path or 'the model folder'}{have}: {fix}")
    return [float(r) for r in entry["ratios"]]


def write_magcache_ratios(model_dir, sampler: str, steps: int, ratios: list[float], overwrite: bool = False):
    """Add this grid's ratios to the model folder's calibration file (a file this command did not write is kept
    unless `overwrite`)."""
    import json
    from pathlib import Path

    from .fileio import claim_file, write_text_atomic

    path = Path(model_dir) / CALIBRATION_FILE
    exists = claim_file(path, "--cache magcache-calibrate", overwrite=overwrite, made_by=MADE_BY)
    data = json.loads(path.read_text(encoding="utf-8")) if exists else {}
    data = data if isinstance(data, dict) and data.get("made_by") == MADE_BY else {}
    data["made_by"] = MADE_BY
    data.setdefault("magcache", {})[calibration_key(sampler, steps)] = {"ratios": [round(r, 6) for r in ratios]}
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
    return path


@contextlib.contextmanager
def capturing_magcache_ratios() -> Iterator[list[list[float]]]:
    """The ratio lists diffusers' MagCache calibration reports (one per CFG branch and call), captured from its
    logger; its own "copy these values" print is swallowed (stdout stays clean for `--json`)."""
    import ast
    import io
    import logging

    lists: list[list[float]] = []

    class Handler(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("MagCache Calibration Results:"):
                lists.append([float(v) for v in ast.literal_eval(message.split(":", 1)[1].strip())])

    log = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level, propagate = Handler(level=logging.INFO), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # ours only: diffusers' own handler would print the record too
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield lists
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def cache_config(mode: str, num_inference_steps: int | None = None, mag_ratios: list[float] | None = None):
    """The diffusers cache config of a mode (None for "none"); MagCache needs the step count and, unless
    calibrating, the ratios."""
    import torch
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if mode not in CACHE_MODES:
        raise UserInputError(f"--cache {mode!r}: choose one of {', '.join(CACHE_MODES)}")
    if mode == "magcache-calibrate":
        return MagCacheConfig(calibrate=True, num_inference_steps=num_inference_steps)
    if mode == "magcache":
        return MagCacheConfig(mag_ratios=mag_ratios, num_inference_steps=num_inference_steps, threshold=0.06,
                              max_skip_steps=3, retention_ratio=0.2)
    if mode == "fbcache":
        return FirstBlockCacheConfig(threshold=0.05)
    if mode == "taylorseer":
        return TaylorSeerCacheConfig(use_lite_mode=True, cache_interval=5, disable_cache_before_step=3,
                                     max_order=1, taylor_factors_dtype=torch.float32)
    return None


def attention_backends() -> list[str]:
    """diffusers' attention backends usable here: their requirements met and nothing downloaded at run time
    (the `*_hub` kernels are fetched from the Hub, which the package never contacts)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    usable = []
    for backend in AttentionBackendName:
        if backend.value.endswith("_hub"):
            continue
        try:
            _check_attention_backend_requirements(backend)
        except (RuntimeError, ImportError, ValueError):
            continue
        usable.append(backend.value)
    return usable


def check_attention_backend(name: str | None) -> None:
    if name is None:
        return
    usable = attention_backends()
    if name not in usable:
        raise UserInputError(f"--attention-backend {name!r} is not usable on this machine: choose one of "
                             f"{', '.join(usable)}")


def apply_speed_options(pipe, *, cache: str = "none", compile: bool = False, attention_backend: str | None = None,
                        num_inference_steps: int | None = None, mag_ratios: list[float] | None = None) -> None:
    """Attention backend, then the cache hooks, then regional compilation of the repeated blocks."""
    transformer = pipe.transformer
    if attention_backend is not None:
        check_attention_backend(attention_backend)
        transformer.set_attention_backend(attention_backend)
    config = cache_config(cache, num_inference_steps, mag_ratios)
    if config is not None:
        transformer.enable_cache(config)
    if compile:
        transformer.compile_repeated_blocks(fullgraph=True)


class ForwardCounter:
    """Counts the transformer's forward calls and those its last block really computed (a cached step skips it)."""

    def __init__(self, transformer):
        self.transformer, self.calls, self.computed, self._handles = transformer, 0, 0, []

    def _count(self, name: str):
        def hook(module, args):
            setattr(self, name, getattr(self, name) + 1)

        return hook

    @contextlib.contextmanager
    def counting(self) -> Iterator[ForwardCounter]:
        self.calls = self.computed = 0
        # the last block's FFN: its pre-hook runs only when the block's own forward runs (diffusers' cache hooks
        # replace the block's forward, so a hook on the block itself would fire for cached steps too)
        inner = self.transformer.blocks[-1].ffn
        self._handles = [self.transformer.register_forward_pre_hook(self._count("calls")),
                         inner.register_forward_pre_hook(self._count("computed"))]
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []

    def record(self) -> dict:
        return {"calls": self.calls, "computed": self.computed, "cached": self.calls - self.computed}


class StageTimer:
    """Seconds per stage of one pipeline call — `references` (VAE encodes and the CLIP image encoder),
    `denoise` (the transformer forwards), `decode` (VAE decode) — and the peak memory of the device.

    Stages are timed by wrapping the components' calls (on CUDA with a synchronize at each boundary, so the time
    is the device's); the text encoder is timed where it runs (`generate` encodes before the pipeline loads). Peak
    memory: `torch.cuda.max_memory_allocated` on CUDA (reset per call), the process's peak resident set on the CPU.
    """

    def __init__(self, pipe, device):
        import torch

        self.pipe, self.device = pipe, torch.device(device)
        self.seconds: dict[str, float] = {}

    def _sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, stage: str, fn):
        import time

        def wrapper(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

        return wrapper

    @contextlib.contextmanager
    def timing(self) -> Iterator[StageTimer]:
        import torch

        self.seconds = {"references": 0.0, "denoise": 0.0, "decode": 0.0}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        patched = [(self.pipe.vae, "encode", "references"), (self.pipe.vae, "decode", "decode"),
                   (self.pipe.transformer, "forward", "denoise")]
        if getattr(self.pipe, "image_encoder", None) is not None:
            patched.append((self.pipe.image_encoder, "forward", "references"))
        saved = [(obj, name, obj.__dict__.get(name)) for obj, name, _ in patched]
        for obj, name, stage in patched:
            setattr(obj, name, self._timed(stage, getattr(obj, name)))
        try:
            yield self
        finally:
            for obj, name, original in saved:  # back to the class's method (or what was set on the instance)
                if original is None:
                    delattr(obj, name)
                else:
                    setattr(obj, name, original)

    def record(self) -> dict:
        import resource

        import torch

        if self.device.type == "cuda":
            peak = {"device": "cuda", "peak_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)}
        else:
            peak = {"device": "cpu (process peak RSS)",
                    "peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
        return {"seconds": {k: round(v, 3) for k, v in self.seconds.items()}, "memory": peak}
