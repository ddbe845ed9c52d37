"""The Kaleido-14B-S2V release's facts, in one home (reference/kaleido-official.md §1, §3).

Everything that takes the release's settings — the pipeline, the converter, the tiny components, the toy and
the CLI — reads them here. `official_sigmas` is the one computation of the sampling grid.
"""

from __future__ import annotations

import numpy as np

SHIFT = 7.0  # flow-matching timestep shift of the sampler (and the converted scheduler's config)
REF_ROPE = "shift_hw"  # the R-RoPE variant the release was trained with (§1.7)
REF_ROPE_OFFSET = 80  # its spatial offset O, in patches
TRAINED_REFERENCES = 3  # trained with at most 3 references; more gets a warning
MAX_REFERENCES = 4  # our default hard limit per video
REFERENCE_NOTE = f"the model was trained with at most {TRAINED_REFERENCES}"  # why more references do worse
MIN_FRAMES = 1  # 4k + 1, k >= 0

# Wan2.1's default negative prompt (`wan/configs/shared_config.py`, `sample_neg_prompt`).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
# The release's `sample_neg_prompt`: Wan's with "画得不好的脸部，" ("poorly drawn faces,") removed.
KALEIDO_NEGATIVE_PROMPT = WAN_NEGATIVE_PROMPT.replace("画得不好的脸部，", "")

# The few-step sampler that Wan2.1-T2V-14B step/CFG-distillation LoRAs expect (LightX2V `f8aee98`,
# configs/distill/wan21/wan_t2v_distill_lora_4step_cfg.json: denoising_step_list [1000, 750, 500, 250],
# sample_shift 5, enable_cfg false; lightx2v/models/schedulers/wan/step_distill/scheduler.py:25-49: σ = 5s/(1+4s)
# at s = t/1000, Euler x + (σ_next − σ)·v; Self-Forcing `33593df` warps the same list with shift 5): the release's
# grid formula with shift 5, 4 steps, no CFG. σ = 1, 0.9375, 0.8333, 0.625, then 0.
DISTILL_SHIFT = 5.0
DISTILL_DEFAULTS = dict(num_inference_steps=4, guidance_scale=1.0)

# Sampling defaults of the release's script (keys as in `KaleidoPipeline.__call__` / generation_defaults.json).
GENERATION_DEFAULTS = dict(
    height=512, width=896, num_frames=81, num_inference_steps=50, guidance_scale=6.0, fps=16,
    max_sequence_length=512, negative_prompt=KALEIDO_NEGATIVE_PROMPT,
)


def official_sigmas(num_inference_steps: int = 50, shift: float = SHIFT) -> np.ndarray:
    """The num_inference_steps + 1 sigmas σ_k = shift·s / (1 + (shift − 1)·s), s = 1 − k/n, k = 0..n.

    σ_0 = 1 (pure noise) down to σ_n = 0; the model is called at timesteps 1000·σ_k for k < n. For n = 50:
    σ_1 = 0.99709, σ_25 = 0.875, σ_49 = 0.125.
    """
    if num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}")
    s = 1.0 - np.arange(num_inference_steps + 1, dtype=np.float64) / num_inference_steps
    return shift * s / (1.0 + (shift - 1.0) * s)
