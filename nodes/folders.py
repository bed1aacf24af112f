"""Model folders the pack registers, named once."""

from __future__ import annotations

import logging
import os

import folder_paths

logger = logging.getLogger(__name__)

DIFFUSION_MODELS = "diffusion_models"  # ComfyUI's own folder: pruned students live beside other Wan models
INPUT_SUFFIX = ".safetensors"


def safetensors_in_input() -> list[str]:
    """Files of the input folder that may hold conditioning tensors."""
    root = folder_paths.get_input_directory()
    if not os.path.isdir(root):
        return []
    return sorted(f for f in os.listdir(root) if f.endswith(INPUT_SUFFIX))
