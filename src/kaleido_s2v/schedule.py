"""The official Kaleido sampling schedule (shift 7 on a uniform grid), as a pure function."""

from __future__ import annotations

import numpy as np

OFFICIAL_SHIFT = 7.0


def official_sigmas(num_inference_steps: int = 50, shift: float = OFFICIAL_SHIFT) -> np.ndarray:
    """The num_inference_steps + 1 sigmas σ_k = shift·s / (1 + (shift − 1)·s), s = 1 − k/n, k = 0..n.

    σ_0 = 1 (pure noise) down to σ_n = 0; the model is called at timesteps 1000·σ_k for k < n. For n = 50:
    σ_1 = 0.99709, σ_25 = 0.875, σ_49 = 0.125.
    """
    if num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}")
    s = 1.0 - np.arange(num_inference_steps + 1, dtype=np.float64) / num_inference_steps
    return shift * s / (1.0 + (shift - 1.0) * s)
