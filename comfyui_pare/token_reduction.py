"""Asymmetric token reduction and restoration on Wan's token grid (AsymRnR, ICML'25, written for Wan2.1).

Self-attention over the L = frames x rows x columns tokens of a Wan block costs O(L^2). Neighbouring tokens are
often near copies of each other, so attention can run on fewer of them:

1. **Split** (``grid_split``): the grid is cut into chunks of a spatio-temporal ``stride`` (frames, rows,
   columns); one token of each chunk, drawn by a seeded generator, is a *destination*, the rest are *sources*.
2. **Match** (``match_tokens``): every source finds its most similar destination (cosine or euclidean, per
   head, on the features being reduced), and the sources are ordered from least to most similar.
3. **Reduce** (``Reduction.reduce``): the least similar sources are kept as they are; the rest are merged into
   their destination (``mode="mean"``: the destination becomes the mean of its group) or dropped
   (``mode="prune"``: the destination stands for the group unchanged).
4. **Restore** (``Reduction.restore``): every original token reads the output of the reduced token it went
   into, so merged sources get a copy of their group's output.

Queries and keys/values are reduced separately, with their own matchings and ratios (the "asymmetric" part):
reducing queries saves rows of the attention matrix and is undone by restoration; reducing keys/values saves
columns and needs no restoration. Keys and values share one matching (made on the values, as AsymRnR does), so a
merged key and its value describe the same group of tokens.

**Proportional attention.** A key that stands for n tokens gets log(n) added to its attention logits
(``Reduction.log_sizes``), so its softmax weight is that of n copies. With it, attention over a group of
identical tokens is unchanged by merging them: reduced attention equals full attention for duplicated tokens.

**RoPE.** Wan's 3-axis RoPE is applied *before* reduction (ComfyUI's attention seam receives rotated q and k),
so every token's position is taken before merging. A merged key is the mean of its members' *rotated* keys:
it keeps no single position. Because the logit is linear in the key, q . mean(R_j k_j) = mean(q . R_j k_j): the
merged key's logit is exactly the mean of the logits its members would have had, each at its own position,
which keeps the attention result closest to the full one (giving it the destination's position instead would
move every member's logit to the destination's rotation). Merged queries are likewise means of rotated queries.
In ``prune`` mode the destination keeps its own position and rotation.

Everything here is plain torch and works on [B, H, L, d] tensors; indices are per batch row and per head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

METRICS = ("cosine", "euclidean")
MODES = ("mean", "prune")
_SIM_BUDGET = 1 << 26  # similarity entries computed at once (256 MB in float32), whatever the token count

# attend(q [B,H,Lq,d], k [B,H,Lk,d], v [B,H,Lk,d], bias [B,H,1,Lk] | None) -> [B,H,Lq,d]
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def grid_split(grid: tuple[int, int, int], stride: tuple[int, int, int], generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Destination and source token indices (long, ascending) of a (frames, rows, columns) grid, flattened in that
    order as Wan flattens its tokens.

    Each whole chunk of ``stride`` tokens gives one destination at a position drawn from ``generator`` (a CPU
    generator, so the draw is the same on every device); tokens of a partial chunk at the far edges are sources.
    """
    if len(grid) != 3 or len(stride) != 3 or min(grid) < 1 or min(stride) < 1:
        raise ValueError(f"grid {tuple(grid)} and stride {tuple(stride)} must be three positive integers each")
    chunks = [g // s for g, s in zip(grid, stride)]
    n_dst = math.prod(chunks)
    if n_dst == 0:
        raise ValueError(f"stride {tuple(stride)} is larger than the token grid {tuple(grid)}")
    volume = math.prod(stride)
    pick = torch.randint(volume, (n_dst,), generator=generator)
    offs = torch.stack(torch.meshgrid(*(torch.arange(s) for s in stride), indexing="ij"), -1).reshape(-1, 3)[pick]
    base = torch.stack(torch.meshgrid(*(torch.arange(c) * s for c, s in zip(chunks, stride)), indexing="ij"), -1)
    pos = base.reshape(-1, 3) + offs
    dst = (pos[:, 0] * grid[1] + pos[:, 1]) * grid[2] + pos[:, 2]
    is_dst = torch.zeros(math.prod(grid), dtype=torch.bool)
    is_dst[dst] = True
    return is_dst.nonzero().flatten().to(device), (~is_dst).nonzero().flatten().to(device)


@dataclass(frozen=True)
class Matching:
    """A split and, per batch row and head, each source's best destination; reused across steps by the cache."""

    dst: torch.Tensor  # [Nd] long: token indices of the destinations
    src: torch.Tensor  # [Ns] long: token indices of the sources
    # int32 keeps the matching cache small (two [B, H, Ns] tables per cached block and feature)
    order: torch.Tensor  # [B, H, Ns] int32: positions into ``src``, least similar to its destination first
    target: torch.Tensor  # [B, H, Ns] int32: index into ``dst`` of each source's best destination
    score: torch.Tensor | None = None  # [B, H, Ns] float32: similarity to it (cosine, or minus squared distance)

    @property
    def num_tokens(self) -> int:
        return self.dst.numel() + self.src.numel()

    def fits(self, x: torch.Tensor) -> bool:
        """Whether this matching can reduce ``x`` [B, H, L, d] (same rows, heads and tokens)."""
        return tuple(x.shape[:2]) == tuple(self.order.shape[:2]) and x.shape[2] == self.num_tokens


def match_tokens(x: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, metric: str = "cosine") -> Matching:
    """Match each source of ``x`` [B, H, L, d] to its most similar destination.

    cosine: highest cosine similarity; euclidean: smallest distance. Computed in float32, in chunks of sources so
    memory stays bounded at any token count. The order is a stable sort, so ties are broken by token index.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")

    def prepared(idx: torch.Tensor) -> torch.Tensor:  # float32 copies of only the tokens in use: bounded memory
        t = x.index_select(2, idx).float()
        return F.normalize(t, dim=-1) if metric == "cosine" else t

    src_dev = src.to(x.device)
    xd = prepared(dst.to(x.device))
    bias = None if metric == "cosine" else -0.5 * xd.square().sum(-1)  # argmin |s-d|^2 = argmax s.d - |d|^2/2
    b, h, n_dst = xd.shape[:3]
    chunk = max(1, _SIM_BUDGET // max(1, b * h * n_dst))
    best, target = [], []
    for start in range(0, src.numel(), chunk):
        xs = prepared(src_dev[start:start + chunk])
        sim = xs @ xd.transpose(-1, -2)  # [B, H, c, Nd]
        if bias is not None:
            sim = sim + bias[:, :, None, :]
        val, idx = sim.max(dim=-1)
        if bias is not None:  # report -distance^2 so that larger is more similar for both metrics
            val = 2 * val - xs.square().sum(-1)
        best.append(val)
        target.append(idx)
    best_t, target_t = torch.cat(best, -1), torch.cat(target, -1)
    order = torch.sort(best_t, dim=-1, stable=True).indices
    return Matching(dst.to(x.device), src_dev, order.int(), target_t.int(), best_t)


def plan_matching(x: torch.Tensor, grid: tuple[int, int, int], stride: tuple[int, int, int], metric: str = "cosine",
                  generator: torch.Generator | None = None) -> Matching:
    """Split the grid and match ``x`` [B, H, L, d] (L must equal the grid's token count)."""
    if x.shape[2] != math.prod(grid):
        raise ValueError(f"{x.shape[2]} tokens do not fill the grid {tuple(grid)}")
    dst, src = grid_split(grid, stride, generator, x.device)
    return match_tokens(x, dst, src, metric)


def kept_sources(num_tokens: int, num_dst: int, ratio: float) -> int:
    """Sources left unmerged so that about ``ratio`` of the tokens are removed (destinations are never removed)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"reduction ratio must be in [0, 1), got {ratio}")
    return min(num_tokens - num_dst, max(0, int(num_tokens * (1.0 - ratio)) - num_dst))


class Reduction:
    """One matching applied at one ratio: reduce [B, H, L, d] -> [B, H, L', d] and restore back.

    The reduced sequence is the kept sources (least similar first), then the destinations. ``slot`` [B, H, L]
    says which reduced token every original token went into; restoration is one gather by it.
    """

    def __init__(self, matching: Matching, ratio: float, mode: str = "mean") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.matching, self.ratio, self.mode = matching, ratio, mode
        m = matching
        n_dst, n_src = m.dst.numel(), m.src.numel()
        self.keep = kept_sources(m.num_tokens, n_dst, ratio)
        b, h = m.order.shape[:2]
        order, target = m.order.long(), m.target.long()
        kept, merged = order[..., :self.keep], order[..., self.keep:]
        src = m.src.expand(b, h, n_src)
        slot = torch.empty(b, h, m.num_tokens, dtype=torch.long, device=m.order.device)
        slot[..., m.dst] = torch.arange(self.keep, self.keep + n_dst, device=slot.device).expand(b, h, n_dst)
        slot.scatter_(-1, src.gather(-1, kept), torch.arange(self.keep, device=slot.device).expand(b, h, self.keep))
        slot.scatter_(-1, src.gather(-1, merged), self.keep + target.gather(-1, merged))
        self.slot = slot
        # The token that represents each slot in "prune" mode: kept sources, then destinations.
        self.representative = torch.cat([src.gather(-1, kept), m.dst.expand(b, h, n_dst)], dim=-1)
        self.length = self.keep + n_dst
        self.sizes = torch.zeros(b, h, self.length, device=slot.device).scatter_add_(
            -1, slot, torch.ones(b, h, m.num_tokens, device=slot.device))

    @property
    def removed(self) -> int:
        return self.matching.num_tokens - self.length

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, L, d] -> [B, H, L', d]: each group's mean (in float32), or its destination (``prune``)."""
        if self.mode == "prune":
            return x.gather(2, self.representative[..., None].expand(-1, -1, -1, x.shape[-1]))
        idx = self.slot[..., None].expand(-1, -1, -1, x.shape[-1])
        total = torch.zeros(*x.shape[:2], self.length, x.shape[-1], device=x.device, dtype=torch.float32)
        total.scatter_add_(2, idx, x.float())
        return (total / self.sizes[..., None]).to(x.dtype)

    def restore(self, y: torch.Tensor) -> torch.Tensor:
        """[B, H, L', d] -> [B, H, L, d]: every token gets the output of the reduced token it went into."""
        return y.gather(2, self.slot[..., None].expand(-1, -1, -1, y.shape[-1]))

    def log_sizes(self, dtype: torch.dtype) -> torch.Tensor:
        """The proportional-attention bias [B, H, 1, L']: log of the number of tokens each key stands for."""
        return self.sizes.log()[:, :, None, :].to(dtype)


def reduced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: AttendFn,
                      q_reduction: Reduction | None = None, kv_reduction: Reduction | None = None,
                      proportional: bool = True) -> torch.Tensor:
    """Attention of q, k, v [B, H, L, d] (RoPE already applied) with queries and keys/values reduced separately.

    ``attend`` runs the attention itself (ComfyUI's attention function in the node; SDPA in references). The
    output has all L query tokens: reduced queries are restored. With no reduction this is ``attend(q, k, v,
    None)`` on the unchanged tensors.
    """
    bias = None
    if kv_reduction is not None:
        k, v = kv_reduction.reduce(k), kv_reduction.reduce(v)
        if proportional:
            bias = kv_reduction.log_sizes(q.dtype)
    if q_reduction is not None:
        return q_reduction.restore(attend(q_reduction.reduce(q), k, v, bias))
    return attend(q, k, v, bias)


def sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The plain-torch ``AttendFn`` (scaled dot-product attention with an optional additive bias)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class MatchingCache:
    """The matching cache: a (block, feature) matching is made at one step and reused for ``reuse_steps`` steps.

    Matching costs a similarity search of sources against destinations; tokens move little between neighbouring
    steps, so AsymRnR reuses it. The split of every refresh is drawn from a generator seeded by (seed, block,
    feature, step), so any implementation that asks at the same steps gets the same split. A matching is never
    reused for a batch of another shape (e.g. cond alone vs cond + uncond), it is remade.
    """

    def __init__(self, reuse_steps: int = 1, stride: tuple[int, int, int] = (1, 2, 2), metric: str = "cosine",
                 seed: int = 0) -> None:
        if reuse_steps < 1:
            raise ValueError(f"reuse_steps must be >= 1, got {reuse_steps}")
        self.reuse_steps, self.stride, self.metric, self.seed = reuse_steps, tuple(stride), metric, seed
        self._entries: dict[tuple, tuple[int, Matching]] = {}
        self.made = self.reused = 0

    def clear(self) -> None:
        """Drop every cached matching (the counts stay)."""
        self._entries.clear()

    def get(self, block: int, feature: str, step: int, x: torch.Tensor, grid: tuple[int, int, int],
            rows_key: tuple = ()) -> Matching:
        """The matching for ``x`` [B, H, L, d] at ``step`` (made now, or reused from an earlier step)."""
        key = (block, feature, tuple(x.shape[:3]), rows_key)
        entry = self._entries.get(key)
        if entry is not None and 0 <= step - entry[0] < self.reuse_steps and entry[1].fits(x):
            self.reused += 1
            return entry[1]
        gen = torch.Generator().manual_seed(((self.seed * 1000 + block) * 2 + (feature == "kv")) * 100_003 + step)
        matching = replace(plan_matching(x, grid, self.stride, self.metric, gen), score=None)  # score: not kept
        self._entries[key] = (step, matching)
        self.made += 1
        return matching


def reduced_attention_macs(grid: tuple[int, int, int], stride: tuple[int, int, int], inner: int, q_ratio: float,
                           kv_ratio: float, cache_steps: int = 1) -> tuple[int, int]:
    """(attention-core MACs, matching MACs) of one self-attention call over ``inner`` = heads x head_dim channels.

    The core is QK^T and AV on the reduced lengths, 2 Lq' Lk' inner (``compute.block_macs`` counts 2 L^2 inner
    unreduced). Matching a feature costs one source-by-destination similarity per head, Ns Nd inner, made once per
    ``cache_steps`` steps (amortised here). Gathers, scatters and the softmax bias are memory work, not counted.
    """
    n = math.prod(grid)
    n_dst = math.prod(g // s for g, s in zip(grid, stride))
    lq = n if q_ratio == 0 else n_dst + kept_sources(n, n_dst, q_ratio)
    lk = n if kv_ratio == 0 else n_dst + kept_sources(n, n_dst, kv_ratio)
    matched = (q_ratio > 0) + (kv_ratio > 0)
    return 2 * lq * lk * inner, matched * (n - n_dst) * n_dst * inner // cache_steps
