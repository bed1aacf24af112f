"""comfyui_pare: the PARE core in plain torch (no ComfyUI import).

Pruned-checkpoint format, model surgery, router, LoRA slicing and compute accounting for Wan2.1.
"""

import re
from pathlib import Path


def _version() -> str:
    """The one version string is pyproject.toml's (the registry reads it there; every install carries the file)."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
    except OSError:
        match = None
    if match:
        return match.group(1)
    try:  # installed as a wheel (pip install .): the same string, from the package metadata
        from importlib.metadata import version
        return version("comfyui-pare")
    except Exception:  # noqa: BLE001 - a version string must never break an import
        return "0+unknown"


__version__ = _version()
