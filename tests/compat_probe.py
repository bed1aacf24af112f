"""Run by tests/nodes/test_comfy_compat.py as ``python -m tests.compat_probe`` in a fresh process per ComfyUI
(PARE_COMFYUI_DIR): the pack's seams on the real ComfyUI, then every checked ComfyUI object removed from ComfyUI's
real modules in turn, with every node that declares its seam run while it is missing. Prints one JSON line."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import sys

import torch

import comfy_library
from benchmarks.models import bench_files
from comfyui_pare.router import load_router
from comfyui_pare.wan import WanDims

PACK = comfy_library.PACK_MODULE


def attempt(fn) -> str | None:
    try:
        fn()
        return None
    except Exception as e:  # noqa: BLE001 - the probe reports whatever the node raised
        return f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def removed(module: str, qualname: str):
    """``module.qualname`` deleted where it is defined (the class in the MRO that holds it), restored after."""
    *path, name = qualname.split(".")
    parent = importlib.import_module(module)
    for part in path:
        parent = getattr(parent, part)
    owner = next((c for c in inspect.getmro(parent) if name in vars(c)), parent) if inspect.isclass(parent) else parent
    saved = vars(owner)[name]
    delattr(owner, name)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def node_runners(comfy, files, student) -> dict:
    """One call per node name the seams use, with inputs that reach its seams when nothing is missing."""
    node = {n: sys.modules[f"{PACK}.nodes.{n}"] for n in ("routing_nodes", "token_reduction_nodes", "lora",
                                                          "toy_text", "calibration")}
    seams = sys.modules[f"{PACK}.nodes.comfy_compat.seams"]
    router = load_router(files.folder / files.router)
    rn = node["routing_nodes"]
    return {
        seams.LOAD: lambda: comfy_library.pare_unet(comfy, files.student),
        seams.APPLY_ROUTER: lambda: rn.PAREApplyRouter.execute(student, router, mode="threshold", budget=1.0,
                                                               threshold=0.5),
        seams.STATIC: lambda: rn.PAREStaticSchedule.execute(student, "1-1"),
        seams.TOKENS: lambda: node["token_reduction_nodes"].PARETokenReduction.execute(
            student, "custom", 1.0, 1, 0.0, 1.0, schedule_json='{"num_blocks": 2, "rules": [{"feature": "q", "blocks": "all", "ratio": 0.5}]}'),
        seams.LORA: lambda: node["lora"].PARELoraLoader.execute(student, "no_such_lora.safetensors", 1.0),
        seams.LOAD_ROUTER: lambda: rn.PARELoadRouter.execute(files.router),
        seams.TOY_TEXT: lambda: node["toy_text"].PAREToyTextEncode.execute("no_such_encoder.safetensors", "a"),
        seams.CALIBRATION: lambda: node["calibration"].PARESaveCalibrationSample.execute(
            None, "a", 0, 64, 64, 1, "pare_calibration", "sample"),
        seams.REGISTRATION: lambda: asyncio.run(sys.modules[f"{PACK}.nodes"].comfy_entrypoint()),
    }


def main() -> None:
    comfy = comfy_library.load_comfy("cpu")
    seams = sys.modules[f"{PACK}.nodes.comfy_compat.seams"]
    files = bench_files(WanDims(dim=128, num_heads=2, ffn_dim=256, num_layers=2, text_dim=4096), 0.5, 0.5)
    comfy.add_model_folder("diffusion_models", files.folder)
    comfy.add_model_folder("pare_routers", files.folder)
    out = {"version": seams.comfy_version(), "missing": [s.name for s in seams.missing_seams()],
           "seams": {s.name: {"used_by": list(s.used_by), "checks": len(s.checks)} for s in seams.SEAMS}}
    student = comfy_library.pare_unet(comfy, files.student)
    runners = node_runners(comfy, files, student)
    out["baseline"] = {name: attempt(run) for name, run in runners.items()}  # nothing removed
    out["unknown_nodes"] = sorted({n for s in seams.SEAMS for n in s.used_by} - set(runners))
    out["removed"] = []
    for seam in seams.SEAMS:
        for check in seam.checks:
            with removed(check.module, check.qualname):
                seams._present.cache_clear()  # seams are checked once at start-up; this probe removes them after
                logged = [s.name for s in seams.check_seams()]
                errors = {n: attempt(runners[n]) for n in seam.used_by if n in runners}
            seams._present.cache_clear()
            out["removed"].append({"seam": seam.name, "object": f"{check.module}.{check.qualname}",
                                   "logged": seam.name in logged, "errors": errors})
    with torch.inference_mode():
        out["load_restored"] = attempt(lambda: comfy_library.pare_unet(comfy, files.student))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
