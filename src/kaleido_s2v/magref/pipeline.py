"""MagrefPipeline: MAGREF's any-reference video generation (diffusers `DiffusionPipeline`).

An unmodified Wan2.1 image-to-video network conditioned on one canvas: the references composited onto white
(`canvas.compose_references`), VAE-encoded as frame 0 of an otherwise zero video, with the region mask in the
4-channel first-frame mask (Wan I2V puts ones there) and CLIP features of the whole canvas. Sampling is the
release's: flow UniPC on the shift-3 grid (`release.magref_sigmas`), CFG 5 with the image conditioning in both
branches, the first 4 decoded frames dropped (reference/magref-official.md §2-§3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers import UniPCMultistepScheduler
from diffusers.utils import logging
from diffusers.utils.torch_utils import get_module_execution_device
from diffusers.video_processor import VideoProcessor
from PIL import Image

from ..latents import denormalize_latents
from ..pipeline import KaleidoPipelineOutput, WanSamplingMixin, check_request, check_sizes
from ..references import ReferenceImage, group_references
from .canvas import assign_blocks, compose_references, latent_mask
from .conditioning import canvas_condition, canvas_tensor, clip_features
from .release import (
    DROP_FRAMES,
    GENERATION_DEFAULTS,
    MAGREF_NEGATIVE_PROMPT,
    MAX_REFERENCES,
    MIN_FRAMES,
    REFERENCE_NOTE,
    SCHEDULER_CONFIG,
    unshifted_sigmas,
)

logger = logging.get_logger(__name__)

MagrefPipelineOutput = KaleidoPipelineOutput  # same fields: `.frames`


class MagrefPipeline(WanSamplingMixin, DiffusionPipeline, WanLoraLoaderMixin):
    r"""MAGREF reference-to-video pipeline: references on one masked canvas + prompt -> video.

    Args:
        tokenizer, text_encoder (`UMT5EncoderModel`): the text branch, as Wan2.1's.
        vae (`AutoencoderKLWan`): encodes the canvas (as frame 0 of a zero video) and decodes the video.
        transformer (`WanTransformer3DModel`): Wan2.1 image-to-video (`in_channels=36`, `image_dim`,
            `added_kv_proj_dim`).
        image_encoder (`CLIPVisionModel`): ViT-H/14; the second-to-last block's states of the whole canvas.
        scheduler (`UniPCMultistepScheduler`): flow UniPC. The pipeline always runs the release's grid
            (`release.magref_sigmas`); a config that would give another is corrected with a warning.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->transformer->vae"
    _lora_loadable_modules = ["transformer"]

    def __init__(self, tokenizer, text_encoder, vae, transformer, image_encoder, scheduler: UniPCMultistepScheduler):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                              image_encoder=image_encoder, scheduler=scheduler)
        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal if getattr(self, "vae", None) else 4
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # ------------------------------------------------------------------ conditioning
    default_negative_prompt = MAGREF_NEGATIVE_PROMPT  # `encode_prompt` (WanSamplingMixin) uses it

    def encode_image(self, canvas: torch.Tensor, device=None) -> torch.Tensor:
        """CLIP features of canvases (B, 3, H, W) in [−1, 1] (`conditioning.clip_features`)."""
        return clip_features(self.image_encoder, canvas, device)

    def prepare_condition(self, canvas: torch.Tensor, region: torch.Tensor, num_frames: int) -> torch.Tensor:
        """y = cat(mask4, latent16) (B, 20, T, h, w) (`conditioning.canvas_condition`)."""
        return canvas_condition(self.vae, canvas, region, num_frames)

    def compose(self, references: Sequence[ReferenceImage], height: int, width: int, layout: str,
                layout_seed: int | None) -> tuple[Image.Image, torch.Tensor]:
        """(canvas, latent region mask (h, w)) of one prompt's references."""
        canvas, mask = compose_references(references, layout, layout_seed, height, width)
        return canvas, latent_mask(mask, self.vae_scale_factor_spatial)

    @torch.no_grad()
    def encode_canvas(self, reference_images, height: int = GENERATION_DEFAULTS["height"],
                      width: int = GENERATION_DEFAULTS["width"], num_frames: int = GENERATION_DEFAULTS["num_frames"],
                      layout: str = "release", layout_seed: int | None = None, batch_size: int = 1,
                      device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_embeds (B, tokens, D), condition y (B, 20, T, h, w)) of the references' canvases, one per prompt
        (`reference_images` as `__call__` takes them); pass them back to reuse them across seeds and prompts."""
        per_prompt, _ = group_references(reference_images, batch_size)
        composed = [self.compose(refs, height, width, layout, layout_seed) for refs in per_prompt]
        canvases = torch.stack([canvas_tensor(c) for c, _ in composed])
        image_embeds = self.encode_image(canvases).to(device=device, dtype=dtype)
        condition = self.prepare_condition(canvases, torch.stack([m for _, m in composed]), num_frames)
        return image_embeds, condition.to(device=device, dtype=dtype)

    def check_canvas_inputs(self, image_embeds, condition, height: int, width: int, num_frames: int,
                            batch_size: int) -> None:
        """Precomputed `image_embeds` and `condition` (from `encode_canvas`) for this call's size and batch."""
        if (image_embeds is None) != (condition is None):
            raise ValueError("give both `image_embeds` and `condition` (as `encode_canvas` returns them), or neither")
        h, w = height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial
        t = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        want = (batch_size, self.transformer.config.in_channels - self.transformer.config.out_channels, t, h, w)
        if not torch.is_tensor(condition) or tuple(condition.shape) != want:
            got = tuple(condition.shape) if torch.is_tensor(condition) else type(condition).__name__
            raise ValueError(f"`condition` must be {want} for {batch_size} prompt(s) at {height}x{width}, {num_frames} "
                             f"frames, as `encode_canvas` returns it; got {got}")
        dim = self.transformer.config.image_dim
        if not torch.is_tensor(image_embeds) or image_embeds.ndim != 3 or image_embeds.shape[0] != batch_size or (
            image_embeds.shape[-1] != dim
        ):
            got = tuple(image_embeds.shape) if torch.is_tensor(image_embeds) else type(image_embeds).__name__
            raise ValueError(f"`image_embeds` must be ({batch_size}, tokens, {dim}) as `encode_canvas` returns it; "
                             f"got {got}")

    # ------------------------------------------------------------------ checks & schedule
    def check_inputs(self, prompt, negative_prompt, reference_lists_, height, width, num_frames, num_inference_steps,
                     max_references, layout, callback_on_step_end_tensor_inputs=None, precomputed: bool = False) -> None:
        check_sizes(height, width, num_inference_steps, self.vae_scale_factor_spatial * self.transformer.config.patch_size[1])
        num_refs = len(reference_lists_[0]) if reference_lists_ else 0
        check_request(prompt, negative_prompt, num_refs, max_references, note=REFERENCE_NOTE)
        if num_refs == 0 and not precomputed:
            raise ValueError("`reference_images`: MAGREF needs at least one reference image (or `image_embeds` and "
                             "`condition` from `encode_canvas`)")
        if num_frames < MIN_FRAMES or (num_frames - 1) % self.vae_scale_factor_temporal:
            raise ValueError(f"`num_frames` {num_frames}: must be 4k+1 and more than {DROP_FRAMES} (the first "
                             f"{DROP_FRAMES} decoded frames are dropped; the release uses 81)")
        used = len(assign_blocks(num_refs, layout, None, height, width)) if num_refs else 0
        if used < num_refs:
            logger.warning(f"layout {layout!r} places {used} of the {num_refs} references; the rest are dropped "
                           "(layout='grid' holds up to 8)")
        self.check_call_options(callback_on_step_end_tensor_inputs)

    def set_release_timesteps(self, num_inference_steps: int, device=None) -> torch.Tensor:
        """Put the scheduler on the release's grid (timesteps 999, 991, …, 71 for 40 steps); a scheduler whose
        config would give another grid or other steps is replaced by a corrected UniPC with a warning."""
        config = self.scheduler.config
        wrong = {k: config.get(k) for k, v in SCHEDULER_CONFIG.items() if config.get(k, v) != v}
        if not isinstance(self.scheduler, UniPCMultistepScheduler) or wrong:
            logger.warning(f"Scheduler {type(self.scheduler).__name__} {wrong or ''} does not sample as MAGREF; "
                           "using UniPCMultistepScheduler with the release's settings instead.")
            self.scheduler = UniPCMultistepScheduler.from_config(config, **SCHEDULER_CONFIG)
        # handed unshifted (numpy: diffusers shifts them by flow_shift); equal to Wan's FlowUniPC grid
        self.scheduler.set_timesteps(sigmas=unshifted_sigmas(num_inference_steps), device=device)
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
        layout: str = "release",
        layout_seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        max_sequence_length: int = GENERATION_DEFAULTS["max_sequence_length"],
        *,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        max_references: int = MAX_REFERENCES,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> KaleidoPipelineOutput | tuple:
        r"""Generate videos in which the reference subjects appear and act as the prompt says.

        Args:
            prompt: the caption (one string, or a list for a batch).
            reference_images: PIL images, paths or (H, W, 3) arrays: one image, a list shared by every prompt, or
                one list per prompt (same length for all); composited onto one white canvas per prompt.
            negative_prompt: defaults to MAGREF's (`MAGREF_NEGATIVE_PROMPT`); used when guidance_scale > 1.
            height, width: the canvas and video size (the release: 480 x 832 only; here any multiple of 16).
            num_frames: 4k + 1 decoded frames, k >= 1; the first 4 are dropped (81 -> 77, as the release saves).
            num_inference_steps: steps of the release's shift-3 flow UniPC grid (40).
            guidance_scale: CFG scale (5); both branches see the same canvas latents and CLIP features.
            layout: "release" (three columns, the release commit's) or "grid" (HEAD's 1-8 blocks); see
                `kaleido_s2v.magref.compose_references`.
            layout_seed: None keeps reference order; an int shuffles the grid as HEAD does, reproducibly.
            generator, latents, callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length,
                attention_kwargs: as in `WanImageToVideoPipeline`. Noise is `randn((B, 16, T, H/8, W/8))`.
            output_type: "np" (B, F − 4, H, W, 3) floats in [0, 1], "pt", "pil", or "latent" (before decoding).
            max_references: more references than this raise (default 8, the grid's largest).
            prompt_embeds, negative_prompt_embeds: precomputed text states from `encode_prompt` instead of the text
                (as in `WanPipeline`; with both, or guidance off, no text encoder is needed).
            image_embeds, condition: the canvas's CLIP features and y from `encode_canvas`, instead of
                `reference_images` (both or neither).

        Returns:
            `MagrefPipelineOutput` with `.frames`, or `(frames,)` when `return_dict=False`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs
        batch_size = self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        precomputed = image_embeds is not None or condition is not None
        if precomputed and reference_images is not None:
            raise ValueError("Cannot forward both `reference_images` and `image_embeds`/`condition`: give one")
        per_prompt, _ = group_references(reference_images, batch_size)
        self.check_inputs(prompt, negative_prompt, per_prompt, height, width, num_frames, num_inference_steps,
                          max_references, layout, callback_on_step_end_tensor_inputs, precomputed)
        if precomputed:
            self.check_canvas_inputs(image_embeds, condition, height, width, num_frames, batch_size)
        self.check_call_options(output_type=output_type)
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device

        # 2. Text
        transformer_dtype = self.transformer.dtype
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, self.do_classifier_free_guidance, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, max_sequence_length=max_sequence_length, device=device,
            dtype=transformer_dtype,
        )

        # 3. The canvas of each prompt: CLIP features and y = cat(mask4, latent16), shared by both CFG branches
        if not precomputed:
            image_embeds, condition = self.encode_canvas(reference_images, height, width, num_frames, layout,
                                                         layout_seed, batch_size)
        image_embeds = image_embeds.to(device=device, dtype=transformer_dtype)
        condition = condition.to(device=device, dtype=transformer_dtype)

        # 4. Timesteps (the release's grid) and noise (fp32; CFG and UniPC updates run in fp32)
        timesteps = self.set_release_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(batch_size, self.transformer.config.out_channels, height, width, num_frames,
                                       torch.float32, device, generator, latents)

        # 5. Denoising loop
        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                latent_model_input = torch.cat([latents.to(transformer_dtype), condition], dim=1)  # noise/mask/canvas
                timestep = t.expand(latents.shape[0])
                with self.transformer.cache_context("cond"):
                    noise_pred = self.transformer(
                        hidden_states=latent_model_input, timestep=timestep, encoder_hidden_states=prompt_embeds,
                        encoder_hidden_states_image=image_embeds, attention_kwargs=attention_kwargs,
                        return_dict=False,
                    )[0].float()
                if self.do_classifier_free_guidance:
                    with self.transformer.cache_context("uncond"):
                        noise_uncond = self.transformer(
                            hidden_states=latent_model_input, timestep=timestep,
                            encoder_hidden_states=negative_prompt_embeds,
                            encoder_hidden_states_image=image_embeds,  # same image conditioning: text-only guidance
                            attention_kwargs=attention_kwargs, return_dict=False,
                        )[0].float()
                    noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {k: locals()[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()
        self._current_timestep = None

        # 6. Decode; the first frames come from the reference canvas: dropped, as the release's saved video
        if output_type == "latent":
            video = latents
        else:
            latents = latents.to(get_module_execution_device(self.vae), dtype=self.vae.dtype)
            video = self.vae.decode(denormalize_latents(self.vae, latents), return_dict=False)[0][:, :, DROP_FRAMES:]
            video = self.video_processor.postprocess_video(video, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return MagrefPipelineOutput(frames=video)
