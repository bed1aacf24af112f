"""The ComfyUI objects the nodes use, reached here and nowhere else in the pack.

Every module of ComfyUI the pack touches is imported in this file only, and each internal name is looked up when it
is used (not at import), so a ComfyUI release that renames one fails the node that needs it with the seam's
``ComfyVersionError`` (``seams.require``, called first by that node), not the whole pack at start-up. Each function
names the seam (``seams.SEAMS``) that guards it. The public V3 node API (``io``, ``ComfyExtension``) is re-exported
as it is: the node classes are defined with it at import.
"""

from __future__ import annotations

import os
from typing import Callable

import comfy.ldm.modules.attention
import comfy.ldm.wan.model
import comfy.lora
import comfy.model_detection
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io

__all__ = ["ComfyExtension", "io", "ModelPatcher"]

ModelPatcher = comfy.model_patcher.ModelPatcher  # for type hints; its methods used are seams


# -- loading a Wan model (seams: load_diffusion_model_state_dict, model_config_from_unet, WanAttentionBlock) ------

def diffusion_model_loader() -> Callable:
    """``comfy.sd.load_diffusion_model_state_dict`` of the running release (its signature varies)."""
    return comfy.sd.load_diffusion_model_state_dict


def model_config_detector() -> Callable:
    return comfy.model_detection.model_config_from_unet


def set_model_config_detector(detect: Callable) -> None:
    """Swap ``comfy.model_detection.model_config_from_unet`` (the loader looks it up at call time)."""
    comfy.model_detection.model_config_from_unet = detect


def wan_attention_block(*args, **kwargs) -> torch.nn.Module:
    return comfy.ldm.wan.model.WanAttentionBlock(*args, **kwargs)


def vace_model_class() -> type | None:
    """``comfy.ldm.wan.model.VaceWanModel`` (looked up by ``model_base.WAN21_Vace`` when it builds a model), or None
    where the release has none."""
    return getattr(comfy.ldm.wan.model, "VaceWanModel", None)


def set_vace_model_class(cls: Callable) -> None:
    comfy.ldm.wan.model.VaceWanModel = cls


def converts_old_quants() -> bool:
    """True where the running release converts scaled fp8 layouts itself (``comfy.utils.convert_old_quants``, 0.8 and
    later). A detection, not a seam: both answers are supported releases."""
    return hasattr(comfy.utils, "convert_old_quants")


def unet_config(patcher: ModelPatcher) -> dict:
    """ComfyUI's detection result for a loaded model (``model.model_config.unet_config``: ``image_model``,
    ``model_type``, ...; seam: unet_config), {} where there is none."""
    return getattr(getattr(patcher.model, "model_config", None), "unet_config", {}) or {}


def wan_attributes(diffusion_model: torch.nn.Module) -> dict:
    """The dims of a stock-loaded ComfyUI Wan model from its attributes (seam: WanModel attributes); ``blocks`` as
    its count, and the VACE blocks' where the model has them."""
    dm = diffusion_model
    out = {"dim": dm.dim, "num_heads": dm.num_heads, "ffn_dim": dm.ffn_dim, "num_layers": len(dm.blocks),
           "text_dim": dm.text_dim, "in_dim": dm.in_dim, "out_dim": dm.out_dim}
    if hasattr(dm, "vace_blocks"):
        out.update(vace_layers=dm.vace_layers, vace_in_dim=dm.vace_in_dim)
    return out


# -- sampler hooks (seams: create_model_options_clone, WrappersMP, add_wrapper_with_key) -----------------------

def clone_model_options(model_options: dict) -> dict:
    return comfy.model_patcher.create_model_options_clone(model_options)


def outer_sample_wrapper() -> str:
    return comfy.patcher_extension.WrappersMP.OUTER_SAMPLE


def diffusion_model_wrapper() -> str:
    return comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL


def set_keyed_wrapper(model: ModelPatcher, kind: str, key: str, fn: Callable) -> None:
    """Replace the wrapper of ``kind`` under ``key`` (a node applied twice is idempotent)."""
    model.remove_wrappers_with_key(kind, key)
    model.add_wrapper_with_key(kind, key, fn)


def set_keyed_on_load_callback(model: ModelPatcher, key: str, fn: Callable) -> None:
    """Replace the ``CallbacksMP.ON_LOAD`` callback under ``key``."""
    on_load = comfy.patcher_extension.CallbacksMP.ON_LOAD
    model.remove_callbacks_with_key(on_load, key)
    model.add_callback_with_key(on_load, key, fn)


# -- attention (seam: attention function names) ----------------------------------------------------------------

MASKLESS_BACKENDS = ("attention_sage", "attention_flash")  # kernels that take no additive attention bias


def sdpa_attention() -> Callable:
    """ComfyUI's SDPA attention function, unwrapped like the ``func`` the attention override receives."""
    fn = comfy.ldm.modules.attention.attention_pytorch
    return getattr(fn, "__wrapped__", fn)


# -- LoRA weights (seams: load_lora, comfy.utils attribute helpers) --------------------------------------------

def load_lora(lora: dict, to_load: dict) -> dict:
    return comfy.lora.load_lora(lora, to_load, log_missing=False)


def get_attr(obj, name: str):
    return comfy.utils.get_attr(obj, name)


def put_param(obj, name: str, value: torch.Tensor, in_place: bool) -> None:
    """Put ``value`` back as parameter ``name``: copied into it (``in_place``) or set as a new parameter."""
    (comfy.utils.copy_to_param if in_place else comfy.utils.set_attr_param)(obj, name, value)


# -- model folders (seams: folder_paths) -----------------------------------------------------------------------

def register_model_folder(kind: str, extensions: set[str]) -> list[str]:
    """models/<kind> as ComfyUI's default folder for ``kind`` (idempotent), listing only files with ``extensions``;
    its folders, the default first."""
    path = os.path.join(folder_paths.models_dir, kind)
    os.makedirs(path, exist_ok=True)
    folder_paths.add_model_folder_path(kind, path, is_default=True)
    paths, _ = folder_paths.folder_names_and_paths[kind]
    folder_paths.folder_names_and_paths[kind] = (paths, set(extensions))
    return list(paths)


def folder_paths_of(kind: str) -> list[str]:
    return list(folder_paths.folder_names_and_paths.get(kind, ([],))[0])


def filename_list(kind: str) -> list[str]:
    return folder_paths.get_filename_list(kind)


def full_path(kind: str, name: str) -> str | None:
    return folder_paths.get_full_path(kind, name)


def full_path_or_raise(kind: str, name: str) -> str:
    return folder_paths.get_full_path_or_raise(kind, name)


def output_directory() -> str:
    return folder_paths.get_output_directory()


def save_image_path(filename_prefix: str, output_dir: str) -> tuple:
    """(folder, file name stem, counter, subfolder, prefix) of ComfyUI's numbered outputs."""
    return folder_paths.get_save_image_path(filename_prefix, output_dir)
