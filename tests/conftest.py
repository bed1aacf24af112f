"""Shared fixtures: one real ComfyUI server per test session (with the pack and the tiny assets installed)."""

from __future__ import annotations

from pathlib import Path

# The checkout's root, scripts/ and tests/ are on the import path by pytest's ``pythonpath`` (pyproject.toml): this
# checkout's core wins over an editable install made from another one.
import pytest
import torch
from safetensors.torch import load_file

from comfyui_pare import tested_comfyui
from scripts import tiny_assets
from scripts.comfy_harness import INSTALLS, ComfyServer

REPO = Path(__file__).resolve().parents[1]
TEST_NODES = Path(__file__).resolve().parent / "comfy_test_nodes"  # test-only nodes (block call counter)

# Tests marked ``every_comfyui`` run against each tested ComfyUI (comfyui_pare/tested_comfyui.py) whose ``runs``
# names them; the rest against the pinned release only, to keep CI time in bounds.
PINNED = tested_comfyui.PINNED.version


def pytest_configure(config):
    config.addinivalue_line("markers", "every_comfyui: run the test on every tested ComfyUI that lists it "
                                       f"({tested_comfyui.names()}; comfyui_pare/tested_comfyui.py)")


def pytest_generate_tests(metafunc):
    if "comfyui_version" in metafunc.fixturenames:
        versions = [PINNED]
        if metafunc.definition.get_closest_marker("every_comfyui") is not None:
            nodeid = metafunc.definition.nodeid.split("[")[0]
            versions = [t.version for t in tested_comfyui.TESTED if t.runs_test(nodeid)]
        metafunc.parametrize("comfyui_version", versions, scope="session")


def comfy_install(version: str):
    """The ComfyUI install for ``version``, or a skip naming what is missing (a newer release's source tree)."""
    install = INSTALLS[version]
    reason = install.missing()
    if reason:
        pytest.skip(reason)
    return install


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core box, two threads waiting on each other cost far more wall time."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    return tiny_assets.ensure_assets()


@pytest.fixture(scope="session")
def comfy(assets_dir, tmp_path_factory, comfyui_version):
    """A real ComfyUI (0.3.75, or each version for ``every_comfyui`` modules) with this pack in custom_nodes and the
    tiny assets in its folders."""
    install = comfy_install(comfyui_version)
    base = tmp_path_factory.mktemp(f"comfy-base-{comfyui_version}")
    tiny_assets.install_assets(base)
    server = ComfyServer(base_dir=base, comfy_dir=install.comfy_dir, extra_custom_nodes=(TEST_NODES,))
    server.start()
    yield server
    server.stop()


def read_latent(path: Path) -> torch.Tensor:
    """A SaveLatent output (safetensors with 'latent_tensor')."""
    return load_file(str(path))["latent_tensor"]


def run_latent(server: ComfyServer, graph, save_node: str) -> torch.Tensor:
    entry = server.run(graph.to_json())
    files = server.output_files(entry, save_node, "latents")
    assert len(files) == 1, entry.get("outputs")
    return read_latent(files[0])
