"""Speed options shared by every pipeline: step caching, regional compilation and the attention backend — all
diffusers' own mechanisms — and a counter of the transformer forwards a run really computed.

Cache modes go through `transformer.enable_cache` (diffusers' hooks); both pipelines call the two CFG branches under
`cache_context("cond")` / `cache_context("uncond")`, so each branch keeps its own cache, and Kaleido's reference
tokens are inside the cached residuals (they run through the same blocks). Thresholds are diffusers' documented
defaults unless said otherwise:
  - `fbcache`: First Block Cache, threshold 0.05 (the residual change of the first block that allows reusing the
    rest);
  - `taylorseer`: TaylorSeer in diffusers' lite mode (blocks predicted by a first-order Taylor series, refreshed
    every 5 steps after the first 3; the default attention-module mode did not skip on these transformers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .errors import UserInputError

CACHE_MODES = ("none", "fbcache", "taylorseer")


def cache_config(mode: str):
    """The diffusers cache config of a mode (None for "none")."""
    import torch
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if mode not in CACHE_MODES:
        raise UserInputError(f"--cache {mode!r}: choose one of {', '.join(CACHE_MODES)}")
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


def apply_speed_options(pipe, *, cache: str = "none", compile: bool = False, attention_backend: str | None = None
                        ) -> None:
    """Attention backend, then the cache hooks, then regional compilation of the repeated blocks."""
    transformer = pipe.transformer
    if attention_backend is not None:
        check_attention_backend(attention_backend)
        transformer.set_attention_backend(attention_backend)
    config = cache_config(cache)
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
