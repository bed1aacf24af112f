"""Model folders the pack registers, named once."""

from __future__ import annotations

import logging
import os

import folder_paths

logger = logging.getLogger(__name__)

DIFFUSION_MODELS = "diffusion_models"  # ComfyUI's own folder: pruned students live beside other Wan models
ROUTERS = "pare_routers"  # models/pare_routers: PARE router files
LORAS = "loras"
TOKEN_SCHEDULES = "pare_token_schedules"  # models/pare_token_schedules: token-reduction schedule JSON files
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
    token_schedule_dir()
    _registered = True
    if not folder_paths.get_filename_list(ROUTERS):
        logger.info("PARE: no router files yet; put PARE router .safetensors files in %s", " or ".join(paths))


def token_schedule_dir() -> str:
    """models/pare_token_schedules, registered once (.json only): where PARE Token Reduction finds schedule files."""
    if TOKEN_SCHEDULES not in folder_paths.folder_names_and_paths:
        path = os.path.join(folder_paths.models_dir, TOKEN_SCHEDULES)
        os.makedirs(path, exist_ok=True)
        folder_paths.add_model_folder_path(TOKEN_SCHEDULES, path, is_default=True)
        paths, _ = folder_paths.folder_names_and_paths[TOKEN_SCHEDULES]
        folder_paths.folder_names_and_paths[TOKEN_SCHEDULES] = (paths, {".json"})
    return folder_paths.folder_names_and_paths[TOKEN_SCHEDULES][0][0]


def file_fingerprint(folder: str, name: str) -> str:
    """Path, mtime and size of a model file: a node reloads when the file on disk changes under the same name."""
    path = folder_paths.get_full_path(folder, name)
    if path is None or not os.path.exists(path):
        return f"{folder}/{name}:missing"
    st = os.stat(path)
    return f"{path}:{st.st_mtime_ns}:{st.st_size}"
