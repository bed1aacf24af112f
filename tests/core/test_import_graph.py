"""The repository's import graph has no cycle and no import against the floors (``python -m scripts.import_graph``),
and the check does fail on each kind of fault, shown on a small made-up repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO

from scripts import import_graph


def test_repository_graph_is_clean():
    proc = subprocess.run([sys.executable, "-m", "scripts.import_graph"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].endswith(" 0 cycles, 0 refused imports, 0 ComfyUI imports outside the adapter, 0 bare script imports"), lines[-1]
    graph = {line.split(" -> ")[0]: set(line.split(" -> ")[1].split(", ")) for line in lines if " -> " in line}
    # The graph is read, not empty: edges that exist today, relative ones (the pack's) and absolute ones.
    assert "comfyui_pare.pruned" in graph["comfyui_pare.wan_reader"]
    assert "comfyui_pare.wan_reader" not in graph["comfyui_pare.pruned"]
    assert {"training.route_eval", "training.calibrate_router"} <= graph["training.route_finish"]
    assert "training.route_finish" in graph["training.route"]
    assert "comfy_library" in graph["training.toyworld.comfy_vae"]
    assert "nodes" in graph[import_graph.PACK]
    assert graph["comfy_library"] == {"-"}  # ComfyUI's own top-level ``nodes`` is not this repository's


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_each_fault_is_named(tmp_path, capsys):
    _write(tmp_path, {
        "comfyui_pare/__init__.py": "",
        "comfyui_pare/a.py": "from .b import x\n",
        "comfyui_pare/b.py": "def x():\n    from .a import y  # a cycle dodged inside a function is still one\n",
        "comfyui_pare/c.py": "from training.t import z\n",
        "training/__init__.py": "",
        "training/t.py": "import scripts.s\n",
        "scripts/__init__.py": "",
        "scripts/s.py": "from training import t\nimport nodes  # ComfyUI's\n",
        "nodes/__init__.py": "from ..comfyui_pare import a\nimport folder_paths\n",
        "nodes/comfy_compat/internals.py": "import comfy.sd\nfrom comfy_api.latest import io\n",
        "comfyui_pare/d.py": "from comfy.utils import get_attr\n",
        "tests/helpers.py": "",
        "tests/core/test_x.py": "from test_y import q\nimport helpers\n",
        "tests/nodes/test_y.py": "import helpers\nimport s\n",
    })
    assert import_graph.main(["--root", str(tmp_path), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "cycle: comfyui_pare.a <-> comfyui_pare.b" in out
    assert "cycle: scripts.s <-> training.t" in out
    assert "comfyui_pare.c -> training.t (comfyui_pare may import only itself)" in out
    assert "training.t -> scripts.s (training may import only ['comfy_library', 'comfyui_pare'])" in out
    assert "tests.core.test_x -> tests.nodes.test_y (a test module is no library" in out
    assert "ComfyUI imported outside nodes.comfy_compat.internals: nodes -> folder_paths" in out
    assert "ComfyUI imported outside nodes.comfy_compat.internals: comfyui_pare.d -> comfy.utils" in out
    assert "internals -> comfy" not in out  # the adapter may
    assert "script imported by its bare name (a path edit; use scripts.<name>): tests.nodes.test_y -> s" in out
    assert out.strip().endswith("2 cycles, 3 refused imports, 2 ComfyUI imports outside the adapter, "
                                "1 bare script imports")
    assert "refused import: nodes ->" not in out  # the pack may import the core; scripts.s imports ComfyUI's nodes
