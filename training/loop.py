"""The generic training loop shared by stage 1 (``distill``) and stage 2 (``route``).

A stage supplies the trainable root module (one ``nn.Module``; stage 2 puts student and router in a
``ModuleDict``), the callable to run in the step (its DDP/FSDP2 wrapper) and a ``loss_fn(step, generator) ->
(loss, metrics)`` that computes this rank's share of the global batch. The loop owns the rest: AdamW with linear
warm-up, gradient clipping, an optional EMA of the weights (``training.ema``: diffusers' ``EMAModel`` schedule),
tqdm on rank 0, a ``loss.csv`` + ``loss.png`` curve, ``checkpoint-<step>/`` folders and ``--resume``.

Randomness comes only from ``generator``, a CPU ``torch.Generator`` seeded from the config and identical on every
rank; it is saved in each checkpoint, so a resumed run repeats the uninterrupted one bit for bit (with
``deterministic = true``).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from comfyui_pare.safetensors_io import atomic_write_text

from .checkpointing import CheckpointManager, resolve_resume
from .config import ConfigError, OutputPath
from .ema import EMA
from .parallel import DistInfo, all_reduce_mean
from .plots import line_chart_png
from .resources import set_phase, summarize_steps

logger = logging.getLogger(__name__)

LossFn = Callable[[int, torch.Generator], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainConfig:
    """The ``[train]`` table: optimisation, checkpointing and placement (shared by every training stage)."""

    output_dir: OutputPath
    steps: int
    batch_size: int = 1  # global batch: split evenly across the ranks
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.0  # 0 disables the EMA; the exported weights are the EMA's when enabled
    checkpointing_steps: int = 100
    checkpoints_total_limit: int = 3  # 0 keeps every checkpoint
    seed: int = 0
    mixed_precision: Literal["no", "bf16"] = "no"
    gradient_checkpointing: bool = False  # recompute block activations in backward (needed at 14B, long videos)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    deterministic: bool = True  # torch.use_deterministic_algorithms: bitwise-equal resume
    log_every: int = 1

    def validate(self) -> None:
        checks = [("steps", self.steps >= 1), ("batch_size", self.batch_size >= 1),
                  ("learning_rate", self.learning_rate > 0), ("warmup_steps", self.warmup_steps >= 0),
                  ("max_grad_norm", self.max_grad_norm >= 0), ("ema_decay", 0 <= self.ema_decay < 1),
                  ("checkpointing_steps", self.checkpointing_steps >= 1),
                  ("checkpoints_total_limit", self.checkpoints_total_limit >= 0), ("log_every", self.log_every >= 1)]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"config field 'train.{name}': value {getattr(self, name)!r} is out of range")

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.mixed_precision == "bf16" else None


def set_determinism(cfg: TrainConfig) -> None:
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _param_groups(model: nn.Module, lr_scales: dict[str, float]) -> list[dict]:
    """One optimizer group per scaled submodule (in ``lr_scales`` order), then the rest at scale 1."""
    groups, taken = [], set()
    for name, scale in lr_scales.items():
        params = [p for p in model.get_submodule(name).parameters() if p.requires_grad]
        if params:  # a frozen submodule gets no group
            groups.append({"params": params, "lr_scale": float(scale)})
        taken.update(id(p) for p in params)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    return [{"params": rest, "lr_scale": 1.0}] + groups if rest else groups


class Trainer:
    """Runs ``cfg.steps`` optimisation steps of ``loss_fn`` on ``model``, resumable."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, model: nn.Module, loss_fn: LossFn,
                 config: Any = None, lr_scales: dict[str, float] | None = None, tokens_per_step: int = 0) -> None:
        """``lr_scales`` maps a submodule name of ``model`` (e.g. ``"router"``) to a multiplier of the learning
        rate for its parameters (stage 2 trains its router faster than the student); the rest use 1.
        ``tokens_per_step``: video tokens in a global batch, for the tokens/s the run logs."""
        self.cfg, self.info, self.model, self.loss_fn, self.config = cfg, info, model, loss_fn, config
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the trainable module has no parameters with requires_grad")
        self.optimizer = torch.optim.AdamW(_param_groups(model, lr_scales or {}), lr=cfg.learning_rate,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                           weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.ema: EMA | None = None
        if cfg.ema_decay > 0:
            self.ema = EMA(self.params, decay=cfg.ema_decay)
        self.output_dir = Path(cfg.output_dir)
        self.checkpoints = CheckpointManager(self.output_dir, info, cfg.checkpoints_total_limit)
        self.csv_path = self.output_dir / "loss.csv"
        self.history: list[dict[str, float]] = []
        self.tokens_per_step = tokens_per_step
        self.step_times: list[float] = []  # wall time of each step this process ran

    def lr_at(self, step: int) -> float:
        if self.cfg.warmup_steps and step < self.cfg.warmup_steps:
            return self.cfg.learning_rate * (step + 1) / self.cfg.warmup_steps
        return self.cfg.learning_rate

    def _extra_state(self) -> dict:
        extra: dict[str, Any] = {"history": self.history}
        if self.ema is not None:
            extra["ema"] = {"decay": self.ema.decay, "optimization_step": self.ema.optimization_step}
        return extra

    def _named_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """The EMA weights by parameter name, sharded as the parameters are (DTensors under FSDP2): each rank
        keeps and writes its shard's EMA, and a checkpoint resumes on any number of ranks."""
        if self.ema is None:
            return {}
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        return {"ema": dict(zip(names, self.ema.shadow_params))}

    def save(self, step: int) -> Path:
        return self.checkpoints.save(step, self.model, self.optimizer, {"train": self.generator}, self.config,
                                     self._extra_state(), named_states=self._named_states())

    def resume(self, resume: str | None) -> int:
        path = resolve_resume(self.output_dir, resume)
        if path is None:
            return 0
        if self.ema is not None and not (path / "ema").is_dir():
            raise ConfigError(f"{path}: the checkpoint has no EMA state but train.ema_decay is set")
        state = self.checkpoints.load(path, self.model, self.optimizer, {"train": self.generator},
                                      self._named_states())
        self.history = [h for h in state.extra.get("history", []) if h["step"] <= state.step]
        if self.ema is not None:
            self.ema.optimization_step = state.extra["ema"]["optimization_step"]
        return state.step

    def _log(self, row: dict[str, float]) -> None:
        self.history.append(row)
        if not self.info.is_main:
            return
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    def _write_curves(self) -> None:
        if not self.info.is_main or not self.history:
            return
        keys = list(self.history[0])
        lines = ["\n".join([",".join(keys)] + [",".join(repr(h[k]) for k in keys) for h in self.history])]
        atomic_write_text(self.csv_path, lines[0] + "\n")  # rewritten whole: drops rows past a resumed step
        series = {k: [h[k] for h in self.history] for k in keys if k not in ("step", "lr")}
        line_chart_png(self.output_dir / "loss.png", [h["step"] for h in self.history], series, title="training loss")

    def run(self, resume: str | None = None) -> int:
        """Train to ``cfg.steps``; returns the last step. Checkpoints every ``checkpointing_steps`` and at the end."""
        start = self.resume(resume)
        if self.info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._write_curves()
        bar = tqdm(total=self.cfg.steps, initial=start, disable=not self.info.is_main, desc="train", unit="step")
        step = start
        while step < self.cfg.steps:
            started = time.perf_counter()
            lr = self.lr_at(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            set_phase("forward_backward")
            loss, metrics = self.loss_fn(step, self.generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower train.learning_rate or "
                                         "check the inputs")
            loss.backward()
            set_phase("optimizer_step")
            grad_norm = 0.0
            if self.cfg.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                set_phase("ema")
                self.ema.step(self.params)
            if self.info.device.type == "cuda":
                torch.cuda.synchronize(self.info.device)
            self.step_times.append(time.perf_counter() - started)
            step += 1
            if step % self.cfg.log_every == 0 or step == self.cfg.steps:
                logged = all_reduce_mean({"loss": float(loss.detach()), **metrics}, self.info)
                row = {"step": step, "lr": lr, **logged, "grad_norm": grad_norm}
                self._log(row)
                seconds = self.step_times[-1]
                bar.set_postfix(loss=f"{logged['loss']:.4g}", s_step=f"{seconds:.3g}",
                                tok_s=f"{self.tokens_per_step / max(seconds, 1e-9):.4g}")
            bar.update(1)
            if step % self.cfg.checkpointing_steps == 0 or step == self.cfg.steps:
                set_phase("checkpoint")
                self.save(step)
                self._write_curves()
        bar.close()
        if not math.isfinite(self.history[-1]["loss"] if self.history else 0.0):
            raise FloatingPointError("training ended with a non-finite loss")
        return step

    def throughput(self) -> dict:
        """Median step time and tokens/s of this run's steps (``training.resources``)."""
        return summarize_steps(self.step_times, self.tokens_per_step)

    def final_weights(self) -> None:
        """Copy the EMA weights into the model and free the training state (call after ``run``, before the final
        evaluation and the export, which need only the weights): the AdamW moments and the EMA copy, three times the
        student (sharded under FSDP2), would otherwise stay beside the final evaluation and the gathered export."""
        if self.ema is not None:
            self.ema.copy_to(self.params)
        self.ema = None
        self.optimizer.state.clear()
        for p in self.params:
            p.grad = None
