"""Token reduction on the trainable Wan outside ComfyUI: every block's self-attention runs the core's reduced
attention at the schedule's ratios, with the same matching cache as the PARE Token Reduction node.

The reference the node's tests compare against, and the model the token-reduction benchmark times. The caller
announces each model call (``begin_call``: its sigma and token grid); steps are counted by sigma changes, as the
node counts them.
"""

from __future__ import annotations

from typing import Callable

import torch

from comfyui_pare.token_reduction import MatchingCache, Reduction, reduced_attention, sdpa_attend
from comfyui_pare.token_schedule import TokenSchedule

from .model import SelfAttention, WanTransformer, apply_rope


class TokenReduction:
    """Installed on a ``WanTransformer``: replaces each block's self-attention forward (``remove`` undoes it)."""

    def __init__(self, model: WanTransformer, schedule: TokenSchedule, percent_to_sigma: Callable[[float], float],
                 cache_steps: int = 1, strength: float = 1.0) -> None:
        schedule.check_blocks(model.num_blocks)
        self.schedule, self.percent_to_sigma, self.strength = schedule, percent_to_sigma, strength
        self.cache = MatchingCache(cache_steps, schedule.stride, schedule.metric, schedule.seed)
        self.step, self.sigma, self.grid = -1, None, None
        self._attns = [block.self_attn for block in model.blocks]
        for i, attn in enumerate(self._attns):
            attn.forward = self._forward(attn, i)

    def begin_call(self, sigma: float, grid: tuple[int, int, int]) -> None:
        if sigma != self.sigma:
            self.step += 1
            self.sigma = sigma
        self.grid = grid

    def remove(self) -> None:
        for attn in self._attns:
            del attn.forward  # back to the class's forward

    def ratios(self, block: int) -> tuple[float, float]:
        return self.schedule.ratios(block, self.sigma, self.percent_to_sigma, self.strength)

    def _forward(self, attn: SelfAttention, index: int):
        def forward(x: torch.Tensor, freqs) -> torch.Tensor:
            b, s = x.shape[:2]
            q = apply_rope(attn.norm_q(attn.q(x)).view(b, s, attn.num_heads, attn.head_dim), freqs)
            k = apply_rope(attn.norm_k(attn.k(x)).view(b, s, attn.num_heads, attn.head_dim), freqs)
            v = attn.v(x).view(b, s, attn.num_heads, attn.head_dim)
            qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
            q_ratio, kv_ratio = self.ratios(index)
            mode, step = self.schedule.mode, self.step
            q_red = Reduction(self.cache.get(index, "q", step, qh, self.grid), q_ratio, mode) if q_ratio else None
            kv_red = Reduction(self.cache.get(index, "kv", step, vh, self.grid), kv_ratio, mode) if kv_ratio else None
            out = reduced_attention(qh, kh, vh, sdpa_attend, q_red, kv_red, self.schedule.proportional)
            return attn.o(out.transpose(1, 2).reshape(b, s, -1))
        return forward
