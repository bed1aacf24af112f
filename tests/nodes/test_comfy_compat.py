"""Every ComfyUI internal the pack relies on is a seam in nodes/comfy_compat/seams.py, present in each real ComfyUI we
test, and checked by the nodes that use it: with each checked object removed from ComfyUI's real module in turn,
every node that declares the seam fails with an error naming the seam and the running ComfyUI version (never
telling a user on a newer release to update), not with an AttributeError. One fresh process per ComfyUI
(``python -m tests.compat_probe``), which removes every object and runs the nodes in it; the tests below read its
report, one per seam."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, comfy_install

pytestmark = pytest.mark.every_comfyui


def seam_names() -> list[str]:
    """The seams' names as written in seams.py (read, not imported: the module is part of the pack)."""
    tree = ast.parse((REPO / "nodes" / "comfy_compat" / "seams.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Seam"]
    return [ast.literal_eval(c.args[0]) for c in calls]


SEAM_NAMES = seam_names()


@pytest.fixture(scope="module")
def probe(comfyui_version):
    install = comfy_install(comfyui_version)
    env = {**os.environ, "PARE_COMFYUI_DIR": str(install.comfy_dir)}
    proc = subprocess.run([sys.executable, "-m", "tests.compat_probe"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr, comfyui_version


def test_every_seam_is_present_in_each_tested_comfyui(probe):
    out, _, version = probe
    assert out["version"] == version
    assert out["missing"] == [] and list(out["seams"]) == SEAM_NAMES and len(SEAM_NAMES) >= 25
    assert out["unknown_nodes"] == []  # every node a seam names has a runner in the probe
    for node, error in out["baseline"].items():  # nothing removed: no node refuses to run
        assert error is None or not error.startswith("ComfyVersionError"), (node, error)
    assert out["load_restored"] is None


@pytest.mark.parametrize("name", SEAM_NAMES, ids=[n[:60] for n in SEAM_NAMES])
def test_each_removed_internal_fails_its_nodes_naming_it(probe, name):
    out, log, version = probe
    seam = out["seams"][name]
    removals = [r for r in out["removed"] if r["seam"] == name]
    assert len(removals) == seam["checks"] >= 1  # every checked object was removed once
    for removal in removals:
        assert removal["logged"], removal  # the start-up check names it
        assert set(removal["errors"]) == set(seam["used_by"])
        for node, error in removal["errors"].items():
            assert error is not None, f"{node} ran without {removal['object']}"
            assert error.startswith(f"ComfyVersionError: {node} cannot run on ComfyUI {version}: it lacks "), error
            assert name in error, error
            assert "update comfyui" not in error.lower() and "please report it" in error.lower(), error
    assert f"ComfyUI {version} lacks {name}" in log  # the start-up style log line names the version too
