"""Attention backends (ComfyUI's --use-sage-attention / --use-flash-attention / xformers / SDPA): what the pack hands
them. Routing and pruned heads never touch attention (blocks are skipped whole; a pruned or padded block calls the
backend with its own head count at head dim 128). Token reduction calls the user's backend through ComfyUI's
attention override, except for a call carrying the proportional-attention bias on a backend that cannot apply one."""

from __future__ import annotations

import importlib

import pytest
import torch

import comfy_library

pytestmark = pytest.mark.comfy


def raw(f):
    return getattr(f, "__wrapped__", f)  # ComfyUI's override receives the unwrapped function


def test_biased_reduced_attention_avoids_backends_that_drop_masks():
    comfy_library.load_comfy("cpu")
    from comfy.ldm.modules import attention as A

    tr = importlib.import_module(f"{comfy_library.PACK_MODULE}.nodes.token_reduction")
    bias = torch.zeros(1, 1, 1, 4)
    for maskless in (A.attention_sage, A.attention_flash):
        assert tr.backend_for(raw(maskless), bias) is raw(A.attention_pytorch)
        assert tr.backend_for(raw(maskless), None) is raw(maskless)  # unbiased calls stay on the user's backend
    for masked in (A.attention_pytorch, A.attention_xformers, A.attention_split, A.attention_sub_quad,
                   A.attention_basic):
        assert tr.backend_for(raw(masked), bias) is raw(masked)
