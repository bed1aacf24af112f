"""Oracle labels for a block router: the frozen student's error under every skip mask of its unpinned blocks.

For one model input (a noised latent at one step, with its prompt's context and the empty prompt's), the sampler's
CFG velocity is ``v_u + cfg (v_c - v_u)``. The router decides the cond and the uncond row separately, so the label of
one input is a table ``E[mc, mu]``: the squared error against the teacher's CFG velocity when the cond row runs mask
``mc`` and the uncond row mask ``mu``::

    E[mc, mu] = || cfg d_c(mc) - (cfg - 1) d_u(mu) ||^2,    d(m) = v_student(m) - v_teacher

Mask ``m`` (0 .. 2^U - 1) runs the j-th unpinned block iff bit j of ``m`` is set (``mask_bits``). Every mask is
evaluated exactly, sharing the work of common prefixes: the states after each block are kept for both choices
(skip / run), so the whole table costs about 2^U block calls per row instead of U 2^U / 2. That is exhaustive, so
it is for small routers (the toy's 6 unpinned blocks: 64 masks); a model with tens of routed blocks needs sampled
nested masks instead.
"""

from __future__ import annotations

import dataclasses

import torch

from .model import WanTransformer


def mask_bits(unpinned: list[int], num_blocks: int, pinned_on: bool = True) -> torch.Tensor:
    """Bool [2^U, N]: row m runs the j-th of ``unpinned`` iff bit j of m is set; every other block runs."""
    u = len(unpinned)
    m = torch.arange(2 ** u)
    run = torch.full((2 ** u, num_blocks), pinned_on, dtype=torch.bool)
    for j, b in enumerate(unpinned):
        run[:, b] = (m >> j) & 1 == 1
    return run


@torch.no_grad()
def all_mask_velocities(student: WanTransformer, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                        unpinned: list[int]) -> torch.Tensor:
    """Velocities [2^U, B, ...] of ``student`` on inputs ``x`` [B, ...] under every mask of ``unpinned`` blocks."""
    p = student.prepare(x, timestep, context)
    b = x.shape[0]
    h, states = p.tokens, 1
    for i in range(student.num_blocks):
        rows = dataclasses.replace(p, e=p.e.repeat(states, 1, 1), context=p.context.repeat(states, 1, 1))
        out = student.run_block(i, h, rows)
        if i in unpinned:  # state index gains a bit: the first half skipped block i, the second half ran it
            h, states = torch.cat([h, out]), states * 2
        else:
            h = out
    done = dataclasses.replace(p, e_head=p.e_head.repeat(states, 1))
    v = student.finish(h, done)
    return v.reshape(states, b, *v.shape[1:])


@torch.no_grad()
def mask_tables(student: WanTransformer, teacher: WanTransformer, x: torch.Tensor, timestep: torch.Tensor,
                cond: torch.Tensor, uncond: torch.Tensor, unpinned: list[int], cfg: float) -> torch.Tensor:
    """Tables [B, 2^U, 2^U] (cond mask, uncond mask) of the CFG velocity's squared error against the teacher."""
    b = x.shape[0]
    xx, tt, ctx = torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([cond, uncond])
    ref = teacher(xx, tt, ctx).float()
    v = all_mask_velocities(student, xx, tt, ctx, unpinned).float()
    d = (v - ref[None]).flatten(2)  # [M, 2B, numel]
    dc, du = d[:, :b].transpose(0, 1), d[:, b:].transpose(0, 1)  # [B, M, numel]
    a, c = cfg, cfg - 1.0
    sq_c, sq_u = dc.square().sum(-1), du.square().sum(-1)  # [B, M]
    cross = torch.bmm(dc, du.transpose(1, 2))  # [B, Mc, Mu]
    return a * a * sq_c[:, :, None] + c * c * sq_u[:, None, :] - 2.0 * a * c * cross
