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

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch

from comfyui_pare.model_family import token_grid

from .config import ConfigError, InputPath, OutputPath
from .data import PreparedSample, collate, noised, with_condition
from .flow_weights import sd3_loss_weights, timestep_density
from .model import WanTransformer
from .parallel import DistInfo, init_distributed, resolve_strategy, shard_frozen, warm_up
from .resources import mark_baseline, record_load, return_freed_memory, start_run
from .salient import salient_weights
from .sample_index import SampleIndex
from .sampling import time_snr_shift
from .sharded import CheckpointRows, RowSource, meta_model
from .targets import TargetCache, draw_generator, settings_of, teacher_fingerprint
from .teacher import load_model, read_model

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # (x_t, timestep, context, clip)


@dataclass
class ModelConfig:
    teacher: InputPath
    student: InputPath  # the pruned initialisation from `python -m training prune` (stage 2: the stage-1 result)
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"
    export_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class DataConfig:
    samples: InputPath  # a folder of calibration samples (indexed from the headers, read when drawn)
    generate_steps: int = 0  # teacher Euler steps for samples without a latent (0: they are an error)
    target_draws: int = 0  # > 0: K fixed (sigma, noise) draws per sample, teacher targets reusable (training.targets)
    target_cache: OutputPath | None = None  # folder of the teacher's targets for those draws (`cache-targets`)

    def validate(self) -> None:
        if self.generate_steps < 0 or self.target_draws < 0:
            raise ConfigError("config fields 'data.generate_steps' and 'data.target_draws' must be >= 0")
        if self.target_cache is not None and self.target_draws == 0:
            raise ConfigError("config field 'data.target_cache' needs 'data.target_draws' > 0 (the cached targets are "
                              "for fixed draws per sample)")


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
    """Flow-matching sigmas [batch]: SD3's timestep density (``training.flow_weights``), then Wan's shift."""
    u = timestep_density(flow.weighting_scheme, batch, logit_mean=flow.logit_mean, logit_std=flow.logit_std,
                         mode_scale=flow.mode_scale, generator=generator)
    return time_snr_shift(flow.shift, u.clamp(1e-5, 1.0))


def loss_weights(flow: FlowConfig, sigma: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Per-row SD3 loss weights [B] of ``flow.weighting_scheme`` (``training.flow_weights``)."""
    return sd3_loss_weights(flow.weighting_scheme, sigma).to(device)


@dataclass
class Draw:
    """The randomness of one global batch, identical on every rank: sample rows, and either sigmas [B] and noise
    [B, ...] or, with fixed draws (``data.target_draws``), each row's draw number [B]."""

    idx: torch.Tensor
    sigma: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    draws: torch.Tensor | None = None


@dataclass
class LocalBatch:
    """This rank's rows of a global batch."""

    rows: slice
    items: list[PreparedSample]
    sigma: torch.Tensor  # [b]
    draws: list[int] | None  # fixed-draw numbers, or None
    inputs: Inputs


class Stage:
    """Teacher, student, samples and the inputs of a step; a stage adds its ``loss_fn`` for the ``Trainer``."""

    def __init__(self, cfg, info: DistInfo, teacher, student, wrapped, samples: SampleIndex) -> None:
        self.cfg, self.info, self.teacher, self.student, self.wrapped = cfg, info, teacher, student, wrapped
        self.samples = samples
        self.context_length = samples.context_length
        self.dims = student.dims
        # Under FSDP2 the MixedPrecisionPolicy casts the parameters; elsewhere autocast does the bf16 compute.
        self.autocast = (torch.autocast(info.device.type, dtype=torch.bfloat16)
                         if cfg.train.mixed_precision == "bf16" and cfg.train.strategy != "fsdp" else nullcontext())
        self.cache = (None if cfg.data.target_cache is None else TargetCache(
            cfg.data.target_cache, teacher_fingerprint(cfg.model.teacher, cfg.model.teacher_dtype,
                                                       cfg.train.mixed_precision),
            settings_of(cfg, self.context_length)))

    def inputs(self, items: list[PreparedSample], sigma: torch.Tensor, noise: torch.Tensor) -> Inputs:
        """Model inputs (x_t, timestep = sigma * 1000, context, clip) of ``items``, on this rank's device."""
        x0, _, ctx, clip = collate(items, self.context_length)
        x = with_condition(noised(x0, noise, sigma), x0, self.dims)
        dev = self.info.device
        return x.to(dev), (sigma * 1000).to(dev), ctx.to(dev), None if clip is None else clip.to(dev)

    def draw(self, gen: torch.Generator) -> Draw:
        """The global batch's rows, then its sigmas and noise (or its fixed draws), in this order from ``gen`` (a
        stage draws more after it)."""
        b = self.cfg.train.batch_size
        idx = torch.randint(len(self.samples), (b,), generator=gen)
        if self.cfg.data.target_draws:
            return Draw(idx, draws=torch.randint(self.cfg.data.target_draws, (b,), generator=gen))
        sigma = sample_sigmas(self.cfg.flow, b, gen)
        noise = torch.randn((b, *self.samples.latent_shape), generator=gen)
        return Draw(idx, sigma, noise)

    def fixed_draw(self, item: PreparedSample, draw: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma [1], noise [1, ...]) of draw ``draw`` of a sample (``training.targets.draw_generator``)."""
        gen = draw_generator(item.sha256, self.cfg.train.seed, draw)
        sigma = sample_sigmas(self.cfg.flow, 1, gen)
        return sigma, torch.randn((1, *item.x0.shape), generator=gen)

    def local_inputs(self, d: Draw) -> LocalBatch:
        """This rank's rows of the global batch: its slice, samples, sigmas, draws and model inputs."""
        rows = self.info.local_slice(self.cfg.train.batch_size)
        items = [self.samples[i] for i in d.idx[rows].tolist()]
        if d.draws is None:
            sigma, noise, draws = d.sigma[rows], d.noise[rows], None
        else:
            draws = d.draws[rows].tolist()
            pairs = [self.fixed_draw(item, j) for item, j in zip(items, draws)]
            sigma, noise = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        return LocalBatch(rows, items, sigma, draws, self.inputs(items, sigma, noise))

    @torch.no_grad()
    def teacher_velocity(self, batch: LocalBatch, return_hidden_states: bool = False):
        """The teacher's velocity for this rank's rows: one forward of the batch, or with fixed draws one row at a
        time (so a row's target is the same in any batch) or read from ``data.target_cache``."""
        x, t, ctx, clip = batch.inputs
        if batch.draws is None:
            with self.autocast:
                return self.teacher(x, t, ctx, clip, return_hidden_states=return_hidden_states)
        if self.cache is not None:
            return torch.cat([self.cache.velocity(item.path, item.sha256, j)
                              for item, j in zip(batch.items, batch.draws)]).to(x.device)
        return torch.cat([self.teacher_row(x[r:r + 1], t[r:r + 1], ctx[r:r + 1], None if clip is None else
                                           clip[r:r + 1]) for r in range(x.shape[0])])

    @torch.no_grad()
    def teacher_row(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, clip: torch.Tensor | None):
        """One row's teacher velocity, as the target cache stores it."""
        with self.autocast:
            return self.teacher(x, t, ctx, clip)

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


def tokens_of(samples: SampleIndex) -> tuple[int, int]:
    """(video tokens, text tokens) per sample of the training inputs: what block costs and tokens/s count."""
    _, f, h, w = samples.latent_shape
    t, gh, gw = token_grid((f, h, w))
    tokens = t * gh * gw
    return tokens, samples.context_length


def load_teacher_and_samples(cfg) -> tuple[DistInfo, WanTransformer, SampleIndex]:
    """The process group, the frozen teacher placed for this rank (under ``strategy = "fsdp"`` on several ranks
    built on the meta device, sharded, and only this rank's rows read: ``training.sharded``) and the sample index."""
    info = init_distributed(cfg.train.device)
    return_freed_memory()
    warm_up(cfg.train.strategy, info)
    mark_baseline()  # host memory before any model: what resources.json's peaks are measured against
    start_run()  # resources.json's phases: "load" from here
    tdtype = torch.bfloat16 if cfg.model.teacher_dtype == "bfloat16" else torch.float32
    started = time.perf_counter()
    if resolve_strategy(cfg.train.strategy, info) == "fsdp":
        rows = CheckpointRows(cfg.model.teacher, tdtype)
        teacher = shard_frozen(meta_model(cfg.model.teacher, tdtype), cfg.train.strategy, info,
                               cfg.train.compute_dtype, {"": rows})
        reader = rows.reader
    else:  # one tensor at a time, straight into the dtype and onto the device it runs on
        teacher, reader = read_model(cfg.model.teacher, dtype=tdtype, device=info.device)
        teacher = shard_frozen(teacher, cfg.train.strategy, info)
    record_load(reader.bytes_read, time.perf_counter() - started, reader.read_seconds)
    samples = SampleIndex(cfg.data.samples, teacher.dims, hash_files=cfg.data.target_draws > 0)
    samples.generate_missing(teacher, cfg.data.generate_steps, cfg.flow.shift)
    return info, teacher, samples


def load_inputs(cfg) -> tuple[DistInfo, WanTransformer, WanTransformer, SampleIndex]:
    """Teacher and samples (``load_teacher_and_samples``) and the student (float32, not yet placed).

    Under ``strategy = "fsdp"`` on several ranks the student stays on the meta device until the stage's
    ``wrap_trainable`` shards it and reads its rows (``student_sources``); otherwise it is read whole.
    ``cfg`` has the [model], [data], [flow] and [train] tables (both stages' configs do)."""
    info, teacher, samples = load_teacher_and_samples(cfg)
    fsdp = resolve_strategy(cfg.train.strategy, info) == "fsdp"
    student = meta_model(cfg.model.student, torch.float32) if fsdp else load_model(cfg.model.student, device=info.device)
    if student.meta.dims != teacher.meta.dims:
        raise ConfigError(f"config field 'model.student': {cfg.model.student} was pruned from another teacher "
                          f"(dims {student.meta.dims} vs {teacher.meta.dims})")
    return info, teacher, student, samples
