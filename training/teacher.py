"""The one way training reads a Wan checkpoint (teacher or student), whatever layout the user has."""

from __future__ import annotations

import os

import torch

from comfyui_pare.pruned import PrunedWanMeta, load_checkpoint

from .model import WanTransformer


def load_wan(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], PrunedWanMeta]:
    """State dict (original Wan key names, floating point) and metadata of a Wan checkpoint."""
    return load_checkpoint(path)


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
               device: torch.device | str | None = None) -> WanTransformer:
    """A ``WanTransformer`` with the checkpoint's per-block widths, loaded strictly."""
    sd, meta = load_wan(path)
    return WanTransformer.from_state_dict(sd, meta, dtype=dtype, device=device)
