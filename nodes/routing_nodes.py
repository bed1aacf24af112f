"""Nodes for PARE's depth half: load a router, apply it (or a static schedule) to a model, report."""

from __future__ import annotations

import logging

import folder_paths
import torch
from comfy_api.latest import io

from ..comfyui_pare.errors import PareError
from ..comfyui_pare.report import heatmap
from ..comfyui_pare.router import BlockRouter, RoutingPolicy, check_router_fits, load_router
from ..comfyui_pare.schedule import parse_schedule
from .folders import ROUTERS, file_fingerprint
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
            inputs=[io.Combo.Input("router_name", options=folder_paths.get_filename_list(ROUTERS),
                                   tooltip="A PARE router file in models/pare_routers, trained for the model you route.")],
            outputs=[PareRouter.Output(tooltip="The router, for PARE Apply Router.")],
        )

    @classmethod
    def fingerprint_inputs(cls, router_name: str) -> str:
        return file_fingerprint(ROUTERS, router_name)  # reload when a new router is exported under the same name

    @classmethod
    def execute(cls, router_name: str) -> io.NodeOutput:
        router = load_router(folder_paths.get_full_path_or_raise(ROUTERS, router_name))
        router.pare_name = router_name
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
                                       "'budget': spend a fixed fraction of the block compute per step. "
                                       "'threshold': run each block whose router probability exceeds the "
                                       "threshold, so the compute follows the router."),
                io.Float.Input("budget", default=0.75, min=0.0, max=1.0, step=0.01,
                               tooltip="mode 'budget': fraction of the block compute to spend per step; the router "
                                       "keeps its highest-scoring blocks within it. 1.0 runs every block. The same "
                                       "share at every step is not how the router was trained: on the toy world "
                                       "it lost the motion that mode 'trained' keeps."),
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
        meta = model_meta(model)
        name = getattr(router, "pare_name", "router")
        check_router_fits(router.spec, meta.num_blocks, meta.dims.dim, meta.fingerprint(), source=name,
                          text_dim=meta.dims.text_dim if router.spec.text_dim else None)
        if mode not in ROUTE_MODES:
            raise PareError(f"PARE Apply Router: mode must be one of {ROUTE_MODES}, got {mode!r}")
        by_threshold = mode != "budget"
        if mode == "trained":  # the router file's defaults, written by `python -m training route` / `export`
            threshold = router.spec.default_threshold
        policy = RoutingPolicy(budget=budget, threshold=threshold if by_threshold else None,
                               pin_first=pin_first, pin_last=pin_last)
        _check_range(start_percent, end_percent, cfg_disagreement)
        label = f"PARE router {name} ({mode} {threshold if by_threshold else budget:g})"
        if mode == "trained" and router.spec.train_budget is not None:
            label = f"PARE router {name} (trained threshold {threshold:g}, budget {router.spec.train_budget:g})"
        template = RoutingTemplate(RouterDecider(router, policy), meta, start_percent, end_percent,
                                   cfg_disagreement, label)
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
        summary = "\n".join(run.summary() if run is not None else
                            ["PARE routing: no sampling run recorded yet for this model"])
        image = torch.from_numpy(heatmap(steps, template.meta.num_blocks).copy()).float().div(255.0).unsqueeze(0)
        return io.NodeOutput(image, summary)


def _check_range(start: float, end: float, cfg_disagreement: str) -> None:
    if not 0.0 <= start <= end <= 1.0:
        raise PareError(f"start_percent {start} and end_percent {end} must satisfy 0 <= start <= end <= 1")
    if cfg_disagreement not in CFG_MODES:
        raise PareError(f"cfg_disagreement must be one of {CFG_MODES}, got {cfg_disagreement!r}")
