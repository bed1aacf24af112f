"""Every ComfyUI internal the pack relies on, in one place, checked when the pack loads.

The nodes use ComfyUI's public node API (``comfy_api.latest``, V3) and a handful of internals that ComfyUI does not
promise to keep. Each internal is listed here as a ``Seam``: what it is, which node needs it, and how to check
that the running ComfyUI has it (a function, an argument, an attribute: never a version string). ``check_seams``
runs at start-up and logs every missing seam once; ``require`` is called by a node before it touches a seam and
raises ``ComfyVersionError`` naming the internal and the running ComfyUI version, instead of an AttributeError deep
inside a sampler.

Tested by running on ComfyUI 0.3.75 and 0.8.0 (``TESTED_COMFYUI``). Where releases differ, the nodes detect what the
running one has: ``nodes/wan_model.py`` builds the model through the running release's own
``load_diffusion_model_state_dict`` (quantization layout, dtype choice, patcher class); ``nodes/hooks.py`` reads
optional ``transformer_options`` keys and tolerates the newer ``args["transformer_options"]`` of block patches.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import Callable

from ..comfyui_pare.errors import PareError

logger = logging.getLogger(__name__)

TESTED_COMFYUI = ("0.3.75", "0.8.0")
OLDEST_SUPPORTED = TESTED_COMFYUI[0]


def comfy_version() -> str:
    """The running ComfyUI's version, as its ``comfyui_version.py`` says (for messages only)."""
    try:
        return importlib.import_module("comfyui_version").__version__
    except (ImportError, AttributeError):
        return "(unknown version)"


def _older_than_supported(version: str) -> bool:
    """True only for a clearly numbered release older than the oldest the pack supports (wording of messages)."""
    def parts(v: str) -> tuple[int, ...] | None:
        try:
            return tuple(int(p) for p in v.split(".")[:3])
        except ValueError:
            return None
    have, oldest = parts(version), parts(OLDEST_SUPPORTED)
    return have is not None and oldest is not None and have < oldest


def advice() -> str:
    """What a user on the running ComfyUI can do about a missing internal: never 'update' to someone ahead."""
    version, tested = comfy_version(), " and ".join(TESTED_COMFYUI)
    if _older_than_supported(version):
        return f"comfyui-pare supports ComfyUI {OLDEST_SUPPORTED} and later (tested: {tested}); update ComfyUI"
    return (f"comfyui-pare is tested on ComfyUI {tested}; this ComfyUI ({version}) changed that internal. Please "
            "report it at the comfyui-pare repository with the ComfyUI version, or use a tested ComfyUI meanwhile")


class ComfyVersionError(PareError):
    """The running ComfyUI lacks an internal the pack relies on."""


@dataclass(frozen=True)
class Seam:
    name: str
    used_by: str
    check: Callable[[], bool]


def _resolve(module: str, dotted: str):
    obj = importlib.import_module(module)
    for part in dotted.split(".") if dotted else ():
        obj = getattr(obj, part)
    return obj


def _attr(module: str, *path: str) -> Callable[[], bool]:
    def check() -> bool:
        _resolve(module, ".".join(path))  # raises AttributeError / ImportError when missing
        return True
    return check


def _params(module: str, qualname: str, *names: str) -> Callable[[], bool]:
    return lambda: all(n in inspect.signature(_resolve(module, qualname)).parameters for n in names)


def _source_has(module: str, qualname: str, *snippets: str) -> Callable[[], bool]:
    """For seams that are conventions inside a function body (dict keys), not names we can getattr."""
    return lambda: all(s in inspect.getsource(_resolve(module, qualname)) for s in snippets)


WAN = "comfy.ldm.wan.model"
MP = "comfy.model_patcher"
SEAMS: tuple[Seam, ...] = (
    Seam("comfy_api.latest V3 node schema (io.ComfyNode, ComfyExtension)", "every node",
         _attr("comfy_api.latest", "ComfyExtension")),
    Seam("WanModel(wan_attn_block_class=...) builds each block through a factory", "PARE Load Pruned Wan",
         _params(WAN, "WanModel.__init__", "wan_attn_block_class")),
    Seam("WanAttentionBlock(cross_attn_type, dim, ffn_dim, num_heads, ..., operation_settings)",
         "PARE Load Pruned Wan", _params(WAN, "WanAttentionBlock.__init__", "cross_attn_type", "dim", "ffn_dim",
                                         "num_heads", "operation_settings")),
    Seam("comfy.sd.load_diffusion_model_state_dict detecting through comfy.model_detection.model_config_from_unet",
         "PARE Load Pruned Wan",
         lambda: _source_has("comfy.sd", "load_diffusion_model_state_dict", "model_config_from_unet")()
         and _attr("comfy.model_detection", "model_config_from_unet")()),
    Seam("comfy.ldm.wan.model.VaceWanModel (looked up when model_base.WAN21_Vace builds it; main blocks in .blocks, "
         "hints added after the double_block patch)", "PARE Load Pruned Wan (pruned VACE students)",
         lambda: _attr(WAN, "VaceWanModel")() and _source_has(WAN, "VaceWanModel.forward_orig", "vace_layers_mapping",
                                                              '("double_block", i)')()),
    Seam("patches_replace['dit'][('double_block', i)] per-block replace in WanModel.forward_orig",
         "PARE Apply Router, PARE Static Block Schedule, PARE Token Reduction",
         _source_has(WAN, "WanModel.forward_orig", '("double_block", i)', '"original_block"')),
    Seam("ModelPatcher.set_model_patch_replace", "PARE Apply Router, PARE Static Block Schedule, PARE Token Reduction",
         _attr(MP, "ModelPatcher", "set_model_patch_replace")),
    Seam("WrappersMP.OUTER_SAMPLE / DIFFUSION_MODEL and ModelPatcher.add_wrapper_with_key / "
         "remove_wrappers_with_key", "PARE Apply Router, PARE Static Block Schedule, PARE Token Reduction",
         lambda: _attr("comfy.patcher_extension", "WrappersMP", "OUTER_SAMPLE")()
         and _attr("comfy.patcher_extension", "WrappersMP", "DIFFUSION_MODEL")()
         and _attr(MP, "ModelPatcher", "add_wrapper_with_key")() and _attr(MP, "ModelPatcher", "remove_wrappers_with_key")()),
    Seam("DIFFUSION_MODEL wrapper arguments (x, timestep, context, clip_fea, time_dim_concat, transformer_options)",
         "PARE Apply Router, PARE Static Block Schedule, PARE Token Reduction",
         _params(WAN, "WanModel._forward", "x", "timestep", "context", "clip_fea", "time_dim_concat",
                 "transformer_options")),
    Seam("comfy.model_patcher.create_model_options_clone", "PARE Apply Router, PARE Static Block Schedule, PARE Token Reduction",
         _attr(MP, "create_model_options_clone")),
    Seam("model_sampling.percent_to_sigma (schedule positions as sigmas)", "PARE Apply Router, PARE Static Block Schedule, PARE Token Reduction",
         _attr("comfy.model_sampling", "ModelSamplingDiscreteFlow", "percent_to_sigma")),
    Seam("transformer_options['sigmas'] / ['cond_or_uncond'] set per model call",
         "PARE Apply Router, PARE Token Reduction",
         _source_has("comfy.samplers", "_calc_cond_batch", '"cond_or_uncond"', '"sigmas"')),
    Seam("transformer_options['optimized_attention_override'] seam of comfy.ldm.modules.attention.wrap_attn",
         "PARE Token Reduction",
         _source_has("comfy.ldm.modules.attention", "wrap_attn", '"optimized_attention_override"')),
    Seam("WanSelfAttention.forward: RoPE on q and k, then optimized_attention(..., transformer_options=)",
         "PARE Token Reduction",
         _source_has(WAN, "WanSelfAttention.forward", "apply_rope1", "transformer_options=transformer_options")),
    Seam("ModelPatcher.get_model_object (the model_sampling object patch before it is applied)",
         "PARE Token Reduction", _attr(MP, "ModelPatcher", "get_model_object")),
    Seam("comfy.lora.load_lora(..., log_missing=)", "PARE LoRA Loader", _params("comfy.lora", "load_lora", "log_missing")),
    Seam("ModelPatcher.add_patches / patch_weight_to_device / backup", "PARE LoRA Loader",
         lambda: all(_attr(MP, "ModelPatcher", n)() for n in ("add_patches", "patch_weight_to_device",
                                                               "model_state_dict"))),
    Seam("ModelPatcher._load_list skips modules with parametrised children (Wan modulation tables)",
         "PARE LoRA Loader", _attr(MP, "ModelPatcher", "_load_list")),
    Seam("CallbacksMP.ON_LOAD and ModelPatcher.add_callback_with_key / remove_callbacks_with_key",
         "PARE LoRA Loader",
         lambda: _attr("comfy.patcher_extension", "CallbacksMP", "ON_LOAD")()
         and _attr(MP, "ModelPatcher", "add_callback_with_key")()
         and _attr(MP, "ModelPatcher", "remove_callbacks_with_key")()),
    Seam("folder_paths.add_model_folder_path(is_default=) / folder_names_and_paths", "PARE Load Router",
         _params("folder_paths", "add_model_folder_path", "is_default")),
    Seam("folder_paths.get_save_image_path(filename_prefix, output_dir) / get_output_directory",
         "PARE Save Calibration Sample",
         lambda: _params("folder_paths", "get_save_image_path", "filename_prefix", "output_dir")()
         and _attr("folder_paths", "get_output_directory")()),
    Seam("conditioning's clip_vision_output.penultimate_hidden_states (WanImageToVideo, CLIP Vision Encode)",
         "PARE Save Calibration Sample", _source_has("comfy.clip_vision", "ClipVisionModel.encode_image",
                                                     "penultimate_hidden_states")),
)


@functools.cache
def _present(seam: Seam) -> bool:
    try:
        return bool(seam.check())
    except (ImportError, AttributeError, TypeError, ValueError, OSError):
        return False


def missing_seams() -> list[Seam]:
    return [s for s in SEAMS if not _present(s)]


def check_seams() -> list[Seam]:
    """Log each internal this ComfyUI lacks (once, at start-up); the nodes that need it will refuse to run."""
    missing = missing_seams()
    for seam in missing:
        logger.error("comfyui-pare: ComfyUI %s lacks %s (needed by %s). %s.", comfy_version(), seam.name,
                     seam.used_by, advice())
    return missing


def require(*used_by: str) -> None:
    """Raise ComfyVersionError if any seam used by the named node is missing."""
    missing = [s for s in SEAMS if any(u in s.used_by for u in used_by) and not _present(s)]
    if missing:
        names = "; ".join(s.name for s in missing)
        raise ComfyVersionError(f"{', '.join(used_by)} cannot run on ComfyUI {comfy_version()}: it lacks {names}. "
                                f"{advice()}.")
