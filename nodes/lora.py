"""PARE LoRA Loader: any Wan LoRA, cut to a pruned student's widths, applied with ComfyUI's own patches.

The LoRA is parsed (every key style, diffusers names included), checked against the model's base and sliced to
the kept heads / FFN neurons by the core (``comfyui_pare.lora``). The result is handed to ComfyUI's own
``comfy.lora.load_lora`` in the standard ``diffusion_model.*`` layout and added with ``ModelPatcher.add_patches``,
so the merge arithmetic, strength, stacking, unpatching and low-VRAM handling are exactly the stock loader's.

One gap of ComfyUI 0.3.75 is closed here: ``.diff`` patches on ``blocks.N.modulation`` and ``head.modulation``.
ComfyUI accepts them into ``patcher.patches`` but its loader only patches parameters of modules without
parametrised children (``ModelPatcher._load_list``), and those tables live directly on the block / head, so they
are never merged. An ``ON_LOAD`` callback patches such parameters with ComfyUI's own ``patch_weight_to_device``
(which records the backup that ``unpatch_model`` restores).
"""

from __future__ import annotations

import logging
from math import isfinite, prod
from typing import Any, Mapping

import torch

from ..comfyui_pare.alignment import pad_lora
from ..comfyui_pare.errors import PareError, PareFormatError
from ..comfyui_pare.lora import (
    LoraPatch,
    ParsedLora,
    bias_key,
    load_lora_file,
    made_for_student,
    slice_lora,
    to_standard_state_dict,
    weight_key,
)
from .comfy_compat import ModelPatcher, internals, io, require
from .folders import LORAS, file_fingerprint
from .model_info import model_meta

logger = logging.getLogger(__name__)

PREFIX = "diffusion_model."  # where ComfyUI's BaseModel keeps the Wan weights in its state dict
BARE_PARAMETER_CALLBACK = "pare_lora_bare_parameters"
_SHOW_KEYS = 3


def _first_keys(keys: list[str]) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:_SHOW_KEYS])
    return shown + (", ..." if len(keys) > _SHOW_KEYS else "")


def warn_skipped_keys(parsed: ParsedLora) -> None:
    """One warning line per kind of key that will not be applied, with the count and the first few names."""
    if parsed.unmatched:
        logger.warning("PARE LoRA: %s: %d key(s) match no Wan module and are not applied: %s",
                       parsed.source, len(parsed.unmatched), _first_keys(parsed.unmatched))
    if parsed.ignored:
        logger.warning("PARE LoRA: %s: %d key(s) carry nothing ComfyUI applies (e.g. an alpha without a "
                       "lora_up/lora_down pair) and are not applied: %s",
                       parsed.source, len(parsed.ignored), _first_keys(parsed.ignored))


def _check_against_model(p: LoraPatch, model_shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """The sliced patch must fit the loaded weights exactly; ComfyUI would only log a mismatch and skip it."""
    wk = PREFIX + weight_key(p.module)
    want = model_shapes.get(wk)
    if want is None:
        raise PareFormatError(
            f"{source}: '{next(iter(p.keys.values()))}' patches '{wk}', which this model does not have")
    where = f"after slicing to the model's widths; expected to fit '{wk}' {list(want)}"
    if p.up is not None:
        if p.up.shape[0] != want[0] or p.up.shape[1] != p.down.shape[0] or prod(p.down.shape[1:]) != prod(want[1:]):
            raise PareFormatError(f"{source}: '{p.keys['up']}' / '{p.keys['down']}' have shapes {list(p.up.shape)} / "
                                  f"{list(p.down.shape)} {where}")
    if p.diff is not None and tuple(p.diff.shape) != want:
        raise PareFormatError(f"{source}: '{p.keys['diff']}' has shape {list(p.diff.shape)} {where}")
    if p.diff_b is not None:
        bk = PREFIX + bias_key(p.module)
        if model_shapes.get(bk) != tuple(p.diff_b.shape):
            raise PareFormatError(f"{source}: '{p.keys['diff_b']}' has shape {list(p.diff_b.shape)} after slicing; "
                                  f"expected to fit '{bk}' {list(model_shapes.get(bk, ()))}")


def comfy_patches(sliced: ParsedLora, model_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """ComfyUI patch objects (state-dict key -> weight adapter / ("diff", ...)) for a sliced LoRA.

    Built by ComfyUI's own ``load_lora`` from our standard layout, so each adapter is exactly what the stock
    loader creates for the same tensors. Every module must yield its patch, or this raises naming the key.
    """
    for p in sliced.patches.values():
        _check_against_model(p, model_shapes, sliced.source)
    standard = to_standard_state_dict(sliced, prefix=PREFIX)
    to_load = {PREFIX + m: PREFIX + weight_key(m) for m in sliced.patches}
    patches = internals.load_lora(standard, to_load)
    for module, p in sliced.patches.items():
        wanted = ([PREFIX + weight_key(module)] if p.up is not None or p.diff is not None else []) + (
            [PREFIX + bias_key(module)] if p.diff_b is not None else [])
        for key in wanted:
            if key not in patches:
                raise PareFormatError(f"{sliced.source}: ComfyUI built no patch for '{key}' from "
                                      f"'{next(iter(p.keys.values()))}'; it cannot be applied")
    return patches


def _skipped_by_comfy_loader(model: torch.nn.Module, key: str) -> bool:
    """True for a parameter ComfyUI's ``ModelPatcher.load`` never patches: one owned by a module that also has
    parametrised children (its ``_load_list`` skips such modules), e.g. Wan's ``blocks.N.modulation``."""
    owner_name, _, name = key.rpartition(".")
    owner = internals.get_attr(model, owner_name) if owner_name else model
    if name not in dict(owner.named_parameters(recurse=False)):
        return False
    return any(next(child.parameters(), None) is not None for child in owner.children())


def patch_bare_parameters(patcher: ModelPatcher, device_to, lowvram_model_memory,
                          force_patch_weights, full_load) -> None:
    """ON_LOAD callback: merge the pending patches ComfyUI's loader skipped, where the parameter lives.

    Every load merges from the original weight: a key merged by an earlier load is first put back to its backup.
    So the result is the same whether the patcher kept the merged weight since the last load (``ModelPatcher``)
    or restored its backups at the start of this load (newer releases' ``ModelPatcherDynamic``), and a reload
    never adds the patch twice. ``patch_weight_to_device`` records the backup that ``unpatch_model`` restores.
    """
    for key in list(patcher.patches):
        if not _skipped_by_comfy_loader(patcher.model, key):
            continue
        saved = patcher.backup.get(key)
        if saved is not None:  # merged before: start again from the original
            internals.put_param(patcher.model, key, saved.weight, in_place=saved.inplace_update)
        patcher.patch_weight_to_device(key)


def apply_lora(model: ModelPatcher, path: str, strength: float) -> tuple[ModelPatcher, int, int]:
    """(patched clone, patches applied, modules narrowed to the pruned widths). The input is not modified."""
    meta = model_meta(model)
    parsed = load_lora_file(path)
    model_shapes = {k: tuple(v.shape) for k, v in model.model_state_dict(filter_prefix=PREFIX).items()}
    # A teacher LoRA is cut to the student's widths; one trained on the student fits them already. Either way it is
    # then padded to the widths the loader built (zero padding to the tensor-core grain).
    sliced = parsed if made_for_student(parsed, meta) else slice_lora(parsed, meta)
    sliced = pad_lora(sliced, meta, model_shapes, PREFIX)
    warn_skipped_keys(parsed)
    narrowed = sliced.narrowed
    patches = comfy_patches(sliced, model_shapes)

    patched = model.clone()
    added = set(patched.add_patches(patches, strength))
    missing = sorted(set(patches) - added)
    if missing:
        raise PareFormatError(f"{path}: ComfyUI did not accept the patches for {_first_keys(missing)}; "
                              "the model has no such weights")
    if any(_skipped_by_comfy_loader(patched.model, k) for k in added):
        # once per patcher, however many LoRAs
        internals.set_keyed_on_load_callback(patched, BARE_PARAMETER_CALLBACK, patch_bare_parameters)
    return patched, len(added), narrowed


class PARELoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PARELoraLoader",
            display_name="PARE LoRA Loader (pruned Wan)",
            category="PARE/lora",
            description=(
                "Applies a Wan LoRA trained on the full model to a PARE-pruned student (or any Wan model): "
                "the LoRA is cut to the heads and FFN neurons the student kept, so it merges exactly, then "
                "applied with ComfyUI's own patches (strength, stacking and unpatching as in Load LoRA). Reads "
                "every common key style, diffusers names included, and also applies .diff patches on the "
                "modulation tables (lightx2v's diff_m keys too), which the stock loader drops. Works on fp8_scaled "
                "models. A LoRA for another base is refused."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The Wan model to patch: a PARE student from PARE Load Pruned "
                                                 "Wan, or a plain Wan model. It is cloned, never modified."),
                io.Combo.Input(
                    "lora_name", options=internals.filename_list(LORAS),
                    tooltip="A Wan LoRA (.safetensors) in models/loras, trained on the full (unpruned) model, in "
                            "any key style: diffusion_model.*, lora_unet_*, lora_A/B, diffusers (transformer.*).",
                ),
                io.Float.Input(
                    "strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                    tooltip="How strongly the LoRA changes the model, as in the stock LoRA loader: 1 applies it "
                            "as trained, 0 leaves the model unchanged, negative values invert it.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="A patched clone of the model; chain more LoRA loaders after it.")],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name: str, strength_model: float, **_: Any) -> str:
        # Re-apply when the LoRA file on disk changes (e.g. a new training checkpoint with the same name).
        return f"{file_fingerprint(LORAS, lora_name)}:{strength_model}"

    @classmethod
    def execute(cls, model: ModelPatcher, lora_name: str, strength_model: float) -> io.NodeOutput:
        if strength_model == 0:  # as the stock loader: nothing to apply, the input passes through
            return io.NodeOutput(model)
        if not isfinite(strength_model):  # NaN passes ComfyUI's min/max checks and would turn every weight NaN
            raise PareError(f"PARE LoRA Loader: strength_model must be a finite number, got {strength_model}")
        require("PARE LoRA Loader")
        path = internals.full_path_or_raise(LORAS, lora_name)
        patched, applied, narrowed = apply_lora(model, path, strength_model)
        logger.info("PARE LoRA: applied %d patches from %s (sliced %d modules to the pruned widths)",
                    applied, lora_name, narrowed)
        return io.NodeOutput(patched)
