"""Router health at the end of stage 2 (``comfyui_pare.router_health``): logged, reported, and a collapsed learned
router stops the stage before anything is exported (issue 28: the first toy router left training constant)."""

from __future__ import annotations

import logging

import torch

from comfyui_pare.router_health import RouterCollapsed, RouterHealth, health_from_logits

from .calibrate_router import schedule_batches

logger = logging.getLogger(__name__)

HEALTH_STEPS = 8


@torch.no_grad()
def check_health(cfg, stage, gated) -> RouterHealth:
    """The router's health on the first ``route.eval_samples`` samples, each noised at the same ``HEALTH_STEPS``
    sigmas of the flow schedule (inputs x steps). Raises RouterCollapsed for a learned router whose output is
    constant over these inputs, unless ``route.on_collapse`` is "warn" (a fixed or frozen router is constant on purpose
    and only logged)."""
    rc = cfg.route
    samples = stage.samples[:rc.eval_samples]
    batches = schedule_batches(gated.student, samples, HEALTH_STEPS, cfg.flow.shift, cfg.train.seed + 4_000_037)
    logits, pre = [], []
    for x, t, ctx, _ in batches:
        tokens = gated.student.patch_embed(x).float()
        text = ctx if gated.router.spec.text_dim else None
        logits.append(gated.router(t, tokens, text).cpu())
        pre.append(gated.router.hidden_preactivations(t, tokens, text).cpu())
    health = health_from_logits(torch.stack(logits), torch.cat(pre), gated.pinned.cpu())
    logger.info("%s", health.describe())
    if rc.learns_router and health.collapsed:
        message = (f"{cfg.train.output_dir}: stage 2 ended with a collapsed router: {health.describe()}. "
                   "Its decisions do not depend on the step or the input, so it is a static schedule; "
                   "lower route.router_learning_rate, keep route.layer_norm on, or train a static "
                   "schedule on purpose (route.fixed_schedule)")
        if rc.on_collapse == "fail":
            raise RouterCollapsed(message)
        logger.warning("%s (route.on_collapse = 'warn': exported anyway)", message)
    return health
