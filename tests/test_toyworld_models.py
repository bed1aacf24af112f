"""The shipped toy teacher, measured on decoded frames (the shipped toy VAE), sampled as ComfyUI's KSampler does
(training.sampling) with the toy world's default sampler settings (20 Euler steps, CFG 4, shift 3). Each prompt
names a colour/shape pair and a direction; the held-out pairs never appeared in training. Rates are logged
(`pytest -s -o log_cli=true` shows them) and quoted in training/README.md."""

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

TOKENS = evaluate.LATENT_SHAPE[1] * (evaluate.LATENT_SHAPE[2] // 2) * (evaluate.LATENT_SHAPE[3] // 2)

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
def reports(toy):
    """Held-out: all 3 pairs x 4 directions; seen: every third of the 9 x 4 seen prompts (12, every direction)."""
    out = {split: evaluate.evaluate(toy["teacher"], toy["text"], toy["vae"], split, SHIFT,
                                    every=1 if split == "heldout" else 3)[0] for split in ("heldout", "seen")}
    for split, rep in out.items():
        log.info("toy teacher on %s prompts: %s", split, rep)
    return out


def test_teacher_shows_the_named_colour_on_held_out_and_seen_prompts(reports):
    assert reports["heldout"].n == 12 and reports["seen"].n == 12
    assert reports["heldout"].colour_rate >= 0.8, reports
    assert reports["seen"].colour_rate >= 0.8, reports


def test_teacher_moves_the_object_the_named_way(reports):
    assert reports["heldout"].direction_rate >= 0.8, reports
    assert reports["seen"].direction_rate >= 0.8, reports


@pytest.mark.xfail(strict=True, reason="NOT demonstrated on the shipped toy (issue 9 marks it blocked): magnitude "
                   "has no bias here for the protection to correct. Ablating each teacher head alone "
                   "(docs/toy_head_ablation.json), raw importance orders 39 of 48 within-block head pairs like the "
                   "trajectory damage (type-normalised: 36), and the heads that attend to other frames (ratio < 0.1, "
                   "block 5) have the largest raw scores, so both rankings keep them. Measured trajectory errors "
                   "(held-out + seen): aware 1.59 vs magnitude-only 1.62 px at seed 0 (1.9%, the test asks 5%), "
                   "1.54/1.58/1.69 vs 1.50/1.52/1.63 px at seeds 100/200/300; scale:1.5 1.62/1.59/1.66/1.81 px")
def test_aware_pruning_beats_magnitude_only_at_equal_compute(toy):
    """The same head/FFN targets pruned with spatial/temporal-aware scores (prune --protect normalize) and with
    magnitude-only scores (--protect none), then the same stage-1 distillation: equal block compute, and the aware
    student's decoded videos follow the ground-truth trajectories clearly (>= 5%) more closely (held-out and seen
    prompts); a smaller gap is within what one seed per prompt can resolve."""
    from comfyui_pare.compute import model_block_macs

    students = {name: WanTransformer.from_checkpoint(WEIGHTS / f"pare_toy_student_{name}_stage1.safetensors",
                                                     dtype=torch.float32) for name in ("aware", "magnitude")}
    macs = {n: sum(b.total for b in model_block_macs(m.meta, TOKENS)) for n, m in students.items()}
    assert macs["aware"] == macs["magnitude"], macs
    errs = {}
    for name, model in students.items():
        reps = [evaluate.evaluate(model, toy["text"], toy["vae"], split, SHIFT, every=every)[0]
                for split, every in (("heldout", 1), ("seen", 3))]
        errs[name] = sum(r.trajectory_error_px for r in reps) / 2
        log.info("%s stage-1 student: %s", name, reps)
    assert errs["aware"] <= 0.95 * errs["magnitude"], errs


def test_routed_student_keeps_the_motion_on_every_held_out_prompt(toy, reports):
    """The shipped student behind its router at the trained threshold (PAREApplyRouter's default; the ComfyUI tests
    show the two sample alike to fp32 tolerance), on the teacher report's prompts and seeds (other than the ComfyUI
    test's): trajectory error within 20% of the teacher's on held-out and on seen prompts. Before the hard-gate
    phase the student missed this (2.85 vs 1.70 px held-out)."""
    from comfyui_pare.router import RoutingPolicy, load_router
    from training.routed import RoutedVelocity

    router = load_router(WEIGHTS / "pare_toy_router.safetensors")
    student = WanTransformer.from_checkpoint(WEIGHTS / "pare_toy_student.safetensors", dtype=torch.float32)
    routed = RoutedVelocity(student, router, RoutingPolicy(threshold=router.spec.default_threshold))
    for split, every in (("heldout", 1), ("seen", 3)):
        rep = evaluate.evaluate(routed, toy["text"], toy["vae"], split, SHIFT, every=every)[0]
        log.info("routed student on %s prompts: %s (teacher %s)", split, rep, reports[split])
        assert rep.trajectory_error_px <= 1.2 * reports[split].trajectory_error_px, (split, rep, reports[split])
