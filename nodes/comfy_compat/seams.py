"""Every ComfyUI internal the pack relies on, as a checked seam: checked when the pack loads and before a node runs.

The nodes use ComfyUI's public node API (``comfy_api.latest``, V3) and a handful of internals that ComfyUI does not
promise to keep. Each internal is listed here as a ``Seam``: a name that says what is checked, the nodes that need
it, and its ``Check``s, each on one ComfyUI object (a function, an argument, an attribute, a convention in a function
body: never a version string). ``check_seams`` runs at start-up and logs every missing seam once; ``require`` is
called by a node before it touches a seam and raises ``ComfyVersionError`` naming the internal and the running
ComfyUI version, instead of an AttributeError deep inside a sampler. The nodes reach the ComfyUI objects themselves
through ``internals``, the one module of the pack that imports ComfyUI.

Tested on every ComfyUI of ``comfyui_pare.tested_comfyui`` (``TESTED_COMFYUI``): tests/nodes/test_comfy_compat.py
removes the object of each check from ComfyUI's real modules in turn and runs every node that needs it. Where
releases differ, the nodes detect what the running one has: ``nodes/wan_model.py`` builds the model through the running release's own
``load_diffusion_model_state_dict`` (quantization layout, dtype choice, patcher class); ``nodes/hooks.py`` reads
optional ``transformer_options`` keys and tolerates the newer ``args["transformer_options"]`` of block patches.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from dataclasses import dataclass

from ...comfyui_pare import tested_comfyui
from ...comfyui_pare.errors import PareError

logger = logging.getLogger(__name__)

TESTED_COMFYUI = tested_comfyui.VERSIONS
OLDEST_SUPPORTED = tested_comfyui.PINNED.version


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
    version, tested = comfy_version(), tested_comfyui.names()
    if _older_than_supported(version):
        return f"comfyui-pare supports ComfyUI {OLDEST_SUPPORTED} and later (tested: {tested}); update ComfyUI"
    return (f"comfyui-pare is tested on ComfyUI {tested}; this ComfyUI ({version}) changed that internal. Please "
            "report it at the comfyui-pare repository with the ComfyUI version, or use a tested ComfyUI meanwhile")


class ComfyVersionError(PareError):
    """The running ComfyUI lacks an internal the pack relies on."""


# The node names seams are required by (``require``), as the nodes display them.
LOAD = "PARE Load Pruned Wan"
LORA = "PARE LoRA Loader"
LOAD_ROUTER = "PARE Load Router"
APPLY_ROUTER = "PARE Apply Router"
STATIC = "PARE Static Block Schedule"
TOKENS = "PARE Token Reduction"
TOY_TEXT = "PARE Toy Text Encode"
CALIBRATION = "PARE Save Calibration Sample"
REGISTRATION = "PARE node registration"  # comfy_entrypoint: the extension and its model folders
HOOKED = (APPLY_ROUTER, STATIC, TOKENS)  # the per-step features of the hook kit (nodes/hooks.py)
META_READERS = (APPLY_ROUTER, STATIC, TOKENS, LORA)  # nodes that describe a stock-loaded Wan (nodes/model_info.py)


def _resolve(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split(".") if qualname else ():
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Check:
    """One ComfyUI object (``module`` + ``qualname``) that must exist, with these ``params`` in its signature and
    these ``source`` snippets in its body (for conventions such as dict keys, which cannot be looked up)."""

    module: str
    qualname: str
    params: tuple[str, ...] = ()
    source: tuple[str, ...] = ()

    def __call__(self) -> bool:
        obj = _resolve(self.module, self.qualname)  # raises AttributeError / ImportError when missing
        if self.params and not all(p in inspect.signature(obj).parameters for p in self.params):
            return False
        return all(s in inspect.getsource(obj) for s in self.source)


@dataclass(frozen=True)
class Seam:
    name: str
    used_by: tuple[str, ...]
    checks: tuple[Check, ...]


WAN = "comfy.ldm.wan.model"
MP = "comfy.model_patcher"
PE = "comfy.patcher_extension"
ATTENTION = "comfy.ldm.modules.attention"
FP = "folder_paths"
WAN_ATTRIBUTES = ("dim", "ffn_dim", "num_heads", "text_dim", "in_dim", "out_dim", "blocks")
VACE_ATTRIBUTES = ("vace_layers", "vace_in_dim", "vace_blocks")
SEAMS: tuple[Seam, ...] = (
    Seam("comfy_api.latest V3 node schema (io, ComfyExtension)", (REGISTRATION,),
         (Check("comfy_api.latest", "io"), Check("comfy_api.latest", "ComfyExtension"))),
    Seam("WanModel(wan_attn_block_class=...) builds each block through a factory", (LOAD,),
         (Check(WAN, "WanModel.__init__", params=("wan_attn_block_class",)),)),
    Seam("WanAttentionBlock(cross_attn_type, dim, ffn_dim, num_heads, ..., operation_settings)", (LOAD,),
         (Check(WAN, "WanAttentionBlock.__init__",
                params=("cross_attn_type", "dim", "ffn_dim", "num_heads", "operation_settings")),)),
    Seam("comfy.sd.load_diffusion_model_state_dict detecting through comfy.model_detection.model_config_from_unet",
         (LOAD,), (Check("comfy.sd", "load_diffusion_model_state_dict", source=("model_config_from_unet",)),
                   Check("comfy.model_detection", "model_config_from_unet"))),
    Seam("comfy.ldm.wan.model.VaceWanModel (looked up when model_base.WAN21_Vace builds it; main blocks in .blocks, "
         "hints added after the double_block patch)", (LOAD,),
         (Check(WAN, "VaceWanModel"),
          Check(WAN, "VaceWanModel.forward_orig", source=("vace_layers_mapping", '("double_block", i)')))),
    Seam("model.model_config.unet_config from detection: image_model 'wan2.1' and model_type (read to describe a "
         "stock-loaded Wan)", META_READERS,
         (Check("comfy.model_detection", "detect_unet_config", source=('"image_model"] = "wan2.1"', '"model_type"]')),
          Check("comfy.model_base", "BaseModel.__init__", source=("self.model_config = model_config",)),
          Check("comfy.supported_models_base", "BASE.__init__", source=("self.unet_config = ",)))),
    Seam("WanModel attributes dim, ffn_dim, num_heads, text_dim, in_dim, out_dim, blocks (read to describe a "
         "stock-loaded Wan)", META_READERS,
         (Check(WAN, "WanModel.__init__", source=tuple(f"self.{a} = " for a in WAN_ATTRIBUTES)),)),
    Seam("VaceWanModel attributes vace_layers, vace_in_dim, vace_blocks (read to describe a stock-loaded VACE Wan)",
         META_READERS, (Check(WAN, "VaceWanModel.__init__", source=tuple(f"self.{a} = " for a in VACE_ATTRIBUTES)),)),
    Seam("patches_replace['dit'][('double_block', i)] per-block replace in WanModel.forward_orig", HOOKED,
         (Check(WAN, "WanModel.forward_orig", source=('("double_block", i)', '"original_block"')),)),
    Seam("ModelPatcher.set_model_patch_replace", HOOKED, (Check(MP, "ModelPatcher.set_model_patch_replace"),)),
    Seam("WrappersMP.OUTER_SAMPLE / DIFFUSION_MODEL", HOOKED,
         (Check(PE, "WrappersMP.OUTER_SAMPLE"), Check(PE, "WrappersMP.DIFFUSION_MODEL"))),
    Seam("ModelPatcher.add_wrapper_with_key / remove_wrappers_with_key", HOOKED,
         (Check(MP, "ModelPatcher.add_wrapper_with_key"), Check(MP, "ModelPatcher.remove_wrappers_with_key"))),
    Seam("DIFFUSION_MODEL wrapper arguments (x, timestep, context, clip_fea, time_dim_concat, transformer_options)",
         HOOKED, (Check(WAN, "WanModel._forward", params=("x", "timestep", "context", "clip_fea", "time_dim_concat",
                                                          "transformer_options")),)),
    Seam("comfy.model_patcher.create_model_options_clone", HOOKED, (Check(MP, "create_model_options_clone"),)),
    Seam("model_sampling.percent_to_sigma (schedule positions as sigmas)", HOOKED,
         (Check("comfy.model_sampling", "ModelSamplingDiscreteFlow.percent_to_sigma"),)),
    Seam("ModelPatcher.get_model_object (the model_sampling object patch before it is applied)", HOOKED,
         (Check(MP, "ModelPatcher.get_model_object"),)),
    Seam("transformer_options['sigmas'] / ['cond_or_uncond'] set per model call", HOOKED,
         (Check("comfy.samplers", "_calc_cond_batch", source=('"cond_or_uncond"', '"sigmas"')),)),
    Seam("transformer_options['optimized_attention_override'] seam of comfy.ldm.modules.attention.wrap_attn",
         (TOKENS,), (Check(ATTENTION, "wrap_attn", source=('"optimized_attention_override"',)),)),
    Seam("WanSelfAttention.forward: RoPE on q and k, then optimized_attention(..., transformer_options=)", (TOKENS,),
         (Check(WAN, "WanSelfAttention.forward", source=("apply_rope1", "transformer_options=transformer_options")),)),
    Seam("attention functions attention_pytorch / attention_sage / attention_flash (backends matched by name)",
         (TOKENS,), (Check(ATTENTION, "attention_pytorch"), Check(ATTENTION, "attention_sage"),
                     Check(ATTENTION, "attention_flash"))),
    Seam("comfy.lora.load_lora(..., log_missing=)", (LORA,),
         (Check("comfy.lora", "load_lora", params=("log_missing",)),)),
    Seam("ModelPatcher.add_patches / patch_weight_to_device / model_state_dict(filter_prefix=)", (LORA,),
         (Check(MP, "ModelPatcher.add_patches"), Check(MP, "ModelPatcher.patch_weight_to_device"),
          Check(MP, "ModelPatcher.model_state_dict", params=("filter_prefix",)))),
    Seam("ModelPatcher.backup entries (weight, inplace_update) recorded by patch_weight_to_device", (LORA,),
         (Check(MP, "ModelPatcher.patch_weight_to_device", source=("self.backup[key]", "'inplace_update'")),)),
    Seam("ModelPatcher._load_list skips modules with parametrised children (Wan modulation tables)", (LORA,),
         (Check(MP, "ModelPatcher._load_list"),)),
    Seam("CallbacksMP.ON_LOAD and ModelPatcher.add_callback_with_key / remove_callbacks_with_key", (LORA,),
         (Check(PE, "CallbacksMP.ON_LOAD"), Check(MP, "ModelPatcher.add_callback_with_key"),
          Check(MP, "ModelPatcher.remove_callbacks_with_key"))),
    Seam("comfy.utils.get_attr / copy_to_param / set_attr_param", (LORA,),
         (Check("comfy.utils", "get_attr"), Check("comfy.utils", "copy_to_param"),
          Check("comfy.utils", "set_attr_param"))),
    Seam("folder_paths.add_model_folder_path(is_default=) / folder_names_and_paths / models_dir",
         (REGISTRATION, TOKENS), (Check(FP, "add_model_folder_path", params=("is_default",)),
                                  Check(FP, "folder_names_and_paths"), Check(FP, "models_dir"))),
    Seam("folder_paths.get_filename_list / get_full_path / get_full_path_or_raise",
         (LOAD, LORA, LOAD_ROUTER, TOKENS, TOY_TEXT),
         (Check(FP, "get_filename_list"), Check(FP, "get_full_path"), Check(FP, "get_full_path_or_raise"))),
    Seam("folder_paths.get_save_image_path(filename_prefix, output_dir) / get_output_directory", (CALIBRATION,),
         (Check(FP, "get_save_image_path", params=("filename_prefix", "output_dir")),
          Check(FP, "get_output_directory"))),
    Seam("conditioning's clip_vision_output.penultimate_hidden_states (WanImageToVideo, CLIP Vision Encode)",
         (CALIBRATION,), (Check("comfy.clip_vision", "ClipVisionModel.encode_image",
                                source=("penultimate_hidden_states",)),)),
)


@functools.cache
def _present(seam: Seam) -> bool:
    try:
        return all(check() for check in seam.checks)
    except (ImportError, AttributeError, TypeError, ValueError, OSError):
        return False


def missing_seams() -> list[Seam]:
    return [s for s in SEAMS if not _present(s)]


def check_seams() -> list[Seam]:
    """Log each internal this ComfyUI lacks (once, at start-up); the nodes that need it will refuse to run."""
    missing = missing_seams()
    for seam in missing:
        logger.error("comfyui-pare: ComfyUI %s lacks %s (needed by %s). %s.", comfy_version(), seam.name,
                     ", ".join(seam.used_by), advice())
    return missing


def require(*used_by: str) -> None:
    """Raise ComfyVersionError if any seam used by the named node is missing."""
    missing = [s for s in SEAMS if any(u in s.used_by for u in used_by) and not _present(s)]
    if missing:
        names = "; ".join(s.name for s in missing)
        raise ComfyVersionError(f"{', '.join(used_by)} cannot run on ComfyUI {comfy_version()}: it lacks {names}. "
                                f"{advice()}.")
