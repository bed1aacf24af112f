"""VDMini through the training verbs: ``prune --depth static`` removes the blocks calibration says matter least and
writes a smaller student that records its teacher blocks; stage 1 trains it with the content / motion options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from training_helpers import distill_toml, write_micro_teacher, write_samples

from comfyui_pare.compute import model_block_macs, sum_macs
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.wan import WanDims
from comfyui_pare.wan_reader import open_wan
from training.__main__ import main
from training.calibrate import CalibrationStats
from training.config import ConfigError, load_config
from training.depth import DEFAULT_TOKENS
from training.distill import DistillConfig, train
from training.model import WanTransformer

DEEP = WanDims(dim=64, num_heads=4, ffn_dim=128, num_layers=6, text_dim=64)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vdmini")
    teacher, samples = root / "teacher.safetensors", write_samples(root / "samples", 3)
    write_micro_teacher(teacher, DEEP)
    assert main(["calibrate", "--teacher", str(teacher), "--samples", str(samples), "--out",
                 str(root / "stats.safetensors"), "--timesteps", "2", "--query-rows", "8", "--device", "cpu"]) == 0
    return {"root": root, "teacher": teacher, "samples": samples, "stats": root / "stats.safetensors"}


def prune(c: dict, name: str, *args: str) -> PrunedWanMeta:
    out = c["root"] / name
    assert main(["prune", "--teacher", str(c["teacher"]), "--stats", str(c["stats"]), "--out", str(out),
                 "--plan-out", str(out.with_suffix(".json")), "--depth", "static", *args]) == 0
    with open_wan(out) as r:
        return r.meta


def mean_contribution(c: dict) -> list[float]:
    return CalibrationStats.load(c["stats"]).block_contribution.double().mean(0).tolist()


def test_prune_removes_the_least_contributing_blocks(calibrated):
    contrib = mean_contribution(calibrated)
    # Lowest contribution anywhere (first and last pinned): the two smallest of blocks 1-4.
    meta = prune(calibrated, "any.safetensors", "--remove-blocks", "2", "--depth-order", "contribution")
    expected_removed = sorted(sorted(range(1, 5), key=lambda i: contrib[i])[:2])
    assert meta.kept_blocks == tuple(i for i in range(6) if i not in expected_removed)
    assert meta.num_blocks == 4 and not any(b != meta.blocks[0] for b in meta.blocks)  # widths untouched
    plan = json.loads((calibrated["root"] / "any.json").read_text())
    assert plan["kept_blocks"] == list(meta.kept_blocks)
    # VDMini's shallow order: candidates are the first half (blocks 1-2 here, block 0 pinned).
    shallow = prune(calibrated, "shallow.safetensors", "--remove-blocks", "2")
    assert shallow.kept_blocks == (0, 3, 4, 5)
    # The student's file is smaller and loads in the training-side model with its 4 blocks.
    assert (calibrated["root"] / "any.safetensors").stat().st_size < 0.75 * calibrated["teacher"].stat().st_size
    assert WanTransformer.from_checkpoint(calibrated["root"] / "any.safetensors").num_blocks == 4


def test_depth_target_composes_with_width_pruning(calibrated):
    meta = prune(calibrated, "both.safetensors", "--heads", "0.75", "--ffn", "0.75", "--ffn-multiple", "16",
                 "--depth-target", "0.45", "--depth-order", "contribution")
    assert meta.kept_blocks is not None
    assert any(b.num_heads < DEEP.num_heads or b.ffn_dim < DEEP.ffn_dim for b in meta.blocks)
    student = sum_macs(model_block_macs(meta, DEFAULT_TOKENS)).total
    teacher = sum_macs(model_block_macs(PrunedWanMeta.teacher(DEEP), DEFAULT_TOKENS)).total
    assert student <= 0.45 * teacher
    assert main(["prune", "--teacher", str(calibrated["teacher"]), "--stats", str(calibrated["stats"]), "--out",
                 str(calibrated["root"] / "x.safetensors"), "--remove-blocks", "2"]) == 2  # needs --depth static


def test_stage1_with_content_and_motion_losses(calibrated, tmp_path):
    prune(calibrated, "s1.safetensors", "--remove-blocks", "2", "--depth-order", "contribution")
    out = tmp_path / "run"
    cfg = tmp_path / "run.toml"
    cfg.write_text(distill_toml(calibrated["teacher"], calibrated["root"] / "s1.safetensors", calibrated["samples"],
                                out, steps=30, batch_size=2, learning_rate=1e-3, checkpointing_steps=30)
                   + "[distill]\ncontent_weight = 0.5\nmotion_weight = 0.5\nvelocity_motion_weight = 0.5\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = train(load_config(DistillConfig, cfg))
    finally:
        torch.set_num_threads(threads)
    assert report["final"] < report["initial"], report
    header = (out / "loss.csv").read_text().splitlines()[0].split(",")
    assert {"content", "motion_feature", "motion_velocity"} <= set(header)
    with open_wan(out / "student.safetensors") as r:
        assert r.meta.kept_blocks is not None and r.meta.num_blocks == 4
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace("content_weight = 0.5", "adversarial_weight = 1.0"))
    with pytest.raises(ConfigError, match="adversarial motion term is not implemented"):
        load_config(DistillConfig, bad)
