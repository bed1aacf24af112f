"""PARE Token Reduction: AsymRnR on Wan self-attention, inside ComfyUI's own sampler.

How it hooks in (the per-run lifecycle is nodes/hooks.py's, shared with routing; the node is in
nodes/token_reduction_nodes.py):

* ``transformer_options["optimized_attention_override"]``: ComfyUI's attention seam. Every ``optimized_attention``
  call of the model passes through it with the attention function it would have used (``func``: pytorch,
  sub-quadratic, sage, ...). An override that was there before is kept and called in turn (chained), so the
  reduced attention still runs on the user's backend and through any earlier override.
* A ``double_block`` replace patch per block (chained to any earlier one, e.g. PARE routing) hands the block a
  shallow copy of ``transformer_options`` that names the block. A Wan block's first attention call is its
  self-attention (then cross-attention), so the override reduces exactly that call, after RoPE.
* Per sampling run: a fresh ``ReductionRun`` (matching cache, statistics), schedule positions mapped to sigmas
  with the sampled model's ``percent_to_sigma`` (a ModelSamplingSD3 shift is honoured on the first run too); one
  summary log line per run.
* Per model call: the token grid (frames, rows, columns) and the step index, kept per thread.

Blocks skipped by PARE routing never call attention; a pruned block attends with its kept heads. With ratio 0
everywhere (or strength 0, or outside start/end percent) the original attention call is made unchanged.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from ..comfyui_pare.token_reduction import MatchingCache, Reduction, reduced_attention
from ..comfyui_pare.token_schedule import TokenSchedule
from .comfy_compat import ModelPatcher, internals
from .hooks import CallInfo, ChainedBlockPatch, HookRun, RunTemplate, SigmaWindow, install

logger = logging.getLogger(__name__)

KEY = "pare_token_reduction"  # transformer_options key and wrapper key
BLOCK_KEY = "pare_token_reduction_block"
OVERRIDE = "optimized_attention_override"


@dataclass(eq=False)
class ReductionTemplate(RunTemplate):
    """What the node configures; a fresh ReductionRun is made from it for every sampling run (shared by clones)."""

    schedule: TokenSchedule
    strength: float = 1.0
    cache_steps: int = 1
    start_percent: float = 0.0
    end_percent: float = 1.0
    last_run: "ReductionRun | None" = None

    def start_run(self, model_sampling, schedule: list[float] | None) -> "ReductionRun":
        return ReductionRun(self, model_sampling.percent_to_sigma)


@dataclass(frozen=True)
class ReductionCall:
    sigma: float
    step: int
    grid: tuple[int, int, int]


class ReductionRun(HookRun):
    """Per-sampling-run state: step counter, matching cache, ratio lookups and statistics; the current call's sigma,
    step and token grid per thread."""

    def __init__(self, template: ReductionTemplate, percent_to_sigma: Callable[[float], float]) -> None:
        super().__init__()
        s = template.schedule
        self.template = template
        self.window = SigmaWindow(percent_to_sigma, template.start_percent, template.end_percent)
        self.cache = MatchingCache(template.cache_steps, s.stride, s.metric, s.seed)
        self.step = -1
        self._last_sigma: float | None = None
        self._step_lock = threading.Lock()
        self._ratios: dict[tuple[int, float], tuple[float, float]] = {}
        self.calls = self.reduced_calls = 0
        self.tokens = {"q": [0, 0], "kv": [0, 0]}  # [tokens before, tokens after] summed over reduced calls

    def begin_call(self, info: CallInfo) -> None:
        sigma = float(info.sigma[0])
        with self._step_lock:
            if sigma != self._last_sigma:  # a new step; CFG halves run separately keep the step
                self.step += 1
                self._last_sigma = sigma
            step = self.step
        self.current = ReductionCall(sigma, step, info.grid)

    def ratios(self, block: int) -> tuple[float, float]:
        call: ReductionCall | None = self.current
        sigma = None if call is None else call.sigma
        if sigma is None or not self.window.contains(sigma):
            return 0.0, 0.0
        key = (block, sigma)
        if key not in self._ratios:
            t = self.template
            self._ratios[key] = t.schedule.ratios(block, sigma, self.window.sigma, t.strength)
        return self._ratios[key]

    def finish(self) -> None:
        self.cache.clear()  # the matchings can be large (GPU memory); the run's statistics stay
        logger.info("%s", self.summary())

    def summary(self) -> str:
        def pct(feat: str) -> str:
            before, after = self.tokens[feat]
            return f"{100.0 * (1 - after / before):.1f}%" if before else "0%"
        return (f"PARE token reduction ({self.template.schedule.name}, strength {self.template.strength:g}): "
                f"reduced {self.reduced_calls} of {self.calls} self-attention calls; queries -{pct('q')}, "
                f"keys/values -{pct('kv')} in those calls; matchings made {self.cache.made}, reused {self.cache.reused}")


@dataclass
class BlockCall:
    index: int
    seen: bool = False  # the block's first attention call (self-attention) has passed


class ReductionBlock(ChainedBlockPatch):
    """The ``double_block`` replace patch of one block: names the block for the attention override, chains on."""

    def __call__(self, args: dict, extra: dict) -> dict:
        topts = args["transformer_options"]
        if isinstance(topts.get(KEY), ReductionRun):
            args = {**args, "transformer_options": {**topts, BLOCK_KEY: BlockCall(self.index)}}
        return self.call_next(args, extra)


# ComfyUI attention functions whose kernels take no additive bias (``internals.MASKLESS_BACKENDS``, a seam): sageattn
# swallows ``attn_mask`` unused, and flash-attn refuses it (ComfyUI then falls back to SDPA with a warning on every
# call).


def backend_for(func: Callable, bias: torch.Tensor | None) -> Callable:
    """The user's attention function, or ComfyUI's SDPA one for a call with a proportional-attention bias that the
    user's backend cannot apply (reduced keys/values with ``proportional``; every other call keeps the backend)."""
    if bias is None or getattr(func, "__name__", "") not in internals.MASKLESS_BACKENDS:
        return func
    return internals.sdpa_attention()


class ReducedSelfAttention:
    """The attention override: reduced self-attention where the schedule asks for it, else the next in chain."""

    def __init__(self, prev: Callable | None) -> None:
        self.prev = prev

    def _next(self, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        return self.prev(func, *args, **kwargs) if self.prev is not None else func(*args, **kwargs)

    def __call__(self, func: Callable, *args, **kwargs) -> torch.Tensor:
        topts = kwargs.get("transformer_options") or {}
        call, run = topts.get(BLOCK_KEY), topts.get(KEY)
        if not isinstance(call, BlockCall) or not isinstance(run, ReductionRun) or call.seen:
            return self._next(func, args, kwargs)
        call.seen = True
        run.calls += 1
        q, k, v = args[:3]
        heads = kwargs["heads"] if "heads" in kwargs else args[3]
        q_ratio, kv_ratio = run.ratios(call.index)
        if q_ratio == 0.0 and kv_ratio == 0.0:
            return self._next(func, args, kwargs)
        grid, step = run.current.grid, run.current.step
        if (kwargs.get("skip_reshape") or not all(torch.is_tensor(t) for t in (q, k, v)) or q.ndim != 3
                or k.shape != q.shape or v.shape != q.shape or q.shape[1] != math.prod(grid)):
            # Extra tokens (newer releases may append context latents) or q/k/v handed over in another form.
            run.warn_once("shape", "PARE token reduction: block %d's self-attention has shape %s, not the token grid %s; "
                          "it runs unreduced", call.index, tuple(getattr(q, "shape", ())), grid)
            return self._next(func, args, kwargs)
        b, n = q.shape[:2]
        qh, kh, vh = (t.view(b, n, heads, -1).transpose(1, 2) for t in (q, k, v))
        sched = run.template.schedule
        rows = tuple(topts.get("cond_or_uncond", ()))
        q_red = kv_red = None
        if q_ratio > 0:
            q_red = Reduction(run.cache.get(call.index, "q", step, qh, grid, rows), q_ratio, sched.mode)
            run.tokens["q"][0] += n
            run.tokens["q"][1] += q_red.length
        if kv_ratio > 0:
            kv_red = Reduction(run.cache.get(call.index, "kv", step, vh, grid, rows), kv_ratio, sched.mode)
            run.tokens["kv"][0] += n
            run.tokens["kv"][1] += kv_red.length
        run.reduced_calls += 1
        base = {key: val for key, val in kwargs.items() if key not in ("heads", "mask")}

        def attend(q_, k_, v_, bias):
            kw = {**base, "heads": heads, "mask": bias, "skip_reshape": True, "skip_output_reshape": True}
            return self._next(backend_for(func, bias), (q_, k_, v_), kw)

        out = reduced_attention(qh, kh, vh, attend, q_red, kv_red, sched.proportional)
        return out.transpose(1, 2).reshape(b, n, -1)


def apply_token_reduction(model: ModelPatcher, template: ReductionTemplate, num_blocks: int) -> ModelPatcher:
    """A patched clone; replaces PARE token reduction already on ``model`` (idempotent), keeps other patches."""
    m = install(model, KEY, template, ReductionBlock, num_blocks, "PARE Token Reduction")
    topts = m.model_options["transformer_options"]
    prev = topts.get(OVERRIDE)
    if isinstance(prev, ReducedSelfAttention):
        prev = prev.prev
    topts[OVERRIDE] = ReducedSelfAttention(prev)
    return m
