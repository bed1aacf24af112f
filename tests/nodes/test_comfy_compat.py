"""Every ComfyUI internal the pack relies on is listed in nodes/comfy_compat.py, present in each real ComfyUI we test
(0.3.75 and upstream 0.8.0), and checked by the node that uses it: with the internal removed from ComfyUI's real
module, the node fails with an error naming the internal and the running ComfyUI version (never telling a user on
a newer release to update), not with an AttributeError. One fresh process per ComfyUI (tests/compat_probe.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, comfy_install

pytestmark = pytest.mark.every_comfyui


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
    assert out["missing"] == [] and out["count"] >= 17


def test_a_node_fails_naming_the_missing_internal_and_the_running_version(probe):
    out, log, version = probe
    static = out["static"]
    assert static.startswith(f"ComfyVersionError: PARE Static Block Schedule cannot run on ComfyUI {version}: it "
                             "lacks ModelPatcher.set_model_patch_replace"), static
    load = out["load"]
    assert load.startswith(f"ComfyVersionError: PARE Load Pruned Wan cannot run on ComfyUI {version}"), load
    assert "model_config_from_unet" in load
    for message in (static, load):
        assert "update ComfyUI" not in message.lower().replace("update comfyui", "update ComfyUI")
        assert "please report it" in message.lower()
    assert any("set_model_patch_replace" in s for s in out["after"])
    assert f"ComfyUI {version} lacks" in log  # the start-up style log line names the version too
    assert out["load_restored"] is None
