"""Router-driven block skipping inside ComfyUI's own sampler (the runtime half of PARE's depth pruning).

How it hooks in (the lifecycle is nodes/hooks.py's, shared with token reduction):

* A fresh ``RoutingRun`` per sampling run, made from the template by the kit's ``OUTER_SAMPLE`` wrapper; the
  schedule range is mapped to sigmas with the sampled model's own ``percent_to_sigma`` (shift included, first
  run after a load too). One summary line per run.
* Per model call (the kit's ``DIFFUSION_MODEL`` wrapper): a call record (the call's sigmas and CFG branches, kept
  on the device), timed.
* A ``double_block`` replace patch per block: the patch of block 0 asks the decider once per model call
  (router on the patch-embedded tokens that block 0 receives, or the static schedule), on the device, and
  reads the decision to the host once; every block patch then looks it up and either calls the block,
  returns its input unchanged (the block's compute is never spent), or runs it on a subset of rows.

Host syncs: a call with no decision to make (every block runs, e.g. budget 1.0) reads nothing back; a
deciding call reads its run mask once. The call sigmas (for the report) and the CUDA-event timings are read
once per run, at its end. ``PARE_SYNC_TIMING=1`` times each call with a device synchronize instead.

CFG: cond and uncond are batched together. When their decisions differ for a block, ``cfg_disagreement``
decides: "subset" (default) runs the block only on the rows that need it and leaves the others unchanged;
"union" runs it on every row. One row's decision is never used for another.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from ..comfyui_pare.compute import model_block_macs
from ..comfyui_pare.pruned import PrunedWanMeta
from ..comfyui_pare.report import CallRecord, StepRecord, steps_from_calls, summary_lines
from ..comfyui_pare.router import BlockRouter, DecisionTensors, RoutingPolicy, decide
from ..comfyui_pare.schedule import SkipRange
from .comfy_compat import ModelPatcher
from .hooks import CallInfo, ChainedBlockPatch, HookRun, RunTemplate, SigmaWindow, install, log_summary

logger = logging.getLogger(__name__)

KEY = "pare_routing"  # transformer_options key and wrapper key
SYNC_TIMING = os.environ.get("PARE_SYNC_TIMING", "") == "1"


class Decider(Protocol):
    @property
    def needs_tokens(self) -> bool: ...

    def decide(self, run: "RoutingRun", call: "ModelCall", tokens: torch.Tensor | None,
               costs: list[float]) -> torch.Tensor | None:
        """Bool run mask [rows, blocks] on the call's device, or None when every block runs."""


@dataclass
class RouterDecider:
    router: BlockRouter
    policy: RoutingPolicy
    # Copies of the router on other devices: the loader's cached module itself is never moved.
    _on_device: dict[torch.device, BlockRouter] = field(default_factory=dict, repr=False)

    @property
    def needs_tokens(self) -> bool:
        return not self.policy.runs_everything

    def router_on(self, device: torch.device) -> BlockRouter:
        if next(self.router.parameters()).device == device:
            return self.router
        if device not in self._on_device:
            self._on_device[device] = copy.deepcopy(self.router).to(device)
        return self._on_device[device]

    def decide(self, run: "RoutingRun", call: "ModelCall", tokens: torch.Tensor | None,
               costs: list[float]) -> torch.Tensor | None:
        if self.policy.runs_everything:
            return None  # no router call, nothing to read back
        router = self.router_on(tokens.device)
        with torch.no_grad():
            text = call.context if router.spec.text_dim > 0 else None
            logits = router(call.timestep.to(tokens.device, torch.float32), tokens, text)
        prepared = run.cached(("decide", len(costs), tokens.shape[1]), tokens.device,
                              lambda: DecisionTensors.make(self.policy, costs, len(costs), tokens.device))
        return decide(logits, self.policy, prepared=prepared)


@dataclass
class ScheduleDecider:
    ranges: tuple[SkipRange, ...]

    needs_tokens = False

    def decide(self, run: "RoutingRun", call: "ModelCall", tokens: torch.Tensor | None,
               costs: list[float]) -> torch.Tensor | None:
        n, device = len(costs), call.sigma.device
        keep = torch.ones(call.rows, n, dtype=torch.bool, device=device)
        for k, rng in enumerate(self.ranges):
            high, low = run.percent_to_sigma(rng.start_percent), run.percent_to_sigma(rng.end_percent)
            blocks = run.cached(("blocks", k, n), device, lambda rng=rng: _block_mask(rng, n, device))
            hit = (call.sigma >= low) & (call.sigma <= high)  # on the device: no host read per call
            keep &= ~(hit[:, None] & blocks[None, :])
        return keep


def _block_mask(rng: SkipRange, n: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[rng.first_block:rng.last_block + 1] = True
    return mask.to(device)


@dataclass(eq=False)
class RoutingTemplate(RunTemplate):
    """What the Apply node configures; a fresh RoutingRun is made from it for every sampling run (shared by clones,
    with the last run kept for the report)."""

    decider: Decider
    meta: PrunedWanMeta
    start_percent: float = 0.0
    end_percent: float = 1.0
    cfg_disagreement: str = "subset"
    label: str = "PARE routing"
    last_run: "RoutingRun | None" = None  # the finished run the report node shows
    notes: tuple[str, ...] = ()  # what the report adds about the setting (e.g. budget-mode warnings)

    def start_run(self, model_sampling, schedule: list[float] | None = None) -> "RoutingRun":
        return RoutingRun(self, model_sampling.percent_to_sigma, schedule)


class CallTimer:
    """Wall time of one model call without a host sync: CUDA events on a GPU (read at the end of the run),
    ``perf_counter`` elsewhere. ``PARE_SYNC_TIMING=1``: synchronize and use ``perf_counter`` everywhere."""

    def __init__(self, device: torch.device):
        self._events = device.type == "cuda" and not SYNC_TIMING
        self._device = device
        if self._events:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        self._seconds: float | None = None

    def stop(self) -> None:
        if self._events:
            self._end.record()
        else:
            if SYNC_TIMING and self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
            self._seconds = time.perf_counter() - self._t0

    @property
    def seconds(self) -> float:
        if self._seconds is None:
            self._end.synchronize()  # once per run in practice: later events have completed too
            self._seconds = self._start.elapsed_time(self._end) / 1000.0
        return self._seconds


@dataclass
class ModelCall:
    sigma: torch.Tensor  # [rows], float64 where the device has it; stays on the device until the run ends
    branches: list[int]  # cond_or_uncond, one per chunk of rows
    rows: int
    timestep: torch.Tensor | None
    context: torch.Tensor | None
    run_rows: list[tuple[bool, ...]] | None = None  # per block: does row r run it (None: no block patch ran)
    timer: CallTimer | None = None


class RoutingRun(HookRun):
    """Per-sampling-run state: the current model call (per thread) and the records of all calls."""

    def __init__(self, template: RoutingTemplate, percent_to_sigma: Callable[[float], float],
                 schedule: list[float] | None = None):
        super().__init__()
        self.template = template
        self.window = SigmaWindow(percent_to_sigma, template.start_percent, template.end_percent)
        self.schedule = schedule  # the sampler's sigmas (steps + 1), for grouping calls into steps
        self.calls: list[ModelCall] = []
        self._calls_lock = threading.Lock()
        self.block_calls = 0  # times an original block actually ran
        self.unrouted_calls = 0  # model calls in which no PARE block patch ran
        self._costs: dict[tuple[int, int], list[float]] = {}
        self._cache: dict[tuple, object] = {}
        self._records: list[CallRecord] | None = None

    def percent_to_sigma(self, percent: float) -> float:
        return self.window.sigma(percent)

    def cached(self, key: tuple, device: torch.device, make: Callable[[], object]):
        """A per-run constant on ``device`` (made once per run, so calls copy nothing from the host)."""
        full = (*key, device)
        if full not in self._cache:
            self._cache[full] = make()
        return self._cache[full]

    # -- per model call ----------------------------------------------------------------------------------
    # Under torch.compile these run eagerly and are never traced (compiler.disable): they are bookkeeping
    # and host-side decisions, and tracing them would guard on values that change every step.
    @torch.compiler.disable
    def begin_call(self, info: CallInfo) -> None:
        self.current = ModelCall(sigma=info.sigma, branches=info.branches, rows=info.rows, timestep=info.timestep,
                                 context=info.context, timer=CallTimer(info.sigma.device))

    @torch.compiler.disable
    def end_call(self) -> None:
        call = self.current
        self.current = None
        if call is None:
            return
        call.timer.stop()
        call.context = call.timestep = None  # keep no large tensors alive between steps
        if call.run_rows is None:
            # No PARE block patch ran: another node replaced the model's forward, so nothing was routed.
            self.unrouted_calls += 1
            self.warn_once("unrouted", "%s: a model call ran without PARE's block patches (another node replaced "
                           "the model's forward?), so it was not routed; apply PARE routing last",
                           self.template.label)
        with self._calls_lock:
            self.calls.append(call)

    def finish(self) -> None:
        if not self.calls:
            logger.warning("%s: no model call reached PARE's routing in this run (another node replaced the "
                           "model's forward?)", self.template.label)
        log_summary(self.template.label, self.summary())

    def costs(self, tokens: int, text_tokens: int) -> list[float]:
        key = (tokens, text_tokens)
        if key not in self._costs:
            self._costs[key] = [float(m.total) for m in model_block_macs(self.template.meta, tokens, max(1, text_tokens))]
        return self._costs[key]

    @torch.compiler.disable
    def decide(self, block_index: int, img: torch.Tensor) -> list[tuple[bool, ...]] | None:
        """The run mask of the current call, computed once (at the first patched block) and read once."""
        call = self.current
        if call is None:
            return None
        if call.run_rows is None:
            call.run_rows = self._decide(call, block_index, img)
        return call.run_rows

    def _decide(self, call: ModelCall, block_index: int, img: torch.Tensor) -> list[tuple[bool, ...]]:
        decider = self.template.decider
        costs = self.costs(img.shape[1], call.context.shape[1] if call.context is not None else 1)
        everything = [(True,) * call.rows for _ in costs]
        if block_index != 0 and decider.needs_tokens:
            # The router reads block 0's input (the patch-embedded latent); without it, run everything.
            self.warn_once("block0", "%s: another node replaced PARE's patch on block 0, so the router cannot "
                           "see the latent and every block runs; apply PARE routing last", self.template.label)
            return everything
        if self.window.empty:
            return everything
        mask = decider.decide(self, call, img if decider.needs_tokens else None, costs)
        if mask is None:
            return everything
        if not self.window.whole:
            mask = mask | ~self.window.active(call.sigma)[:, None]  # outside the active range every block runs
        return [tuple(col) for col in mask.t().tolist()]  # the one host read of this call

    def row_index(self, keep: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return self.cached(("rows", keep), device, lambda: torch.tensor(keep, device=device))

    # -- records -----------------------------------------------------------------------------------------
    def call_records(self) -> list[CallRecord]:
        """The routed calls with host sigmas (all read in one transfer, once per run)."""
        if self._records is None:
            routed = [c for c in self.calls if c.run_rows is not None]
            sigmas: list[float] = []
            if routed:
                try:
                    sigmas = torch.stack([c.sigma[0] for c in routed]).tolist()
                except RuntimeError:  # calls on different devices
                    sigmas = [float(c.sigma[0]) for c in routed]
            self._records = [CallRecord(sigma=s, branches=tuple(c.branches), ran=np.asarray(c.run_rows).T)
                             for s, c in zip(sigmas, routed)]
        return self._records

    def step_records(self) -> list[StepRecord]:
        """Calls grouped into sampler steps, per CFG branch (second-order samplers: 2 evaluations a step)."""
        return steps_from_calls(self.call_records(), self.schedule)

    def wall_seconds(self) -> float:
        return sum(c.timer.seconds for c in self.calls)

    def summary(self) -> list[str]:
        tokens_costs = next(iter(self._costs.values()), None) or [1.0] * self.template.meta.num_blocks
        return summary_lines(self.step_records(), tokens_costs, self.wall_seconds(), len(self.calls),
                             unrouted_calls=self.unrouted_calls)


class RoutedBlock(ChainedBlockPatch):
    """The ``double_block`` replace patch of one block; chains to the patch that was there before (``call_next``)."""

    # torch.compile (TorchCompileModel, per-block compile): this frame runs eagerly, so the decision is
    # never traced into a graph (no guard on it, no recompile when it changes); the block it calls is still
    # compiled, as its own frame (recursive=False).
    @torch.compiler.disable(recursive=False)
    def __call__(self, args: dict, extra: dict) -> dict:
        run = args["transformer_options"].get(KEY)
        if not isinstance(run, RoutingRun):
            return self.call_next(args, extra)
        rows = run.decide(self.index, args["img"])
        if rows is None:
            return self.call_next(args, extra)
        mine = rows[self.index]
        if all(mine) or (any(mine) and run.template.cfg_disagreement == "union"):
            run.block_calls += 1
            return self.call_next(args, extra)
        if not any(mine):
            return {"img": args["img"]}
        run.block_calls += 1
        return self._run_subset(args, extra, tuple(r for r, on in enumerate(mine) if on), run)

    def _run_subset(self, args: dict, extra: dict, keep: tuple[int, ...], run: RoutingRun) -> dict:
        """Run the block on some rows of the batch; the other rows pass through unchanged."""
        img = args["img"]
        b = img.shape[0]
        start, stop = keep[0], keep[-1] + 1
        if stop - start == len(keep):  # contiguous rows (cond or uncond of a CFG batch): views, no index
            def rows(t):
                return t[start:stop] if torch.is_tensor(t) and t.ndim > 0 and t.shape[0] == b else t
        else:
            idx = run.row_index(keep, img.device)

            def rows(t):
                return t.index_select(0, idx) if torch.is_tensor(t) and t.ndim > 0 and t.shape[0] == b else t

        sub = {k: (rows(v) if k in ("img", "txt", "vec", "pe") else v) for k, v in args.items()}
        out = self.call_next(sub, extra)["img"]
        if stop - start == len(keep):
            return {"img": torch.cat([img[:start], out, img[stop:]])}
        return {"img": img.index_copy(0, run.row_index(keep, img.device), out)}


def apply_routing(model: ModelPatcher, template: RoutingTemplate, node: str) -> ModelPatcher:
    """A patched clone; replaces any PARE routing already on ``model`` (idempotent) and keeps other patches."""
    return install(model, KEY, template, RoutedBlock, template.meta.num_blocks, node)


def routing_template(model: ModelPatcher) -> RoutingTemplate | None:
    t = model.model_options.get("transformer_options", {}).get(KEY)
    return t if isinstance(t, RoutingTemplate) else None
