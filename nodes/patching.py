"""Installing the pack's per-block patches and keyed wrappers on a ModelPatcher clone, chained and idempotent."""

from __future__ import annotations

from typing import Callable

import comfy.model_patcher
import comfy.patcher_extension as pe


def chain_block_patches(m: comfy.model_patcher.ModelPatcher, num_blocks: int, make: Callable[[int, Callable | None], object],
                        own: type) -> None:
    """Set ``make(i, inner)`` as the ``double_block`` replace patch of every block, where ``inner`` is the patch that
    was there (another pack's, kept and called in turn), unwrapping one of our own type ``own`` (re-applying a node
    replaces its patch instead of stacking it)."""
    dit = m.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for i in range(num_blocks):
        inner = dit.get(("double_block", i))
        if isinstance(inner, own):
            inner = inner.inner
        m.set_model_patch_replace(make(i, inner), "dit", "double_block", i)


def set_keyed_wrappers(m: comfy.model_patcher.ModelPatcher, key: str, outer_sample: Callable,
                       diffusion_model: Callable) -> None:
    """Install the OUTER_SAMPLE and DIFFUSION_MODEL wrappers under ``key``, replacing ours from an earlier apply."""
    for wrapper_type, fn in ((pe.WrappersMP.OUTER_SAMPLE, outer_sample),
                             (pe.WrappersMP.DIFFUSION_MODEL, diffusion_model)):
        m.remove_wrappers_with_key(wrapper_type, key)
        m.add_wrapper_with_key(wrapper_type, key, fn)
