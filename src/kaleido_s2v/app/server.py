"""The page: references (shown as the model will see them), prompt, seed, "Advanced" settings, Generate with a
per-step progress bar and Cancel, the video with its sidecar, this session's history, examples; and `/generate`, the
named API endpoint `gradio_client` calls (docs/app.md).

One generation at a time: Gradio's queue runs `/generate` with concurrency 1 (others wait, their position shown) and
the runner holds a lock on the device besides. Every error is one line in the page (`gr.Error`); the next request
works. Only the output folder is served (`allowed_paths`), uploads are capped (`max_file_size`), nothing is fetched
from outside: no share link, no analytics, no server-side rendering, the theme's fonts from the package.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import gradio as gr

from ..errors import UserInputError
from .messages import page_message
from .runner import RANDOM_SEED, Cancelled, Runner

logger = logging.getLogger(__name__)

QUEUE_SIZE = 32  # requests waiting beyond this are refused ("queue full") instead of piling up
HISTORY_HEADERS = ["#", "time", "prompt", "references", "seed", "size", "frames", "steps", "guidance", "seconds",
                   "video"]
# the built-in model's world: (prompt, [(shape, colour, texture, accent)], seed)
BUILTIN_EXAMPLES = [
    ("The red striped circle moves to the left while the blue square bounces on a sandy floor.",
     [("circle", "red", "striped", None), ("square", "blue", "plain", None)], 0),
    ("The green figure with an orange hat moves to the right under a blue sky.",
     [("figure", "green", "plain", "orange")], 1),
    ("The blue square grows while the green figure with an orange hat spins around on a checkered floor.",
     [("square", "blue", "plain", None), ("figure", "green", "plain", "orange")], 2),
]


def _paths(files) -> list[str]:
    """gr.File(file_count="multiple") gives None, or a list of paths (or file objects with `.name`)."""
    return [f if isinstance(f, str) else getattr(f, "path", None) or f.name for f in (files or [])]


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def _example_references(folder: Path) -> list[list]:
    """The built-in examples' references, drawn by the model's world (a package install has no examples/ folder)."""
    from PIL import Image

    from ..toy.scene import Subject
    from ..toy.world import subject_image

    rows = []
    for prompt, subjects, seed in BUILTIN_EXAMPLES:
        paths = []
        for shape, colour, texture, accent in subjects:
            path = folder / f"{'_'.join(p for p in (colour, texture if texture != 'plain' else '', shape) if p)}.png"
            if not path.exists():
                Image.fromarray(subject_image(Subject(shape, colour, texture, accent), 128)).save(path)
            paths.append(str(path))
        rows.append([prompt, paths, seed])
    return rows


def _history_rows(history: list[dict]) -> list[list]:
    return [[e[h] for h in HISTORY_HEADERS] for e in history]


def _history_entry(sidecar: dict, n: int) -> dict:
    s = sidecar["settings"]
    return {"#": n, "time": time.strftime("%H:%M:%S"), "prompt": sidecar["prompt"],
            "references": ", ".join(Path(r).name for r in sidecar["references"]), "seed": str(sidecar["seed"]),
            "size": f"{s['width']}x{s['height']}", "frames": s["num_frames"], "steps": s["num_inference_steps"],
            "guidance": s["guidance_scale"], "seconds": sidecar["seconds"], "video": Path(sidecar["video"]).name,
            "_video": sidecar["video"], "_sidecar": str(Path(sidecar["video"]).with_suffix(".json"))}


def build_demo(runner: Runner, *, examples: bool = True) -> gr.Blocks:
    """The page over a loaded `runner` (`examples`: the built-in model's, which run as they are)."""
    d, lim = runner.defaults, runner.limits
    m = lim.size_multiple
    min_frames = max(1, (runner.family.min_frames + 2) // 4 * 4 + 1)
    model = ("the built-in small model (a toy world of coloured shapes: write captions like the examples')"
             if runner.builtin else f"`{runner.model_name}`")
    with gr.Blocks(title="Kaleido S2V", delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown(f"## Kaleido reference-to-video\nModel: {model} on `{runner.device}`. Upload 1–"
                    f"{runner.max_references} reference images, describe the video, press **Generate**.")
        history = gr.State([])
        with gr.Row():
            with gr.Column():
                refs = gr.File(label="Reference images", file_count="multiple", file_types=["image"],
                               elem_id="references")
                preview = gr.Gallery(label="As the model sees them", columns=4, height=180, interactive=False,
                                     allow_preview=False, object_fit="contain", format="png", fit_columns=False,
                                     elem_id="preview")
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                    placeholder="What the subjects do, and where")
                negative = gr.Textbox("", label="Negative prompt", placeholder="the model's default", elem_id="negative")
                seed = gr.Number(label="Seed", value=RANDOM_SEED, precision=0, elem_id="seed",
                                 info=f"{RANDOM_SEED}: random (the seed used is shown with the video)")
                enhance = gr.Checkbox(False, label="Enhance the prompt first", elem_id="enhance",
                                      visible=runner.options.enhancer is not None,
                                      info="rewritten in the model's long caption style by the app's enhancer, which "
                                      "sees the references (docs/prompts.md); the sidecar keeps both prompts")
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        height = gr.Slider(m, lim.max_height, value=d["height"], step=m, label="Height")
                        width = gr.Slider(m, lim.max_width, value=d["width"], step=m, label="Width")
                    frames = gr.Slider(min_frames, lim.max_frames, value=d["num_frames"], step=4, label="Frames")
                    steps = gr.Slider(1, lim.max_steps, value=d["num_inference_steps"], step=1, label="Steps",
                                      interactive=lim.fixed_steps is None)
                    with gr.Row():
                        guidance = gr.Slider(0, 20, value=d["guidance_scale"], step=0.1, label="Guidance",
                                             info="1: no guidance")
                        fps = gr.Slider(1, 60, value=d["fps"], step=1, label="FPS")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", elem_id="cancel")
            with gr.Column():
                video = gr.Video(label="Video", autoplay=True, loop=True, height=360, interactive=False,
                                 elem_id="video")
                with gr.Row():
                    seed_used = gr.Textbox(label="Seed used", interactive=False, elem_id="seed-used")
                    sidecar = gr.File(label="Sidecar JSON", interactive=False,
                                      elem_id="sidecar")
                table = gr.Dataframe(headers=HISTORY_HEADERS, value=[], interactive=False, wrap=True,
                                     label="This session's videos (select a row to show it again)",
                                     elem_id="history")
        if examples and runner.builtin:
            with tempfile.TemporaryDirectory(prefix="kaleido-app-examples-") as folder:  # copied into Gradio's cache
                gr.Examples(_example_references(Path(folder)), inputs=[prompt, refs, seed],
                            label="Examples (built-in model)")

        def show_preview(files, h, w):
            paths = _paths(files)
            try:
                images = runner.preview(paths, int(h), int(w))
            except UserInputError as e:  # said now, and again (as an error) if Generate is pressed
                gr.Warning(page_message(str(e), paths))
                return []
            if not paths and images:
                return [(images[0], "default reference (built-in model)")]
            names = [Path(p).name for p in paths] if runner.family.fits_references else ["canvas"]
            return list(zip(images, names))

        def arm(request: gr.Request):  # on the click, before the request joins the queue: Cancel reaches it there
            runner.cancels.arm(_session(request))

        def cancel(request: gr.Request):
            runner.cancels.cancel(_session(request))

        async def generate(prompt: str, references: list[str] | None, seed: int = RANDOM_SEED,
                           negative_prompt: str = "", height: int = d["height"], width: int = d["width"],
                           frames: int = d["num_frames"], steps: int = d["num_inference_steps"],
                           guidance: float = d["guidance_scale"], fps: int = d["fps"], enhance_prompt: bool = False,
                           request: gr.Request = None, progress=gr.Progress()):
            """One video from reference images and a prompt; returns (video mp4, sidecar JSON). seed -1: random."""
            paths = _paths(references)
            progress(0, desc="Preparing the references")

            def work(flag):
                try:
                    settings = dict(height=_int(height, "Height"), width=_int(width, "Width"),
                                    frames=_int(frames, "Frames"), steps=_int(steps, "Steps"),
                                    guidance=None if guidance is None else float(guidance), fps=_int(fps, "FPS"))
                    return runner.generate(
                        prompt or "", paths, seed=_int(seed, "Seed"), negative_prompt=negative_prompt or None,
                        labels=[Path(p).name for p in paths], settings=settings, cancel=flag,
                        enhance=bool(enhance_prompt),
                        on_step=lambda done, total: progress((done, total), desc="Denoising", unit="steps"))
                except Cancelled as e:
                    raise gr.Error(f"Cancelled: {e}", print_exception=False) from None
                except UserInputError as e:
                    raise gr.Error(page_message(str(e), paths), print_exception=False) from None
                except Exception as e:  # a bug or the device (e.g. out of memory): one line here, the trace logged
                    logger.exception("generation failed")
                    first = (str(e).strip().splitlines() or [""])[0][:200]
                    raise gr.Error(f"Generation failed ({type(e).__name__}: {first}); the server log has the "
                                   "details", print_exception=False) from None

            # The device work runs in a thread; a client's `job.cancel()` cancels this coroutine, which then
            # flags the thread to stop at its next step (a thread cannot be stopped from outside).
            with runner.cancels.running(_session(request)) as flag:
                try:
                    result = await asyncio.to_thread(work, flag)
                except asyncio.CancelledError:
                    flag.set()
                    raise
            return result["video"], result["sidecar"]

        def remember(sidecar_file, entries):
            data = json.loads(Path(_paths([sidecar_file])[0]).read_text(encoding="utf-8"))
            entries = [*entries, _history_entry(data, len(entries) + 1)]
            return _history_rows(entries), entries, str(data["seed"])

        def show_again(entries, evt: gr.SelectData):
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            e = entries[row]
            return e["_video"], e["_sidecar"], e["seed"]

        private = dict(api_visibility="private", queue=False)
        # queued (a message shows only there) but never behind a generation: no concurrency limit of their own
        previews = dict(api_visibility="private", show_progress="hidden", concurrency_limit=None)
        for trigger in (refs.change, height.change, width.change):
            trigger(show_preview, [refs, height, width], preview, **previews)
        demo.load(show_preview, [refs, height, width], preview, **previews)
        done = run.click(arm, None, None, **private).then(
            generate, [prompt, refs, seed, negative, height, width, frames, steps, guidance, fps, enhance],
            [video, sidecar], api_name="generate", concurrency_limit=1)
        done.success(remember, [sidecar, history], [table, history, seed_used], **private)
        stop.click(cancel, None, None, **private)
        table.select(show_again, [history], [video, sidecar, seed_used], **private)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return demo


def _int(value, label: str):
    """Numbers from the page or a client (floats from sliders) as ints; None stays None (the model's default)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise UserInputError(f"{label} {value!r}: give a whole number")


def launch(demo: gr.Blocks, runner: Runner, *, host: str = "127.0.0.1", port: int = 7860, auth=None,
           max_upload_mb: int = 20, quiet: bool = False):
    """Serve `demo` (returns at once; `demo.block_thread()` waits): only the output folder is served, uploads over
    `max_upload_mb` are refused, nothing is shared or fetched."""
    return demo.launch(
        server_name=host, server_port=port, auth=auth, share=False, inbrowser=False, prevent_thread_lock=True,
        allowed_paths=[os.fspath(runner.output_dir.resolve())], max_file_size=f"{max_upload_mb}mb",
        ssr_mode=False, pwa=False, mcp_server=False, enable_monitoring=False, show_error=False, quiet=quiet,
        footer_links=["api", "settings"], theme=gr.themes.Default())
