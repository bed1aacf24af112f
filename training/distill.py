"""``python -m training distill --config cfg.toml [--resume latest]``: stage 1, the pruned student learns the
teacher's velocity.

Each step draws a global batch from the calibration samples, a flow-matching time per row (``u`` from diffusers'
``compute_density_for_timestep_sampling``, then Wan's shift sigma = shift u / (1 + (shift - 1) u), the
``FlowMatchEulerDiscreteScheduler`` shift) and fresh noise, all from the run's generator; each rank takes its
slice. Loss: ``compute_loss_weighting_for_sd3``-weighted MSE between student and teacher velocities
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
from typing import Literal

import torch

from comfyui_pare.pruned import PrunedWanMeta, save_checkpoint
from comfyui_pare.safetensors_io import atomic_write_text

from .config import ConfigError, InputPath, load_config
from .data import PreparedSample, collate, noised, with_condition
from .icmd import icmd_terms, matched_outputs
from .loop import TrainConfig
from .salient import salient_weights

logger = logging.getLogger(__name__)

HELP = "stage 1: distil the pruned student to the teacher's velocity (TOML config, resumable, torchrun-ready)"
EVAL_SIGMAS = (0.9, 0.7, 0.5, 0.3, 0.1)


@dataclass
class ModelConfig:
    teacher: InputPath
    student: InputPath  # the pruned initialisation from `python -m training prune`
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"
    export_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class DataConfig:
    samples: InputPath
    generate_steps: int = 0  # teacher Euler steps for samples without a latent (0: they are an error)

    def validate(self) -> None:
        if self.generate_steps < 0:
            raise ConfigError("config field 'data.generate_steps' must be >= 0")


@dataclass
class FlowConfig:
    shift: float = 5.0
    weighting_scheme: Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"] = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    salient_weight: float = 0.0  # extra loss weight on salient latent cells (training.salient; 0: plain MSE)
    salient_threshold: float = 0.1  # departure from the clip's per-channel median that makes a cell salient

    def validate(self) -> None:
        if self.shift <= 0:
            raise ConfigError(f"config field 'flow.shift' must be positive, got {self.shift}")
        if self.salient_weight < 0 or self.salient_threshold < 0:
            raise ConfigError("config fields 'flow.salient_weight' and 'flow.salient_threshold' must be >= 0, got "
                              f"{self.salient_weight} and {self.salient_threshold}")


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


def sample_sigmas(flow: FlowConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Flow-matching sigmas [batch]: diffusers' timestep density, then Wan's shift."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from .sampling import time_snr_shift

    u = compute_density_for_timestep_sampling(flow.weighting_scheme, batch, logit_mean=flow.logit_mean,
                                              logit_std=flow.logit_std, mode_scale=flow.mode_scale,
                                              generator=generator)
    return time_snr_shift(flow.shift, u.clamp(1e-5, 1.0))


class StageOne:
    """Teacher, student, data and the step's loss; everything a ``Trainer`` needs."""

    def __init__(self, cfg: DistillConfig, info, teacher, student, wrapped, samples: list[PreparedSample]) -> None:
        self.cfg, self.info, self.teacher, self.student, self.wrapped = cfg, info, teacher, student, wrapped
        self.samples = samples
        self.context_length = max(s.context.shape[0] for s in samples)
        self.dims = student.dims
        self.autocast = (torch.autocast(info.device.type, dtype=torch.bfloat16)
                         if cfg.train.mixed_precision == "bf16" and cfg.train.strategy != "fsdp" else nullcontext())

    def inputs(self, items: list[PreparedSample], sigma: torch.Tensor, noise: torch.Tensor):
        x0, _, ctx, clip = collate(items, self.context_length)
        x = with_condition(noised(x0, noise, sigma), x0, self.dims)
        dev = self.info.device
        return x.to(dev), (sigma * 1000).to(dev), ctx.to(dev), None if clip is None else clip.to(dev)

    def loss_fn(self, step: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        b = self.cfg.train.batch_size
        idx = torch.randint(len(self.samples), (b,), generator=gen)
        sigma = sample_sigmas(self.cfg.flow, b, gen)
        noise = torch.randn((b, *self.samples[0].x0.shape), generator=gen)
        rows = self.info.local_slice(b)
        items = [self.samples[i] for i in idx[rows].tolist()]
        x, t, ctx, clip = self.inputs(items, sigma[rows], noise[rows])
        opts = self.cfg.distill
        feat = opts.needs_states
        with torch.no_grad(), self.autocast:
            target = self.teacher(x, t, ctx, clip, return_hidden_states=feat)
        with self.autocast:
            pred = self.wrapped(x, t, ctx, clip, return_hidden_states=feat)
        if feat:
            (target, t_states), (pred, s_states) = target, pred
        weight = compute_loss_weighting_for_sd3(self.cfg.flow.weighting_scheme, sigma[rows]).to(x.device)
        per_row = self.row_errors(pred, target, items)
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

    def row_errors(self, pred: torch.Tensor, target: torch.Tensor, items: list[PreparedSample]) -> torch.Tensor:
        """Per-row velocity MSE [B], salient cells weighted by ``flow.salient_weight`` (``training.salient``)."""
        err = (pred.float() - target.float()).pow(2)
        flow = self.cfg.flow
        if flow.salient_weight > 0:
            x0 = torch.stack([item.x0 for item in items]).to(err.device)
            err = err * salient_weights(x0, flow.salient_weight, flow.salient_threshold)
        return err.flatten(1).mean(1)

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

    @torch.no_grad()
    def velocity_error(self) -> float:
        """Relative error ||v_s - v_t||^2 / ||v_t||^2 on a fixed set (first samples x EVAL_SIGMAS, fixed noise)."""
        gen = torch.Generator().manual_seed(self.cfg.train.seed + 1_000_003)  # never the training generator
        num = den = 0.0
        was_training = self.student.training
        self.student.eval()
        for item in self.samples[:self.cfg.distill.eval_samples]:
            for s in EVAL_SIGMAS:
                noise = torch.randn((1, *item.x0.shape), generator=gen)
                x, t, ctx, clip = self.inputs([item], torch.tensor([s]), noise)
                with self.autocast:
                    vt, vs = self.teacher(x, t, ctx, clip), self.student(x, t, ctx, clip)
                num += float((vs.float() - vt.float()).pow(2).sum())
                den += float(vt.float().pow(2).sum())
        self.student.train(was_training)
        return num / max(den, 1e-30)


def load_inputs(cfg):
    """Teacher (frozen, placed for this rank), student (float32, not yet placed) and prepared samples.

    Shared with stage 2 (``training.route``), whose config has the same [model], [data], [flow] and [train] tables.
    Returns (info, teacher, student, samples)."""
    from comfyui_pare.calibration import read_folder

    from .data import prepare_sample
    from .parallel import init_distributed, shard_frozen
    from .teacher import load_model

    info = init_distributed(cfg.train.device)
    tdtype = torch.bfloat16 if cfg.model.teacher_dtype == "bfloat16" else torch.float32
    teacher = load_model(cfg.model.teacher, dtype=tdtype)
    student = load_model(cfg.model.student, dtype=torch.float32)
    if student.meta.dims != teacher.meta.dims:
        raise ConfigError(f"config field 'model.student': {cfg.model.student} was pruned from another teacher "
                          f"(dims {student.meta.dims} vs {teacher.meta.dims})")
    teacher = shard_frozen(teacher, cfg.train.strategy, info, cfg.train.compute_dtype)
    samples = [prepare_sample(s, teacher.dims, teacher, cfg.data.generate_steps, cfg.flow.shift)
               for s in read_folder(cfg.data.samples)]
    collate(samples)  # one latent shape for the whole set: fail now, not at step 1,000
    return info, teacher, student, samples


def build(cfg: DistillConfig):
    """Load teacher, student and samples; place them for this rank. Returns (info, stage)."""
    from .parallel import checkpoint_activations, wrap_trainable

    info, teacher, student, samples = load_inputs(cfg)
    student.train()
    if cfg.train.gradient_checkpointing:
        checkpoint_activations(student)
    wrapped = wrap_trainable(student, cfg.train.strategy, info, cfg.train.compute_dtype)
    return info, StageOne(cfg, info, teacher, student, wrapped, samples)


def export_student(stage: StageOne, path: Path, dtype: torch.dtype) -> None:
    from .parallel import full_state_dict

    sd = full_state_dict(stage.student, stage.info)
    if stage.info.is_main:
        meta: PrunedWanMeta = stage.student.meta
        save_checkpoint(path, {k: v.to(dtype) for k, v in sd.items()}, meta)
        logger.info("wrote the student to %s", path)


def train(cfg: DistillConfig, resume: str | None = None) -> dict:
    from .loop import Trainer, set_determinism
    from .parallel import barrier, shutdown

    set_determinism(cfg.train)
    info, stage = build(cfg)
    try:
        out = Path(cfg.train.output_dir)
        report_path = out / "velocity_error.json"
        report = json.loads(report_path.read_text()) if resume and report_path.is_file() else {}
        if "initial" not in report:
            report["initial"] = stage.velocity_error()
        trainer = Trainer(cfg.train, info, stage.student, stage.loss_fn, config=cfg)
        trainer.run(resume)
        trainer.final_weights()
        report["final"] = stage.velocity_error()
        report["ratio"] = report["final"] / max(report["initial"], 1e-30)
        export_student(stage, out / "student.safetensors",
                       torch.bfloat16 if cfg.model.export_dtype == "bfloat16" else torch.float32)
        if info.is_main:
            atomic_write_text(report_path, json.dumps(report, indent=1))
            logger.info("velocity error %.4g -> %.4g (x%.3f)", report["initial"], report["final"], report["ratio"])
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
