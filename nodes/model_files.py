"""Files a prompt names, opened only by name inside their ComfyUI model folder.

A workflow is text from a stranger: a file name in it may be absolute, climb out with ``..`` or name a FIFO or a
device. Such names are refused before anything is opened, the path comes from ComfyUI's ``folder_paths`` (which
searches only the folder's registered directories), and the file is read as a regular file of bounded size
(``comfyui_pare.untrusted``), so a prompt can neither read elsewhere nor block the execution thread.
"""

from __future__ import annotations

import os

from ..comfyui_pare.errors import PareError
from ..comfyui_pare.untrusted import MAX_JSON_BYTES, quote, read_text_file
from .comfy_compat import internals

MAX_NAME = 255


def check_model_file_name(name: str, what: str) -> None:
    """Refuse a name that is not a plain relative name inside a model folder (subfolders allowed)."""
    bad = (not name or len(name) > MAX_NAME or "\0" in name or "\\" in name or os.path.isabs(name)
           or name.startswith("~") or any(part in ("..", ".") for part in name.split("/")))
    if bad:
        raise PareError(f"{what} {quote(name)}: cannot be read (give the name of a file in the model folder, "
                        "not a path: absolute paths, '..', '~' and backslashes are refused)")


def model_file_path(folder: str, name: str, what: str) -> str:
    """The full path of ``name`` in the model folder ``folder``; an error naming the folder if it is not there."""
    check_model_file_name(name, what)
    path = internals.full_path(folder, name)
    if path is None:
        dirs = internals.folder_paths_of(folder)
        raise PareError(f"{what} {quote(name)}: cannot be read (no such file in models/{folder}: "
                        f"{', '.join(dirs) or 'no directory registered'})")
    return path


def read_model_text(folder: str, name: str, what: str, max_bytes: int = MAX_JSON_BYTES) -> str:
    """A UTF-8 text file of at most ``max_bytes`` from a model folder, by name; regular files only."""
    return read_text_file(model_file_path(folder, name, what), f"{what} {quote(name)}", max_bytes)
