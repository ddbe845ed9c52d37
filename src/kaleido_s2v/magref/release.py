"""The MAGREF release's facts, in one home (reference/magref-official.md §1-§3).

The pipeline, the converter, the tiny components and the CLI read them here; `magref_sigmas` is the one
computation of its sampling grid.
"""

from __future__ import annotations

import numpy as np

from ..release import WAN_NEGATIVE_PROMPT

SHIFT = 3.0  # flow shift of the sampler (`generate.py --sample_shift` default; 480p)
NUM_TRAIN_TIMESTEPS = 1000
# FlowUniPCMultistepScheduler(shift=1): sigma_max = 1 − alphas[0] computed in float64, stored as float32.
SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))  # 0.99900001...
CANVAS_HEIGHT, CANVAS_WIDTH = 480, 832  # the release's only canvas
DROP_FRAMES = 4  # the official script drops the first 4 decoded frames (the reference "frame")
MAX_REFERENCES = 8  # the grid layout's largest block count
REFERENCE_NOTE = f"the canvas has at most {MAX_REFERENCES} blocks"
MIN_FRAMES = DROP_FRAMES + 1  # 4k + 1, k >= 1: something must be left after the dropped frames
# "镜头晃动，" ("camera shake,") + Wan2.1's negative prompt (`configs/magref_14B.py:10`)
MAGREF_NEGATIVE_PROMPT = "镜头晃动，" + WAN_NEGATIVE_PROMPT
# CLIP's image normalisation (`modules/clip.py:457-458`)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Sampling defaults of the release's script (keys as in `MagrefPipeline.__call__` / generation_defaults.json).
GENERATION_DEFAULTS = dict(
    height=CANVAS_HEIGHT, width=CANVAS_WIDTH, num_frames=81, num_inference_steps=40, guidance_scale=5.0, fps=15,
    max_sequence_length=512, negative_prompt=MAGREF_NEGATIVE_PROMPT,
)

# The scheduler MAGREF samples with, as diffusers' UniPC (same steps as Wan's FlowUniPCMultistepScheduler).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="flow_prediction", use_flow_sigmas=True,
    flow_shift=SHIFT, solver_order=2, predict_x0=True, solver_type="bh2", lower_order_final=True,
    final_sigmas_type="zero", use_dynamic_shifting=False, use_karras_sigmas=False, use_exponential_sigmas=False,
    use_beta_sigmas=False, thresholding=False, timestep_spacing="linspace",
)


def unshifted_sigmas(num_inference_steps: int = 40) -> np.ndarray:
    """linspace(σ_max, 0, n + 1)[:-1]: the grid before the shift (what the scheduler is handed)."""
    if num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}")
    return np.linspace(SIGMA_MAX, 0.0, num_inference_steps + 1)[:-1].copy()


def magref_sigmas(num_inference_steps: int = 40, shift: float = SHIFT) -> np.ndarray:
    """The n + 1 sigmas σ_k = shift·s / (1 + (shift − 1)·s), s = linspace(0.999, 0, n + 1)[k] for k < n, then 0.

    Timesteps int64(1000·σ_k): 999, 991, 982, …, 71 for n = 40 (the official FlowUniPC grid; diffusers' own
    `set_timesteps(40)` differs by up to 0.0027 in σ, so the pipeline hands these over).
    """
    s = unshifted_sigmas(num_inference_steps)
    return np.append(shift * s / (1.0 + (shift - 1.0) * s), 0.0)


def magref_scheduler():
    """diffusers `UniPCMultistepScheduler` configured as the release samples."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(**SCHEDULER_CONFIG)
