"""ComfyUI nodes of the PARE pack (V3 schema). Registered once, from the pack's root __init__.py."""

from __future__ import annotations

from .calibration import PARESaveCalibrationSample
from .comfy_compat import ComfyExtension, check_seams, io, require
from .comfy_compat.seams import REGISTRATION
from .folders import register_folders
from .loaders import PARELoadPrunedWan
from .lora import PARELoraLoader
from .routing_nodes import PAREApplyRouter, PARELoadRouter, PARERoutingReport, PAREStaticSchedule
from .token_reduction_nodes import PARETokenReduction
from .toy_text import PAREToyTextEncode

# Node IDs are stable forever: deprecate, never rename or delete.
NODES: list[type[io.ComfyNode]] = [
    PARELoadPrunedWan,
    PARELoraLoader,
    PARELoadRouter,
    PAREApplyRouter,
    PAREStaticSchedule,
    PARERoutingReport,
    PARETokenReduction,
    PAREToyTextEncode,
    PARESaveCalibrationSample,
]


class PareExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> PareExtension:
    check_seams()  # logs what this ComfyUI lacks; the nodes that need it refuse to run, naming the version
    require(REGISTRATION)  # without these the pack cannot register its nodes and folders at all
    register_folders()
    return PareExtension()
