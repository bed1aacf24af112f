"""The shipped toy models are real: the teacher draws the named colour moving the named way on prompts it never
saw word for word, and the PARE student keeps that at half the compute. Measured on decoded frames (the shipped
toy VAE), sampling as ComfyUI's KSampler does (training.sampling), with the toy world's default sampler settings.
Numbers are logged so `pytest -s` shows the rates quoted in training/README.md."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from comfyui_pare.safetensors_io import load_tensors
from comfyui_pare.toy_text import ToyTextEncoder
from training.model import WanTransformer
from training.toyworld import evaluate
from training.toyworld.comfy_vae import load_vae
from training.toyworld.teacher import SHIFT

WEIGHTS = Path(__file__).resolve().parents[1] / "training" / "toyworld" / "weights"
log = logging.getLogger(__name__)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core box, two threads waiting on each other cost far more wall time."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def toy():
    return {
        "teacher": WanTransformer.from_checkpoint(WEIGHTS / "pare_toy_teacher.safetensors"),
        "text": ToyTextEncoder.load(WEIGHTS / "pare_toy_text.safetensors"),
        "vae": load_vae(load_tensors(WEIGHTS / "pare_toy_vae.safetensors")[0]),
    }


@pytest.fixture(scope="module")
def teacher_heldout(toy):
    return evaluate.evaluate(toy["teacher"], toy["text"], toy["vae"], "heldout", SHIFT)


def test_teacher_draws_held_out_combos_moving_the_named_way(teacher_heldout):
    """Red triangles, green circles and blue squares never appeared in training; each in all 4 directions."""
    report, _, _ = teacher_heldout
    log.info("teacher, held-out prompts: %s", report)
    assert report.n == 12
    assert report.colour_rate >= 0.8, report
    assert report.direction_rate >= 0.8, report


def test_teacher_on_seen_combos(toy):
    report, _, _ = evaluate.evaluate(toy["teacher"], toy["text"], toy["vae"], "seen", SHIFT)
    log.info("teacher, seen prompts: %s", report)
    assert report.n == 36
    assert report.colour_rate >= 0.8 and report.direction_rate >= 0.8, report


def test_aware_pruning_beats_magnitude_only_at_equal_compute(toy):
    """Both students keep the same number of heads and FFN neurons (equal block compute) and had the same
    stage-1 distillation; the spatial/temporal-aware one keeps the motion better."""
    from comfyui_pare.compute import model_block_macs

    aware = WanTransformer.from_checkpoint(WEIGHTS / "pare_toy_student_aware_stage1.safetensors", dtype=torch.float32)
    magnitude = WanTransformer.from_checkpoint(WEIGHTS / "pare_toy_student_magnitude_stage1.safetensors",
                                               dtype=torch.float32)
    macs = [sum(b.total for b in model_block_macs(m.meta, 80)) for m in (aware, magnitude)]
    assert abs(macs[0] - macs[1]) / macs[1] < 0.01, macs
    errs = {}
    for name, model in (("aware", aware), ("magnitude", magnitude)):
        reps = [evaluate.evaluate(model, toy["text"], toy["vae"], split, SHIFT)[0] for split in ("heldout", "seen")]
        errs[name] = (reps[0].trajectory_error_px * reps[0].n + reps[1].trajectory_error_px * reps[1].n) / 48
        log.info("%s stage-1 student: %s", name, reps)
    assert errs["aware"] < errs["magnitude"], errs
