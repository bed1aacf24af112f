"""Nodes for PARE's depth half: load a router, apply it (or a static schedule) to a model, report."""

from __future__ import annotations

import logging

import torch

from ..comfyui_pare.errors import PareError
from ..comfyui_pare.report import heatmap
from ..comfyui_pare.router import BlockRouter, RoutingPolicy, check_router_fits, load_router
from ..comfyui_pare.router_budget import BudgetCalibration, read_budget_calibration
from ..comfyui_pare.schedule import parse_schedule
from .comfy_compat import internals, io, require
from .folders import ROUTERS, file_fingerprint
from .hooks import check_percent_range
from .model_info import model_meta
from .routing import RouterDecider, RoutingTemplate, ScheduleDecider, apply_routing, routing_template

logger = logging.getLogger(__name__)

PareRouter = io.Custom("PARE_ROUTER")
CFG_MODES = ["subset", "union"]
ROUTE_MODES = ["trained", "budget", "threshold"]
# Expert knobs are optional inputs with defaults (ComfyUI 0.3.75's V3 inputs have no advanced= flag yet).
ADVANCED = {"optional": True}
CFG_TOOLTIP = ("Under CFG, cond and uncond are batched. When their decisions differ for a block: 'subset' runs the "
               "block only on the rows that need it (saves compute), 'union' runs it on all rows.")


def _range_inputs() -> list:
    return [
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, **ADVANCED,
                       tooltip="Where in the schedule routing starts (0 = first, noisiest step)."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, **ADVANCED,
                       tooltip="Where in the schedule routing ends (1 = last step). Outside the range every block runs."),
        io.Combo.Input("cfg_disagreement", options=CFG_MODES, default="subset", **ADVANCED, tooltip=CFG_TOOLTIP),
    ]


class PARELoadRouter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PARELoadRouter",
            display_name="PARE Load Router",
            category="PARE/routing",
            description="Loads a PARE block router (.safetensors) from models/pare_routers.",
            inputs=[io.Combo.Input("router_name", options=internals.filename_list(ROUTERS),
                                   tooltip="A PARE router file in models/pare_routers, trained for the model you route.")],
            outputs=[PareRouter.Output(tooltip="The router, for PARE Apply Router.")],
        )

    @classmethod
    def fingerprint_inputs(cls, router_name: str) -> str:
        return file_fingerprint(ROUTERS, router_name)  # reload when a new router is exported under the same name

    @classmethod
    def execute(cls, router_name: str) -> io.NodeOutput:
        require("PARE Load Router")
        path = internals.full_path_or_raise(ROUTERS, router_name)
        router = load_router(path)
        router.pare_name = router_name
        router.pare_budget = read_budget_calibration(path)  # None: the file has no budget calibration
        return io.NodeOutput(router)


class PAREApplyRouter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PAREApplyRouter",
            display_name="PARE Apply Router",
            category="PARE/routing",
            description=(
                "Skips transformer blocks per step and per sample, as the router decides from the timestep and "
                "the latent. Returns a patched copy of the model; the blocks it skips are never computed."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The Wan model to route (pruned or not)."),
                PareRouter.Input("router", tooltip="From PARE Load Router; must match the model's block count."),
                io.Combo.Input("mode", options=ROUTE_MODES, default="trained",
                               tooltip="'trained': the router's own threshold, set in training so it spends its "
                                       "training budget; the decisions are the ones the student was trained with. "
                                       "'budget': spend the budget's share of the block compute over the whole run "
                                       "(the router's calibrated threshold for it). "
                                       "'threshold': run each block whose router probability exceeds the "
                                       "threshold, so the compute follows the router."),
                io.Float.Input("budget", default=0.75, min=0.0, max=1.0, step=0.01,
                               tooltip="mode 'budget': share of the block compute to spend over the whole "
                                       "sampling run (1.0 runs every block). The router keeps its own preferences: "
                                       "steps and inputs it rates higher run more blocks, through the threshold "
                                       "calibrated for this budget and stored in the router file. Outside the "
                                       "budgets the file was validated for, or with a file without calibration "
                                       "(then the same share runs at every step), it warns in the log and the "
                                       "routing report."),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01, **ADVANCED,
                               tooltip="mode 'threshold': run a block when the router's probability exceeds this. "
                                       "Ignored in mode 'budget'."),
                io.Int.Input("pin_first", default=1, min=0, max=64, **ADVANCED,
                             tooltip="Number of first blocks that always run."),
                io.Int.Input("pin_last", default=1, min=0, max=64, **ADVANCED,
                             tooltip="Number of last blocks that always run."),
                *_range_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The routed model.")],
        )

    @classmethod
    def execute(cls, model, router: BlockRouter, mode: str, budget: float, threshold: float = 0.5, pin_first: int = 1,
                pin_last: int = 1, start_percent: float = 0.0, end_percent: float = 1.0,
                cfg_disagreement: str = "subset") -> io.NodeOutput:
        require("PARE Apply Router")
        meta = model_meta(model)
        name = getattr(router, "pare_name", "router")
        check_router_fits(router.spec, meta.num_blocks, meta.dims.dim, meta.fingerprint(), source=name,
                          text_dim=meta.dims.text_dim if router.spec.text_dim else None)
        if mode not in ROUTE_MODES:
            raise PareError(f"PARE Apply Router: mode must be one of {ROUTE_MODES}, got {mode!r}")
        notes: tuple[str, ...] = ()
        if mode == "budget":
            policy, label, notes = budget_policy(router, name, budget, pin_first, pin_last, meta.fingerprint())
        else:
            if mode == "trained":  # the router file's defaults, written by `python -m training route` / `export`
                threshold = router.spec.default_threshold
            policy = RoutingPolicy(budget=budget, threshold=threshold, pin_first=pin_first, pin_last=pin_last)
            label = f"PARE router {name} ({mode} {threshold:g})"
            if mode == "trained" and router.spec.train_budget is not None:
                label = f"PARE router {name} (trained threshold {threshold:g}, budget {router.spec.train_budget:g})"
        _check_range(start_percent, end_percent, cfg_disagreement)
        for note in notes:
            logger.warning("%s: %s", label, note)
        template = RoutingTemplate(RouterDecider(router, policy), meta, start_percent, end_percent,
                                   cfg_disagreement, label, notes=notes)
        return io.NodeOutput(apply_routing(model, template, "PARE Apply Router"))


class PAREStaticSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PAREStaticSchedule",
            display_name="PARE Static Block Schedule",
            category="PARE/routing",
            description=(
                "Skips fixed blocks over fixed parts of the schedule, without a router: the baseline a learned "
                "router should beat. Same machinery as PARE Apply Router."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The Wan model to patch."),
                io.String.Input("schedule", default="10-17@0.3-1.0", multiline=False,
                                tooltip="Blocks to skip and when: 'A-B@start-end', comma-separated; e.g. "
                                        "'10-17@0.3-1.0' skips blocks 10..17 from 30% to the end of sampling."),
                io.Combo.Input("cfg_disagreement", options=CFG_MODES, default="subset", **ADVANCED,
                               tooltip=CFG_TOOLTIP),
            ],
            outputs=[io.Model.Output(tooltip="The model with the schedule applied.")],
        )

    @classmethod
    def execute(cls, model, schedule: str, cfg_disagreement: str = "subset") -> io.NodeOutput:
        require("PARE Static Block Schedule")
        meta = model_meta(model)
        ranges = parse_schedule(schedule, meta.num_blocks)
        _check_range(0.0, 1.0, cfg_disagreement)
        template = RoutingTemplate(ScheduleDecider(ranges), meta, 0.0, 1.0, cfg_disagreement,
                                   f"PARE static schedule '{schedule}'")
        return io.NodeOutput(apply_routing(model, template, "PARE Static Block Schedule"))


class PARERoutingReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PARERoutingReport",
            display_name="PARE Routing Report",
            category="PARE/routing",
            description=(
                "After sampling, shows which blocks ran: a heat map of blocks (rows) x steps (columns, one per "
                "CFG branch: cond then uncond; green ran, dark skipped, amber ran for part of the batch) and a "
                "summary with the executed fraction, the estimated compute saved and the wall time."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The routed model that was sampled (output of a PARE routing node)."),
                io.Latent.Input("samples", tooltip="The sampled LATENT, so the report runs after sampling."),
            ],
            outputs=[
                io.Image.Output("heatmap", tooltip="Blocks x steps map of the last sampling run."),
                io.String.Output("summary", tooltip="Executed fraction, compute saved and wall time."),
            ],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, samples) -> io.NodeOutput:
        template = routing_template(model)
        if template is None:
            raise PareError("PARE Routing Report needs the model output of PARE Apply Router or PARE Static Block Schedule")
        run = template.last_run
        steps = run.step_records() if run is not None else []
        lines = run.summary() if run is not None else ["PARE routing: no sampling run recorded yet for this model"]
        summary = "\n".join([*lines, f"setting: {template.label}", *(f"warning: {n}" for n in template.notes)])
        image = torch.from_numpy(heatmap(steps, template.meta.num_blocks).copy()).float().div(255.0).unsqueeze(0)
        return io.NodeOutput(image, summary)


def budget_policy(router: BlockRouter, name: str, budget: float, pin_first: int, pin_last: int,
                  fingerprint: str) -> tuple[RoutingPolicy, str, tuple[str, ...]]:
    """Budget mode: (policy, label, warnings). With the router file's budget calibration the budget becomes the
    threshold calibrated to spend it over a whole run; without one, the old rule (the same share at every step)."""
    pins = dict(pin_first=pin_first, pin_last=pin_last)
    if budget >= 1.0:
        return RoutingPolicy(budget=1.0, **pins), f"PARE router {name} (budget 1: every block)", ()
    cal: BudgetCalibration | None = getattr(router, "pare_budget", None)
    if cal is None:
        note = (f"the router file has no budget calibration, so budget {budget:g} is spent at every step (the "
                "top-scoring blocks that fit), which is not how a router is trained and can lose quality; calibrate "
                "it with `python -m training calibrate-router` (or re-export it), or use mode 'trained'")
        return RoutingPolicy(budget=budget, **pins), f"PARE router {name} (budget {budget:g} per step)", (note,)
    threshold = cal.threshold_for(budget)
    label = f"PARE router {name} (budget {budget:g} over the run: calibrated threshold {threshold:.4g})"
    notes = []
    if not cal.is_validated(budget):
        clamped = ("" if cal.is_calibrated(budget) else f" (it is also outside the calibrated budgets "
                   f"{cal.budgets[0]:g}-{cal.budgets[-1]:g}, so the nearest calibrated threshold is used)")
        notes.append(f"budget {budget:g} is outside the budgets this router was validated for "
                     f"({cal.describe_validated()}){clamped}; there the compute spent or the quality was not confirmed")
    if (cal.pin_first, cal.pin_last) != (pin_first, pin_last):
        notes.append(f"the budget calibration assumed pin_first={cal.pin_first}, pin_last={cal.pin_last}; with "
                     f"{pin_first}/{pin_last} the compute spent differs from the budget")
    if cal.model_fingerprint and fingerprint and cal.model_fingerprint != fingerprint:
        notes.append(f"the budget calibration was made with model {cal.model_fingerprint}, this model is "
                     f"{fingerprint}; the compute spent may differ from the budget")
    return RoutingPolicy(threshold=threshold, **pins), label, tuple(notes)


def _check_range(start: float, end: float, cfg_disagreement: str) -> None:
    check_percent_range(start, end)
    if cfg_disagreement not in CFG_MODES:
        raise PareError(f"cfg_disagreement must be one of {CFG_MODES}, got {cfg_disagreement!r}")
