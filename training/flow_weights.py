"""SD3's timestep density and loss weights for flow-matching training (Esser et al. 2024, arXiv 2403.03206).

The same formulas, argument names and random draws as diffusers' ``compute_density_for_timestep_sampling`` and
``compute_loss_weighting_for_sd3`` (``diffusers.training_utils``; tests/training/test_flow_weights_ema.py compares
them), written here because importing ``diffusers.training_utils`` loads transformers and scipy: ~0.3 GB of host
memory in every training rank for two ten-line functions.
"""

from __future__ import annotations

import math

import torch

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


def timestep_density(weighting_scheme: str, batch: int, logit_mean: float = 0.0, logit_std: float = 1.0,
                     mode_scale: float = 1.29, generator: torch.Generator | None = None) -> torch.Tensor:
    """``u`` in [0, 1] of shape [batch] drawn from ``weighting_scheme``'s density: ``logit_normal`` (sigmoid of a
    normal), ``mode`` (uniform bent towards the middle by ``mode_scale``), anything else uniform. One draw of
    ``generator`` per row, as diffusers draws them, so a seeded run samples the same times."""
    if weighting_scheme == "logit_normal":
        u = torch.normal(mean=logit_mean, std=logit_std, size=(batch,), generator=generator)
        return torch.sigmoid(u)
    u = torch.rand(size=(batch,), generator=generator)
    if weighting_scheme == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sd3_loss_weights(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-row loss weights of ``weighting_scheme`` at ``sigmas``: ``sigma_sqrt`` 1/sigma^2, ``cosmap``
    2 / (pi (1 - 2 sigma + 2 sigma^2)), anything else 1 (the density already carries the weighting)."""
    if weighting_scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return torch.ones_like(sigmas)
