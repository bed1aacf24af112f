"""The pack's one adapter to ComfyUI: ``internals`` reaches every ComfyUI object the nodes use (the only module of
the pack that imports ComfyUI), ``seams`` lists and checks each internal among them. The nodes import both from
here, so a ComfyUI change is a change in this package."""

from . import internals
from .internals import ComfyExtension, ModelPatcher, io
from .seams import SEAMS, ComfyVersionError, Seam, check_seams, comfy_version, missing_seams, require

__all__ = ["SEAMS", "ComfyExtension", "ComfyVersionError", "ModelPatcher", "Seam", "check_seams", "comfy_version",
           "internals", "io", "missing_seams", "require"]
