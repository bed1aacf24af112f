"""``python -m training route --config cfg.toml [--resume latest]``: stage 2, the stage-1 student and a block router
trained together under a compute budget.

loss = distillation + budget_weight * (expected executed compute fraction - budget)^2

* Distillation as in stage 1 (``training.distill``, the shared part in ``training.stage_common``): the same calibration samples, Wan's shifted flow-matching
  sigmas, noise from the run's generator, SD3 loss weighting; the student runs gated: every block's output is
  x + g (B(x) - x) with straight-through hard gates on sigmoid((logit + noise) / tau) (``training.gates``).
* The router (``comfyui_pare.router.BlockRouter``) reads what the nodes feed it at inference: Wan's timestep
  embedding, mean/std of the patch-embedded tokens, optionally the mean text context.
* Compute: each block's real MACs (``comfyui_pare.compute``) at the samples' token count; pinned blocks (the
  node's ``pin_first``/``pin_last``) always run. Under torchrun the budget term uses the global batch's fraction.
* Separate learning rates: ``train.learning_rate`` for the student, ``route.router_learning_rate`` for the router.

At the end, on held-out noised inputs: the router's default threshold is calibrated to spend the budget, the
budget error and the velocity errors (router vs the best static contiguous skip of the same compute from the
calibration stats) go to ``route_report.json``, and ``student.safetensors`` + ``router.safetensors`` are written
(the same code as ``python -m training export``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from comfyui_pare.router import BlockRouter, load_router
from comfyui_pare.safetensors_io import atomic_write_text
from comfyui_pare.schedule import parse_schedule

from .config import ConfigError, InputPath, load_config
from .gates import budget_penalty, compute_fraction, expected_compute_fraction, logistic_noise, normalized_costs
from .loop import TrainConfig, Trainer, set_determinism
from .parallel import barrier, checkpoint_activations, full_state_dict, shutdown, wrap_trainable
from .resources import set_phase, write_report
from .route_eval import best_contiguous_skip, student_contribution
from .route_finish import finish_run
from .routed import GatedWan, block_costs, initial_bias, pin_mask, router_spec_for
from .sharded import TensorRows
from .stage_common import (
    DataConfig,
    FlowConfig,
    ModelConfig,
    Stage,
    load_inputs,
    loss_weights,
    student_sources,
    tokens_of,
)

logger = logging.getLogger(__name__)

HELP = "stage 2: train the stage-1 student and a block router together under a compute budget (resumable, torchrun)"


@dataclass
class RouteSection:
    """The ``[route]`` table."""

    budget: float = 0.5  # share of the block compute to spend, pinned blocks included
    budget_weight: float = 10.0  # lambda of the budget term
    tau: float = 1.0  # gate temperature
    gate_noise: bool = True  # logistic noise on the logits while training ...
    gate_noise_final: float = 0.0  # ... its scale falls linearly from 1 to this at the last step, so the student
    # ends up trained on the router's deterministic decisions (the ones inference makes)
    # The student uses train.learning_rate. Issue 28: at 0.03 on unnormalised features every hidden unit of the toy
    # router died within 200 steps (a constant router); with LayerNorm at 1e-3, 90 of 128 stayed alive.
    router_learning_rate: float = 1e-3
    hidden: int = 128  # router MLP width
    text_input: bool = True  # feed the router the mean text context: the content signal that transfers to new prompts
    layer_norm: bool = True  # normalise the pooled latent and text features (router format 2)
    pin_first: int = 1  # blocks that always run (match PARE Apply Router's pin_first / pin_last)
    pin_last: int = 1
    stats: InputPath | None = None  # `calibrate` stats: seeds the router bias, picks the static baseline
    init_spread: float = 1.0  # how far calibration contributions spread the initial logits
    eval_samples: int = 8  # held-out evaluation: samples ...
    eval_sigmas: int = 4  # ... x sigmas each (fixed noise, never the training generator)
    # Ablation: "" learns the router; "auto" trains the student under the best contiguous skip from `stats` at the
    # budget, "A-B" under skipping blocks A..B; the router file then holds that fixed schedule.
    fixed_schedule: str = ""
    # Hard-gate phase: a router file from an earlier `route` run for this student, frozen; the student trains under
    # its deterministic decisions at its default threshold (no gate noise, no budget term), so it is trained for
    # exactly the schedule inference runs. The exported router makes the same decisions.
    frozen_router: InputPath | None = None
    # A learned router whose output ends up constant over the held-out inputs: "fail" stops the stage before export
    # (issue 28); "warn" logs it and exports anyway (smoke tests of the plumbing, a few steps from initialisation).
    on_collapse: str = "fail"

    def validate(self) -> None:
        checks = [("budget", 0.0 < self.budget <= 1.0), ("budget_weight", self.budget_weight >= 0),
                  ("tau", self.tau > 0), ("gate_noise_final", self.gate_noise_final >= 0),
                  ("router_learning_rate", self.router_learning_rate > 0),
                  ("hidden", self.hidden >= 1), ("pin_first", self.pin_first >= 0), ("pin_last", self.pin_last >= 0),
                  ("eval_samples", self.eval_samples >= 1), ("eval_sigmas", self.eval_sigmas >= 1)]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"config field 'route.{name}': value {getattr(self, name)!r} is out of range")
        if self.fixed_schedule == "auto" and self.stats is None:
            raise ConfigError("config field 'route.fixed_schedule': 'auto' needs route.stats (calibration stats)")
        if self.fixed_schedule not in ("", "auto"):
            parse_schedule(self.fixed_schedule)  # raises naming the entry at fault
        if self.on_collapse not in ("fail", "warn"):
            raise ConfigError(f"config field 'route.on_collapse': {self.on_collapse!r} is not 'fail' or 'warn'")
        if self.fixed_schedule and self.frozen_router is not None:
            raise ConfigError("config fields 'route.fixed_schedule' and 'route.frozen_router' exclude each other")

    @property
    def learns_router(self) -> bool:
        return not self.fixed_schedule and self.frozen_router is None


@dataclass
class RouteConfig:
    model: ModelConfig  # model.student: the stage-1 result (`distill`'s student.safetensors)
    data: DataConfig
    train: TrainConfig
    flow: FlowConfig = field(default_factory=FlowConfig)
    route: RouteSection = field(default_factory=RouteSection)


class StageTwo(Stage):
    """The shared data and inputs (``training.stage_common``); the step's loss is the gated distillation plus the
    budget term."""

    def __init__(self, cfg: RouteConfig, info, teacher, gated: GatedWan, wrapped, samples, costs: torch.Tensor) -> None:
        super().__init__(cfg, info, teacher, gated.student, wrapped, samples)
        self.gated, self.costs = gated, costs

    def loss_fn(self, step: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, rc = self.cfg, self.cfg.route
        b = cfg.train.batch_size
        d = self.draw(gen)
        gate_noise = None
        if rc.gate_noise and rc.learns_router:
            scale = 1.0 + (rc.gate_noise_final - 1.0) * step / max(1, cfg.train.steps - 1)
            gate_noise = scale * logistic_noise((b, self.gated.student.num_blocks), gen)
        batch = self.local_inputs(d)
        (x, t, ctx, clip), rows = batch.inputs, batch.rows
        target = self.teacher_velocity(batch)
        with self.autocast:
            pred, logits, gates = self.wrapped(x, t, ctx, rc.tau, None if gate_noise is None else gate_noise[rows],
                                               clip)
        weight = loss_weights(cfg.flow, batch.sigma, x.device)
        per_row = self.row_errors(pred, target, batch.items)
        distill = (weight * per_row).mean()
        local = expected_compute_fraction(logits, self.costs, self.gated.pinned)
        glob = self._global_mean(local.detach())
        # Value: the penalty of the global batch. Gradient: d/dlogits of it, which the data-parallel gradient average
        # assembles from each rank's share (the square of a per-rank mean would not add up to the global one).
        penalty = budget_penalty(glob, rc.budget, rc.budget_weight)
        surrogate = 2.0 * rc.budget_weight * (glob - rc.budget) * (local - local.detach())
        loss = distill + penalty + surrogate
        return loss, {"velocity_mse": float(per_row.detach().mean()), "expected_compute": float(glob),
                      "executed_compute": float(compute_fraction(gates.detach(), self.costs)),
                      "budget_penalty": float(penalty)}

    def _global_mean(self, value: torch.Tensor) -> torch.Tensor:
        if not self.info.distributed:
            return value
        out = value.clone()
        dist.all_reduce(out)
        return out / self.info.world_size


def build(cfg: RouteConfig):
    """Teacher, stage-1 student + a new router (or the checkpoint's, on resume), samples; placed for this rank."""
    rc = cfg.route
    info, teacher, student, samples = load_inputs(cfg)
    meta = student.meta
    tokens, text_tokens = tokens_of(samples)
    raw_costs = block_costs(meta, tokens, text_tokens)
    n = meta.num_blocks
    costs = normalized_costs(raw_costs, n)
    pinned = pin_mask(n, rc.pin_first, rc.pin_last)
    contribution = None if rc.stats is None else student_contribution(rc.stats, meta).mean(dim=0)
    spec = router_spec_for(meta, rc.hidden, rc.text_input, train_budget=rc.budget, layer_norm=rc.layer_norm)
    if rc.frozen_router is not None:
        router = frozen_router(rc.frozen_router, spec)
    elif rc.learns_router:
        router = BlockRouter(spec, init_bias=initial_bias(n, rc.budget, raw_costs, pinned, contribution,
                                                          rc.init_spread))
    else:
        run = fixed_mask(rc, meta, costs, pinned)
        router = BlockRouter.constant(spec, torch.where(run, 30.0, -30.0)).requires_grad_(False)
        logger.info("fixed schedule (ablation): blocks run %s", run.int().tolist())
    if cfg.train.gradient_checkpointing:
        checkpoint_activations(student)
    gated = GatedWan(student, router, pinned).train()
    sources = {"student.": student_sources(cfg)[""], "router.": TensorRows(router.state_dict())}  # if sharded
    wrapped = wrap_trainable(gated, cfg.train.strategy, info, cfg.train.compute_dtype, sources)
    return info, StageTwo(cfg, info, teacher, gated, wrapped, samples, costs.to(info.device))


def frozen_router(path, spec):
    """The router in ``path`` with its bias moved by -logit(default threshold), so that the training gate
    (logit > 0) makes its decisions at that threshold; no gradients. It keeps its own architecture (any format, e.g.
    an oracle-fitted router) but must drive this student (blocks and width)."""
    router = load_router(path)
    if (router.spec.num_blocks, router.spec.dim) != (spec.num_blocks, spec.dim):
        raise ConfigError(f"config field 'route.frozen_router': {path} is a router for {router.spec.num_blocks} "
                          f"blocks of width {router.spec.dim}; this student has {spec.num_blocks} of width {spec.dim}")
    t = min(max(router.spec.default_threshold, 1e-6), 1.0 - 1e-6)
    # This student's fingerprint and the [route] budget; the router's own architecture.
    shifted = BlockRouter(dataclasses.replace(router.spec, model_fingerprint=spec.model_fingerprint,
                                              train_budget=spec.train_budget))
    shifted.load_state_dict(router.state_dict())
    with torch.no_grad():
        shifted.bias -= math.log(t / (1.0 - t))
    return shifted.requires_grad_(False)


def fixed_mask(rc: RouteSection, meta, costs: torch.Tensor, pinned: torch.Tensor) -> torch.Tensor:
    """Bool [N] of the ablation's fixed schedule (True: the block runs)."""
    num_blocks = meta.num_blocks
    if rc.fixed_schedule == "auto":
        contribution = student_contribution(rc.stats, meta)
        return best_contiguous_skip(contribution, costs, pinned, rc.budget).mask(num_blocks)
    run = torch.ones(num_blocks, dtype=torch.bool)
    for rng in parse_schedule(rc.fixed_schedule, num_blocks):
        run[rng.first_block:rng.last_block + 1] = False
    return run


def train(cfg: RouteConfig, resume: str | None = None) -> dict:
    """Run stage 2 to ``train.steps``, then evaluate and export (rank 0). Returns the report."""
    set_determinism(cfg.train)
    info, stage = build(cfg)
    try:
        trainer = Trainer(cfg.train, info, stage.gated, stage.loss_fn, config=cfg,
                          lr_scales={"router": cfg.route.router_learning_rate / cfg.train.learning_rate},
                          tokens_per_step=cfg.train.batch_size * tokens_of(stage.samples)[0])
        trainer.run(resume)
        trainer.final_weights()
        set_phase("export")  # the threshold calibration and the export (route_finish.finish_run)
        state = full_state_dict(stage.gated, info)  # collective under FSDP2: every rank takes part
        report = {}
        if info.is_main:
            out = Path(cfg.train.output_dir)
            report = finish_run(cfg, stage, state, out / "student.safetensors", out / "router.safetensors")
            atomic_write_text(out / "route_report.json", json.dumps(report, indent=1))
        write_report(cfg.train.output_dir, info, trainer.throughput())
        barrier()
        return report
    finally:
        shutdown()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="TOML config: [model] teacher + student (the stage-1 result), [data], [train], [flow], [route]")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (name or path)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set route.budget=0.4 (repeatable)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(RouteConfig, args.config, args.set)
    train(cfg, args.resume)
    return 0
