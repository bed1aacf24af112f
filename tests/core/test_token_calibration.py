"""asymrnr-calibrate: the real CLI on the tiny teacher and calibration samples; the schedule it writes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO

from comfyui_pare.calibration import write_sample
from comfyui_pare.errors import PareError
from comfyui_pare.token_calibration import schedule_from_redundancy, step_ranges
from comfyui_pare.token_schedule import load_schedule
from scripts import tiny_assets


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO, capture_output=True, text=True)


def test_schedule_from_redundancy_spends_the_target_on_the_most_redundant_cells():
    red = torch.tensor([[[0.9, 0.1, 0.8], [0.2, 0.95, 0.3]],  # q: blocks x steps
                        [[0.1, 0.2, 0.3], [0.6, 0.5, 0.4]]])  # kv
    s = schedule_from_redundancy(red, [0.0, 0.4, 0.8], target_q=0.3, target_kv=0.1, max_ratio=0.6)
    assert step_ranges([0.0, 0.4, 0.8]) == [(0.0, 0.2), (0.2, 0.6000000000000001), (0.6000000000000001, 1.0)]

    def p2s(p):
        return 1.0 - p
    on = {feat: [[s.ratios(b, 1.0 - pc, p2s)[f] for pc in (0.0, 0.4, 0.8)] for b in range(2)]
          for f, feat in enumerate(("q", "kv"))}
    assert on["q"] == [[0.6, 0.0, 0.6], [0.0, 0.6, 0.0]]  # 0.3 / 0.6 of 6 cells = the 3 most redundant
    assert on["kv"] == [[0.0, 0.0, 0.0], [0.6, 0.0, 0.0]]  # round(0.1 / 0.6 * 6) = 1 cell
    with pytest.raises(PareError, match="target ratio for q must be in"):
        schedule_from_redundancy(red, [0.0, 0.4, 0.8], target_q=0.7, target_kv=0.1, max_ratio=0.6)


def test_cli_measures_the_tiny_teacher_and_writes_a_loadable_schedule(assets_dir, tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    gen = torch.Generator().manual_seed(0)
    shape = [16, 3, 8, 8]
    write_sample(samples / "a.safetensors", torch.randn(12, tiny_assets.TINY_T2V.text_dim, generator=gen),
                 latent_shape=shape, seed=1, prompt="a red circle")
    write_sample(samples / "b.safetensors", torch.randn(7, tiny_assets.TINY_T2V.text_dim, generator=gen),
                 latent_shape=shape, seed=2, prompt="a blue square", latent=torch.randn(*shape, generator=gen))
    out = tmp_path / "schedule.json"
    proc = cli("asymrnr-calibrate", "--model", str(assets_dir / tiny_assets.TEACHER_T2V), "--samples", str(samples),
               "--out", str(out), "--steps", "4", "--target-q", "0.3", "--target-kv", "0.15", "--max-ratio", "0.6")
    assert proc.returncode == 0, proc.stderr
    s = load_schedule(out)
    s.check_blocks(tiny_assets.TINY_T2V.num_layers)
    red = torch.tensor([s.calibration["redundancy"][f] for f in ("q", "kv")])
    assert red.shape == (2, 6, 4) and ((red > -1) & (red <= 1)).all() and red.std() > 0
    assert s.calibration["samples"] == 2 and s.calibration["steps"] == 4
    # every rule sits on a cell at least as redundant as every cell left out, at the target budget
    for f, (feat, target) in enumerate((("q", 0.3), ("kv", 0.15))):
        on = torch.zeros(6, 4, dtype=torch.bool)
        for rule in (r for r in s.rules if r.feature == feat):
            for k, pc in enumerate(s.calibration["step_percents"]):
                if rule.start_percent <= pc <= rule.end_percent:
                    on[rule.blocks[0], k] = True
        assert on.sum() == round(target / 0.6 * 24)
        assert red[f][on].min() >= red[f][~on].max()


def test_errors_name_what_is_wrong(assets_dir, tmp_path, capsys):
    from training.token_calibrate import main  # in-process: the CLI dispatch itself is run above

    model = str(assets_dir / tiny_assets.TEACHER_T2V)
    assert main(["--model", model, "--samples", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "not found" in err, err
    assert main(["--model", model, "--samples", str(tmp_path), "--out", str(tmp_path / "s.json"), "--stride", "1,2"]) == 2
    assert "--stride must be three positive integers" in capsys.readouterr().err


def test_calibrates_a_pruned_student_in_process(assets_dir, tmp_path):
    from comfyui_pare.pruned import save_checkpoint
    from comfyui_pare.surgery import BlockPlan, PrunePlan, prune_state_dict
    from comfyui_pare.wan_reader import load_checkpoint
    from training.token_calibrate import main

    sd, meta = load_checkpoint(assets_dir / tiny_assets.TEACHER_T2V)
    plan = PrunePlan(tuple(BlockPlan(heads=(0, 3, 5)) if i % 2 else BlockPlan() for i in range(6)))
    save_checkpoint(tmp_path / "student.safetensors", *prune_state_dict(sd, meta, plan))
    (tmp_path / "samples").mkdir()
    write_sample(tmp_path / "samples" / "a.safetensors", torch.randn(5, tiny_assets.TINY_T2V.text_dim),
                 latent_shape=[16, 2, 6, 4], seed=3)
    out = tmp_path / "s.json"
    assert main(["--model", str(tmp_path / "student.safetensors"), "--samples", str(tmp_path / "samples"),
                 "--out", str(out), "--steps", "2", "--stride", "1,1,2"]) == 0
    s = load_schedule(out)
    assert s.num_blocks == 6 and s.stride == (1, 1, 2) and len(s.calibration["redundancy"]["q"][1]) == 2
