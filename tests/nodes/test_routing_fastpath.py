"""The routed path's fast-path properties, through ComfyUI's real sampler run in this process (ComfyUI as a library):

* host reads: what PARE's own code reads back from tensors (``.tolist()``, ``.item()``, ``bool()``, ``.cpu()`` ...,
  counted with a TorchFunctionMode, attributed to the calling file) - on a GPU each is a device sync;
* torch.compile: under ComfyUI's stock TorchCompileModel node and under per-block compile (ComfyUI's own
  ``set_torch_compile_wrapper`` with block keys), routing gives exactly the eager routed result, with decisions that
  change between steps, and nothing is recompiled after the first model call. The dynamo front end is what
  routing interacts with, so the cheap 'eager' backend is used here; the bench measures inductor.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from torch.overrides import TorchFunctionMode

import comfy_library
from benchmarks.models import bench_files
from comfyui_pare.router import BlockRouter, RouterSpec
from comfyui_pare.wan import WanDims

pytestmark = pytest.mark.comfy
DIMS = WanDims(dim=256, num_heads=2, ffn_dim=512, num_layers=4, text_dim=4096)
READS = {"tolist", "item", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero"}
PARE_DIRS = (str(REPO / "nodes") + "/", str(REPO / "comfyui_pare") + "/")
TORCH_DIR = str(Path(torch.__file__).parent)


class HostReads(TorchFunctionMode):
    """Counts tensor reads to the host (and tensors built from host data) made by PARE's own code."""

    def __init__(self):
        super().__init__()
        self.reads = 0
        self.uploads = 0
        self.call: int | None = None  # the model call in progress (set by CallIndex), None between calls
        self.by_call: dict[int | None, list[str]] = {}  # "read" / "upload" per model call

    def __call__(self, executor, *args, **kwargs):
        """An outermost APPLY_MODEL wrapper: numbers the sampler's model calls."""
        self.call = sum(1 for k in self.by_call if k is not None)
        self.by_call.setdefault(self.call, [])
        try:
            return executor(*args, **kwargs)
        finally:
            self.call = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        kwargs = kwargs or {}
        # (.to("cpu") cannot be told from a no-op on a CPU-only machine; PARE's code reads with .tolist())
        if name in READS or name == "tensor":
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(PARE_DIRS):
                if name == "tensor":
                    self.uploads += 1
                else:
                    self.reads += 1
                self.by_call.setdefault(self.call, []).append("upload" if name == "tensor" else "read")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def lib():
    comfy = comfy_library.load_comfy("cpu")
    files = bench_files(DIMS, 0.5, 0.7)
    comfy.add_model_folder("diffusion_models", files.folder)
    student = comfy_library.pare_unet(comfy, files.student)
    gen = torch.Generator().manual_seed(0)
    cond = [torch.randn(1, 8, DIMS.text_dim, generator=gen) for _ in range(2)]
    return comfy, student, cond


def sample(lib, model, steps: int, seed: int = 0) -> torch.Tensor:
    comfy, _, (ctx, neg) = lib
    with torch.inference_mode():
        return comfy_library.ksample(comfy, comfy_library.with_shift(comfy, model), ctx, neg, torch.zeros(1, 16, 1, 8, 8),
                                 steps, cfg=4.0, seed=seed)


def switch_router(boundary: float = 700.0) -> BlockRouter:
    """Early steps skip blocks 1 and 2, late steps skip block 2 only: decisions change during sampling."""
    spec = RouterSpec(num_blocks=DIMS.num_layers, dim=DIMS.dim)
    return BlockRouter.timestep_switch(spec, boundary, [5, -5, -5, 5], [5, 5, -5, 5])


def routed_models(lib) -> dict[str, object]:
    comfy, student, _ = lib
    constant = BlockRouter.constant(RouterSpec(num_blocks=DIMS.num_layers, dim=DIMS.dim), [4.0, 1.0, 3.0, 2.0])
    return {
        "budget": comfy_library.apply_router(comfy, student, constant, budget=0.5),
        "static": comfy_library.static_schedule(comfy, student, "1-2@0.3-1.0"),
        "budget_1": comfy_library.apply_router(comfy, student, constant, budget=1.0),
    }


def test_routed_path_reads_the_host_at_most_once_per_model_call(lib):
    counts = {}
    for name, model in routed_models(lib).items():
        for steps in (2, 4):
            mode = HostReads()
            with mode:
                sample(lib, model, steps)
            counts[name, steps] = (mode.reads, mode.uploads)
    for name in ("budget", "static", "budget_1"):
        (r2, u2), (r4, u4) = counts[name, 2], counts[name, 4]
        per_call = (r4 - r2) / 2  # CFG batches cond and uncond: one model call per step
        assert per_call == (0 if name == "budget_1" else 1), (name, counts)
        assert u4 == u2, f"{name}: tensors built from host data on every call {counts}"
        assert r2 - 2 * per_call <= 2, f"{name}: per-run reads {counts}"  # schedule + the call sigmas, once


def call_records(lib, model) -> list:
    template = lib[0].pack["routing"].routing_template(model)
    return [(r.sigma, r.branches, r.ran.tolist()) for r in template.last_run.call_records()]


def test_every_routed_model_call_reads_once_and_the_report_is_unchanged(lib):
    """Per model call, not just on average: one read (the run mask), host data uploaded only in a run's first call
    (its constants), for budget and threshold routers and a static schedule; the report's records are the same with
    and without the counter."""
    comfy, student, _ = lib
    models = routed_models(lib)
    models["threshold"] = comfy_library.apply_router(comfy, student, switch_router(), threshold=0.5)
    kind = comfy.pe.WrappersMP.APPLY_MODEL
    for name, model in models.items():
        sample(lib, model, 4)
        plain = call_records(lib, model)
        mode = HostReads()
        counted = model.clone()
        counted.wrappers[kind] = {"host_reads": [mode], **counted.wrappers.get(kind, {})}  # outermost
        with mode:
            sample(lib, counted, 4)
        calls = [mode.by_call[i] for i in range(4)]
        assert all(c.count("read") == (0 if name == "budget_1" else 1) for c in calls), (name, mode.by_call)
        assert all("upload" not in c for c in calls[1:]), (name, mode.by_call)
        assert mode.by_call.get(None, []).count("read") <= 2, (name, mode.by_call)  # once per run, between calls
        assert call_records(lib, counted) == plain, name
        assert name == "budget_1" or any(not all(row) for _, _, ran in plain for row in ran), name


def test_routing_under_torch_compile_is_exact_without_recompiles(lib):
    import torch._dynamo
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_extras.nodes_torch_compile import TorchCompileModel
    from torch._dynamo.utils import counters

    comfy, student, _ = lib
    routed = comfy_library.apply_router(comfy, student, switch_router(), threshold=0.5, pin_first=0, pin_last=0)
    steps = 3
    eager = sample(lib, routed, steps)
    plain = sample(lib, student, steps)
    assert (eager - plain).abs().max() > 1e-3, "routing must change the result for this test to mean anything"
    template = comfy.pack["routing"].routing_template(routed)
    eager_blocks = template.last_run.block_calls
    graphs_after_call: list[int] = []

    def count_graphs(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        graphs_after_call.append(counters["stats"]["unique_graphs"])
        return out

    for how in ("TorchCompileModel", "per-block"):
        torch._dynamo.reset()
        if how == "TorchCompileModel":
            compiled = TorchCompileModel.execute(routed, "eager").result[0]  # the stock node (inductor: the bench)
        else:
            compiled = routed.clone()
            set_torch_compile_wrapper(compiled, backend="eager",
                                      keys=[f"diffusion_model.blocks.{i}" for i in range(DIMS.num_layers)])
        compiled.add_wrapper_with_key(comfy.pe.WrappersMP.APPLY_MODEL, "test_graphs", count_graphs)
        counters.clear()
        graphs_after_call.clear()
        for run in range(2):
            out = sample(lib, compiled, steps)
            assert torch.equal(out, eager), f"{how}, run {run}: compiled routing differs from eager routing"
            assert template.last_run.block_calls == eager_blocks, how
        assert len(graphs_after_call) == 2 * steps and graphs_after_call[0] > 0, (how, graphs_after_call)
        assert graphs_after_call[1:] == [graphs_after_call[0]] * (2 * steps - 1), \
            f"{how}: recompiled after the first model call: graphs after each call {graphs_after_call}"
