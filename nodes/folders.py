"""Model folders the pack registers, named once."""

from __future__ import annotations

import logging
import os

import folder_paths

logger = logging.getLogger(__name__)

DIFFUSION_MODELS = "diffusion_models"  # ComfyUI's own folder: pruned students live beside other Wan models
ROUTERS = "pare_routers"  # models/pare_routers: PARE router files
LORAS = "loras"
INPUT_SUFFIX = ".safetensors"
_registered = False


def register_folders() -> None:
    """Register models/pare_routers once, .safetensors only (routers are never pickles)."""
    global _registered
    if _registered:
        return
    path = os.path.join(folder_paths.models_dir, ROUTERS)
    os.makedirs(path, exist_ok=True)
    folder_paths.add_model_folder_path(ROUTERS, path, is_default=True)
    paths, _ = folder_paths.folder_names_and_paths[ROUTERS]
    folder_paths.folder_names_and_paths[ROUTERS] = (paths, {INPUT_SUFFIX})
    _registered = True
    if not folder_paths.get_filename_list(ROUTERS):
        logger.info("PARE: no router files yet; put PARE router .safetensors files in %s", " or ".join(paths))


def file_fingerprint(folder: str, name: str) -> str:
    """Path, mtime and size of a model file: a node reloads when the file on disk changes under the same name."""
    path = folder_paths.get_full_path(folder, name)
    if path is None or not os.path.exists(path):
        return f"{folder}/{name}:missing"
    st = os.stat(path)
    return f"{path}:{st.st_mtime_ns}:{st.st_size}"
