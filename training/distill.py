"""``python -m training distill --config cfg.toml [--resume latest]``: stage 1, the pruned student learns the
teacher's velocity.

Each step draws a global batch from the calibration samples, a flow-matching time per row (``u`` from SD3's timestep
density, ``training.flow_weights``, then Wan's shift sigma = shift u / (1 + (shift - 1) u), the
``FlowMatchEulerDiscreteScheduler`` shift) and fresh noise (or fixed draws with cached teacher targets:
``training.targets``), all from the run's generator; each rank takes its slice (the part shared with stage 2 is
``training.stage_common``). Loss: SD3-loss-weighted MSE between student and teacher velocities
(``flow.salient_weight`` counts the cells where the clip's content is more, ``training.salient``), plus
``feature_weight`` x the mean MSE of the block outputs (every block's output state, student vs teacher), plus
VDMini's options for depth-pruned students (``training.icmd``): ``content_weight`` (per-frame content distillation
of block outputs), ``motion_weight`` (motion consistency on frame differences of block outputs) and
``velocity_motion_weight`` (on frame differences of the predicted velocities). Student block i is always matched to
the teacher block it came from (``kept_blocks`` of a depth-pruned student). VDMini's adversarial motion term is
``adversarial_weight``, which is not implemented (a non-zero value is refused).
The teacher is frozen (FSDP2-sharded per block under ``strategy = "fsdp"``). The velocity error on a fixed
evaluation set is measured before and after (``velocity_error.json``); the result is ``student.safetensors`` in
the pruned format that PARE Load Pruned Wan reads.
"""

from __future__ import annotations

import argparse
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from comfyui_pare.errors import PareFormatError
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.safetensors_io import StreamingWriter, atomic_write_text

from .config import ConfigError, load_config
from .icmd import icmd_terms, matched_outputs
from .loop import TrainConfig, Trainer, set_determinism
from .parallel import barrier, checkpoint_activations, shutdown, whole, wrap_trainable
from .resources import set_phase, write_report
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

HELP = "stage 1: distil the pruned student to the teacher's velocity (TOML config, resumable, torchrun-ready)"
EVAL_SIGMAS = (0.9, 0.7, 0.5, 0.3, 0.1)


@dataclass
class LossConfig:
    feature_weight: float = 0.0  # block-output feature matching (0: velocity only)
    eval_samples: int = 8  # samples in the fixed velocity-error evaluation
    content_weight: float = 0.0  # VDMini: per-frame content distillation of the block outputs
    motion_weight: float = 0.0  # VDMini: motion consistency on frame differences of the block outputs
    velocity_motion_weight: float = 0.0  # VDMini: motion consistency on frame differences of the velocities
    adversarial_weight: float = 0.0  # VDMini's adversarial motion term: not implemented, must stay 0

    def validate(self) -> None:
        if self.feature_weight < 0 or self.eval_samples < 1:
            raise ConfigError("config fields 'distill.feature_weight' >= 0 and 'distill.eval_samples' >= 1")
        for name in ("content_weight", "motion_weight", "velocity_motion_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config field 'distill.{name}' must be >= 0, got {getattr(self, name)}")
        if self.adversarial_weight != 0:
            raise ConfigError("config field 'distill.adversarial_weight': VDMini's adversarial motion term is not "
                              "implemented; use 'distill.motion_weight' / 'distill.velocity_motion_weight' (the "
                              "direct motion-consistency terms) and leave it at 0")

    @property
    def needs_states(self) -> bool:
        return self.feature_weight > 0 or self.content_weight > 0 or self.motion_weight > 0


@dataclass
class DistillConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    flow: FlowConfig = field(default_factory=FlowConfig)
    distill: LossConfig = field(default_factory=LossConfig)

    def validate(self) -> None:
        if self.data.target_draws and self.distill.needs_states:
            raise ConfigError("config field 'data.target_draws': fixed draws with cached teacher targets give the "
                              "teacher's velocity only; distill.feature_weight, content_weight and motion_weight need "
                              "its block outputs (set them to 0, or data.target_draws to 0)")


class StageOne(Stage):
    """Stage 1's step: the velocity loss plus block-output feature matching and VDMini's terms (``[distill]``)."""

    def loss_fn(self, step: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        batch = self.local_inputs(self.draw(gen))
        x, t, ctx, clip = batch.inputs
        opts = self.cfg.distill
        feat = opts.needs_states
        target = self.teacher_velocity(batch, return_hidden_states=feat)
        with self.autocast:
            pred = self.wrapped(x, t, ctx, clip, return_hidden_states=feat)
        if feat:
            (target, t_states), (pred, s_states) = target, pred
        weight = loss_weights(self.cfg.flow, batch.sigma, x.device)
        per_row = self.row_errors(pred, target, batch.items)
        velocity = (weight * per_row).mean()
        metrics = {"velocity_mse": float(per_row.detach().mean())}
        loss = velocity
        if opts.feature_weight > 0:
            pairs = matched_outputs(s_states, t_states, self.student.meta.teacher_blocks)
            feature = torch.stack([(s.float() - t_.float()).pow(2).mean() for s, t_ in pairs])
            loss = loss + opts.feature_weight * feature.mean()
            metrics["feature_mse"] = float(feature.detach().mean())
        if opts.content_weight > 0 or opts.motion_weight > 0 or opts.velocity_motion_weight > 0:
            loss = loss + self.icmd_loss(s_states if feat else None, t_states if feat else None, pred, target,
                                         x.shape[2], metrics)
        return loss, metrics

    def icmd_loss(self, s_states, t_states, pred, target, num_frames: int, metrics: dict[str, float]) -> torch.Tensor:
        """VDMini's weighted content and motion terms (``training.icmd``); each is also logged."""
        opts = self.cfg.distill
        weights = {"content": opts.content_weight, "motion_feature": opts.motion_weight,
                   "motion_velocity": opts.velocity_motion_weight}
        terms = icmd_terms(s_states, t_states, self.student.meta.teacher_blocks, num_frames, pred, target)
        total = pred.new_zeros((), dtype=torch.float32)
        for name, term in terms.items():
            if weights[name] > 0:
                total = total + weights[name] * term
                metrics[name] = float(term.detach())
        return total


def build(cfg: DistillConfig):
    """Load teacher, student and samples; place them for this rank. Returns (info, stage)."""
    info, teacher, student, samples = load_inputs(cfg)
    student.train()
    if cfg.train.gradient_checkpointing:
        checkpoint_activations(student)
    wrapped = wrap_trainable(student, cfg.train.strategy, info, cfg.train.compute_dtype, student_sources(cfg))
    return info, StageOne(cfg, info, teacher, student, wrapped, samples)


def export_student(stage: StageOne, path: Path, dtype: torch.dtype) -> None:
    """Write the student in the pruned format, one tensor at a time: under FSDP2 each tensor is gathered whole (every
    rank takes part), written by rank 0 and dropped, so the export costs one tensor beyond the shards."""
    meta: PrunedWanMeta = stage.student.meta
    shapes, state = meta.expected_shapes(), stage.student.state_dict()
    if state.keys() != shapes.keys():
        raise PareFormatError(f"{path}: the student's state does not match its metadata (missing "
                              f"{sorted(shapes.keys() - state.keys())[:3]}, extra {sorted(state.keys() - shapes.keys())[:3]})")
    writer = StreamingWriter(path, {k: (dtype, shape) for k, shape in shapes.items()}, meta.to_header())
    with writer if stage.info.is_main else nullcontext():
        for key in writer.order:
            tensor = whole(state[key])
            if stage.info.is_main:
                writer.write(key, tensor.to("cpu", dtype))
    if stage.info.is_main:
        logger.info("wrote the student to %s", path)


def train(cfg: DistillConfig, resume: str | None = None) -> dict:
    set_determinism(cfg.train)
    info, stage = build(cfg)
    try:
        out = Path(cfg.train.output_dir)
        report_path = out / "velocity_error.json"
        report = json.loads(report_path.read_text()) if resume and report_path.is_file() else {}
        if "initial" not in report:
            set_phase("initial_eval")
            report["initial"] = stage.velocity_error(cfg.distill.eval_samples, EVAL_SIGMAS)
        trainer = Trainer(cfg.train, info, stage.student, stage.loss_fn, config=cfg,
                          tokens_per_step=cfg.train.batch_size * tokens_of(stage.samples)[0])
        trainer.run(resume)
        trainer.final_weights()
        set_phase("final_eval")
        report["final"] = stage.velocity_error(cfg.distill.eval_samples, EVAL_SIGMAS)
        report["ratio"] = report["final"] / max(report["initial"], 1e-30)
        set_phase("export")
        export_student(stage, out / "student.safetensors",
                       torch.bfloat16 if cfg.model.export_dtype == "bfloat16" else torch.float32)
        if info.is_main:
            atomic_write_text(report_path, json.dumps(report, indent=1))
            logger.info("velocity error %.4g -> %.4g (x%.3f)", report["initial"], report["final"], report["ratio"])
        write_report(out, info, trainer.throughput())
        barrier()
        return report
    finally:
        shutdown()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="TOML config ([model], [data], [train], [flow], [distill])")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (name or path)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=200 (repeatable)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(DistillConfig, args.config, args.set)
    train(cfg, args.resume)
    return 0
