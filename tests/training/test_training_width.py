"""Width pruning: head types from the intra-slice ratio, its estimator, temporal protection, the prune verb."""

from __future__ import annotations

import json
import math

import pytest
import torch
from training_helpers import write_micro_teacher, write_samples

from comfyui_pare.calibration import read_folder
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.wan import WanDims
from comfyui_pare.wan_reader import load_checkpoint
from training.__main__ import main
from training.attention_stats import frame_of_tokens, intra_slice_ratio, intra_slice_ratio_dense, sample_rows
from training.calibrate import CalibrateOptions, CalibrationStats, calibrate
from training.data import prepare_sample
from training.model import WanTransformer, rope_freqs
from training.prune import PruneTargets, global_counts, greedy_dedup, make_plan, round_to_multiple
from training.scores import SPATIAL, TEMPORAL, adjust_importance, classify
from training.tiny import random_wan_state_dict

# ------------------------------------------------------------------------------------------ the estimator


def _qk(heads: int, length: int, d: int, seed: int, sharp: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return sharp * torch.randn(heads, length, d, generator=gen), sharp * torch.randn(heads, length, d, generator=gen)


def test_chunked_ratio_equals_dense_reference():
    grid = (5, 3, 4)
    frames = frame_of_tokens(grid)
    q, k = _qk(3, len(frames), 8, seed=0)
    dense = intra_slice_ratio_dense(q, k, frames)
    rows = torch.arange(len(frames))
    for chunk in (7, 16, 1000):  # chunk boundaries inside and across frames, and one chunk
        chunked = intra_slice_ratio(q, k, frames, rows, key_chunk=chunk)
        torch.testing.assert_close(chunked.double(), dense, rtol=0, atol=2e-6)
    sub = torch.tensor([0, 13, 59])
    torch.testing.assert_close(intra_slice_ratio(q[:, sub], k, frames, sub, 5).double(), dense[:, sub], rtol=0,
                               atol=2e-6)
    assert 0.05 < dense.mean() < 0.95 and dense.std() > 0.05  # varied rows: not trivially all 0 or all 1


def test_sampled_estimator_within_its_sampling_tolerance():
    """The mean over R random rows estimates the all-rows mean; its error stays within 4 standard errors."""
    frames = frame_of_tokens((6, 4, 5))
    n_all, n = len(frames), 24
    q, k = _qk(4, n_all, 8, seed=1, sharp=1.5)
    exact_rows = intra_slice_ratio_dense(q, k, frames)
    exact = exact_rows.mean(1)
    # Standard error of a mean of n rows drawn without replacement from N.
    se = exact_rows.std(1) / math.sqrt(n) * math.sqrt((n_all - n) / (n_all - 1))
    gen = torch.Generator().manual_seed(0)
    errors = []
    for _ in range(30):
        rows = sample_rows(n_all, n, gen)
        est = intra_slice_ratio(q[:, rows], k, frames, rows, key_chunk=32).mean(1).double()
        assert ((est - exact).abs() <= 4 * se).all(), (est, exact, se)
        errors.append((est - exact).abs())
    assert torch.stack(errors).mean() > 0  # really sampled, not all rows
    assert sample_rows(10, 50, gen).tolist() == list(range(10))


# ------------------------------------------------------------------ a teacher with a spatial and a temporal head

HEAD_DIM = 32
ONE_LAYER = WanDims(dim=4 * HEAD_DIM, num_heads=4, ffn_dim=128, num_layers=1, text_dim=16)
A, B, C, D = 0, 1, 2, 3  # A, C, D attend within their frame; B across frames
OUT_SCALE = {A: 3.0, B: 0.5, C: 2.0, D: 1.5}


def constructed_teacher() -> tuple[dict[str, torch.Tensor], PrunedWanMeta]:
    """Queries and keys are constant vectors in the first RoPE pair of the frame band (angular frequency 1 per
    frame), so attention logits are s cos(f_q - f_k + phase): phase 0 peaks on the query's own frame (spatial),
    phase pi is lowest there and peaks 2-3 frames away (temporal). Raw importance is set by scaling each head's
    columns of ``o``."""
    dims = ONE_LAYER
    assert dims.head_dim - 4 * (dims.head_dim // 6) >= 2  # the frame band holds channel pair (0, 1)
    assert rope_freqs((2, 1, 1), HEAD_DIM)[0][1, 0] == pytest.approx(math.cos(1.0))  # pair 0 turns 1 rad per frame
    sd = random_wan_state_dict(dims, seed=5)
    p = "blocks.0.self_attn."
    for name in ("q", "k"):
        sd[p + f"{name}.weight"].zero_()
        bias = torch.zeros(dims.dim)
        for h in range(dims.num_heads):
            bias[h * HEAD_DIM] = -1.0 if (name == "k" and h == B) else 1.0
        sd[p + f"{name}.bias"] = bias
        sd[p + f"norm_{name}.weight"] = torch.full((dims.dim,), 2.7)  # logit scale ~ 2.7^2 * sqrt(32) ~ 41
    for h, s in OUT_SCALE.items():
        sd[p + "o.weight"][:, h * HEAD_DIM:(h + 1) * HEAD_DIM] *= s
    return sd, PrunedWanMeta.teacher(dims)


def test_constructed_heads_are_classified_and_temporal_head_is_protected(tmp_path):
    sd, meta = constructed_teacher()
    model = WanTransformer.from_state_dict(sd, meta)
    folder = write_samples(tmp_path / "samples", 3, text_dim=16, latent_shape=[16, 4, 4, 4])
    samples = [prepare_sample(s, meta.dims) for s in read_folder(folder)]
    stats = calibrate(model, samples, CalibrateOptions(sigmas=(0.9, 0.5), query_rows=16))
    ratio, raw = stats.head_ratio[0], stats.head_importance[0]
    types = stats.head_type()[0]
    assert ratio[A] > 0.95 and ratio[C] > 0.95 and ratio[D] > 0.95 and ratio[B] < 0.05, ratio
    assert types.tolist() == [SPATIAL, TEMPORAL, SPATIAL, SPATIAL]
    assert raw[B] == raw.min() and raw[A] == raw.max(), raw  # B is the weakest by magnitude

    targets = dict(heads=0.75, ffn=1.0, head_floor=0.25, ffn_multiple=1)
    none = make_plan(stats, sd, meta, PruneTargets(protection="none", **targets)).blocks[0].heads
    norm = make_plan(stats, sd, meta, PruneTargets(protection="normalize", **targets)).blocks[0].heads
    assert B not in none and len(none) == 3  # magnitude only drops the temporal head
    assert B in norm and len(norm) == 3  # normalising within types keeps it (and drops the weakest spatial one)
    strong = make_plan(stats, sd, meta, PruneTargets(protection="scale:10", **targets)).blocks[0].heads
    assert B in strong


def test_adjusted_scores_and_type_thresholds():
    raw = torch.tensor([[4.0, 1.0, 2.0], [2.0, 3.0, 6.0]])
    types = torch.tensor([[0, 1, 2], [0, 1, 2]], dtype=torch.int8)
    norm = adjust_importance(raw, types, "normalize")
    torch.testing.assert_close(norm, torch.tensor([[4 / 3, 0.5, 0.5], [2 / 3, 1.5, 1.5]], dtype=torch.float64))
    torch.testing.assert_close(adjust_importance(raw, types, "scale:3")[:, 1], torch.tensor([3.0, 9.0],
                                                                                              dtype=torch.float64))
    assert torch.equal(adjust_importance(raw, types, "none"), raw.double())
    assert classify(torch.tensor([0.7, 0.3, 0.5, 0.69])).tolist() == [0, 1, 2, 2]
    with pytest.raises(ValueError, match="scale:<k>"):
        adjust_importance(raw, types, "scale:-1")


def test_global_ranking_floors_rounding_and_dedup():
    scores = [torch.tensor([9.0, 8.0, 7.0, 6.0]), torch.tensor([1.0, 0.5, 0.2, 0.1])]
    assert global_counts(scores, 0.5, 0.25) == [3, 1]  # block 1 keeps its floor only
    assert global_counts(scores, 0.5, 0.5) == [2, 2]
    assert [round_to_multiple(c, 512, 64) for c in (10, 100, 500, 512)] == [64, 128, 512, 512]
    assert round_to_multiple(20, 48, 64) == 48
    w = torch.tensor([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0], [0.7, 0.7]])
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert greedy_dedup(s, w, 2, threshold=0.95) == [0, 2]  # neuron 1 duplicates neuron 0
    assert greedy_dedup(s, w, 2, threshold=1.1) == [0, 1]
    assert greedy_dedup(s, w, 4, threshold=0.5) == [0, 1, 2, 3]  # filled from the skipped ones


def test_calibrate_and_prune_verbs(tmp_path, capsys):
    teacher = tmp_path / "teacher.safetensors"
    sd = write_micro_teacher(teacher)
    samples = write_samples(tmp_path / "samples", 2)
    stats_path = tmp_path / "stats.safetensors"
    assert main(["calibrate", "--teacher", str(teacher), "--samples", str(samples), "--out", str(stats_path),
                 "--timesteps", "2", "--query-rows", "8", "--device", "cpu"]) == 0
    stats = CalibrationStats.load(stats_path)
    assert stats.block_contribution.shape == (2, 2) and (stats.block_contribution > 0).all()
    assert stats.timesteps.tolist() == pytest.approx([1000.0, float(5 * 0.5 / (1 + 4 * 0.5)) * 1000], rel=1e-5)
    assert ((stats.head_ratio > 0) & (stats.head_ratio < 1)).all()
    ffn0 = sd["blocks.1.ffn.0.weight"].norm(dim=1) * sd["blocks.1.ffn.2.weight"].norm(dim=0)
    torch.testing.assert_close(stats.ffn_importance[1], ffn0)
    for png in ("stats_head_types.png", "stats_block_contribution.png"):
        assert (tmp_path / png).stat().st_size > 100
    out, plan_path = tmp_path / "student.safetensors", tmp_path / "plan.json"
    assert main(["prune", "--teacher", str(teacher), "--stats", str(stats_path), "--heads", "0.5", "--ffn", "0.5",
                 "--ffn-multiple", "32", "--out", str(out), "--plan-out", str(plan_path)]) == 0
    student, meta = load_checkpoint(out)
    plan = json.loads(plan_path.read_text())
    assert [list(b.heads) for b in meta.blocks] == [b["heads"] for b in plan["blocks"]]
    assert sum(b.num_heads for b in meta.blocks) == 4 and all(b.ffn_dim % 32 == 0 for b in meta.blocks)
    assert all(b.num_heads * meta.dims.head_dim % 32 == 0 for b in meta.blocks)  # head widths on the grain too
    assert sum(b.ffn_dim for b in meta.blocks) == 128
    heads0 = plan["blocks"][0]["heads"]
    torch.testing.assert_close(student["blocks.0.self_attn.q.weight"][:16], sd["blocks.0.self_attn.q.weight"]
                               [heads0[0] * 16:(heads0[0] + 1) * 16], rtol=0, atol=0)

    # Errors name the file and the field, and the CLI turns them into exit code 2.
    bad = tmp_path / "bad"
    write_samples(bad, 1)
    (bad / "s00.safetensors").write_bytes((samples / "s00.safetensors").read_bytes()[:200])
    assert main(["calibrate", "--teacher", str(teacher), "--samples", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "s00.safetensors" in capsys.readouterr().err
    wrong_dim = write_samples(tmp_path / "wrong", 1, text_dim=32)
    assert main(["calibrate", "--teacher", str(teacher), "--samples", str(wrong_dim), "--out", str(tmp_path / "x")]) == 2
    assert "s00.safetensors: calibration sample field 'context' has text dim 32" in capsys.readouterr().err
    assert main(["prune", "--teacher", str(teacher), "--stats", str(teacher), "--heads", "0.5", "--ffn", "0.5",
                 "--out", str(tmp_path / "y")]) == 2
    assert "not a calibration stats file" in capsys.readouterr().err
