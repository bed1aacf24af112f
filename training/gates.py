"""Stage 2's differentiable block gates and compute-budget term (docs/method.md, "Depth: the router").

* ``straight_through_gates``: hard 0/1 gates in the forward pass, the gradient of the soft gate
  ``sigmoid((logit + noise) / tau)`` in the backward pass. The noise is logistic, so a gate is on with
  probability exactly ``sigmoid(logit)``: the expected compute below is the expectation over that noise, and at
  inference (no noise) the gate ``logit > 0`` is ``sigmoid(logit) > 0.5``, the router's decision at threshold 0.5.
* ``expected_compute_fraction``: sum_i c_i * P(block i runs) / sum_i c_i, averaged over the batch, with each
  block's real cost ``c_i`` (``comfyui_pare.compute``); pinned blocks always run and always cost.
* ``budget_penalty``: lambda * (expected fraction - budget)^2.
"""

from __future__ import annotations

from typing import Sequence

import torch


def logistic_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Standard logistic noise log(u) - log(1 - u), u ~ U(0, 1), drawn from ``generator`` on the CPU (reproducible)."""
    u = torch.rand(tuple(shape), generator=generator, dtype=torch.float32).clamp_(1e-6, 1.0 - 1e-6)
    return (u.log() - (-u).log1p()).to(device)


def straight_through_gates(logits: torch.Tensor, tau: float = 1.0, noise: torch.Tensor | None = None,
                           pinned: torch.Tensor | None = None) -> torch.Tensor:
    """Gates [B, N] in {0, 1} (forward) carrying d sigmoid((logit + noise) / tau) (backward).

    ``noise`` (same shape, e.g. ``logistic_noise``) is added before the temperature; None: deterministic, as at
    inference. ``pinned`` (bool [N]) blocks are held at exactly 1 with no gradient.
    """
    if tau <= 0:
        raise ValueError(f"gate temperature tau must be positive, got {tau}")
    z = logits if noise is None else logits + noise.to(logits)
    soft = torch.sigmoid(z / tau)
    hard = (z > 0).to(soft.dtype)  # = soft > 0.5, written so that rounding of the sigmoid cannot flip it
    gates = hard + (soft - soft.detach())  # exactly 0/1 forward; the parentheses keep it exact
    if pinned is not None:
        gates = torch.where(pinned.to(gates.device), torch.ones_like(gates), gates)
    return gates


def run_probabilities(logits: torch.Tensor, pinned: torch.Tensor | None = None) -> torch.Tensor:
    """P(block runs) [B, N] under logistic gate noise: sigmoid(logit), 1 for pinned blocks."""
    probs = torch.sigmoid(logits.float())
    if pinned is not None:
        probs = torch.where(pinned.to(probs.device), torch.ones_like(probs), probs)
    return probs


def normalized_costs(costs: Sequence[float] | torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Block costs as float32 fractions of the total (sum 1); validated like the router's ``decide``."""
    c = torch.as_tensor(costs, dtype=torch.float64).detach().cpu()
    if c.shape != (num_blocks,):
        raise ValueError(f"block costs must have one value per block ({num_blocks}), got shape {list(c.shape)}")
    if bool((c < 0).any()) or not bool(torch.isfinite(c).all()) or float(c.sum()) <= 0:
        raise ValueError(f"block costs must be finite, non-negative and not all zero, got {c.tolist()[:8]}")
    return (c / c.sum()).float()


def compute_fraction(run: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the cost-weighted fraction of blocks run; ``run`` [B, N] is 0/1 or a probability.

    ``costs`` are normalised (``normalized_costs``). Differentiable in ``run``.
    """
    if run.ndim != 2 or run.shape[1] != costs.numel():
        raise ValueError(f"run must be [batch, {costs.numel()}], got {list(run.shape)}")
    return (run.float() * costs.to(run.device)).sum(dim=1).mean()


def expected_compute_fraction(logits: torch.Tensor, costs: torch.Tensor,
                              pinned: torch.Tensor | None = None) -> torch.Tensor:
    """Expected executed share of the block compute under the gate noise (differentiable in ``logits``)."""
    return compute_fraction(run_probabilities(logits, pinned), costs)


def budget_penalty(expected: torch.Tensor, budget: float, weight: float) -> torch.Tensor:
    """weight * (expected - budget)^2."""
    return weight * (expected - budget).square()
