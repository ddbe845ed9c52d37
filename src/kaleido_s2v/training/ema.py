"""Exponential moving average of the trained weights (diffusers' `EMAModel`), checkpointed by name.

Small-batch flow matching gives noisy weights; sampling from their running average is the usual remedy
(diffusers' training scripts, DiT, SD). The shadow weights have the parameters' own type and placement, so
under FSDP each rank averages its shard (DTensors) and `torch.distributed.checkpoint` saves them with the model.
"""

from __future__ import annotations

import torch
from diffusers.training_utils import EMAModel


class ParameterEMA:
    """EMA of a model's trainable parameters, keyed by parameter name for checkpoints."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad]
        self.ema = EMAModel(params, decay=decay, foreach=True)

    def step(self, model: torch.nn.Module) -> None:
        self.ema.step([p for p in model.parameters() if p.requires_grad])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Shadow weights by name (references, so `dcp.load` fills them in place)."""
        return dict(zip(self.names, self.ema.shadow_params))

    def resumed_at(self, step: int) -> None:
        """The shadow weights were loaded from a checkpoint of `step`: the decay warm-up goes on from there."""
        self.ema.optimization_step = step

    def restart_from(self, model: torch.nn.Module, step: int) -> None:
        """Shadow = the model's current weights; the decay warm-up counts from `step`."""
        _copy(self.ema.shadow_params, [p.detach() for p in model.parameters() if p.requires_grad])
        self.resumed_at(step)

    def swapped_into(self, model: torch.nn.Module):
        """Context manager: the model holds the EMA weights inside, its own weights again after."""
        return _Swap(self, model)


class _Swap:
    def __init__(self, owner: ParameterEMA, model: torch.nn.Module):
        self.owner, self.params = owner, [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):  # per tensor: DTensor has no sharding rule for the _foreach_copy_ of EMAModel.copy_to
        self.saved = [p.detach().clone() for p in self.params]
        _copy(self.params, self.owner.ema.shadow_params)

    def __exit__(self, *exc):
        _copy(self.params, self.saved)
        self.saved = None


@torch.no_grad()
def _copy(dst, src) -> None:
    for d, s in zip(dst, src):
        d.copy_(s)
