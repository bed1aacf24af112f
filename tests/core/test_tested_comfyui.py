"""The tested ComfyUIs are one list (comfyui_pare/tested_comfyui.py): the places a user reads name the same versions,
setup_env.sh reads the same table, and the 0.8.0 subset names test files that exist."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO

from comfyui_pare import tested_comfyui

VERSIONS = list(tested_comfyui.VERSIONS)


def test_readme_table_names_the_tested_versions():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## ComfyUI versions", 1)[1].split("\n## ", 1)[0]
    assert sorted(re.findall(r"^\| ComfyUI (\d+\.\d+\.\d+)", section, re.MULTILINE)) == sorted(VERSIONS)
    assert f"the tests run on **{tested_comfyui.names()}**" in readme


def test_notes_and_pyproject_name_the_tested_versions():
    notes = (REPO / "docs" / "comfyui_notes.md").read_text()
    section = notes.split("## Tested ComfyUIs", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^\| (\d+\.\d+\.\d+) \|", section, re.MULTILINE) == VERSIONS
    assert f"Tested on ComfyUI {tested_comfyui.names()}" in (REPO / "pyproject.toml").read_text().replace("\n# ", " ")


def test_setup_env_reads_the_same_table():
    out = subprocess.run([sys.executable, "-m", "comfyui_pare.tested_comfyui"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0] for r in rows] == VERSIONS and all(len(r) == 4 for r in rows)
    assert rows[0][1] == tested_comfyui.PINNED.wheel and rows[0][0] == tested_comfyui.PINNED.version
    assert rows[2][3].split() == list(tested_comfyui.by_version("0.33.0").extra_packages)
    assert "comfyui_pare.tested_comfyui" in (REPO / "scripts" / "setup_env.sh").read_text()


@pytest.mark.parametrize("entry", tested_comfyui.TESTED, ids=lambda t: t.version)
def test_each_listed_test_exists_and_runs_on_every_comfyui(entry):
    for prefix in entry.runs:
        if prefix == "*":
            continue
        path = REPO / prefix.split("::")[0]
        assert path.is_file(), f"{entry.version}: {prefix} names no test file"
        assert "every_comfyui" in path.read_text(), f"{entry.version}: {prefix} has no every_comfyui test"


def test_runs_test_matches_whole_modules_and_tests_only():
    entry = tested_comfyui.TestedComfyUI("9.9.9", runs=("tests/nodes/test_a.py", "tests/nodes/test_b.py::test_x"))
    assert entry.runs_test("tests/nodes/test_a.py::test_anything")
    assert entry.runs_test("tests/nodes/test_b.py::test_x")
    assert not entry.runs_test("tests/nodes/test_b.py::test_xy")
    assert not entry.runs_test("tests/nodes/test_a.py.bak::test_anything")
    assert tested_comfyui.by_version("0.33.0").runs_test("tests/nodes/test_anything.py::test_x")
    with pytest.raises(KeyError, match="not a tested release"):
        tested_comfyui.by_version("0.1.0")
