"""Stage 1 (``python -m training distill``): it recovers the student, resumes bit for bit after SIGKILL, and gives
the same weights on 2 torchrun ranks as in one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors import safe_open
from training_helpers import distill_toml, run_distill_in_process, write_micro_teacher, write_samples

from comfyui_pare.wan_reader import open_wan
from training.__main__ import main
from training.config import load_config
from training.distill import DistillConfig
from training.salient import salient_weights

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # one thread: same kernels in every process


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> dict[str, Path]:
    """A micro teacher, 4 calibration samples, and its student (half the heads and FFN) made by the verbs."""
    root = tmp_path_factory.mktemp("stage1")
    teacher, samples = root / "teacher.safetensors", write_samples(root / "samples", 4)
    write_micro_teacher(teacher)
    assert main(["calibrate", "--teacher", str(teacher), "--samples", str(samples), "--out",
                 str(root / "stats.safetensors"), "--timesteps", "2", "--query-rows", "8", "--device", "cpu"]) == 0
    assert main(["prune", "--teacher", str(teacher), "--stats", str(root / "stats.safetensors"), "--heads", "0.5",
                 "--ffn", "0.5", "--ffn-multiple", "16", "--out", str(root / "student.safetensors")]) == 0
    return {"root": root, "teacher": teacher, "samples": samples, "student": root / "student.safetensors"}


def _config(pruned: dict, out: Path, tables: str = "", **train_kw) -> Path:
    path = out.with_suffix(".toml")
    path.write_text(distill_toml(pruned["teacher"], pruned["student"], pruned["samples"], out, tables, **train_kw))
    return path


def _weights(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_stage1_halves_the_velocity_error(pruned, tmp_path):
    out = tmp_path / "run"
    report = run_distill_in_process(_config(pruned, out, steps=100, batch_size=4, learning_rate=2e-4,
                                     checkpointing_steps=50))
    print(f"stage-1 velocity error (relative MSE): {report['initial']:.4g} -> {report['final']:.4g} "
          f"(x{report['ratio']:.3f})")
    assert report["final"] <= 0.5 * report["initial"], report
    assert json.loads((out / "velocity_error.json").read_text())["final"] == report["final"]
    with open_wan(out / "student.safetensors") as r:  # the pruned format, widths of the initial student
        with open_wan(pruned["student"]) as init:
            assert r.meta == init.meta and r.layout == "original"
    saved = load_config(DistillConfig, out / "checkpoint-100" / "config.toml")
    assert saved == load_config(DistillConfig, out.with_suffix(".toml"))
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("step,lr,loss,velocity_mse") and len(rows) == 101
    assert (out / "loss.png").stat().st_size > 0


def test_sigkill_then_resume_latest_is_bitwise_equal(pruned, tmp_path):
    settings = dict(steps=10, checkpointing_steps=2, checkpoints_total_limit=2)
    run_distill_in_process(_config(pruned, tmp_path / "straight", **settings))
    cfg = _config(pruned, tmp_path / "killed", **settings)
    cmd = [sys.executable, "-m", "training", "distill", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "killed" / "checkpoint-2").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "student.safetensors").exists(), "the kill came too late to test anything"
    done = subprocess.run(cmd + ["--resume", "latest"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    a, b = _weights(tmp_path / "straight" / "student.safetensors"), _weights(tmp_path / "killed" / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "killed" / "loss.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 11))  # no step logged twice after the resume


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_ranks_equal_one_process(pruned, tmp_path, strategy):
    # Block-output feature matching on: the hidden states of every block go through DDP / FSDP2 too.
    settings = dict(steps=3, batch_size=4, checkpointing_steps=2, tables="[distill]\nfeature_weight = 0.1\n")
    single = tmp_path / "single"
    run_distill_in_process(_config(pruned, single, strategy="none", **settings))
    cfg = _config(pruned, tmp_path / "ranks", strategy=strategy, **settings)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training", "distill", "--config", str(cfg)]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _weights(single / "student.safetensors"), _weights(tmp_path / "ranks" / "student.safetensors")
    init = _weights(pruned["student"])
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained
    # Same losses and gradient norms step by step, to float32 rounding (the ranks' halves are summed by the
    # all-reduce instead of inside one matmul) ...
    assert (single / "loss.csv").read_text().startswith("step,lr,loss,velocity_mse,feature_mse,grad_norm")
    curve = [[float(v) for v in row.split(",")] for row in (single / "loss.csv").read_text().splitlines()[1:]]
    ranks_curve = [[float(v) for v in r.split(",")] for r in (tmp_path / "ranks" / "loss.csv").read_text()
                   .splitlines()[1:]]
    torch.testing.assert_close(torch.tensor(ranks_curve), torch.tensor(curve), rtol=1e-5, atol=0)
    # ... and the same weights. Adam's first updates are ~lr * sign(grad), so an element whose gradient is at
    # rounding level may move differently: allow 1/30 of the 3-step update (3e-3), far below a real difference.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)
    if strategy != "fsdp":
        return
    # Resuming the 2-rank FSDP2 run from its sharded checkpoint (step 2) ends where it ended.
    done = subprocess.run(cmd[:-2] + ["--config", str(cfg), "--resume", "checkpoint-2"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    c = _weights(tmp_path / "ranks" / "student.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)


@pytest.mark.parametrize("edit,field", [
    (lambda t: t + "bogus = 1\n", "train.bogus"),
    (lambda t: t.replace("steps = 6", 'steps = "six"'), "train.steps"),
    (lambda t: t.replace("[data]\nsamples = ", "[data]\nsamples = \"missing\"\nx = "), "data.x"),
    (lambda t: t.replace('student = "', 'student = "/nonexistent/'), "model.student"),
    (lambda t: t + "[flow]\nsalient_weight = -1.0\n", "flow.salient_weight"),
])
def test_bad_config_fails_before_any_compute(pruned, tmp_path, capsys, edit, field):
    cfg = _config(pruned, tmp_path / "run")
    cfg.write_text(edit(cfg.read_text()))
    assert main(["distill", "--config", str(cfg)]) == 2
    assert f"'{field}'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_salient_weights_mark_where_the_content_is_was_or_will_be():
    """A cell is salient where the clean latent departs from its clip's per-channel median (the background, not
    assumed 0) in this or an adjacent latent frame; a clip with nothing in it keeps weight 1 everywhere."""
    x0 = torch.full((2, 16, 5, 8, 8), -0.7)
    x0[:, 3] = 1.3  # another channel's background level
    x0[0, 3, 2, 5, 1] = 1.6  # one cell of one channel, 0.3 above its background, latent frame 2 of clip 0
    x0[0, 9, 4, 0, 0] = -0.75  # 0.05 off: under the threshold
    w = salient_weights(x0, 9.0, threshold=0.1)
    expected = torch.ones(2, 1, 5, 8, 8)
    expected[0, 0, 1:4, 5, 1] = 10.0
    assert torch.equal(w, expected)
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\], got shape \[16, 5, 8, 8\]"):
        salient_weights(x0[0], 9.0)
