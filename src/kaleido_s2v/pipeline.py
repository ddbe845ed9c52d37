"""KaleidoPipeline: multi-subject reference-to-video generation (diffusers `DiffusionPipeline`).

WanPipeline's numbered `__call__` with one step added — *encode references* — and the official sampler:
the shift-7 sigma grid (`release.official_sigmas`), Euler updates, CFG whose two branches get the SAME
reference latents (guidance is text-only), and the release's negative prompt as the default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from diffusers.video_processor import VideoProcessor
from PIL import Image

from .errors import UserInputError
from .latents import denormalize_latents, encode_references
from .references import ReferenceImage, group_references
from .release import (
    GENERATION_DEFAULTS,
    KALEIDO_NEGATIVE_PROMPT,
    MAX_REFERENCES,
    REFERENCE_NOTE,
    SHIFT,
    TRAINED_REFERENCES,
    WAN_NEGATIVE_PROMPT,  # noqa: F401 (importable from here, as before)
    official_sigmas,
)
from .text import encode_text
from .transformer import KaleidoTransformer3DModel  # noqa: F401 (from_pretrained finds the class once imported)

logger = logging.get_logger(__name__)

# The scheduler settings of the official grid (a loaded config that differs is corrected).
_OFFICIAL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=SHIFT,
    use_dynamic_shifting=False,
    shift_terminal=None,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    invert_sigmas=False,
    stochastic_sampling=False,
)

# How the checks below name the arguments: the pipeline's own names; front ends (the CLI) pass their flags.
ARGUMENT_NAMES = {"height": "`height`", "width": "`width`", "num_inference_steps": "`num_inference_steps`",
                  "prompt": "`prompt`", "negative_prompt": "`negative_prompt`",
                  "reference_images": "`reference_images`", "max_references": "`max_references`"}


def check_sizes(height: int, width: int, num_inference_steps: int, size_multiple: int, names=None) -> None:
    """The sampling sizes a model folder allows (`size_multiple`: its VAE stride x patch); one owner of the rule
    for the pipeline and the batch runner, which checks before any model loads."""
    n = {**ARGUMENT_NAMES, **(names or {})}
    if height <= 0 or width <= 0 or height % size_multiple or width % size_multiple:
        raise UserInputError(
            f"{n['height']} {height} / {n['width']} {width}: both must be positive multiples of {size_multiple} for "
            f"this model (divisible by {size_multiple} = VAE stride x patch size{'; e.g. 512x896' if size_multiple == 16 else ''})"
        )
    if num_inference_steps < 1:
        raise UserInputError(f"{n['num_inference_steps']} {num_inference_steps}: must be at least 1 (the release uses 50)")


def check_request(prompt, negative_prompt, num_references: int, max_references: int, names=None,
                  note: str = REFERENCE_NOTE) -> None:
    """Prompt, negative prompt and reference count of one call (or one batch case); `note`: why fewer
    references are better (the family's `REFERENCE_NOTE`). `prompt` None: the call gives `prompt_embeds` instead
    (`WanSamplingMixin.check_prompt_inputs` has checked that one of them is there)."""
    n = {**ARGUMENT_NAMES, **(names or {})}
    if prompt is not None:
        if not isinstance(prompt, (str, list)):
            raise UserInputError(f"{n['prompt']} has to be a `str` or a `list` of str but is {type(prompt).__name__}")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise UserInputError(f"{n['prompt']} is empty: describe the video to generate")
    if negative_prompt is not None and not isinstance(negative_prompt, (str, list)):
        raise UserInputError(
            f"{n['negative_prompt']} has to be a `str` or a `list` of str but is {type(negative_prompt).__name__}"
        )
    if num_references > max_references:
        raise UserInputError(
            f"{n['reference_images']}: {num_references} reference images, more than the limit {max_references}: give "
            f"fewer ({note}) or raise {n['max_references']}"
        )


@dataclass
class KaleidoPipelineOutput(BaseOutput):
    """Output of `KaleidoPipeline`.

    Args:
        frames: "np": (B, F, H, W, 3) floats in [0, 1]; "pt": (B, F, 3, H, W); "pil": B lists of F images;
            "latent": the normalised video latents (B, 16, T, H/8, W/8).
    """

    frames: torch.Tensor | np.ndarray | list[list[Image.Image]]


def official_prompt(prompt: str, reference_paths: Sequence[str | os.PathLike]) -> str:
    """The text the release actually encoded: the whole input line `prompt@@path1@@path2` (see §6.1)."""
    return "@@".join([prompt, *(os.fspath(p) for p in reference_paths)])


class WanSamplingMixin:
    """What both pipelines share with WanPipeline: the call-state properties, the checks of the callback and output
    options, and the noise of `prepare_latents` (B, C, 1 + (F−1)/4, H/8, W/8) drawn from `generator`."""

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]


    default_negative_prompt = KALEIDO_NEGATIVE_PROMPT  # the family release's; MagrefPipeline overrides it

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """`DiffusionPipeline.from_pretrained`; a local folder is resolved and checked first (`model_folder`).

        An official release folder (no `model_index.json`) is converted into a cache folder with
        `auto_convert=True`, else the error gives the `kaleido-s2v convert` command; a local pipeline folder with a
        missing, truncated or corrupt file is one `UserInputError` naming it. (MagrefPipeline also loads a
        diffusers `WanImageToVideoPipeline` folder as it is.)
        """
        auto_convert = kwargs.pop("auto_convert", False)
        path = pretrained_model_name_or_path
        if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
            from .model_folder import resolve_model_folder

            path = resolve_model_folder(path, "pretrained_model_name_or_path", auto_convert=auto_convert,
                                        components=None)
        return super().from_pretrained(path, **kwargs)

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = GENERATION_DEFAULTS["max_sequence_length"],
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds, negative_prompt_embeds), each (B·num_videos_per_prompt, max_sequence_length, D), as
        `WanPipeline.encode_prompt`: embeddings given are used as they are (the text encoder is not needed for
        them), the others encoded with Wan's prompt cleaning and zero rows after each prompt
        (`kaleido_s2v.text.encode_text`). The negative prompt defaults to the family release's."""
        device = device or self._execution_device

        def encode(texts: list[str], name: str) -> torch.Tensor:
            if getattr(self, "text_encoder", None) is None or getattr(self, "tokenizer", None) is None:
                raise ValueError(f"`{name}` must be given: this pipeline has no text encoder (it was loaded with "
                                 "text_encoder=None) to encode the text")
            embeds = encode_text(self.tokenizer, self.text_encoder, texts, max_sequence_length, device, dtype)
            return embeds.repeat_interleave(num_videos_per_prompt, dim=0)

        if prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = encode(prompt, "prompt_embeds")
        else:
            prompt_embeds = prompt_embeds.to(device=device, dtype=dtype or prompt_embeds.dtype)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        if negative_prompt_embeds is None:
            count = prompt_embeds.shape[0] // num_videos_per_prompt
            negative_prompt = self.default_negative_prompt if negative_prompt is None else negative_prompt
            negative_prompt = [negative_prompt] * count if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negative_prompt) != count:
                raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries but there are {count} prompts: "
                                 "give one negative prompt or one per prompt")
            negative_prompt_embeds = encode(negative_prompt, "negative_prompt_embeds")
        else:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype or negative_prompt_embeds.dtype)
        return prompt_embeds, negative_prompt_embeds

    def check_prompt_inputs(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds) -> int:
        """WanPipeline's rules for text and precomputed embeddings; returns the batch size (prompts, not videos)."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Cannot forward both `prompt` and `prompt_embeds`: give one of them")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Cannot forward both `negative_prompt` and `negative_prompt_embeds`: give one of them")
        text_dim = self.transformer.config.text_dim
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and (not torch.is_tensor(embeds) or embeds.ndim != 3 or embeds.shape[-1] != text_dim):
                shape = tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__
                raise ValueError(f"`{name}` must be a (batch, tokens, {text_dim}) tensor (the transformer's text_dim), "
                                 f"got {shape}")
        if prompt_embeds is not None and negative_prompt_embeds is not None and (
            prompt_embeds.shape != negative_prompt_embeds.shape
        ):
            raise ValueError(f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                             f"{tuple(negative_prompt_embeds.shape)} must have the same shape")
        if prompt_embeds is not None:
            return prompt_embeds.shape[0]
        return len(prompt) if isinstance(prompt, list) else 1

    def check_call_options(self, callback_on_step_end_tensor_inputs=None, output_type: str = "np") -> None:
        unknown = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found {unknown}"
            )
        if output_type not in ("np", "pt", "pil", "latent"):
            raise ValueError(f"`output_type` must be one of 'np', 'pt', 'pil', 'latent' but is {output_type!r}")

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self):
        return self._interrupt

    @property
    def attention_kwargs(self):
        return self._attention_kwargs

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        num_frames: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        num_latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        shape = (
            batch_size,
            num_channels_latents,
            num_latent_frames,
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective batch"
                f" size of {batch_size}. Make sure the batch size matches the length of the generators."
            )
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


class KaleidoPipeline(WanSamplingMixin, DiffusionPipeline, WanLoraLoaderMixin):
    r"""Kaleido subject-to-video pipeline: references + prompt -> video.

    Args:
        tokenizer: umT5 tokenizer (any T5-style tokenizer works).
        text_encoder (`UMT5EncoderModel`): the text encoder (any T5-style encoder whose width is the transformer's
            `text_dim`).
        vae (`AutoencoderKLWan`): the Wan2.1 VAE; encodes each reference and decodes the video.
        transformer (`KaleidoTransformer3DModel`): the denoiser.
        scheduler (`FlowMatchEulerDiscreteScheduler`): Euler steps. The pipeline always runs the official grid
            σ_k = 7s / (1 + 6s), s = 1 − k/n; a scheduler config that would give another grid is corrected with a
            warning.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _lora_loadable_modules = ["transformer"]

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal if getattr(self, "vae", None) else 4
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # ------------------------------------------------------------------ references
    @torch.no_grad()
    def encode_references(
        self,
        reference_images: ReferenceImage | Sequence[ReferenceImage] | Sequence[Sequence[ReferenceImage]],
        height: int = GENERATION_DEFAULTS["height"],
        width: int = GENERATION_DEFAULTS["width"],
        num_videos_per_prompt: int = 1,
        batch_size: int = 1,
    ) -> torch.Tensor | None:
        """Fit, pad and VAE-encode every reference ALONE (one encode per image) -> (B', z, N, h, w), or None for
        no references; pass it back as `reference_latents` to reuse it across seeds and prompts.

        `reference_images` as `__call__` takes them; B' is 1 when all `batch_size` prompts share the references
        (the transformer broadcasts it), else batch_size·num_videos_per_prompt (one list per prompt).
        """
        per_prompt, shared = group_references(reference_images, batch_size)
        if not per_prompt or not per_prompt[0]:
            return None
        latents = torch.stack(
            [torch.cat(encode_references(self.vae, refs, height, width), dim=2)[0]
             for refs in (per_prompt[:1] if shared else per_prompt)]
        )  # (B or 1, z, N, h, w)
        return latents if shared else latents.repeat_interleave(num_videos_per_prompt, dim=0)

    def check_reference_latents(self, reference_latents, height: int, width: int, videos: int) -> None:
        """`reference_latents` from `encode_references` for this call's size and batch."""
        h, w = height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial
        z = self.transformer.config.in_channels
        if not torch.is_tensor(reference_latents) or reference_latents.ndim != 5 or (
            reference_latents.shape[1], *reference_latents.shape[3:]) != (z, h, w
        ) or reference_latents.shape[0] not in (1, videos):
            shape = tuple(reference_latents.shape) if torch.is_tensor(reference_latents) else type(
                reference_latents).__name__
            raise ValueError(f"`reference_latents` must be (1 or {videos}, {z}, references, {h}, {w}) as "
                             f"`encode_references` returns for {height}x{width}, got {shape}")

    # ------------------------------------------------------------------ checks & latents
    def check_inputs(
        self,
        prompt,
        negative_prompt,
        reference_lists: list[list[ReferenceImage]],
        height: int,
        width: int,
        num_inference_steps: int,
        max_references: int,
        callback_on_step_end_tensor_inputs=None,
    ) -> None:
        multiple = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        check_sizes(height, width, num_inference_steps, multiple)
        num_refs = len(reference_lists[0]) if reference_lists else 0
        check_request(prompt, negative_prompt, num_refs, max_references)
        if num_refs > TRAINED_REFERENCES:
            logger.warning(
                f"{num_refs} references given; the model was trained with at most {TRAINED_REFERENCES}, so quality "
                "may drop."
            )
        self.check_call_options(callback_on_step_end_tensor_inputs)

    def set_official_timesteps(self, num_inference_steps: int, device: torch.device | None = None,
                               shift: float = SHIFT) -> torch.Tensor:
        """Put the scheduler on the official grid `release.official_sigmas` (timesteps 1000·σ_k, k < n); `shift`
        other than the release's 7 gives the same formula with that shift (5: the distillation LoRAs' grid).

        A loaded scheduler whose config would give another grid (another shift, dynamic shifting, Karras sigmas,
        ...) is replaced by a corrected copy. The grid is handed over already shifted (the scheduler's own shift
        is set to 1 for that call; its config keeps shift 7).
        """
        config = self.scheduler.config
        wrong = {k: config.get(k) for k, v in _OFFICIAL_SCHEDULER_CONFIG.items() if config.get(k, v) != v}
        if not isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler) or wrong:
            logger.warning(
                f"Scheduler {type(self.scheduler).__name__} {wrong or ''} does not give Kaleido's sampling grid; "
                "using FlowMatchEulerDiscreteScheduler with the official settings instead."
            )
            self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config, **_OFFICIAL_SCHEDULER_CONFIG)
        self.scheduler.set_shift(1.0)
        try:
            self.scheduler.set_timesteps(sigmas=official_sigmas(num_inference_steps, shift)[:-1].tolist(),
                                         device=device)
        finally:
            self.scheduler.set_shift(SHIFT)
        return self.scheduler.timesteps

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        reference_images: ReferenceImage | Sequence[ReferenceImage] | Sequence[Sequence[ReferenceImage]] = None,
        negative_prompt: str | list[str] | None = None,
        height: int = GENERATION_DEFAULTS["height"],
        width: int = GENERATION_DEFAULTS["width"],
        num_frames: int = GENERATION_DEFAULTS["num_frames"],
        num_inference_steps: int = GENERATION_DEFAULTS["num_inference_steps"],
        guidance_scale: float = GENERATION_DEFAULTS["guidance_scale"],
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        max_sequence_length: int = GENERATION_DEFAULTS["max_sequence_length"],
        *,
        reference_latents: torch.Tensor | None = None,
        shift: float = SHIFT,
        max_references: int = MAX_REFERENCES,
        official_prompt_with_paths: bool = False,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> KaleidoPipelineOutput | tuple:
        r"""Generate videos in which the reference subjects appear and act as the prompt says.

        Args:
            prompt: the caption (one string, or a list for a batch).
            reference_images: PIL images, paths or (H, W, 3) arrays (uint8, or floats in [0, 1]): one image, a list
                shared by every prompt, or one list per prompt (same length for all). Each is fitted into
                (height, width) with white padding and VAE-encoded alone. `None`/`[]` runs plain Wan
                text-to-video (the release has no such path; the transformer computes exactly Wan's forward).
            negative_prompt: defaults to the release's (`KALEIDO_NEGATIVE_PROMPT`); used when guidance_scale > 1.
            height, width: multiples of the VAE stride × patch size (16 for the release: 512 × 896).
            num_frames: 4k + 1 (others are rounded down with a warning, as WanPipeline does).
            num_inference_steps: steps of the official shift-7 grid.
            guidance_scale: CFG scale; both branches see the same references (text-only guidance).
            num_videos_per_prompt, generator, latents, callback_on_step_end, callback_on_step_end_tensor_inputs,
                max_sequence_length, attention_kwargs: as in `WanPipeline`.
            prompt_embeds, negative_prompt_embeds: precomputed text states (B, max_sequence_length, text_dim) from
                `encode_prompt`, instead of `prompt` / `negative_prompt`, as in `WanPipeline`; with both given (or
                guidance off) the pipeline needs no text encoder (`text_encoder=None`).
            shift: the grid's flow shift σ = shift·s / (1 + (shift − 1)·s) (the release's 7; 5 with 4 steps and
                guidance 1 for Wan2.1 step-distillation LoRAs, `release.DISTILL_SHIFT`).
            reference_latents: precomputed reference latents from `encode_references`, instead of
                `reference_images` (encode once, reuse across seeds and prompts).
            output_type: "np" (B, F, H, W, 3) floats in [0, 1], "pt", "pil" or "latent".
            max_references: more references than this raise `ValueError` (more than 3 warns).
            official_prompt_with_paths: encode `prompt@@path1@@path2` instead of the caption, reproducing the
                release's sampling script (references must then be paths).

        Returns:
            `KaleidoPipelineOutput` with `.frames`, or `(frames,)` when `return_dict=False`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs. Raise error if not correct
        batch_size = self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if reference_latents is not None and reference_images is not None:
            raise ValueError("Cannot forward both `reference_images` and `reference_latents`: give one of them")
        if prompt_embeds is not None and official_prompt_with_paths:
            raise ValueError("`official_prompt_with_paths` encodes the prompt text: it cannot apply to `prompt_embeds`")
        reference_lists, _ = group_references(reference_images, batch_size)
        self.check_inputs(
            prompt,
            negative_prompt,
            reference_lists,
            height,
            width,
            num_inference_steps,
            max_references,
            callback_on_step_end_tensor_inputs,
        )
        self.check_call_options(output_type=output_type)
        if num_frames % self.vae_scale_factor_temporal != 1:
            logger.warning(
                f"`num_frames - 1` has to be divisible by {self.vae_scale_factor_temporal}. Rounding to the nearest "
                "number."
            )
            num_frames = num_frames // self.vae_scale_factor_temporal * self.vae_scale_factor_temporal + 1
        num_frames = max(num_frames, 1)

        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device

        # 2. Define call parameters
        prompts = prompt
        if official_prompt_with_paths:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            for refs in reference_lists:
                if not all(isinstance(r, (str, os.PathLike)) for r in refs):
                    raise ValueError("`official_prompt_with_paths=True` needs `reference_images` given as paths")
            prompts = [official_prompt(p, refs) for p, refs in zip(prompts, reference_lists)]

        # 3. Encode input prompt
        transformer_dtype = self.transformer.dtype
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt=prompts,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            num_videos_per_prompt=num_videos_per_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
            dtype=transformer_dtype,
        )

        # 4. Encode references: one VAE encode per image; the SAME latents go to both CFG branches
        if reference_latents is None:
            reference_latents = self.encode_references(reference_images, height, width, num_videos_per_prompt,
                                                       batch_size)
        else:
            self.check_reference_latents(reference_latents, height, width, batch_size * num_videos_per_prompt)
        if reference_latents is not None:
            reference_latents = reference_latents.to(device=device, dtype=transformer_dtype)
        else:
            logger.info("No reference images: running plain text-to-video (Wan2.1 behaviour).")

        # 5. Prepare timesteps (the official shift-7 grid)
        timesteps = self.set_official_timesteps(num_inference_steps, device=device, shift=shift)

        # 6. Prepare latent variables (fp32; CFG and Euler updates run in fp32 as in the release)
        latents = self.prepare_latents(
            batch_size * num_videos_per_prompt,
            self.transformer.config.in_channels,
            height,
            width,
            num_frames,
            torch.float32,
            device,
            generator,
            latents,
        )

        # 7. Denoising loop
        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                latent_model_input = latents.to(transformer_dtype)
                timestep = t.expand(latents.shape[0])
                cache_context_kwargs = {
                    "step_index": i,
                    "sigma": float(self.scheduler.sigmas[i]),
                    "num_inference_steps": self._num_timesteps,
                }
                with self.transformer.cache_context("cond", **cache_context_kwargs):
                    noise_pred = self.transformer(
                        hidden_states=latent_model_input,
                        timestep=timestep,
                        encoder_hidden_states=prompt_embeds,
                        reference_latents=reference_latents,
                        attention_kwargs=attention_kwargs,
                        return_dict=False,
                    )[0].float()
                if self.do_classifier_free_guidance:
                    with self.transformer.cache_context("uncond", **cache_context_kwargs):
                        noise_uncond = self.transformer(
                            hidden_states=latent_model_input,
                            timestep=timestep,
                            encoder_hidden_states=negative_prompt_embeds,
                            reference_latents=reference_latents,  # same references: guidance is text-only
                            attention_kwargs=attention_kwargs,
                            return_dict=False,
                        )[0]
                    noise_uncond = noise_uncond.float()
                    noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)

                # Euler: x <- x + (σ_{k+1} − σ_k)·v
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()

        self._current_timestep = None

        # 8. Decode
        if output_type == "latent":
            video = latents
        else:
            latents = latents.to(get_module_execution_device(self.vae), dtype=self.vae.dtype)
            video = self.vae.decode(denormalize_latents(self.vae, latents), return_dict=False)[0]
            video = self.video_processor.postprocess_video(video, output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (video,)
        return KaleidoPipelineOutput(frames=video)
