"""Token reduction core (AsymRnR on Wan's grid) and its schedules, without ComfyUI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_pare.errors import PareError
from comfyui_pare.token_reduction import (
    MatchingCache,
    Reduction,
    grid_split,
    kept_sources,
    plan_matching,
    reduced_attention,
    sdpa_attend,
)
from comfyui_pare.token_schedule import PRESETS, load_schedule, parse_schedule_text, preset, save_schedule

GRID = (3, 6, 5)  # odd sizes: partial chunks at the far edges
STRIDE = (1, 2, 2)


def test_grid_split_one_destination_per_whole_chunk():
    dst, src = grid_split(GRID, STRIDE, torch.Generator().manual_seed(0))
    n = math.prod(GRID)
    assert sorted(torch.cat([dst, src]).tolist()) == list(range(n))
    f, r, c = dst // (GRID[1] * GRID[2]), dst // GRID[2] % GRID[1], dst % GRID[2]
    chunks = list(zip((f // STRIDE[0]).tolist(), (r // STRIDE[1]).tolist(), (c // STRIDE[2]).tolist()))
    assert len(set(chunks)) == len(chunks) == 3 * 3 * 2  # whole chunks only: 6 // 2 rows, 5 // 2 columns
    assert (c < 4).all(), "column 4 is a partial chunk: never a destination"
    again, _ = grid_split(GRID, STRIDE, torch.Generator().manual_seed(0))
    assert torch.equal(dst, again)


def test_restore_of_reduce_maps_every_token_to_its_source():
    torch.manual_seed(0)
    b, h, d, n = 2, 2, 8, math.prod(GRID)
    x = torch.randn(b, h, n, d)
    m = plan_matching(x, GRID, STRIDE, "cosine", torch.Generator().manual_seed(1))
    red = Reduction(m, 0.5, "mean")
    assert red.length == int(n * 0.5) and red.removed == n - red.length
    y = red.restore(red.reduce(x))
    xn = F.normalize(x, dim=-1)
    dst_set = set(m.dst.tolist())
    for bi in range(b):
        for hi in range(h):
            slots = red.slot[bi, hi]
            groups: dict[int, list[int]] = {}
            for t, s in enumerate(slots.tolist()):
                groups.setdefault(s, []).append(t)
            assert len(groups) == red.length
            for members in groups.values():
                heads = [t for t in members if t in dst_set]
                expected = x[bi, hi, members].mean(0)
                for t in members:
                    torch.testing.assert_close(y[bi, hi, t], expected, rtol=1e-6, atol=1e-6)
                if len(members) == 1:  # a kept token: exactly itself
                    assert torch.equal(y[bi, hi, members[0]], x[bi, hi, members[0]])
                else:  # a merged group: one destination, each source's most similar destination (brute force)
                    assert len(heads) == 1
                    sims = xn[bi, hi, m.dst] @ xn[bi, hi, [t for t in members if t not in dst_set]].T
                    assert (m.dst[sims.argmax(0)] == heads[0]).all()
            # the kept sources are the least similar ones
            best = (xn[bi, hi, m.src] @ xn[bi, hi, m.dst].T).max(1).values
            kept = [i for i, t in enumerate(m.src.tolist()) if len(groups[int(slots[t])]) == 1 and t not in dst_set]
            merged = [i for i in range(len(m.src)) if i not in kept]
            assert best[kept].max() <= best[merged].min()
    pruned = Reduction(m, 0.5, "prune")
    yp = pruned.restore(pruned.reduce(x))
    rep = pruned.representative.gather(-1, pruned.slot)
    assert torch.equal(yp, x.gather(2, rep[..., None].expand(-1, -1, -1, d)))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_duplicated_tokens_reduced_attention_equals_full(metric):
    """Every chunk of the stride holds copies of one token: merging them changes nothing (proportional attention)."""
    torch.manual_seed(1)
    b, h, d = 2, 4, 16
    f, r, c = GRID[0], GRID[1] - GRID[1] % 2, GRID[2] - GRID[2] % 2
    base = torch.randn(3, b, h, f, r // 2, c // 2, d)
    q, k, v = (t.repeat_interleave(2, 3).repeat_interleave(2, 4).reshape(b, h, f * r * c, d) for t in base)
    grid = (f, r, c)
    full = sdpa_attend(q, k, v, None)
    qm = plan_matching(q, grid, STRIDE, metric, torch.Generator().manual_seed(2))
    kvm = plan_matching(v, grid, STRIDE, metric, torch.Generator().manual_seed(3))
    # keys/values at 0.5: some copies stay apart, so groups differ in size and the bias matters
    q_red, kv_red = Reduction(qm, 0.75, "mean"), Reduction(kvm, 0.5, "mean")
    assert q_red.length == f * r * c // 4 and kv_red.length == f * r * c // 2
    out = reduced_attention(q, k, v, sdpa_attend, q_red, kv_red)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
    plain = reduced_attention(q, k, v, sdpa_attend, q_red, kv_red, proportional=False)
    assert not torch.allclose(plain, full, atol=1e-3), "the proportional bias is what makes it exact"


def test_ratio_zero_removes_nothing_and_reduced_attention_without_reduction_is_attention():
    torch.manual_seed(2)
    q, k, v = torch.randn(3, 1, 2, math.prod(GRID), 8)
    m = plan_matching(v, GRID, STRIDE)
    red = Reduction(m, 0.0)
    assert red.removed == 0 and torch.equal(red.restore(red.reduce(v)), v)
    assert torch.equal(reduced_attention(q, k, v, sdpa_attend), sdpa_attend(q, k, v, None))
    assert kept_sources(100, 25, 0.9) == 0 and kept_sources(100, 25, 0.5) == 25
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        kept_sources(100, 25, 1.0)


def test_matching_cache_reuses_for_n_steps_then_remakes():
    torch.manual_seed(3)
    x = torch.randn(1, 2, math.prod(GRID), 8)
    cache = MatchingCache(reuse_steps=3, stride=STRIDE)
    first = cache.get(0, "q", 0, x, GRID)
    assert cache.get(0, "q", 2, torch.randn_like(x), GRID) is first
    remade = cache.get(0, "q", 3, x, GRID)
    assert remade is not first and (cache.made, cache.reused) == (2, 1)
    assert cache.get(0, "kv", 3, x, GRID) is not remade  # features are cached apart
    other = MatchingCache(reuse_steps=3, stride=STRIDE)
    assert torch.equal(other.get(0, "q", 3, x, GRID).dst, remade.dst)  # same (seed, block, feature, step): same split
    assert cache.get(0, "q", 4, x[:, :1], GRID) is not remade  # another batch/head shape is never reused
    cache.clear()
    assert cache.get(0, "q", 4, x, GRID) is not remade and cache.made == 5


# -- schedules ------------------------------------------------------------------------------------------------

def _schedule(**rule) -> str:
    return json.dumps({"num_blocks": 6, "rules": [{"feature": "q", "blocks": "1-4", "ratio": 0.5, **rule}]})


def test_schedule_ratios_by_block_and_sigma():
    s = parse_schedule_text(json.dumps({"rules": [
        {"feature": "q", "blocks": "1-2,4", "start_percent": 0.5, "ratio": 0.5},
        {"feature": "q", "blocks": [2], "ratio": 0.3},
        {"feature": "kv", "blocks": "all", "ratio": 0.2}], "num_blocks": 6}))

    def p2s(p):
        return 1.0 - p
    assert s.ratios(2, 0.9, p2s) == (0.3, 0.2)  # before 50%: only the whole-range rules
    assert s.ratios(2, 0.4, p2s) == (0.5, 0.2)  # the largest ratio wins
    assert s.ratios(3, 0.4, p2s) == (0.0, 0.2)
    assert s.ratios(4, 0.4, p2s, strength=3.0) == (0.95, 0.6000000000000001)  # capped at MAX_RATIO
    assert s.ratios(4, 0.4, p2s, strength=0.0) == (0.0, 0.0)


@pytest.mark.parametrize("text, message", [
    (_schedule(blocks="3-9"), r"rules\[0\]\.blocks names block 9, but num_blocks is 6"),
    (_schedule(ratio=1.0), r"rules\[0\]\.ratio must be in \[0, 1\), got 1.0"),
    (_schedule(ratio=-0.1), r"rules\[0\]\.ratio must be in \[0, 1\)"),
    (_schedule(feature="k"), r"rules\[0\]\.feature must be one of \['q', 'kv'\]"),
    (_schedule(start_percent=0.8, end_percent=0.2), r"rules\[0\] start_percent 0.8 and end_percent 0.2"),
    (_schedule(speed=2), r"rules\[0\]\.speed is not a rule field"),
    ('{"rules": [], "stride": [1, 2]}', "field 'stride' must be three positive integers"),
    ('{"rules": [], "metric": "dot"}', "field 'metric' must be one of"),
    ('{"rules": [', "not valid JSON"),
])
def test_bad_schedules_name_the_field(text, message):
    with pytest.raises(PareError, match=message):
        parse_schedule_text(text, "my.json")
    with pytest.raises(PareError, match="^my.json: "):
        parse_schedule_text(text, "my.json")


def test_schedule_files_round_trip_and_unreadable_files_are_named(tmp_path):
    s = parse_schedule_text(_schedule(start_percent=0.25), "x")
    save_schedule(tmp_path / "s.json", s)
    assert load_schedule(tmp_path / "s.json").rules == s.rules
    with pytest.raises(PareError, match=r"token schedule file .*missing\.json: cannot be read"):
        load_schedule(tmp_path / "missing.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(PareError, match=r"bin\.json"):
        load_schedule(tmp_path / "bin.json")
    s.check_blocks(6)
    with pytest.raises(PareError, match="made for 6 blocks, but the model has 30"):
        s.check_blocks(30)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_for_1_3b_and_14b(name):
    for blocks in (30, 40):
        s = preset(name, blocks)
        s.check_blocks(blocks)
        covered = {b for r in s.rules for b in r.blocks}
        assert 0 not in covered and blocks - 1 not in covered and 0 < s.max_ratio < 1
        assert parse_schedule_text(json.dumps(s.to_json())).rules == s.rules  # presets are valid schedule JSON
    with pytest.raises(PareError, match="this model has 6 blocks"):
        preset(name, 6)
    levels = [preset(n, 30) for n in PRESETS]
    assert [s.max_ratio for s in levels] == sorted(s.max_ratio for s in levels)


def test_reduced_attention_macs_count_the_reduced_lengths():
    from comfyui_pare.token_reduction import reduced_attention_macs

    x = torch.randn(1, 2, math.prod(GRID), 8)
    m = plan_matching(x, GRID, STRIDE)
    lq, lk = Reduction(m, 0.5).length, Reduction(m, 0.3).length
    core, match = reduced_attention_macs(GRID, STRIDE, 16, 0.5, 0.3, cache_steps=2)
    assert core == 2 * lq * lk * 16 and match == 2 * m.src.numel() * m.dst.numel() * 16 // 2
    assert reduced_attention_macs(GRID, STRIDE, 16, 0.0, 0.0) == (2 * math.prod(GRID) ** 2 * 16, 0)


def test_batch_rows_are_reduced_independently():
    """A batch (e.g. cond and uncond under CFG) gives each row the result it would get alone."""
    torch.manual_seed(4)
    q, k, v = torch.randn(3, 2, 4, math.prod(GRID), 8)

    def run(q, k, v):
        qm = plan_matching(q, GRID, STRIDE, "cosine", torch.Generator().manual_seed(0))
        km = plan_matching(v, GRID, STRIDE, "euclidean", torch.Generator().manual_seed(1))
        return reduced_attention(q, k, v, sdpa_attend, Reduction(qm, 0.6), Reduction(km, 0.4, "prune"))

    both = run(q, k, v)
    for r in range(2):
        torch.testing.assert_close(both[r:r + 1], run(q[r:r + 1], k[r:r + 1], v[r:r + 1]), rtol=1e-6, atol=1e-6)


def test_bf16_features_keep_their_dtype_and_match_float32():
    torch.manual_seed(5)
    q, k, v = torch.randn(3, 1, 2, math.prod(GRID), 16)
    qm, km = plan_matching(q, GRID, STRIDE), plan_matching(v, GRID, STRIDE)
    q_red, kv_red = Reduction(qm, 0.5), Reduction(km, 0.4)
    ref = reduced_attention(q, k, v, sdpa_attend, q_red, kv_red)
    low = reduced_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), sdpa_attend, q_red, kv_red)
    assert low.dtype == torch.bfloat16 and kv_red.reduce(v.bfloat16()).dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0, atol=3e-2)


def test_teacher_schedules_run_on_the_blocks_a_depth_pruned_student_kept():
    teacher = preset("balanced", 30)
    kept = tuple(b for b in range(30) if b not in (5, 6, 7, 20))  # a 26-block student
    student = teacher.for_model(26, kept, 30)
    assert student.num_blocks == 26

    def p2s(p):
        return 1.0 - p
    for j, t in enumerate(kept):
        assert student.ratios(j, 0.5, p2s) == teacher.ratios(t, 0.5, p2s)
    assert teacher.for_model(30, tuple(range(30)), 30) is teacher
    own = parse_schedule_text(_schedule(blocks="20-25").replace('"num_blocks": 6', '"num_blocks": 26'))
    with pytest.raises(PareError, match="made for 26 blocks, but the model has 6"):
        own.for_model(6, (0, 1, 2, 3, 4, 5), 30)


def test_bench_suite_compute_falls_with_the_ratio_and_agrees_with_the_compute_suite():
    from benchmarks import analytic
    from benchmarks.config import BenchConfig
    from benchmarks.token_reduction import RATIOS
    from benchmarks.token_reduction import analytic as reduction_rows

    config = BenchConfig()
    rows = reduction_rows(config)
    plain = {(r["model"], r["resolution"]): r["configs"] for r in analytic.run(config)["rows"]}
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["resolution"], row["config"]), []).append(row["teacher_equivalent"])
    for (model, res, conf), values in groups.items():
        assert len(values) == len(RATIOS) and all(a > b for a, b in zip(values, values[1:])), (model, res, conf)
        base = plain[(model, res)]
        assert math.isclose(values[0], base[conf]["total"] / base["teacher"]["total"], rel_tol=1e-12), (model, res, conf)
