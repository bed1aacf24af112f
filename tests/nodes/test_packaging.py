"""Packaging contract: registry metadata, no torch pin, the pack imports outside ComfyUI, comfy-cli validates, the
registry archive installs into a fresh ComfyUI, and the requirements leave an installed torch alone."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import tomllib
from conftest import REPO
from helpers import PACK_NODES

import comfyui_pare
from scripts.comfy_harness import ComfyServer

TORCH_FAMILY = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*)$")


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
    for key in ("PublisherId", "DisplayName", "Icon", "Banner", "requires-comfyui", "web"):
        assert comfy.get(key), key
    assert data["project"]["name"] == "comfyui-pare"  # the registry name; the bare "pare" is too generic
    assert comfy["requires-comfyui"] == ">=0.3.75"  # the suite runs on 0.3.75 and 0.8.0 (scripts/setup_env.sh)
    assert (REPO / comfy["web"] / "docs").is_dir()
    assert data["project"]["license"] == {"file": "LICENSE"} and (REPO / "LICENSE").exists()
    assert re.fullmatch(r"\d+\.\d+\.\d+", data["project"]["version"])
    assert comfyui_pare.__version__ == data["project"]["version"]  # one version string
    ignored = (REPO / ".comfyignore").read_text().split()
    assert {"training/", "tests/", "scripts/"} <= set(ignored)


def test_publish_workflow_runs_the_registry_action_on_version_tags():
    text = (REPO / ".github" / "workflows" / "publish.yml").read_text()
    assert re.search(r"on:\s*\n\s*push:\s*\n\s*tags:\s*\n\s*- \"v\*\.\*\.\*\"", text), text
    assert "uses: Comfy-Org/publish-node-action@v1" in text and "secrets.REGISTRY_ACCESS_TOKEN" in text


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


def _comfy_cli() -> str:
    comfy_cli = shutil.which("comfy", path=os.path.dirname(sys.executable))
    assert comfy_cli, "comfy-cli is a test requirement (requirements-dev.txt)"
    return comfy_cli


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """`comfy node pack` on a git copy of this checkout's files (tracked and new, as they would be committed)."""
    src = tmp_path_factory.mktemp("pack-src")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], cwd=src, check=True)
    subprocess.run(git + ["add", "-A"], cwd=src, check=True)
    proc = subprocess.run([_comfy_cli(), "--skip-prompt", "--no-enable-telemetry", "node", "pack"], cwd=src,
                          capture_output=True, text=True, timeout=300)
    archive = src / "node.zip"
    assert proc.returncode == 0 and archive.exists(), proc.stdout + proc.stderr
    return archive


def test_node_archive_leaves_out_training_tests_and_scripts(packed):
    names = zipfile.ZipFile(packed).namelist()
    assert not [n for n in names if n.split("/")[0] in {"training", "tests", "scripts", ".github", ".ci"}], names
    for needed in ("__init__.py", "pyproject.toml", "requirements.txt", "nodes/__init__.py", "nodes/comfy_compat/internals.py",
                   "comfyui_pare/router.py", "web/docs/PAREApplyRouter.md", "workflows/pare_wan21_t2v.json"):
        assert needed in names, needed


@pytest.mark.comfy
def test_node_archive_installs_into_a_fresh_comfyui(packed, tmp_path):
    """Unzipped into custom_nodes/ of a fresh ComfyUI, as the registry installs it: nodes, help pages, workflows."""
    base = tmp_path / "fresh"
    target = base / "custom_nodes" / "comfyui-pare"
    target.mkdir(parents=True)
    zipfile.ZipFile(packed).extractall(target)
    with ComfyServer(base_dir=base, front_end=False) as server:
        info = server.object_info()
        ours = {k for k, v in info.items() if v["python_module"].endswith("comfyui-pare")}
        assert ours == set(PACK_NODES), "the node list holds exactly the user-facing nodes"
        assert "PARELoadConditioning" not in info  # test-only
        log = server.log_text().splitlines()
        assert not [ln for ln in log if "comfyui-pare" in ln and ("IMPORT FAILED" in ln or "lacks" in ln)], log[-40:]
        assert sorted(server.get("/workflow_templates")["comfyui-pare"]) == sorted(
            p.stem for p in (REPO / "workflows").glob("*.json"))
        for node_id in PACK_NODES:  # the help page the front end's node library shows
            docs = server.get_text(f"/extensions/comfyui-pare/docs/{node_id}.md")
            assert docs.startswith(f"# {info[node_id]['display_name']}"), node_id


def test_requirements_leave_an_installed_torch_untouched(tmp_path):
    """pip's own resolver, asked to install the pack (and requirements.txt) into this venv, which has torch."""
    import torch

    for args in (["-r", str(REPO / "requirements.txt")], ["--no-build-isolation", str(REPO)]):
        report = tmp_path / "report.json"
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report",
                               str(report), *args], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        installs = [item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]]
        assert not [n for n in installs if TORCH_FAMILY.match(n)], installs
    assert torch.__version__.startswith("2.14.1")  # and the resolver saw that torch
