"""Router-driven block skipping inside ComfyUI's own sampler (the runtime half of PARE's depth pruning).

How it hooks in (ComfyUI 0.3.75, the EasyCache pattern):

* ``OUTER_SAMPLE`` wrapper, once per sampling run: clones the routing template into a fresh per-run state
  (so runs never share state), maps the active schedule range to sigmas with the model's own
  ``percent_to_sigma``, and logs one summary line in ``finally``.
* ``DIFFUSION_MODEL`` wrapper, once per model call: opens a call record (timestep, sigmas, CFG branches)
  and times the call.
* A ``double_block`` replace patch per block: the patch of block 0 asks the decider once per model call
  (router on the patch-embedded tokens that block 0 receives, or the static schedule) and reads the
  decision to the host once; every block patch then looks it up (no sync, no allocation) and either calls
  the block, returns its input unchanged (the block's compute is never spent), or runs it on a subset of rows.

CFG: cond and uncond are batched together. When their decisions differ for a block, ``cfg_disagreement``
decides: "subset" (default) runs the block only on the rows that need it and leaves the others unchanged;
"union" runs it on every row. One row's decision is never used for another.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import comfy.model_patcher
import comfy.patcher_extension as pe
import numpy as np
import torch

from ..comfyui_pare.compute import model_block_macs
from ..comfyui_pare.pruned import PrunedWanMeta
from ..comfyui_pare.report import StepRecord, summary_lines
from ..comfyui_pare.router import BlockRouter, RoutingPolicy, decide
from ..comfyui_pare.schedule import SkipRange

logger = logging.getLogger(__name__)

KEY = "pare_routing"  # transformer_options key and wrapper key


class Decider(Protocol):
    needs_tokens: bool

    def decide(self, run: "RoutingRun", call: "ModelCall", tokens: torch.Tensor | None,
               costs: list[float]) -> torch.Tensor: ...


@dataclass
class RouterDecider:
    router: BlockRouter
    policy: RoutingPolicy
    _device_router: BlockRouter | None = None

    needs_tokens = True

    def decide(self, run: "RoutingRun", call: "ModelCall", tokens: torch.Tensor | None,
               costs: list[float]) -> torch.Tensor:
        router = self._device_router
        if router is None or next(router.parameters()).device != tokens.device:
            router = self._device_router = self.router.to(tokens.device)
        with torch.no_grad():
            text = call.context if router.spec.text_dim > 0 else None
            logits = router(call.timestep.to(tokens.device, torch.float32), tokens, text)
        return decide(logits, self.policy, costs)


@dataclass
class ScheduleDecider:
    ranges: tuple[SkipRange, ...]

    needs_tokens = False

    def decide(self, run: "RoutingRun", call: "ModelCall", tokens: torch.Tensor | None,
               costs: list[float]) -> torch.Tensor:
        mask = torch.ones(call.rows, len(costs), dtype=torch.bool)
        for rng in self.ranges:
            high, low = (run.percent_to_sigma(p) for p in (rng.start_percent, rng.end_percent))
            for r, sigma in enumerate(call.sigmas):
                if low <= sigma <= high:
                    mask[r, rng.first_block:rng.last_block + 1] = False
        return mask


@dataclass(eq=False)
class RoutingTemplate:
    """What the Apply node configures; a fresh RoutingRun is made from it for every sampling run.

    ModelPatcher.clone() deep-copies model_options; the template is configuration plus the slot where the
    last run is kept for the report, so every clone of a routed model shares it (``__deepcopy__``).
    """

    decider: Decider
    meta: PrunedWanMeta
    start_percent: float = 0.0
    end_percent: float = 1.0
    cfg_disagreement: str = "subset"
    label: str = "PARE routing"
    last_run: "RoutingRun | None" = None  # the finished run the report node shows

    def __deepcopy__(self, memo) -> "RoutingTemplate":
        return self

    def start_run(self, model_sampling) -> "RoutingRun":
        return RoutingRun(self, model_sampling.percent_to_sigma)


@dataclass
class ModelCall:
    timestep: torch.Tensor
    sigmas: list[float]
    branches: list[int]  # cond_or_uncond, one per chunk of rows
    rows: int
    context: torch.Tensor | None
    run_rows: list[tuple[bool, ...]] | None = None  # per block: does row r run it
    seconds: float = 0.0


class RoutingRun:
    """Per-sampling-run state: the current model call and the records of all calls."""

    def __init__(self, template: RoutingTemplate, percent_to_sigma: Callable[[float], float]):
        self.template = template
        self.percent_to_sigma = percent_to_sigma  # the sampled model's own mapping (shift included)
        self.sigma_high = percent_to_sigma(template.start_percent)
        self.sigma_low = percent_to_sigma(template.end_percent)
        self.calls: list[ModelCall] = []
        self.current: ModelCall | None = None
        self.block_calls = 0  # times an original block actually ran
        self._costs: dict[tuple[int, int], list[float]] = {}
        self._warned = False

    # -- per model call ----------------------------------------------------------------------------------
    def begin_call(self, x, timestep, context, transformer_options) -> None:
        sigmas = transformer_options.get("sigmas")
        sig = sigmas.detach().float().cpu().tolist() if sigmas is not None else (timestep.float() / 1000).cpu().tolist()
        rows = x.shape[0]
        if len(sig) != rows:
            sig = (sig * rows)[:rows]
        branches = list(transformer_options.get("cond_or_uncond", [0]))
        self.current = ModelCall(timestep=timestep, sigmas=sig, branches=branches, rows=rows, context=context)

    def end_call(self, seconds: float) -> None:
        call = self.current
        if call is not None:
            call.seconds = seconds
            if call.run_rows is None:  # no block patch decided (e.g. block 0's patch was replaced): all ran
                call.run_rows = [(True,) * call.rows for _ in range(self.template.meta.dims.num_layers)]
            call.context = call.timestep = None  # keep no tensors alive between steps
            self.calls.append(call)
        self.current = None

    def costs(self, tokens: int, text_tokens: int) -> list[float]:
        key = (tokens, text_tokens)
        if key not in self._costs:
            self._costs[key] = [float(m.total) for m in model_block_macs(self.template.meta, tokens, max(1, text_tokens))]
        return self._costs[key]

    def decide(self, block_index: int, img: torch.Tensor) -> list[tuple[bool, ...]] | None:
        """The run mask of the current call, computed once (at block 0) and read to the host once."""
        call = self.current
        if call is None:
            return None
        if call.run_rows is None:
            decider = self.template.decider
            costs = self.costs(img.shape[1], call.context.shape[1] if call.context is not None else 1)
            active = torch.tensor([self.sigma_low <= s <= self.sigma_high for s in call.sigmas])
            if block_index != 0 and decider.needs_tokens:
                # The router reads block 0's input (the patch-embedded latent); without it, run everything.
                if not self._warned:
                    self._warned = True
                    logger.warning("%s: another node replaced PARE's patch on block 0, so the router cannot see "
                                   "the latent and every block runs; apply PARE routing last", self.template.label)
                active[:] = False
            if active.any():
                mask = decider.decide(self, call, img if decider.needs_tokens else None, costs).cpu()
                mask = mask | ~active[:, None]  # outside the active range every block runs
            else:
                mask = torch.ones(call.rows, len(costs), dtype=torch.bool)
            call.run_rows = [tuple(col) for col in mask.t().tolist()]
        return call.run_rows

    # -- records -----------------------------------------------------------------------------------------
    def step_records(self) -> list[StepRecord]:
        """Calls grouped into steps (consecutive calls at the same sigma), per CFG branch."""
        steps: list[tuple[float, dict[int, list[np.ndarray]]]] = []
        for call in self.calls:
            sigma = call.sigmas[0] if call.sigmas else 0.0
            if not steps or abs(steps[-1][0] - sigma) > 1e-9 * max(1.0, abs(sigma)):
                steps.append((sigma, {}))
            mask = np.asarray(call.run_rows, dtype=np.float64).T  # [rows, blocks]
            per = call.rows // max(1, len(call.branches))
            for j, branch in enumerate(call.branches):
                steps[-1][1].setdefault(branch, []).append(mask[j * per:(j + 1) * per])
        out = []
        for sigma, by_branch in steps:
            branches = tuple(sorted(by_branch))
            ran = np.stack([np.concatenate(by_branch[b]).mean(axis=0) for b in branches])
            out.append(StepRecord(sigma=sigma, branches=branches, ran=ran))
        return out

    def summary(self) -> list[str]:
        tokens_costs = next(iter(self._costs.values()), None) or [1.0] * self.template.meta.dims.num_layers
        return summary_lines(self.step_records(), tokens_costs, sum(c.seconds for c in self.calls), len(self.calls))


class RoutedBlock:
    """The ``double_block`` replace patch of one block; chains to the patch that was there before."""

    def __init__(self, index: int, inner: Callable | None):
        self.index = index
        self.inner = inner

    def _run(self, args: dict, extra: dict) -> dict:
        return self.inner(args, extra) if self.inner is not None else extra["original_block"](args)

    def __call__(self, args: dict, extra: dict) -> dict:
        run = args["transformer_options"].get(KEY)
        if not isinstance(run, RoutingRun):
            return self._run(args, extra)
        rows = run.decide(self.index, args["img"])
        if rows is None:
            return self._run(args, extra)
        mine = rows[self.index]
        if all(mine) or (any(mine) and run.template.cfg_disagreement == "union"):
            run.block_calls += 1
            return self._run(args, extra)
        if not any(mine):
            return {"img": args["img"]}
        run.block_calls += 1
        return self._run_subset(args, extra, [r for r, on in enumerate(mine) if on])

    def _run_subset(self, args: dict, extra: dict, keep: list[int]) -> dict:
        """Run the block on some rows of the batch; the other rows pass through unchanged."""
        img = args["img"]
        idx = torch.tensor(keep, device=img.device)
        b = img.shape[0]

        def rows(t):
            return t.index_select(0, idx) if torch.is_tensor(t) and t.ndim > 0 and t.shape[0] == b else t

        sub = {k: (rows(v) if k in ("img", "txt", "vec", "pe") else v) for k, v in args.items()}
        out = self._run(sub, extra)["img"]
        return {"img": img.index_copy(0, idx, out)}


# -- wrappers -----------------------------------------------------------------------------------------------

def _outer_sample(executor, *args, **kwargs):
    guider = executor.class_obj
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    topts = guider.model_options["transformer_options"]
    template: RoutingTemplate = topts[KEY]
    run = template.start_run(guider.model_patcher.model.model_sampling)
    topts[KEY] = run
    try:
        return executor(*args, **kwargs)
    finally:
        template.last_run = run
        lines = run.summary()
        logger.info("%s: %s", template.label, "; ".join(lines[1:3] + lines[-1:]) if len(lines) > 2 else lines[0])
        guider.model_options = original


def _diffusion_model(executor, x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs):
    run = transformer_options.get(KEY)
    if not isinstance(run, RoutingRun):
        return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)
    run.begin_call(x, timestep, context, transformer_options)
    start = time.perf_counter()
    try:
        out = executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)  # honest wall time (once per call, not per block)
        return out
    finally:
        run.end_call(time.perf_counter() - start)


def apply_routing(model: comfy.model_patcher.ModelPatcher, template: RoutingTemplate) -> comfy.model_patcher.ModelPatcher:
    """A patched clone; replaces any PARE routing already on ``model`` (idempotent) and keeps other patches."""
    m = model.clone()
    m.model_options["transformer_options"][KEY] = template
    dit = m.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for i in range(template.meta.dims.num_layers):
        inner = dit.get(("double_block", i))
        if isinstance(inner, RoutedBlock):
            inner = inner.inner
        m.set_model_patch_replace(RoutedBlock(i, inner), "dit", "double_block", i)
    for wrapper_type, fn in ((pe.WrappersMP.OUTER_SAMPLE, _outer_sample),
                             (pe.WrappersMP.DIFFUSION_MODEL, _diffusion_model)):
        m.remove_wrappers_with_key(wrapper_type, KEY)
        m.add_wrapper_with_key(wrapper_type, KEY, fn)
    return m


def routing_template(model: comfy.model_patcher.ModelPatcher) -> RoutingTemplate | None:
    t = model.model_options.get("transformer_options", {}).get(KEY)
    return t if isinstance(t, RoutingTemplate) else None

