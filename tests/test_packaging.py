"""Packaging contract: registry metadata, no torch pin, the pack imports outside ComfyUI, comfy-cli validates."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import tomllib
from conftest import REPO


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _names(reqs: list[str]) -> list[str]:
    return [re.split(r"[<>=!~;\[ ]", r.strip(), maxsplit=1)[0].lower() for r in reqs if r.strip() and not r.startswith("#")]


def test_dependencies_are_static_mirrored_and_never_pin_torch():
    project = _pyproject()["project"]
    deps = project["dependencies"]
    req = [ln for ln in (REPO / "requirements.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert sorted(d.replace(" ", "") for d in deps) == sorted(r.replace(" ", "") for r in req)
    everything = deps + [d for extra in project.get("optional-dependencies", {}).values() for d in extra]
    assert not {"torch", "torchvision", "torchaudio"} & set(_names(everything)), "the pack must never pin torch"
    assert all(">=" in d for d in deps), "loose lower bounds only"


def test_registry_table():
    data = _pyproject()
    comfy = data["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert comfy.get(key), key
    assert "comfyui" not in data["project"]["name"].lower()
    assert data["project"]["license"] == {"file": "LICENSE"} and (REPO / "LICENSE").exists()
    assert re.fullmatch(r"\d+\.\d+\.\d+", data["project"]["version"])
    ignored = (REPO / ".comfyignore").read_text().split()
    assert "training/" in ignored and "tests/" in ignored


def test_pack_imports_outside_comfyui(tmp_path):
    """The root package registers nodes only inside ComfyUI; the core never imports comfy."""
    link = tmp_path / "comfyui_pare_pack"
    link.symlink_to(REPO, target_is_directory=True)
    code = ("import sys, comfyui_pare_pack as p, comfyui_pare.router, comfyui_pare.lora, comfyui_pare.pruned;"
            "assert not hasattr(p, 'comfy_entrypoint'); assert not any(m == 'comfy' or m.startswith('comfy.') "
            "for m in sys.modules), sorted(m for m in sys.modules if m.startswith('comfy'))")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_comfy_node_validate_is_clean():
    comfy_cli = shutil.which("comfy", path=os.path.dirname(sys.executable))
    assert comfy_cli, "comfy-cli is a test requirement (requirements-dev.txt)"
    proc = subprocess.run([comfy_cli, "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "passed" in output.lower()
    assert not re.search(r"\b(error|warning|warn)\b", output, re.IGNORECASE), output
