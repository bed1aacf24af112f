"""PARE Token Reduction: AsymRnR on Wan self-attention, inside ComfyUI's own sampler.

How it hooks in (ComfyUI 0.3.75; Wan's blocks set no block index of their own):

* ``transformer_options["optimized_attention_override"]``: ComfyUI's attention seam. Every ``optimized_attention``
  call of the model passes through it with the attention function it would have used (``func``: pytorch,
  sub-quadratic, sage, ...). An override that was there before is kept and called in turn (chained), so the
  reduced attention still runs on the user's backend and through any earlier override.
* A ``double_block`` replace patch per block (chained to any earlier one, e.g. PARE routing) hands the block a
  shallow copy of ``transformer_options`` that names the block. A Wan block's first attention call is its
  self-attention (then cross-attention), so the override reduces exactly that call, after RoPE.
* ``OUTER_SAMPLE`` wrapper: a fresh per-run state (matching cache, statistics), schedule positions mapped to sigmas
  with the sampled model's ``percent_to_sigma`` (``get_model_object``, so a ModelSamplingSD3 shift is honoured on
  the first run too); one summary log line per run.
* ``DIFFUSION_MODEL`` wrapper: the token grid (frames, rows, columns) and the step index of each model call.

Blocks skipped by PARE routing never call attention; a pruned block attends with its kept heads. With ratio 0
everywhere (or strength 0, or outside start/end percent) the original attention call is made unchanged.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import comfy.model_patcher
import folder_paths
import torch
from comfy.ldm.modules.attention import attention_pytorch
from comfy_api.latest import io

from ..comfyui_pare.errors import PareError
from ..comfyui_pare.pruned import PrunedWanMeta
from ..comfyui_pare.token_reduction import MatchingCache, Reduction, reduced_attention
from ..comfyui_pare.token_schedule import PRESETS, TokenSchedule, load_schedule, parse_schedule_text, preset
from .comfy_compat import require
from .folders import TOKEN_SCHEDULES, token_schedule_dir
from .model_info import model_meta
from .patching import chain_block_patches, set_keyed_wrappers

logger = logging.getLogger(__name__)

KEY = "pare_token_reduction"  # transformer_options key and wrapper key
BLOCK_KEY = "pare_token_reduction_block"
OVERRIDE = "optimized_attention_override"
ADVANCED = {"optional": True}  # expert knobs (0.3.75's V3 inputs have no advanced= flag yet)


@dataclass(eq=False)
class ReductionTemplate:
    """What the node configures; a fresh ReductionRun is made from it for every sampling run (shared by clones)."""

    schedule: TokenSchedule
    strength: float = 1.0
    cache_steps: int = 1
    start_percent: float = 0.0
    end_percent: float = 1.0
    last_run: "ReductionRun | None" = None

    def __deepcopy__(self, memo) -> "ReductionTemplate":
        return self


class ReductionRun:
    """Per-sampling-run state: step counter, token grid, matching cache, ratio lookups and statistics."""

    def __init__(self, template: ReductionTemplate, percent_to_sigma: Callable[[float], float]) -> None:
        s = template.schedule
        self.template = template
        self.percent_to_sigma = percent_to_sigma
        self.sigma_high = percent_to_sigma(template.start_percent)
        self.sigma_low = percent_to_sigma(template.end_percent)
        self.cache = MatchingCache(template.cache_steps, s.stride, s.metric, s.seed)
        self.grid: tuple[int, int, int] | None = None
        self.step = -1
        self.sigma: float | None = None
        self._last_sigma: float | None = None
        self._ratios: dict[tuple[int, float], tuple[float, float]] = {}
        self.calls = self.reduced_calls = 0
        self.tokens = {"q": [0, 0], "kv": [0, 0]}  # [tokens before, tokens after] summed over reduced calls
        self._warned = False

    def begin_call(self, grid: tuple[int, int, int], transformer_options: dict, timestep: torch.Tensor) -> None:
        sigmas = transformer_options.get("sigmas")
        sigma = float(sigmas.reshape(-1)[0]) if sigmas is not None else float(timestep.reshape(-1)[0]) / 1000.0
        if sigma != self._last_sigma:  # a new step; CFG halves run separately keep the step
            self.step += 1
            self._last_sigma = sigma
        self.sigma, self.grid = sigma, grid

    def ratios(self, block: int) -> tuple[float, float]:
        sigma = self.sigma
        if sigma is None or not self.sigma_low <= sigma <= self.sigma_high:
            return 0.0, 0.0
        key = (block, sigma)
        if key not in self._ratios:
            t = self.template
            self._ratios[key] = t.schedule.ratios(block, sigma, self.percent_to_sigma, t.strength)
        return self._ratios[key]

    def warn_once(self, msg: str, *args) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(msg, *args)

    def summary(self) -> str:
        def pct(feat: str) -> str:
            before, after = self.tokens[feat]
            return f"{100.0 * (1 - after / before):.1f}%" if before else "0%"
        return (f"PARE token reduction ({self.template.schedule.name}, strength {self.template.strength:g}): "
                f"reduced {self.reduced_calls} of {self.calls} self-attention calls; queries -{pct('q')}, "
                f"keys/values -{pct('kv')} in those calls; matchings made {self.cache.made}, reused {self.cache.reused}")


@dataclass
class BlockCall:
    index: int
    seen: bool = False  # the block's first attention call (self-attention) has passed


class ReductionBlock:
    """The ``double_block`` replace patch of one block: names the block for the attention override, chains on."""

    def __init__(self, index: int, inner: Callable | None) -> None:
        self.index = index
        self.inner = inner

    def __call__(self, args: dict, extra: dict) -> dict:
        topts = args["transformer_options"]
        if isinstance(topts.get(KEY), ReductionRun):
            args = {**args, "transformer_options": {**topts, BLOCK_KEY: BlockCall(self.index)}}
        return self.inner(args, extra) if self.inner is not None else extra["original_block"](args)


# ComfyUI attention functions whose kernels take no additive bias: sageattn swallows ``attn_mask`` unused, and
# flash-attn refuses it (ComfyUI then falls back to SDPA with a warning on every call).
MASKLESS_BACKENDS = ("attention_sage", "attention_flash")


def backend_for(func: Callable, bias: torch.Tensor | None) -> Callable:
    """The user's attention function, or ComfyUI's SDPA one for a call with a proportional-attention bias that the
    user's backend cannot apply (reduced keys/values with ``proportional``; every other call keeps the backend)."""
    if bias is None or getattr(func, "__name__", "") not in MASKLESS_BACKENDS:
        return func
    return getattr(attention_pytorch, "__wrapped__", attention_pytorch)  # the raw function, like ``func``


class ReducedSelfAttention:
    """The attention override: reduced self-attention where the schedule asks for it, else the next in chain."""

    def __init__(self, prev: Callable | None) -> None:
        self.prev = prev

    def _next(self, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        return self.prev(func, *args, **kwargs) if self.prev is not None else func(*args, **kwargs)

    def __call__(self, func: Callable, *args, **kwargs) -> torch.Tensor:
        topts = kwargs.get("transformer_options") or {}
        call, run = topts.get(BLOCK_KEY), topts.get(KEY)
        if not isinstance(call, BlockCall) or not isinstance(run, ReductionRun) or call.seen:
            return self._next(func, args, kwargs)
        call.seen = True
        run.calls += 1
        q, k, v = args[:3]
        heads = kwargs["heads"] if "heads" in kwargs else args[3]
        q_ratio, kv_ratio = run.ratios(call.index)
        if q_ratio == 0.0 and kv_ratio == 0.0:
            return self._next(func, args, kwargs)
        if (kwargs.get("skip_reshape") or q.ndim != 3 or k.shape != q.shape or v.shape != q.shape
                or run.grid is None or q.shape[1] != math.prod(run.grid)):
            run.warn_once("PARE token reduction: block %d's self-attention has shape %s, not the token grid %s; "
                          "it runs unreduced", call.index, tuple(q.shape), run.grid)
            return self._next(func, args, kwargs)
        b, n = q.shape[:2]
        qh, kh, vh = (t.view(b, n, heads, -1).transpose(1, 2) for t in (q, k, v))
        sched = run.template.schedule
        rows = tuple(topts.get("cond_or_uncond", ()))
        q_red = kv_red = None
        if q_ratio > 0:
            q_red = Reduction(run.cache.get(call.index, "q", run.step, qh, run.grid, rows), q_ratio, sched.mode)
            run.tokens["q"][0] += n
            run.tokens["q"][1] += q_red.length
        if kv_ratio > 0:
            kv_red = Reduction(run.cache.get(call.index, "kv", run.step, vh, run.grid, rows), kv_ratio, sched.mode)
            run.tokens["kv"][0] += n
            run.tokens["kv"][1] += kv_red.length
        run.reduced_calls += 1
        base = {key: val for key, val in kwargs.items() if key not in ("heads", "mask")}

        def attend(q_, k_, v_, bias):
            kw = {**base, "heads": heads, "mask": bias, "skip_reshape": True, "skip_output_reshape": True}
            return self._next(backend_for(func, bias), (q_, k_, v_), kw)

        out = reduced_attention(qh, kh, vh, attend, q_red, kv_red, sched.proportional)
        return out.transpose(1, 2).reshape(b, n, -1)


# -- wrappers -----------------------------------------------------------------------------------------------

def _outer_sample(executor, *args, **kwargs):
    guider = executor.class_obj
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    topts = guider.model_options["transformer_options"]
    template: ReductionTemplate = topts[KEY]
    # get_model_object: the ModelSamplingSD3 object patch is not applied to the model until sampling loads it
    sampling = guider.model_patcher.get_model_object("model_sampling")
    run = ReductionRun(template, sampling.percent_to_sigma)
    topts[KEY] = run
    try:
        return executor(*args, **kwargs)
    finally:
        run.cache.clear()  # the matchings can be large (GPU memory); the run's statistics stay
        template.last_run = run
        logger.info("%s", run.summary())
        guider.model_options = original


def _diffusion_model(executor, x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs):
    run = transformer_options.get(KEY)
    if isinstance(run, ReductionRun):
        patch = getattr(executor.class_obj, "patch_size", (1, 2, 2))
        run.begin_call(tuple(-(-s // p) for s, p in zip(x.shape[2:], patch)), transformer_options, timestep)
    return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)


def apply_token_reduction(model: comfy.model_patcher.ModelPatcher, template: ReductionTemplate,
                          num_blocks: int) -> comfy.model_patcher.ModelPatcher:
    """A patched clone; replaces PARE token reduction already on ``model`` (idempotent), keeps other patches."""
    m = model.clone()
    topts = m.model_options["transformer_options"]
    topts[KEY] = template
    prev = topts.get(OVERRIDE)
    if isinstance(prev, ReducedSelfAttention):
        prev = prev.prev
    topts[OVERRIDE] = ReducedSelfAttention(prev)
    chain_block_patches(m, num_blocks, ReductionBlock, ReductionBlock)
    set_keyed_wrappers(m, KEY, _outer_sample, _diffusion_model)
    return m


# -- the node -----------------------------------------------------------------------------------------------

CUSTOM = "custom"
SCHEDULE_CHOICES = [*PRESETS, CUSTOM]


def resolve_schedule(choice: str, schedule_json: str, meta: PrunedWanMeta) -> TokenSchedule:
    """A preset for the teacher's depth, or the custom schedule: inline JSON, or a file (absolute, or relative to
    models/pare_token_schedules). Validated against the model's blocks; a schedule for the teacher's depth runs on
    the blocks a depth-pruned student kept."""
    if choice != CUSTOM:
        schedule = preset(choice, meta.dims.num_layers)
    else:
        text = (schedule_json or "").strip()
        if not text:
            raise PareError("PARE Token Reduction: schedule is 'custom' but schedule_json is empty; paste a schedule "
                            "JSON or give the name of a .json file in models/pare_token_schedules")
        if text.startswith("{"):
            schedule = parse_schedule_text(text, "inline schedule_json")
        else:
            path = text if os.path.isabs(text) else (folder_paths.get_full_path(TOKEN_SCHEDULES, text)
                                                     or os.path.join(token_schedule_dir(), text))
            schedule = load_schedule(path)
    return schedule.for_model(meta.num_blocks, meta.teacher_blocks, meta.dims.num_layers)


class PARETokenReduction(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PARETokenReduction",
            display_name="PARE Token Reduction",
            category="PARE/speed",
            description=(
                "Training-free token reduction for Wan self-attention (AsymRnR): merges similar query and key/value "
                "tokens at the blocks and steps a schedule names, runs attention on fewer tokens and restores the "
                "output. Stacks with PARE routing, pruned students, LoRAs and CFG. Returns a patched copy."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The Wan2.1 model (teacher or PARE student, routed or not)."),
                io.Combo.Input("schedule", options=SCHEDULE_CHOICES, default="balanced",
                               tooltip="A shipped preset for Wan2.1 1.3B (30 blocks) or 14B (40 blocks), or 'custom' "
                                       "to use schedule_json."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Scales every ratio of the schedule (0 = off, bit-identical to no node; "
                                       "ratios are capped at 0.95)."),
                io.Int.Input("matching_cache_steps", default=3, min=1, max=100,
                             tooltip="Reuse each block's token matching for this many steps (1 = match every step). "
                                     "Higher is faster; tokens move little between neighbouring steps."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the schedule reduction may start (0 = first, noisiest step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where reduction stops (1 = last step). Outside the range attention is full."),
                io.String.Input("schedule_json", default="", multiline=True, **ADVANCED,
                                tooltip="For schedule 'custom': a schedule JSON, or the name of a .json file in "
                                        "models/pare_token_schedules (or an absolute path). See "
                                        "docs/token_reduction.md for the format; asymrnr-calibrate writes one."),
            ],
            outputs=[io.Model.Output(tooltip="The model with token reduction applied.")],
        )

    @classmethod
    def execute(cls, model, schedule: str, strength: float, matching_cache_steps: int, start_percent: float,
                end_percent: float, schedule_json: str = "") -> io.NodeOutput:
        require("PARE Token Reduction")
        meta = model_meta(model)
        num_blocks = meta.num_blocks
        sched = resolve_schedule(schedule, schedule_json, meta)
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise PareError(f"start_percent {start_percent} and end_percent {end_percent} must satisfy "
                            "0 <= start <= end <= 1")
        if strength < 0 or matching_cache_steps < 1:
            raise PareError(f"strength must be >= 0 and matching_cache_steps >= 1, got {strength}, {matching_cache_steps}")
        template = ReductionTemplate(sched, strength, matching_cache_steps, start_percent, end_percent)
        return io.NodeOutput(apply_token_reduction(model, template, num_blocks))
