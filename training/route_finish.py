"""Stage-2 finishing: the router's default threshold, the two files the nodes load, their budget calibration and the
run's report.

Above ``route_eval`` (what stage 2 is judged by), ``calibrate_router`` (budget calibration) and below ``route`` (which
finishes its own run) and ``export`` (which rebuilds a run from a checkpoint and finishes it), so the imports among
them run one way.

The router is bound to the student it was trained with: its ``model_fingerprint`` is the student's
``PrunedWanMeta.fingerprint()``, so ``PAREApplyRouter`` warns when it is put on another model. Both files are
written atomically and read back through the same validators the nodes use before this returns.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

from comfyui_pare.errors import PareFormatError
from comfyui_pare.pruned import save_checkpoint
from comfyui_pare.router import BlockRouter, RoutingPolicy, read_router_spec, save_router
from comfyui_pare.wan_reader import load_checkpoint

from .calibrate_router import export_calibration
from .gates import compute_fraction
from .model import WanTransformer
from .parallel import resolve_strategy
from .route_eval import calibrate_threshold, eval_batches, velocity_errors
from .routed import GatedWan, RoutedVelocity
from .router_check import check_health

logger = logging.getLogger(__name__)


def export_student_and_router(student: WanTransformer, router: BlockRouter, student_out: str | os.PathLike,
                              router_out: str | os.PathLike, default_threshold: float,
                              train_budget: float | None, dtype: torch.dtype = torch.float32) -> None:
    """Write ``student`` (weights in ``dtype``) and ``router`` (float32) with the router's trained defaults."""
    meta = student.meta
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in student.state_dict().items()}
    save_checkpoint(student_out, sd, meta)
    spec = dataclasses.replace(router.spec, model_fingerprint=meta.fingerprint(),
                               default_threshold=float(default_threshold), train_budget=train_budget)
    out = BlockRouter(spec)
    out.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in router.state_dict().items()})
    save_router(router_out, out)
    # Read both back as the nodes will, so a file that would not load is never left as the result.
    _, written = load_checkpoint(student_out)
    written_spec = read_router_spec(router_out)
    if written_spec.model_fingerprint != written.fingerprint():
        raise PareFormatError(f"{router_out}: router fingerprint {written_spec.model_fingerprint} does not match "
                              f"{student_out} ({written.fingerprint()})")
    logger.info("exported student %s (fingerprint %s) and router %s (default threshold %.4g, budget %s)",
                student_out, written.fingerprint(), router_out, default_threshold, train_budget)


def local_gated(stage, state: dict[str, torch.Tensor]):
    """A plain (unwrapped, unsharded) copy of the trained student + router from a full state dict."""
    device = stage.info.device
    part = {name: {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            for name in ("student", "router")}
    student = WanTransformer.from_state_dict(part["student"], stage.gated.student.meta, device=device)
    router = BlockRouter(stage.gated.router.spec).to(device)
    router.load_state_dict(part["router"])
    return GatedWan(student, router.eval(), stage.gated.pinned.cpu()).to(device).eval()


@torch.no_grad()
def finish_run(cfg, stage, state: dict[str, torch.Tensor], student_out: Path, router_out: Path) -> dict:
    """Calibrate the default threshold, export both files, measure budget error and velocity errors (rank 0)."""
    rc, seed = cfg.route, cfg.train.seed
    gated = local_gated(stage, state)
    student, router, pinned, costs = gated.student, gated.router, gated.pinned, stage.costs.cpu()
    health = check_health(cfg, stage, gated)  # a collapsed learned router stops here, before the export
    calib, held_out = eval_batches(stage, seed + 2_000_003), eval_batches(stage, seed + 3_000_017)
    logits = torch.cat([gated.logits(t, student.patch_embed(x).float(), ctx).cpu() for x, t, ctx, _ in calib])
    # A fixed or frozen router's decisions are the ones the student trained under: keep them (logit > 0).
    threshold = calibrate_threshold(logits, costs, pinned, rc.budget) if rc.learns_router else 0.5
    export_dtype = torch.bfloat16 if cfg.model.export_dtype == "bfloat16" else torch.float32
    export_student_and_router(student, router, student_out, router_out, threshold, rc.budget, export_dtype)
    fsdp = resolve_strategy(cfg.train.strategy, stage.info) == "fsdp"  # the teacher is sharded: no velocity errors
    budget_part = export_calibration(cfg, stage, gated, logits, held_out, router_out,
                                     measure_quality=not fsdp)

    policy = RoutingPolicy(threshold=threshold, pin_first=rc.pin_first, pin_last=rc.pin_last)
    routed = RoutedVelocity(student, router, policy)
    for x, t, ctx, clip in held_out:
        routed(x, t, ctx, clip)
    executed = float(compute_fraction(torch.cat(routed.masks).float(), costs))
    report = {"budget": rc.budget, "default_threshold": threshold, "executed_fraction": executed,
              "budget_error": executed - rc.budget, "held_out_inputs": sum(b[0].shape[0] for b in held_out),
              "student": str(student_out), "router": str(router_out), "budget_calibration": budget_part,
              "router_health": health.to_json()}
    logger.info("router: default threshold %.4g, held-out compute %.4f (budget %.4f)", threshold, executed, rc.budget)
    if fsdp:
        logger.info("velocity errors are not measured under FSDP (the teacher is sharded); run export instead")
        return report
    report["velocity_error"] = velocity_errors(cfg, stage, gated, routed, held_out, executed)
    return report
