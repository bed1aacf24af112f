"""The oracle-label router fit and the headroom measure, on label tables whose best masks are known by construction.

Synthetic labels: 6 blocks, first and last pinned (16 masks of blocks 1-4), two classes of clips. Skipping a block
costs its class's damage for that block: class 0 needs blocks 1-2 and can spare 3-4, class 1 the other way round.
So a router that reads the class (through the pooled tokens, which differ by class, on both CFG rows) can skip the
cheap blocks of each clip, and one that does not must pay for some expensive ones.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_pare.router import BlockRouter, RouterSpec
from training.router_fit import FitConfig, LabelSet, fit_router, shuffled_content, tokens_from_pooled
from training.router_headroom import HeadroomConfig, content_headroom, pair_costs

N, DIM, STEPS = 6, 8, 4
PINNED = torch.tensor([True, False, False, False, False, True])
DAMAGE = torch.tensor([[4.0, 3.0, 0.2, 0.1], [0.1, 0.2, 3.0, 4.0]])  # [class, unpinned block]
BITS = ((torch.arange(16)[:, None] >> torch.arange(4)[None]) & 1).float()  # mask m runs unpinned block j


def row_damage(cls: int, scale: float) -> torch.Tensor:
    """[M]: one row's squared error under every mask: the damage of the blocks it skips (plus a floor)."""
    return scale * (0.05 + (1 - BITS) @ DAMAGE[cls])


def tables_for(classes: torch.Tensor, content_matters: bool = True, seed: int = 0) -> torch.Tensor:
    """[C, S, M, M]: cond and uncond errors add up (no cross term), the same per step up to a step scale."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in classes.tolist():
        scale = 1.0 + 0.1 * torch.rand((), generator=g)
        steps = []
        for s in range(STEPS):
            d = row_damage(c if content_matters else 0, float(scale) * (1 + s))
            steps.append(16.0 * d[:, None] + 9.0 * d[None, :])
        out.append(torch.stack(steps))
    return torch.stack(out)


def label_set(classes: torch.Tensor, seed: int) -> LabelSet:
    g = torch.Generator().manual_seed(seed + 100)
    c = len(classes)
    tables = tables_for(classes, seed=seed)
    # Mean halves of opposite sign patterns and std halves around 1: the classes stay apart after LayerNorm.
    pattern = torch.tensor([1.0, -1.0]).repeat(DIM // 2)
    centre = torch.stack([torch.cat([pattern, 1 + 0.5 * pattern]), torch.cat([-pattern, 1 - 0.5 * pattern])])
    pooled = centre[classes] + 0.1 * torch.randn(c, 2 * DIM, generator=g)
    pooled_rows = pooled.repeat_interleave(STEPS, 0)  # the same latent statistics for the cond and the uncond row
    t = torch.tensor([900.0, 600.0, 300.0, 100.0]).repeat(c)
    return LabelSet(tables=tables.flatten(0, 1) / tables.amax(), timesteps=t, cond=torch.zeros(c * STEPS, 1, 4),
                    uncond=torch.zeros(1, 4), weights=torch.ones(c * STEPS),
                    groups=torch.arange(c).repeat_interleave(STEPS), pooled_cond=pooled_rows,
                    pooled_uncond=pooled_rows.clone())


def test_tokens_from_pooled_reproduce_the_statistics():
    from comfyui_pare.router import pool_tokens

    pooled = torch.cat([torch.randn(5, DIM), torch.rand(5, DIM) + 0.1], 1)
    assert torch.allclose(pool_tokens(tokens_from_pooled(pooled)), pooled, atol=1e-6)


def test_shuffled_content_keeps_the_step_and_moves_the_content():
    data = label_set(torch.tensor([0, 1, 0, 1]), seed=0)
    shuffled = shuffled_content(data)
    assert torch.equal(shuffled.timesteps, data.timesteps)
    assert torch.equal(shuffled.tables, data.tables)
    # Clip k's rows read clip k+1's statistics, step for step.
    assert torch.equal(shuffled.pooled_cond[:STEPS], data.pooled_cond[STEPS:2 * STEPS])
    assert torch.equal(shuffled.pooled_uncond[-STEPS:], data.pooled_uncond[:STEPS])


def fit(content_input: bool) -> dict:
    """Fit a router (with or without the pooled tokens) from a content-blind prior: the same skip order for every
    clip at every step (block 4 first, then 3, 2, 1)."""
    from training.router_fit import prior_from_order

    train = label_set(torch.tensor([0, 1] * 12), seed=1)
    val = label_set(torch.tensor([0, 1] * 4), seed=2)
    spec = RouterSpec(num_blocks=N, dim=DIM, freq_dim=4, text_dim=0, hidden=16, prior_knots=STEPS, layer_norm=True,
                      token_input=content_input, time_code="fourier")
    torch.manual_seed(0)
    router = BlockRouter(spec, init_bias=0.0)
    order = torch.tensor([float("inf"), 3.0, 2.0, 1.0, 0.0, float("inf")]).expand(STEPS, -1)
    router.set_prior(torch.tensor([100.0, 300.0, 600.0, 900.0]), prior_from_order(order))
    cfg = FitConfig(budgets=(0.5, 2 / 3), steps=300, eval_every=100, learning_rate=1e-2)
    return fit_router(router, train, val, torch.ones(N), PINNED, cfg)["history"][-1]


def test_fit_learns_content_when_the_labels_reward_it_and_it_can_read_it():
    """Reading the class through the pooled tokens (both CFG rows), the fitted router runs each clip's own
    expensive blocks: at 2/3 of the compute (two of the four routed blocks) it runs exactly those and its held-out
    error is far below that of the best content-blind router (which must skip an expensive block of one class);
    the shuffled-content control loses that gain. A router without content input is untouched by the shuffle."""
    aware, blind = fit(True), fit(False)
    for last in (aware, blind):
        assert all(abs(s - b) < 0.05 for s, b in zip(last["val_hard_spend"], (0.5, 2 / 3))), last["val_hard_spend"]
    assert aware["val_hard_error_vs_start"][1] < 0.25 * blind["val_hard_error_vs_start"][1], (aware, blind)
    assert aware["val_shuffled_error_vs_start"][1] > 4 * aware["val_hard_error_vs_start"][1]
    assert aware["live_units"] > 0.5 and aware["decision_spread_inputs"] > 0
    assert blind["val_hard_error_vs_start"] == pytest.approx(blind["val_shuffled_error_vs_start"], abs=1e-6)
    assert blind["decision_spread_inputs"] == 0


def test_headroom_finds_content_gain_only_where_content_matters():
    classes = torch.tensor([0, 1] * 10)
    costs, cfg = torch.ones(N), HeadroomConfig(budgets=(0.5, 0.7), splits=2, multipliers=60)
    with_content = content_headroom(tables_for(classes), classes, costs, PINNED, cfg)
    without = content_headroom(tables_for(classes, content_matters=False), classes, costs, PINNED, cfg)
    assert with_content["per_class_vs_per_step"][0] < -0.3
    # Reading the class on the cond row only (what a text-reading router can do when every uncond row reads the
    # empty prompt) recovers part of it, never more than both rows.
    assert with_content["per_class_vs_per_step"][0] <= with_content["per_class_cond_only_vs_per_step"][0] < -0.05
    assert all(abs(x) < 0.02 for x in without["per_class_vs_per_step"])
    assert all(abs(x) < 0.02 for x in without["per_clip_vs_per_step"])
    # A per-phase schedule can only tie or lose against a per-step one (the synthetic tables are step-invariant).
    assert all(x >= -1e-9 for x in with_content["per_phase_vs_per_step"])


def test_pair_costs_are_the_mean_spend_of_both_rows():
    cost = pair_costs(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0]), PINNED)
    assert cost[15, 15] == pytest.approx(1.0)
    assert cost[0, 0] == pytest.approx(2 / 6)
    assert cost[15, 0] == pytest.approx(0.5 * (1.0 + 2 / 6))


def test_headroom_refuses_mismatched_classes():
    with pytest.raises(ValueError, match="classes must be"):
        content_headroom(tables_for(torch.tensor([0, 1])), torch.tensor([0, 1, 0]), torch.ones(N), PINNED)


def test_oracle_tables_equal_every_mask_run_one_by_one():
    """``mask_tables`` (prefix states shared) against the student run under each of the 64 masks on its own."""
    from pathlib import Path

    from comfyui_pare.toy_text import ToyTextEncoder
    from training.model import WanTransformer
    from training.router_oracle import mask_bits, mask_tables

    weights = Path(__file__).resolve().parents[2] / "training" / "toyworld" / "weights"
    teacher = WanTransformer.from_checkpoint(weights / "pare_toy_teacher.safetensors").eval()
    student = WanTransformer.from_checkpoint(weights / "pare_toy_student.safetensors").eval()
    text = ToyTextEncoder.load(weights / "pare_toy_text.safetensors")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, teacher.meta.dims.in_dim, 5, 8, 8, generator=g)
    t = torch.tensor([700.0, 250.0])
    with torch.no_grad():
        cond, uncond = text(["a red circle moving left", "a blue square moving up"]), text(["", ""])
        unpinned = list(range(1, student.num_blocks - 1))
        tables = mask_tables(student, teacher, x, t, cond, uncond, unpinned, cfg=4.0)
        run = mask_bits(unpinned, student.num_blocks)  # [M, N]
        m = run.shape[0]
        assert tables.shape == (2, m, m)
        for b in range(2):
            ref_c, ref_u = teacher(x[b:b + 1], t[b:b + 1], cond[b:b + 1]), teacher(x[b:b + 1], t[b:b + 1], uncond[b:b + 1])
            v_c = student(x[b:b + 1].expand(m, -1, -1, -1, -1), t[b:b + 1].expand(m), cond[b:b + 1].expand(m, -1, -1),
                          block_mask=run)
            v_u = student(x[b:b + 1].expand(m, -1, -1, -1, -1), t[b:b + 1].expand(m), uncond[b:b + 1].expand(m, -1, -1),
                          block_mask=run)
            d_c, d_u = (v_c - ref_c).flatten(1), (v_u - ref_u).flatten(1)
            cfg_err = 4.0 * d_c[:, None] - 3.0 * d_u[None, :]  # [Mc, Mu, numel]
            expected = cfg_err.square().sum(-1)
            assert torch.allclose(tables[b], expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    # The full mask is the student with every block; skipping nothing unpinned is mask M - 1.
    assert bool(run[-1].all()) and not bool(run[0, unpinned].any())


def test_headroom_command_reads_label_files(tmp_path, capsys):
    """``python -m training.router_headroom`` on label files shaped like ``scripts.router_labels_toy``'s (the toy
    student's 6 routed blocks: 64 x 64 tables), and a named error for a folder without any."""
    from pathlib import Path

    from comfyui_pare.safetensors_io import save_atomic
    from training import router_headroom

    student = Path(__file__).resolve().parents[2] / "training" / "toyworld" / "weights" / "pare_toy_student.safetensors"
    g = torch.Generator().manual_seed(0)
    for k in range(6):
        row = torch.rand(64, generator=g) + 0.1
        table = (row[:, None] + row[None, :]).expand(3, -1, -1).contiguous()
        save_atomic(tmp_path / f"train_{k:05d}.safetensors", {"tables": table}, {"objects": str(1 + k % 2)})
    assert router_headroom.main(["--labels", str(tmp_path), "--student", str(student)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("6 clips, classes [1, 2], 3 steps")
    assert out.count("\n| 0.") == 6
    with pytest.raises(FileNotFoundError, match="no label files"):
        router_headroom.main(["--labels", str(tmp_path / "empty"), "--student", str(student)])
