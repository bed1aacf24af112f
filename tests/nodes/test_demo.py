"""`make demo` end to end: the toy teacher and its PARE student rendered by a real ComfyUI, side by side."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO
from PIL import Image

from training.toyworld import videos

pytestmark = [pytest.mark.comfy, pytest.mark.slow]


def test_demo_renders_teacher_and_student_with_the_table(tmp_path):
    env = {**os.environ, "PARE_DEMO_OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "scripts.demo"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("toy_teacher.webp", "toy_student.webp"):
        with Image.open(tmp_path / name) as video:
            assert video.n_frames == 17 and video.size == (videos.SIZE, videos.SIZE), name
    with Image.open(tmp_path / "toy_side_by_side.webp") as both:
        assert both.n_frames == 17 and both.size == (3 * (2 * videos.SIZE + 2), 3 * videos.SIZE)
    with Image.open(tmp_path / "toy_routing.png") as heat:
        colors = {c for _, c in heat.convert("RGB").getcolors(1 << 16)}
    assert (51, 191, 89) in colors, "the heat map shows blocks that ran"
    out = proc.stdout
    ratio = float(re.search(r"per-step block compute \(student / teacher\)\s+([0-9.]+)", out).group(1))
    psnr = float(re.search(r"latent PSNR, student vs teacher\s+([0-9.]+) dB", out).group(1))
    assert 0.0 < ratio <= 0.5 and psnr > 0, out
    assert re.search(r"trajectory error vs ground truth, teacher\s+[0-9.]+ px", out), out
    assert re.search(r"sampling time \(student / teacher, best of 3\)\s+[0-9.]+", out), out
    # the router's budget curve beside the videos: mode 'budget' spends each budget over the run (student's share)
    with Image.open(tmp_path / "toy_budget_curve.png") as curve:
        assert curve.size == (420, 260)
    points = re.findall(r"([0-9.]+): ([0-9.]+) ([0-9.]+) dB", re.search(r"router budget curve.*", out).group(0))
    budgets = [float(b) for b, _, _ in points]
    assert budgets == [0.6, 0.7, 0.8, 0.9, 1.0], out
    full = float(points[-1][1])  # budget 1: every block of the student
    assert all(abs(float(c) / full - float(b)) <= 0.03 for b, c, _ in points), out
