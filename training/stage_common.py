"""What both training stages share: the [model], [data] and [flow] tables, loading the inputs, drawing a batch,
the velocity error.

Stage 1 (``training.distill``) and stage 2 (``training.route``) train on the same thing: flow-matching inputs
x_t = (1 - s) x_0 + s eps from the calibration samples at Wan's shifted sigmas, against the frozen teacher's
velocity. Each step draws the *global* batch's randomness (rows, sigmas, noise) from the run's generator on every
rank, then each rank takes its slice (``Stage.local_inputs``), so a run does not depend on the number of ranks.
A stage's own loss (feature matching, the router's budget) lives in its module; ``Stage`` never reads a stage's
own config table.
"""

from __future__ import annotations

import importlib
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch

from comfyui_pare.calibration import read_folder
from comfyui_pare.wan import PATCH_SIZE

from .config import ConfigError, InputPath
from .data import PreparedSample, collate, noised, prepare_sample, with_condition
from .model import WanTransformer
from .parallel import DistInfo, init_distributed, resolve_strategy, shard_frozen, warm_up
from .resources import mark_baseline, return_freed_memory
from .salient import salient_weights
from .sampling import time_snr_shift
from .sharded import CheckpointRows, RowSource, meta_model
from .teacher import load_model

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # (x_t, timestep, context, clip)


@dataclass
class ModelConfig:
    teacher: InputPath
    student: InputPath  # the pruned initialisation from `python -m training prune` (stage 2: the stage-1 result)
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


def sample_sigmas(flow: FlowConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Flow-matching sigmas [batch]: diffusers' timestep density, then Wan's shift."""
    from diffusers.training_utils import compute_density_for_timestep_sampling  # heavy: imported when training

    u = compute_density_for_timestep_sampling(flow.weighting_scheme, batch, logit_mean=flow.logit_mean,
                                              logit_std=flow.logit_std, mode_scale=flow.mode_scale,
                                              generator=generator)
    return time_snr_shift(flow.shift, u.clamp(1e-5, 1.0))


def loss_weights(flow: FlowConfig, sigma: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Per-row SD3 loss weights [B] of ``flow.weighting_scheme`` (diffusers' ``compute_loss_weighting_for_sd3``)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(flow.weighting_scheme, sigma).to(device)


@dataclass
class Draw:
    """The randomness of one global batch, identical on every rank: sample rows, sigmas [B], noise [B, ...]."""

    idx: torch.Tensor
    sigma: torch.Tensor
    noise: torch.Tensor


class Stage:
    """Teacher, student, samples and the inputs of a step; a stage adds its ``loss_fn`` for the ``Trainer``."""

    def __init__(self, cfg, info: DistInfo, teacher, student, wrapped, samples: list[PreparedSample]) -> None:
        self.cfg, self.info, self.teacher, self.student, self.wrapped = cfg, info, teacher, student, wrapped
        self.samples = samples
        self.context_length = max(s.context.shape[0] for s in samples)
        self.dims = student.dims
        # Under FSDP2 the MixedPrecisionPolicy casts the parameters; elsewhere autocast does the bf16 compute.
        self.autocast = (torch.autocast(info.device.type, dtype=torch.bfloat16)
                         if cfg.train.mixed_precision == "bf16" and cfg.train.strategy != "fsdp" else nullcontext())

    def inputs(self, items: list[PreparedSample], sigma: torch.Tensor, noise: torch.Tensor) -> Inputs:
        """Model inputs (x_t, timestep = sigma * 1000, context, clip) of ``items``, on this rank's device."""
        x0, _, ctx, clip = collate(items, self.context_length)
        x = with_condition(noised(x0, noise, sigma), x0, self.dims)
        dev = self.info.device
        return x.to(dev), (sigma * 1000).to(dev), ctx.to(dev), None if clip is None else clip.to(dev)

    def draw(self, gen: torch.Generator) -> Draw:
        """The global batch's rows, sigmas and noise, in this order from ``gen`` (a stage draws more after it)."""
        b = self.cfg.train.batch_size
        idx = torch.randint(len(self.samples), (b,), generator=gen)
        sigma = sample_sigmas(self.cfg.flow, b, gen)
        noise = torch.randn((b, *self.samples[0].x0.shape), generator=gen)
        return Draw(idx, sigma, noise)

    def local_inputs(self, d: Draw) -> tuple[slice, list[PreparedSample], Inputs]:
        """This rank's rows of the global batch: (its slice, its samples, its model inputs)."""
        rows = self.info.local_slice(self.cfg.train.batch_size)
        items = [self.samples[i] for i in d.idx[rows].tolist()]
        return rows, items, self.inputs(items, d.sigma[rows], d.noise[rows])

    def row_errors(self, pred: torch.Tensor, target: torch.Tensor, items: list[PreparedSample]) -> torch.Tensor:
        """Per-row velocity MSE [B], salient cells weighted by ``flow.salient_weight`` (``training.salient``)."""
        err = (pred.float() - target.float()).pow(2)
        flow = self.cfg.flow
        if flow.salient_weight > 0:
            x0 = torch.stack([item.x0 for item in items]).to(err.device)
            err = err * salient_weights(x0, flow.salient_weight, flow.salient_threshold)
        return err.flatten(1).mean(1)

    @torch.no_grad()
    def velocity_error(self, eval_samples: int, sigmas: tuple[float, ...]) -> float:
        """Relative error ||v_s - v_t||^2 / ||v_t||^2 of the student on a fixed set: the first ``eval_samples``
        samples x ``sigmas``, fixed noise from its own generator (never the training one)."""
        gen = torch.Generator().manual_seed(self.cfg.train.seed + 1_000_003)
        num = den = 0.0
        was_training = self.student.training
        self.student.eval()
        for i in range(min(eval_samples, len(self.samples))):
            item = self.samples[i]
            for s in sigmas:
                noise = torch.randn((1, *item.x0.shape), generator=gen)
                x, t, ctx, clip = self.inputs([item], torch.tensor([s]), noise)
                with self.autocast:
                    vt, vs = self.teacher(x, t, ctx, clip), self.student(x, t, ctx, clip)
                num += float((vs.float() - vt.float()).pow(2).sum())
                den += float(vt.float().pow(2).sum())
        self.student.train(was_training)
        return num / max(den, 1e-30)


def student_sources(cfg) -> dict[str, RowSource]:
    """Where a sharded (meta-device) student reads its rows: ``model.student`` in float32."""
    return {"": CheckpointRows(cfg.model.student, torch.float32)}


def tokens_of(samples: list[PreparedSample]) -> tuple[int, int]:
    """(video tokens, text tokens) per sample of the training inputs: what block costs and tokens/s count."""
    _, f, h, w = samples[0].x0.shape
    tokens = -(-f // PATCH_SIZE[0]) * -(-h // PATCH_SIZE[1]) * -(-w // PATCH_SIZE[2])
    return tokens, max(s.context.shape[0] for s in samples)


def load_inputs(cfg) -> tuple[DistInfo, WanTransformer, WanTransformer, list[PreparedSample]]:
    """Teacher (frozen, placed for this rank), student (float32, not yet placed) and prepared samples.

    Under ``strategy = "fsdp"`` on several ranks both are built on the meta device: the teacher is sharded here and
    each rank reads only its rows (``training.sharded``); the student stays on meta until the stage's
    ``wrap_trainable`` shards it and reads its rows (``student_sources``). Otherwise both are read whole.
    ``cfg`` has the [model], [data], [flow] and [train] tables (both stages' configs do)."""
    info = init_distributed(cfg.train.device)
    return_freed_memory()
    warm_up(cfg.train.strategy, info)
    # diffusers (timestep density, loss weights) is imported lazily so `--help` stays fast; import it before the
    # baseline, since its ~0.1 GB belongs to the process, not to the first step.
    importlib.import_module("diffusers.training_utils")
    mark_baseline()  # host memory before any model: what resources.json's peaks are measured against
    tdtype = torch.bfloat16 if cfg.model.teacher_dtype == "bfloat16" else torch.float32
    if resolve_strategy(cfg.train.strategy, info) == "fsdp":
        teacher, student = meta_model(cfg.model.teacher, tdtype), meta_model(cfg.model.student, torch.float32)
        sources = {"": CheckpointRows(cfg.model.teacher, tdtype)}
    else:
        teacher, student = load_model(cfg.model.teacher, dtype=tdtype), load_model(cfg.model.student)
        sources = None
    if student.meta.dims != teacher.meta.dims:
        raise ConfigError(f"config field 'model.student': {cfg.model.student} was pruned from another teacher "
                          f"(dims {student.meta.dims} vs {teacher.meta.dims})")
    teacher = shard_frozen(teacher, cfg.train.strategy, info, cfg.train.compute_dtype, sources)
    samples = [prepare_sample(s, teacher.dims, teacher, cfg.data.generate_steps, cfg.flow.shift)
               for s in read_folder(cfg.data.samples)]
    collate(samples)  # one latent shape for the whole set: fail now, not at step 1,000
    return info, teacher, student, samples
