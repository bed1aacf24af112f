"""An exponential moving average of the trainable weights, kept shard by shard.

The semantics of diffusers' ``EMAModel`` with its defaults (``training_utils``; tests/training/test_flow_weights_ema.py
compares the two step by step): the decay at optimisation step ``n`` is ``min(decay, (1 + k) / (10 + k))`` with
``k = n - 1`` (0 at the first step, so the average starts as the weights after it), and each step moves every shadow
tensor by ``(1 - decay) * (shadow - param)``. The shadow tensors are clones of the parameters, so under FSDP2 each
is a DTensor holding this rank's shard and every update is local: nothing is gathered. Written here because
importing ``diffusers.training_utils`` loads transformers and scipy (~0.3 GB of host memory per rank).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class EMA:
    """Shadow copies of ``params`` averaged by :meth:`step`; ``decay`` and ``optimization_step`` are the state a
    checkpoint keeps beside the shadow tensors (the names diffusers' ``EMAModel.state_dict`` uses)."""

    def __init__(self, params: Iterable[torch.Tensor], decay: float = 0.9999) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.shadow_params = [p.detach().clone() for p in params]
        self.decay = decay
        self.optimization_step = 0

    def get_decay(self, optimization_step: int) -> float:
        """The decay applied at ``optimization_step`` (1-based): 0 at the first, then (1 + k) / (10 + k), capped."""
        k = max(0, optimization_step - 1)
        if k == 0:
            return 0.0
        return min((1 + k) / (10 + k), self.decay)

    @torch.no_grad()
    def step(self, params: Iterable[torch.Tensor]) -> None:
        """Average ``params`` (the same tensors, in the same order, as at construction) into the shadow copies;
        parameters that do not require grad are copied."""
        params = list(params)
        if len(params) != len(self.shadow_params):
            raise ValueError(f"EMA.step got {len(params)} parameters, the average holds {len(self.shadow_params)}")
        self.optimization_step += 1
        one_minus_decay = 1 - self.get_decay(self.optimization_step)
        for shadow, param in zip(self.shadow_params, params):
            if param.requires_grad:
                shadow.sub_(one_minus_decay * (shadow - param))  # diffusers' expression, so the rounding matches
            else:
                shadow.copy_(param)

    @torch.no_grad()
    def copy_to(self, params: Iterable[torch.Tensor]) -> None:
        """Write the averaged weights into ``params``."""
        for shadow, param in zip(self.shadow_params, params, strict=True):
            param.data.copy_(shadow.to(param.device).data)
