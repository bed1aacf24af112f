"""``python -m benchmarks``: compute and wall-clock benchmarks of PARE (see docs/benchmarks.md).

A benchmark, not a test: it reports numbers. The suites are a small registry; each is a module with
``run(config, progress) -> dict`` (JSON-able) and ``table(result) -> list[str]``, imported only when selected,
so a suite that needs ComfyUI (``measured``, ``compile``) costs nothing when it is not run, and the core package
``comfyui_pare`` never imports ComfyUI. To add a suite (e.g. token reduction), write its module and add one line
to ``SUITES``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Suite:
    module: str  # dotted module name, relative to this package
    help: str
    needs_comfy: bool

    def load(self) -> ModuleType:
        return importlib.import_module(f"{__name__}{self.module}")


SUITES: dict[str, Suite] = {
    "compute": Suite(".analytic", "analytic MACs per step at real Wan2.1 shapes (1.3B/14B, 480p/720p, 81 frames)", False),
    "measured": Suite(".measured", "step time through ComfyUI's KSampler at 1.3B width: teacher, pruned, routed", True),
    "token_reduction": Suite(".token_reduction", "PARE Token Reduction over ratios: analytic at real shapes, step "
                             "time through ComfyUI at 1.3B width, alone and on the pruned / routed student", True),
    "compile": Suite(".compile_suite", "routing under TorchCompileModel and per-block torch.compile: recompiles, time",
                     True),
}
