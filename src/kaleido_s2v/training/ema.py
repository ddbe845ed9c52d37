"""Exponential moving average of the trained weights (diffusers' `EMAModel`), checkpointed by name.

Small-batch flow matching gives noisy weights; sampling from their running average is the usual remedy
(diffusers' training scripts, DiT, SD). The shadow weights have the parameters' own type and placement, so
under FSDP each rank averages its shard (DTensors) and `torch.distributed.checkpoint` saves them with the model.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.training_utils import EMAModel


class ParameterEMA:
    """EMA of a model's trainable parameters, keyed by parameter name for checkpoints."""

    def __init__(self, model: torch.nn.Module, decay: float):
        """Build after parallelising: the EMA holds the model's final parameter objects (as the optimizer does)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.ema = EMAModel(self.params, decay=decay, foreach=True)

    def step(self) -> None:
        self.ema.step(self.params)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Shadow weights by name (references, so `dcp.load` fills them in place)."""
        return dict(zip(self.names, self.ema.shadow_params))

    def resumed_at(self, step: int) -> None:
        """The shadow weights were loaded from a checkpoint of `step`: the decay warm-up goes on from there."""
        self.ema.optimization_step = step

    def restart_from_weights(self, step: int) -> None:
        """Shadow = the model's current weights; the decay warm-up counts from `step`."""
        _copy(self.ema.shadow_params, [p.detach() for p in self.params])
        self.resumed_at(step)

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the EMA weights inside, its own weights again after. Per tensor, because DTensor has
        no sharding rule for the `_foreach_copy_` of `EMAModel.copy_to`."""
        saved = [p.detach().clone() for p in self.params]
        _copy(self.params, self.ema.shadow_params)
        try:
            yield
        finally:
            _copy(self.params, saved)


@torch.no_grad()
def _copy(dst, src) -> None:
    for d, s in zip(dst, src):
        d.copy_(s)
