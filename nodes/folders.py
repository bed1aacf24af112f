"""Model folders the pack registers, named once and registered through one helper (``register_model_folder``)."""

from __future__ import annotations

import logging
import os

from .comfy_compat import internals

logger = logging.getLogger(__name__)

DIFFUSION_MODELS = "diffusion_models"  # ComfyUI's own folder: pruned students live beside other Wan models
ROUTERS = "pare_routers"  # models/pare_routers: PARE router files
LORAS = "loras"
TOKEN_SCHEDULES = "pare_token_schedules"  # models/pare_token_schedules: token-reduction schedule JSON files
INPUT_SUFFIX = ".safetensors"
# The pack's own folders and the only files listed in each (routers are never pickles).
PACK_FOLDERS = {ROUTERS: {INPUT_SUFFIX}, TOKEN_SCHEDULES: {".json"}}


def register_folders() -> None:
    """Register the pack's model folders (idempotent); say where router files go while there are none."""
    for kind, extensions in PACK_FOLDERS.items():
        paths = internals.register_model_folder(kind, extensions)
        if kind == ROUTERS and not internals.filename_list(ROUTERS):
            logger.info("PARE: no router files yet; put PARE router .safetensors files in %s", " or ".join(paths))


def token_schedule_dir() -> str:
    """models/pare_token_schedules (registered if it is not yet): where PARE Token Reduction finds schedule files."""
    return internals.register_model_folder(TOKEN_SCHEDULES, PACK_FOLDERS[TOKEN_SCHEDULES])[0]


def file_fingerprint(folder: str, name: str) -> str:
    """Path, mtime and size of a model file: a node reloads when the file on disk changes under the same name."""
    path = internals.full_path(folder, name)
    if path is None or not os.path.exists(path):
        return f"{folder}/{name}:missing"
    st = os.stat(path)
    return f"{path}:{st.st_mtime_ns}:{st.st_size}"
