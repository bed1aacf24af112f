"""The student and its router as one model: the gated forward of stage 2 and the routed forward of inference.

The router reads exactly what the ComfyUI nodes give it (``nodes/routing.py``): the model's timestep
(sigma * 1000) through Wan's sinusoidal embedding, the patch-embedded tokens that enter block 0 (pooled to mean and
std by ``BlockRouter``), and, for a router with text input, the raw text context the diffusion model is called
with. So a decision made here is the decision the node makes for the same latent, step and prompt.

* ``GatedWan`` (training): every block runs on every row, and its output is mixed as x + g (B(x) - x) with
  straight-through gates g, so skipped blocks still get a gradient through the soft gate.
* ``RoutedVelocity`` (inference, sampling): the router's hard decisions (``comfyui_pare.router.decide``) drive
  ``WanTransformer``'s per-sample block mask; skipped blocks are never computed.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from comfyui_pare.compute import model_block_macs
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.router import BlockRouter, RouterSpec, RoutingPolicy, decide

from .gates import straight_through_gates
from .model import WanTransformer


def router_spec_for(meta: PrunedWanMeta, hidden: int = 128, use_text: bool = False, freq_dim: int = 256,
                    default_threshold: float = 0.5, train_budget: float | None = None,
                    layer_norm: bool = False) -> RouterSpec:
    """The spec of a router for this (pruned) model, bound to its fingerprint."""
    return RouterSpec(num_blocks=meta.num_blocks, dim=meta.dims.dim, freq_dim=freq_dim,
                      text_dim=meta.dims.text_dim if use_text else 0, hidden=hidden,
                      model_fingerprint=meta.fingerprint(), default_threshold=default_threshold,
                      train_budget=train_budget, layer_norm=layer_norm)


def block_costs(meta: PrunedWanMeta, tokens: int, text_tokens: int) -> list[float]:
    """Each block's MACs at this token count: the weights of the budget term, as the nodes count them."""
    return [float(m.total) for m in model_block_macs(meta, tokens, max(1, text_tokens))]


def pin_mask(num_blocks: int, pin_first: int, pin_last: int) -> torch.Tensor:
    """Bool [N]: the blocks that always run (the same rule as ``RoutingPolicy.pin_mask``)."""
    return RoutingPolicy(pin_first=pin_first, pin_last=pin_last).pin_mask(num_blocks)


def initial_bias(num_blocks: int, budget: float, costs: Sequence[float], pinned: torch.Tensor,
                 contribution: torch.Tensor | None = None, spread: float = 1.0) -> torch.Tensor:
    """Router bias at the start of stage 2: expected compute near ``budget``, higher for blocks that matter more.

    Unpinned blocks start at logit(q) with q the share of the unpinned compute the budget leaves; with a
    calibration ``contribution`` [N] (mean ||B(x) - x|| / ||x||), each adds ``spread`` x its z-score, so the
    blocks calibration found least useful are skipped first.
    """
    c = torch.as_tensor(costs, dtype=torch.float64)
    c = c / c.sum()
    free = float(c[~pinned].sum())
    q = (budget - float(c[pinned].sum())) / free if free > 0 else 1.0
    q = min(max(q, 0.02), 0.98)
    bias = torch.full((num_blocks,), math.log(q / (1 - q)), dtype=torch.float32)
    if contribution is not None:
        contribution = torch.as_tensor(contribution, dtype=torch.float32).reshape(-1)
        if contribution.shape != (num_blocks,):
            raise ValueError(f"contribution must have one value per block ({num_blocks}), got {list(contribution.shape)}")
        free_c = contribution[~pinned]
        if free_c.numel() > 1 and float(free_c.std()) > 0:
            bias = bias + spread * (contribution - free_c.mean()) / free_c.std()
    return bias


class GatedWan(nn.Module):
    """Student + router; ``forward`` is stage 2's gated forward (one module, so DDP/FSDP wrap it whole)."""

    def __init__(self, student: WanTransformer, router: BlockRouter, pinned: torch.Tensor) -> None:
        super().__init__()
        if router.spec.num_blocks != student.num_blocks or router.spec.dim != student.dims.dim:
            raise ValueError(f"router ({router.spec.num_blocks} blocks, dim {router.spec.dim}) does not fit the "
                             f"student ({student.num_blocks} blocks, dim {student.dims.dim})")
        self.student, self.router = student, router
        self.register_buffer("pinned", pinned.clone(), persistent=False)

    @property
    def blocks(self) -> nn.ModuleList:
        """The student's blocks: the units FSDP2 shards one by one (``training.parallel``)."""
        return self.student.blocks

    def logits(self, timestep: torch.Tensor, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.router(timestep, tokens, context if self.router.spec.text_dim else None)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, tau: float = 1.0,
                noise: torch.Tensor | None = None,
                clip_fea: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(velocity, router logits [B, N], gates [B, N]) with x + g (B(x) - x) around every block."""
        model = self.student
        p = model.prepare(x, timestep, context, clip_fea)
        logits = self.logits(timestep, p.tokens, context)
        gates = straight_through_gates(logits, tau, noise, self.pinned)
        h = p.tokens
        for i in range(model.num_blocks):
            g = gates[:, i].to(h.dtype)[:, None, None]
            h = h + g * (model.run_block(i, h, p) - h)
        return model.finish(h, p), logits, gates


class RoutedVelocity:
    """A ``training.sampling.VelocityModel``: the router decides per row, the student skips for real.

    The decisions are those of ``PAREApplyRouter`` with the same policy: ``decide`` on the router's logits, with
    the block costs the node uses for the budget rule. ``masks`` keeps every call's run mask (CPU, bool).
    """

    def __init__(self, student: WanTransformer, router: BlockRouter, policy: RoutingPolicy) -> None:
        self.student, self.router, self.policy = student, router, policy
        self.masks: list[torch.Tensor] = []

    def decisions(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            tokens = self.student.patch_embed(x).to(self.student.text_embedding[0].weight.dtype)
            logits = self.router(timestep.float(), tokens, context if self.router.spec.text_dim else None)
        costs = None if self.policy.threshold is not None else block_costs(
            self.student.meta, tokens.shape[1], context.shape[1])
        return decide(logits, self.policy, costs)

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                 clip_fea: torch.Tensor | None = None) -> torch.Tensor:
        mask = self.decisions(x, timestep, context)
        self.masks.append(mask.cpu())
        with torch.no_grad():
            return self.student(x, timestep, context, clip_fea, block_mask=mask)
