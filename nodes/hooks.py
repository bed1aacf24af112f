"""The one hook kit: how the pack's per-step features (routing, token reduction) live inside ComfyUI's sampler.

A feature is a *template* (what its node configured; shared by every clone of the patched model) that starts a fresh
*run* for every sampling run, a ``double_block`` replace patch class, and a key. ``install`` clones the model, checks
the ComfyUI internals the feature needs (``require``), chains the block patches to whatever patch was there before
(another pack's, or the other PARE feature's) and registers two generic keyed wrappers:

* ``OUTER_SAMPLE``, once per sampling run: the run is made from the template with the sampling object the run really
  uses (``get_model_object("model_sampling")`` sees a ModelSamplingSD3 shift before sampling applies it) and the
  sampler's sigmas; it replaces the template in a copy of ``transformer_options``; in ``finally`` the run is kept
  as the template's ``last_run`` (the report node reads it) and logs its one summary line.
* ``DIFFUSION_MODEL``, once per model call: one ``CallInfo`` (sigmas with the timestep fallback, CFG branches,
  token grid, timestep, context) opens the call on the run; ``end_call`` closes it.

Runs keep the current call per thread: ComfyUI's multi-GPU path may run model calls of one sampling run in threads.
The kit also owns what both features share: the start/end range check of their nodes (``check_percent_range``),
the active range as sigmas (``SigmaWindow``), ``HookRun.warn_once`` and the call of the block patch that was there
before (``ChainedBlockPatch.call_next``).
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from ..comfyui_pare.errors import PareError
from ..comfyui_pare.model_family import PATCH_SIZE, token_grid
from ..comfyui_pare.router import sample_timesteps
from .comfy_compat import ModelPatcher, internals, require

logger = logging.getLogger(__name__)


@dataclass
class CallInfo:
    """What one model call is, read once from ComfyUI's arguments."""

    sigma: torch.Tensor  # [rows] on the device (float64 where it has it): comparisons stay on the device
    rows: int
    branches: list[int]  # cond_or_uncond: one entry per chunk of rows
    grid: tuple[int, int, int]  # latent tokens per (frame, row, column) after patch embedding
    timestep: torch.Tensor | None
    context: torch.Tensor | None

    @classmethod
    def read(cls, model: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor | None,
             transformer_options: dict) -> "CallInfo":
        sigmas = transformer_options.get("sigmas")
        # A per-frame timestep (Wan2.2 TI2V-5B with a start image) counts as its noisy frames' (router.py's rule).
        sig = (sigmas if sigmas is not None else sample_timesteps(timestep) / 1000.0).detach().reshape(-1)
        sig = sig.to(torch.float64 if sig.device.type != "mps" else torch.float32)  # compare like the host did
        rows = x.shape[0]
        if sig.shape[0] != rows:
            sig = sig.repeat((rows + sig.shape[0] - 1) // sig.shape[0])[:rows]
        grid = token_grid(x.shape[2:], getattr(model, "patch_size", PATCH_SIZE))
        return cls(sigma=sig, rows=rows, branches=list(transformer_options.get("cond_or_uncond", [0])),
                   grid=grid, timestep=timestep, context=context)


class HookRun:
    """Base of a per-sampling-run state: the current call, kept per thread."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._warned: set[str] = set()

    @property
    def current(self):
        return getattr(self._local, "call", None)

    @current.setter
    def current(self, call) -> None:
        self._local.call = call

    def warn_once(self, key: str, message: str, *args) -> None:
        """Log ``message`` (a logging format) the first time ``key`` is warned about in this run."""
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def begin_call(self, info: CallInfo) -> None:
        raise NotImplementedError

    def end_call(self) -> None:
        self.current = None

    def finish(self) -> None:
        """The sampling run ended (also on an error or an interrupt): free what is large, log one summary line."""


class RunTemplate:
    """Base of what a node configures. ``ModelPatcher.clone()`` deep-copies ``model_options``; a template is
    configuration plus the ``last_run`` slot, so every clone shares it."""

    last_run: HookRun | None = None

    def __deepcopy__(self, memo) -> "RunTemplate":
        return self

    def start_run(self, model_sampling, schedule: list[float] | None) -> HookRun:
        raise NotImplementedError


def check_percent_range(start_percent: float, end_percent: float) -> None:
    """The start/end inputs of a per-step feature's node: fractions of the sampling run, in order."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise PareError(f"start_percent {start_percent} and end_percent {end_percent} must satisfy "
                        "0 <= start <= end <= 1")


class SigmaWindow:
    """A node's active range [start_percent, end_percent] as sigmas of the sampled model (its own
    ``percent_to_sigma``, a ModelSamplingSD3 shift included). Sigmas fall as sampling goes on, so a call is inside
    when ``low <= sigma <= high``. Percent-to-sigma lookups are cached for the run."""

    def __init__(self, percent_to_sigma: Callable[[float], float], start_percent: float, end_percent: float) -> None:
        self._percent_to_sigma = percent_to_sigma
        self._sigma_of: dict[float, float] = {}
        self.whole = start_percent <= 0.0 and end_percent >= 1.0  # every call is inside
        self.high = self.sigma(start_percent)
        self.low = self.sigma(end_percent)

    def sigma(self, percent: float) -> float:
        if percent not in self._sigma_of:
            self._sigma_of[percent] = float(self._percent_to_sigma(percent))
        return self._sigma_of[percent]

    @property
    def empty(self) -> bool:
        return self.low > self.high

    def contains(self, sigma: float) -> bool:
        return self.low <= sigma <= self.high

    def active(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Bool per row of a call's sigmas (on their device)."""
        return (sigmas >= self.low) & (sigmas <= self.high)


class ChainedBlockPatch:
    """Base of a feature's ``double_block`` replace patch of block ``index``: ``inner`` is the patch that was there
    before (another pack's, or the other PARE feature's), called in turn by ``call_next``."""

    def __init__(self, index: int, inner: Callable | None) -> None:
        self.index = index
        self.inner = inner

    def call_next(self, args: dict, extra: dict) -> dict:
        return self.inner(args, extra) if self.inner is not None else extra["original_block"](args)


def _schedule(args: tuple, kwargs: dict) -> list[float] | None:
    """The sampler's sigmas from OUTER_SAMPLE's (noise, latent_image, sampler, sigmas, ...) arguments."""
    sigmas = kwargs.get("sigmas", args[3] if len(args) > 3 else None)
    return sigmas.detach().float().reshape(-1).tolist() if torch.is_tensor(sigmas) else None


def _outer_sample(key: str, executor, *args, **kwargs):
    guider = executor.class_obj
    original = guider.model_options
    guider.model_options = internals.clone_model_options(original)
    topts = guider.model_options["transformer_options"]
    template: RunTemplate = topts[key]
    run = template.start_run(guider.model_patcher.get_model_object("model_sampling"), _schedule(args, kwargs))
    topts[key] = run
    try:
        return executor(*args, **kwargs)
    finally:
        template.last_run = run
        run.finish()
        guider.model_options = original


def _diffusion_model(key: str, executor, x, timestep, context, clip_fea, time_dim_concat, transformer_options,
                     **kwargs):
    run = transformer_options.get(key)
    if not isinstance(run, HookRun):
        return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)
    run.begin_call(CallInfo.read(executor.class_obj, x, timestep, context, transformer_options))
    try:
        return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)
    finally:
        run.end_call()


# Bookkeeping stays eager under torch.compile; the model the wrapper calls is still compiled.
_diffusion_model = torch.compiler.disable(recursive=False)(_diffusion_model)


def chain_block_patches(m: ModelPatcher, num_blocks: int, make: Callable[[int, Callable | None], object],
                        own: type) -> None:
    """Set ``make(i, inner)`` as the ``double_block`` replace patch of every block, where ``inner`` is the patch that
    was there (another pack's, kept and called in turn), unwrapping one of our own type ``own`` (re-applying a node
    replaces its patch instead of stacking it)."""
    dit = m.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for i in range(num_blocks):
        inner = dit.get(("double_block", i))
        if isinstance(inner, own):
            inner = inner.inner
        m.set_model_patch_replace(make(i, inner), "dit", "double_block", i)


def install(model: ModelPatcher, key: str, template: RunTemplate,
            block_cls: Callable[[int, Callable | None], object], num_blocks: int, node: str
            ) -> ModelPatcher:
    """A clone of ``model`` with the feature installed under ``key``; replaces the same feature installed before
    (idempotent) and keeps every other patch and wrapper. ``node``: the node's display name, for ``require``."""
    require(node)
    m = model.clone()
    m.model_options["transformer_options"][key] = template
    chain_block_patches(m, num_blocks, block_cls, own=block_cls)
    internals.set_keyed_wrapper(m, internals.outer_sample_wrapper(), key, functools.partial(_outer_sample, key))
    internals.set_keyed_wrapper(m, internals.diffusion_model_wrapper(), key, functools.partial(_diffusion_model, key))
    return m


def log_summary(label: str, lines: list[str]) -> None:
    logger.info("%s: %s", label, "; ".join(lines[1:3] + lines[-1:]) if len(lines) > 2 else lines[0])
