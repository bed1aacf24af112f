"""Run by tests/nodes/test_comfy_compat.py in a fresh process per ComfyUI (PARE_COMFYUI_DIR): the pack's seams on the real
ComfyUI, then the nodes with one internal removed from ComfyUI's real modules. Prints one JSON line."""

from __future__ import annotations

import json
import sys

import torch

import comfy_library
from benchmarks.models import bench_files
from comfyui_pare.wan import WanDims


def attempt(fn) -> str | None:
    try:
        fn()
        return None
    except Exception as e:  # noqa: BLE001 - the probe reports whatever the node raised
        return f"{type(e).__name__}: {e}"


def main() -> None:
    comfy = comfy_library.load_comfy("cpu")
    compat = sys.modules[f"{comfy_library.PACK_MODULE}.nodes.comfy_compat"]
    routing_nodes = comfy.pack["routing_nodes"]
    files = bench_files(WanDims(dim=128, num_heads=2, ffn_dim=256, num_layers=2, text_dim=4096), 0.5, 0.5)
    comfy.add_model_folder("diffusion_models", files.folder)
    out = {"version": compat.comfy_version(), "missing": [s.name for s in compat.missing_seams()],
           "count": len(compat.SEAMS)}
    student = comfy_library.pare_unet(comfy, files.student)

    model_detection = sys.modules["comfy.model_detection"]
    model_patcher = sys.modules["comfy.model_patcher"]

    del model_patcher.ModelPatcher.set_model_patch_replace
    compat._present.cache_clear()  # seams are checked once at start-up; this probe removes one afterwards
    out["static"] = attempt(lambda: routing_nodes.PAREStaticSchedule.execute(student, "1-1"))
    detect = model_detection.model_config_from_unet
    del model_detection.model_config_from_unet
    compat._present.cache_clear()
    out["after"] = [s.name for s in compat.check_seams()]
    out["load"] = attempt(lambda: comfy_library.pare_unet(comfy, files.student))
    model_detection.model_config_from_unet = detect
    compat._present.cache_clear()
    with torch.inference_mode():
        out["load_restored"] = attempt(lambda: comfy_library.pare_unet(comfy, files.student))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
