"""The app's model: loaded once at start-up, then one request at a time through the batch runner.

A request goes the way `kaleido-s2v generate --prompt ... --ref ...` goes (`batch.single_case` -> `resolve_settings`
-> `prepare_case` -> `generate_cases`), so the app checks what the CLI checks, with the same messages, and writes
the same mp4 + JSON sidecar atomically. Nothing here imports Gradio: `server.py` is the page around it.

The pipeline is loaded *with* its text encoder and encodes each request's prompt itself. The CLI encodes every
prompt of a run first and frees the encoder before the transformer loads (umT5-xxl is 11 GB); a server takes new
prompts all the time, so it keeps the encoder (on a small GPU, `--cpu-offload` moves it on and off the device).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserInputError, check_at_least, check_seed

MADE_BY = "kaleido-s2v app"  # the output folder's marker (the sidecars are signed by the batch runner)
APP_CACHE_MODES = ("none", "fbcache", "taylorseer", "magcache")  # magcache-calibrate writes the model folder: CLI
RANDOM_SEED = -1  # the page's and the API's "random"
MAX_SCALE = 2  # the app refuses sizes / frames beyond this multiple of the model's defaults (a server guard)


class Cancelled(Exception):
    """Raised from the per-step callback when the user pressed Cancel: the run stops before anything is written."""


@dataclass
class AppOptions:
    """What `kaleido-s2v app` was started with (the model and how it runs; the per-request settings are separate)."""

    model: str | None = None  # None: the built-in model
    output_dir: Path = Path("kaleido_app_outputs")
    device: str | None = None
    dtype: str = "auto"
    max_references: int | None = None
    sampler: str = "official"
    cache: str = "none"
    attention_backend: str | None = None
    loras: list[str] = field(default_factory=list)
    compile: bool = False
    cpu_offload: bool = False
    group_offload: bool = False
    vae_tiling: bool = False
    layerwise_fp8: bool = False
    enhancer: Any = None  # a `prompts.Enhancer` (--enhancer / --enhancer-url): the page offers "Enhance the prompt"
    enhancer_system: str | None = None  # its system prompt (None: the shipped one)


@dataclass
class Limits:
    """The ranges the page offers (sliders) and the runner enforces (API calls): the model's rules and MAX_SCALE."""

    size_multiple: int
    max_height: int
    max_width: int
    max_frames: int
    max_steps: int
    fixed_steps: int | None  # --cache magcache: calibrated for one step count


class CancelBoard:
    """Per-session cancel flags. The page arms a flag when Generate is clicked (before the request joins the queue),
    so Cancel reaches a request that is still waiting as well as the one running; API calls get a flag when they
    start. Cancel sets every flag of its session; a request checks its own between denoising steps."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: dict[str, deque[threading.Event]] = {}
        self._running: dict[str, threading.Event] = {}

    def arm(self, session: str) -> None:
        with self._lock:
            self._waiting.setdefault(session, deque()).append(threading.Event())

    @contextlib.contextmanager
    def running(self, session: str):
        with self._lock:
            waiting = self._waiting.get(session)
            flag = waiting.popleft() if waiting else threading.Event()
            if waiting is not None and not waiting:
                del self._waiting[session]
            self._running[session] = flag
        try:
            yield flag
        finally:
            with self._lock:
                if self._running.get(session) is flag:
                    del self._running[session]

    def is_running(self, session: str) -> bool:
        with self._lock:
            return session in self._running

    def cancel(self, session: str) -> int:
        """Flag this session's running and waiting requests; how many were flagged."""
        with self._lock:
            flags = [*self._waiting.get(session, ()), *([self._running[session]] if session in self._running else [])]
            for f in flags:
                f.set()
            return len(flags)


class Runner:
    """The model of one app: `Runner(options)` checks the options and reads the model folder's facts (cheap, so a
    bad flag fails before anything loads); `load()` loads the pipeline; `generate(...)` runs one request."""

    def __init__(self, options: AppOptions):
        from ..cli.options import parse_device
        from ..generation import check_run_options, choose_model, magcache_ratios

        self.options = o = options
        if o.cache not in APP_CACHE_MODES:
            raise UserInputError(f"--cache {o.cache!r}: the app takes {', '.join(APP_CACHE_MODES)} (calibrate "
                                 "MagCache once with `kaleido-s2v generate --cache magcache-calibrate`)")
        self.device = parse_device(o.device)
        check_run_options(self.device, cpu_offload=o.cpu_offload, group_offload=o.group_offload,
                          attention_backend=o.attention_backend, loras=o.loras)
        self.model = choose_model(o.model, o.sampler)  # as `generate`: the same defaults, the same sampler
        self.max_references = self.family.max_references if o.max_references is None else o.max_references
        check_at_least(self.max_references, "--max-references", 1)
        self.mag_ratios = (magcache_ratios(self.model, self.defaults["num_inference_steps"]) if o.cache == "magcache"
                           else None)
        d = self.defaults
        m = self.size_multiple
        self.limits = Limits(size_multiple=m, max_height=max(m, MAX_SCALE * d["height"] // m * m),
                             max_width=max(m, MAX_SCALE * d["width"] // m * m),
                             max_frames=MAX_SCALE * (d["num_frames"] - 1) + 1,
                             max_steps=max(100, MAX_SCALE * d["num_inference_steps"]),
                             fixed_steps=d["num_inference_steps"] if o.cache == "magcache" else None)
        self.output_dir = Path(o.output_dir)
        self.pipe = None
        self._count_tokens = None  # the video model's tokenizer, counting an enhanced prompt's tokens
        self.record: dict[str, Any] = {}
        self.cancels = CancelBoard()
        self._device_lock = threading.Lock()  # one generation on the device, whatever the queue does
        self._names = threading.Lock()
        self._counter = itertools.count(1)

    # what the model is (`generation.GenerationModel`), under the names the page uses
    builtin = property(lambda self: self.model.builtin)
    folder = property(lambda self: self.model.folder)
    family = property(lambda self: self.model.family)
    defaults = property(lambda self: self.model.defaults)
    size_multiple = property(lambda self: self.model.size_multiple)
    model_name = property(lambda self: self.model.name)

    # ------------------------------------------------------------------------------------------------ loading
    def load(self) -> float:
        """Load the pipeline (with its text encoder) and apply the memory and speed options; returns the seconds."""
        from ..generation import MEMORY_FLAGS, load_generation_pipeline
        from ..vision.common import resolve_dtype

        start = time.perf_counter()
        o = self.options
        dtype = resolve_dtype(o.dtype, self.device)
        pipe, loaded = load_generation_pipeline(
            self.model, self.device, dtype, loras=o.loras, memory={k: getattr(o, k) for k in MEMORY_FLAGS},
            cache=o.cache, compile=o.compile, attention_backend=o.attention_backend,
            num_inference_steps=self.defaults["num_inference_steps"], mag_ratios=self.mag_ratios)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.record = {**loaded, "text_encoder_device": "pipeline", "max_references": self.max_references,
                       "interface": "app"}
        return time.perf_counter() - start

    @property
    def busy(self) -> bool:
        """Whether a generation holds the device now."""
        return self._device_lock.locked()

    # ------------------------------------------------------------------------------------------------ requests
    def check_limits(self, settings: dict) -> None:
        """The app's own guard on top of the model's rules: a server must not take a request that runs for hours."""
        lim = self.limits
        for key, flag, top in (("height", "--height", lim.max_height), ("width", "--width", lim.max_width),
                               ("num_frames", "--frames", lim.max_frames),
                               ("num_inference_steps", "--steps", lim.max_steps)):
            if settings[key] > top:
                raise UserInputError(f"{flag} {settings[key]}: this app allows at most {top} "
                                     f"({MAX_SCALE}x the model's default)")
        if lim.fixed_steps is not None and settings["num_inference_steps"] != lim.fixed_steps:
            raise UserInputError(f"--steps {settings['num_inference_steps']}: --cache magcache was calibrated for "
                                 f"{lim.fixed_steps} steps: keep {lim.fixed_steps}")

    def settings(self, *, height=None, width=None, frames=None, steps=None, guidance=None, fps=None
                 ) -> tuple[dict, int]:
        """Sampling settings of one request (None: the model's default), checked as the CLI checks its flags."""
        from ..batch import resolve_settings

        flags = dict(height=height, width=width, num_frames=frames, num_inference_steps=steps,
                     guidance_scale=guidance, max_sequence_length=None, fps=fps)
        settings, fps = resolve_settings(flags, self.defaults, self.size_multiple, self.family.min_frames)
        self.check_limits(settings)
        settings.update(self.model.pipeline_options)
        return settings, fps

    def next_output(self) -> Path:
        """A new video path in the output folder: timestamp + counter, never an existing name."""
        with self._names:
            while True:
                path = self.output_dir / f"kaleido_{time.strftime('%Y%m%d-%H%M%S')}_{next(self._counter):04d}.mp4"
                if not path.exists() and not path.with_suffix(".json").exists():
                    return path

    def preview(self, references: list, height=None, width=None) -> list:
        """The references as the model will see them: fitted and padded to the video size (Kaleido), or composed on
        MAGREF's canvas; the built-in model's default reference when none is given."""
        from ..references import fit_reference, load_reference

        h = height or self.defaults["height"]
        w = width or self.defaults["width"]
        if not references and self.builtin:
            from ..builtin import default_reference_image

            references = [default_reference_image()]
        names = [f"--ref image {j + 1}" if len(references) > 1 else "--ref image" for j in range(len(references))]
        images = [load_reference(r, n) for r, n in zip(references, names)]
        if self.family.fits_references:
            return [fit_reference(im, h, w) for im in images]
        from ..magref.canvas import compose_references

        return [compose_references(images, "release", None, h, w)[0]] if images else []

    def generate(self, prompt: str, references: list, *, seed: int | None = None, negative_prompt: str | None = None,
                 labels: list[str] | None = None, settings: dict | None = None, on_step=None,
                 cancel: threading.Event | None = None, enhance: bool = False) -> dict:
        """One video: the batch runner's case from these inputs, written into the output folder; returns its
        summary (`video`, `sidecar`, `seed`, `seconds`). `seed` None or RANDOM_SEED: random (the sidecar has the one
        used); `labels`: how the references are recorded (e.g. the uploaded file names); `settings`: keyword
        arguments of `settings()`; `on_step(done, total)`: after each denoising step; `cancel`: set it to stop
        between steps (raises `Cancelled`, nothing written); `enhance`: rewrite the prompt first with the app's
        enhancer (a local one is loaded for the request and freed before the video model runs)."""
        from .. import batch

        if enhance and self.options.enhancer is None:
            raise UserInputError("--enhance-prompt: this app was started without an enhancer: restart it with "
                                 "--enhancer DIR or --enhancer-url URL --enhancer-model NAME")
        seed = None if seed is None or seed == RANDOM_SEED else check_seed(seed)
        settings, fps = self.settings(**(settings or {}))
        case = batch.single_case(prompt, references, self.next_output(), seed=seed,
                                 negative_prompt=negative_prompt or None)
        if labels is not None:
            case.labels = list(labels)
        batch.prepare_case(case, settings, max_references=self.max_references, builtin=self.builtin,
                           family=self.family)
        if self.pipe is None:  # after the checks: they need no model
            raise RuntimeError("Runner.load() first")
        total = settings["num_inference_steps"]

        def step_end(pipe, step, timestep, callback_kwargs):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled after step {step + 1} of {total}: nothing was written")
            if on_step is not None:
                on_step(step + 1, total)
            return callback_kwargs

        with self._device_lock:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled before it started: nothing was generated")
            if enhance:  # on the device too: inside the lock
                from ..prompts import enhance_cases, tokenizer_counter

                if self._count_tokens is None:
                    self._count_tokens = tokenizer_counter(self.folder)
                enhance_cases([case], self.options.enhancer, system=self.options.enhancer_system,
                              count_tokens=self._count_tokens, limit=settings["max_sequence_length"], progress=False)
            try:
                [result] = batch.generate_cases(self.pipe, [case], settings, fps=fps,
                                                negative_prompt=self.defaults["negative_prompt"],
                                                max_references=self.max_references, record=self.record,
                                                model=self.model_name, progress=False, runtime=self._runtime(),
                                                callback_on_step_end=step_end)
            except BaseException:
                self.pipe.maybe_free_model_hooks()  # what a finished call does last: offload, reset cache state
                raise
        return result

    def _runtime(self):
        from ..distributed import Runtime

        return Runtime(device=self.device)
