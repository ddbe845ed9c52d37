"""Fine-tuning Kaleido / Wan2.1 on S2V data: flow matching, FSDP2, context parallel, LoRA (`kaleido-s2v train`)."""

from .cache import build_cache
from .config import RECIPES, TrainConfig, load_config, recipe
from .objective import flow_matching_loss, resolution_shift, sample_sigmas, shift_sigmas
from .trainer import train

__all__ = [
    "RECIPES",
    "TrainConfig",
    "build_cache",
    "flow_matching_loss",
    "load_config",
    "recipe",
    "resolution_shift",
    "sample_sigmas",
    "shift_sigmas",
    "train",
]
