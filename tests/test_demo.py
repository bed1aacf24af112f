"""`make demo` end to end: the shipped tiny workflow renders a video through a real ComfyUI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO
from PIL import Image

pytestmark = [pytest.mark.comfy, pytest.mark.slow]


def test_demo_renders_video_frames_and_heatmap(tmp_path):
    env = {**os.environ, "PARE_DEMO_OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with Image.open(tmp_path / "pare_tiny_t2v.webp") as video:
        assert video.n_frames == 17 and video.size == (128, 128)
    with Image.open(tmp_path / "pare_tiny_t2v_frames.png") as strip:
        assert strip.size[1] == 128
    with Image.open(tmp_path / "pare_tiny_routing.png") as heat:
        colors = {c for _, c in heat.convert("RGB").getcolors(1 << 16)}
    assert (51, 191, 89) in colors and (40, 40, 46) in colors, "the heat map shows run and skipped blocks"
    assert "block compute executed" in proc.stderr
