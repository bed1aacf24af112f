"""Shared fixtures: one real ComfyUI server per test session (with the pack and the tiny assets installed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TEST_NODES = Path(__file__).resolve().parent / "comfy_test_nodes"  # test-only nodes (block call counter)
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))  # this checkout's core, whatever an editable install elsewhere points to

import tiny_assets  # noqa: E402
from comfy_harness import ComfyServer  # noqa: E402


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    return tiny_assets.ensure_assets()


@pytest.fixture(scope="session")
def comfy(assets_dir, tmp_path_factory):
    """A real ComfyUI 0.3.75 with this pack in custom_nodes and the tiny assets in its folders."""
    base = tmp_path_factory.mktemp("comfy-base")
    tiny_assets.install_assets(base)
    server = ComfyServer(base_dir=base, extra_custom_nodes=(TEST_NODES,))
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
