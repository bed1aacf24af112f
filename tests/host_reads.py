"""Count the host reads the pack's own code makes while ComfyUI samples (run as a program; prints JSON).

On CUDA, every value a host needs from a device tensor is a synchronisation: the host waits for the queue to drain
before it can launch more work. This probe runs on the CPU, where those reads are free, and counts them anyway: it
wraps the tensor methods and functions that synchronise on CUDA (``item``, ``tolist``, ``bool(t)``, ``int(t)``,
``float(t)``, ``.cpu()``, ``.numpy()``, ``nonzero``, boolean-mask indexing, ``torch.equal`` ...) and counts the calls
made directly from a file of the pack (``comfyui_pare/``, ``nodes/``), attributed to the model call they happen in
(an outermost APPLY_MODEL wrapper numbers the calls). ComfyUI runs as a library in this process
(``benchmarks.comfy_lib``), with the stock KSampler code path.

Usage: python tests/host_reads.py OUT.json
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PACK_DIRS = tuple(str(REPO / d) + "/" for d in ("comfyui_pare", "nodes"))

_TENSOR_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
                   "__array__", "__repr__", "__format__", "equal", "allclose", "unique", "masked_select")
_TORCH_FUNCTIONS = ("equal", "allclose", "nonzero", "unique", "masked_select", "is_nonzero")
_FACTORIES = ("tensor", "as_tensor")


class Reads:
    def __init__(self) -> None:
        self.call: int | None = None  # index of the model call in progress, None between calls
        self.calls = 0
        self.in_call: dict[int, list[str]] = {}
        self.outside: list[str] = []
        self.copies: dict[int | None, list[str]] = {}  # possible host-to-device copies, by model call
        self._depth = 0

    def record(self, what: str, copy: bool = False) -> None:
        frame = sys._getframe(2)  # the caller of the wrapped method
        name = frame.f_code.co_filename
        if not name.startswith(PACK_DIRS) or self._depth:
            return
        site = f"{Path(name).relative_to(REPO)}:{frame.f_lineno} {what}"
        if copy:
            self.copies.setdefault(self.call, []).append(site)
        else:
            (self.in_call.setdefault(self.call, []) if self.call is not None else self.outside).append(site)

    def wrap(self, owner, name: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def counted(*args, **kwargs):
            self.record(name)
            self._depth += 1  # a read inside another counted read (e.g. tolist -> item) counts once
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        setattr(owner, name, counted)

    def wrap_getitem(self) -> None:
        original = torch.Tensor.__getitem__

        def getitem(t, index):
            parts = index if isinstance(index, tuple) else (index,)
            if any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts):
                self.record("__getitem__[bool mask]")  # the result's size depends on the mask's values
            return original(t, index)

        torch.Tensor.__getitem__ = getitem

    def wrap_to(self) -> None:
        """``.to("cpu")`` is a read. ``.to(device)`` with a device object may be a host-to-device copy on CUDA (from
        a host tensor; PyTorch synchronises after a blocking copy) or a no-op (already there): on the CPU the two
        look alike, so those are counted apart, as copies, which may only make per-run constants."""
        original = torch.Tensor.to

        def to(t, *args, **kwargs):
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, str) and torch.device(target).type == "cpu":
                self.record("to('cpu')")
            elif isinstance(target, (str, torch.device)):
                self.record("to(device)", copy=True)
            return original(t, *args, **kwargs)

        torch.Tensor.to = to

    def wrap_factory(self, name: str) -> None:
        original = getattr(torch, name)

        def made(data, *args, **kwargs):
            if kwargs.get("device") is not None and not torch.is_tensor(data):
                self.record(f"{name}(host data, device=...)", copy=True)
            return original(data, *args, **kwargs)

        setattr(torch, name, made)

    def install(self) -> None:
        for name in _TENSOR_METHODS:
            if hasattr(torch.Tensor, name):
                self.wrap(torch.Tensor, name)
        for name in _TORCH_FUNCTIONS:
            self.wrap(torch, name)
        self.wrap_getitem()
        self.wrap_to()
        for name in _FACTORIES:
            self.wrap_factory(name)

    def __call__(self, executor, *args, **kwargs):  # the outermost APPLY_MODEL wrapper
        self.call = self.calls
        self.calls += 1
        try:
            return executor(*args, **kwargs)
        finally:
            self.call = None

    def to_json(self) -> dict:
        per_call = [len(self.in_call.get(i, [])) for i in range(self.calls)]
        sites = sorted({s for v in self.in_call.values() for s in v})
        copies = {str(k): v for k, v in self.copies.items()}
        return {"calls": self.calls, "reads_per_call": per_call, "sites_in_calls": sites, "outside": self.outside,
                "copies_by_call": copies}


def main(out: str) -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks import comfy_lib
    from benchmarks.config import MEASURED_QUICK
    from benchmarks.models import PIN_FIRST, PIN_LAST, bench_files

    comfy = comfy_lib.load_comfy("cpu")
    files = bench_files(MEASURED_QUICK, 0.5, 0.7)
    comfy.add_model_folder("diffusion_models", files.folder)
    from comfyui_pare.router import load_router

    student = comfy_lib.pare_unet(comfy, files.student)
    router = load_router(files.folder / files.router)
    router.pare_name = files.router
    n = MEASURED_QUICK.num_layers
    models = {
        "plain": student,
        "router_budget": comfy_lib.apply_router(comfy, student, router, 0.5, PIN_FIRST, PIN_LAST),
        "router_threshold": comfy_lib.apply_router(comfy, student, router, threshold=0.5),
        "static": comfy_lib.static_schedule(comfy, student, f"1-{n - 2}@0.3-1.0"),
    }
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 8, MEASURED_QUICK.text_dim, generator=gen)
    neg = torch.randn(1, 8, MEASURED_QUICK.text_dim, generator=gen)
    latent = torch.zeros(1, 16, 1, 8, 8)
    result = {}
    for name, model in models.items():
        model = comfy_lib.with_shift(comfy, model)
        summaries = []
        for counted in (False, True):  # the same run without and with the probe: the report must not change
            reads = Reads()
            m = model.clone()
            kind = comfy.pe.WrappersMP.APPLY_MODEL
            m.wrappers[kind] = {"host_reads": [reads], **m.wrappers.get(kind, {})}
            saved = {k: getattr(torch.Tensor, k) for k in (*_TENSOR_METHODS, "__getitem__", "to")
                     if hasattr(torch.Tensor, k)}
            saved_fn = {k: getattr(torch, k) for k in (*_TORCH_FUNCTIONS, *_FACTORIES)}
            if counted:
                reads.install()
            try:
                with torch.inference_mode():
                    samples = comfy_lib.ksample(comfy, m, ctx, neg, latent, steps=4, cfg=4.0)
            finally:
                for k, v in saved.items():
                    setattr(torch.Tensor, k, v)
                for k, v in saved_fn.items():
                    setattr(torch, k, v)
            template = comfy.pack["routing"].routing_template(m)
            run = template.last_run if template is not None else None
            summaries.append([] if run is None else [[r.sigma, list(r.branches), r.ran.astype(int).tolist()]
                                                     for r in run.call_records()])
        result[name] = {**reads.to_json(), "records": summaries[1], "records_unprobed": summaries[0],
                        "latent_sum": float(samples.abs().sum())}
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
