"""Timing and dtype readings of models run through ComfyUI as a library (``comfy_library``): the measured suites'
per-call timer and the compute dtype they report."""

from __future__ import annotations

import time

import torch

from comfy_library import Comfy

TIMING_KEY = "pare_bench_timing"


class CallTimes:
    """An APPLY_MODEL wrapper that times every model call the sampler makes (wall clock; on CUDA the call is
    bracketed by synchronizes, so the time is the device's, at the price of one sync per call)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def __call__(self, executor, *args, **kwargs):
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = executor(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - start)
        return out


def timed(comfy: Comfy, model) -> tuple[object, CallTimes]:
    """A clone of ``model`` whose sampler model calls are timed (outermost APPLY_MODEL wrapper)."""
    m = model.clone()
    times = CallTimes()
    kind = comfy.pe.WrappersMP.APPLY_MODEL
    m.remove_wrappers_with_key(kind, TIMING_KEY)
    m.wrappers[kind] = {TIMING_KEY: [times], **m.wrappers.get(kind, {})}  # the first wrapper is the outermost
    return m, times




def compute_dtype(model) -> str:
    """The dtype ComfyUI computes in for a loaded model (its manual-cast dtype, else the weights' dtype), and the
    weights' storage dtype when it differs, e.g. 'float16 (weights float8_e4m3fn)'."""
    base = model.model
    stored = base.get_dtype()
    compute = base.manual_cast_dtype or stored
    name = str(compute).removeprefix("torch.")
    scaled = getattr(base.model_config, "scaled_fp8", None)
    if scaled is not None:  # fp8_scaled file: the weights stay fp8 beside their scales, whatever get_dtype says
        return f"{name} (weights {str(scaled).removeprefix('torch.')}, scaled)"
    return name if compute == stored else f"{name} (weights {str(stored).removeprefix('torch.')})"
