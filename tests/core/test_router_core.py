"""Router core: features, hand-set routers, decision policies, and the router file format."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import save_file

from comfyui_pare.errors import PareFileError, PareFormatError
from comfyui_pare.router import (
    BlockRouter,
    RouterSpec,
    RoutingPolicy,
    check_router_fits,
    decide,
    load_router,
    pool_tokens,
    save_router,
    timestep_embedding,
)

SPEC = RouterSpec(num_blocks=6, dim=16, freq_dim=32, hidden=8)


def _rows(mask: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask]


# ------------------------------------------------------------------------------------------ features


def test_timestep_embedding_matches_straightforward_formula():
    ts = [0.0, 1.0, 37.5, 500.0, 999.0, 1000.0]
    got = timestep_embedding(torch.tensor(ts), 256)
    half = 128
    ref = torch.tensor(
        [[math.cos(t * 10000 ** (-i / half)) for i in range(half)] + [math.sin(t * 10000 ** (-i / half)) for i in range(half)]
         for t in ts],
        dtype=torch.float64,
    )
    assert got.shape == (6, 256) and got.dtype == torch.float32
    # float32 angles of up to 1000 rad: ~1e-4 absolute, as Wan's own float32 embedding in ComfyUI
    torch.testing.assert_close(got.double(), ref, atol=2e-4, rtol=0)


def test_pool_tokens_mean_and_population_std():
    x = torch.randn(3, 50, 16, dtype=torch.float64) * 3 + 1
    pooled = pool_tokens(x.to(torch.bfloat16))
    assert pooled.shape == (3, 32) and pooled.dtype == torch.float32
    xb = x.to(torch.bfloat16).double()
    torch.testing.assert_close(pooled[:, :16].double(), xb.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled[:, 16:].double(), xb.std(1, unbiased=False), atol=1e-5, rtol=1e-5)


def test_pool_tokens_chunked_equals_whole(monkeypatch):
    import comfyui_pare.router as router_mod

    x = torch.randn(2, 37, 16)
    whole = pool_tokens(x)
    monkeypatch.setattr(router_mod, "_POOL_CHUNK_ELEMENTS", 2 * 16 * 5)  # 5 tokens per chunk
    torch.testing.assert_close(pool_tokens(x), whole)


def test_pool_tokens_constant_input_has_finite_gradient():
    x = torch.ones(1, 4, 16, requires_grad=True)
    pool_tokens(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_forward_shapes_and_text_input():
    spec = RouterSpec(num_blocks=4, dim=16, freq_dim=32, text_dim=8, hidden=8)
    r = BlockRouter(spec)
    logits = r(torch.tensor([900.0, 100.0]), torch.randn(2, 10, 16), torch.randn(2, 7, 8))
    assert logits.shape == (2, 4) and logits.dtype == torch.float32
    with pytest.raises(ValueError, match="text"):
        r(torch.tensor([900.0, 100.0]), torch.randn(2, 10, 16))
    with pytest.raises(ValueError, match="tokens"):
        r(torch.tensor([1.0]), torch.randn(1, 10, 12), torch.randn(1, 3, 8))


def test_fresh_router_logits_are_its_bias():
    r = BlockRouter(SPEC, init_bias=[1, 2, 3, 4, 5, 6])
    out = r(torch.tensor([10.0, 990.0]), torch.randn(2, 9, 16))
    assert torch.equal(out, torch.tensor([[1.0, 2, 3, 4, 5, 6]] * 2))


def test_router_cost_is_negligible_next_to_a_block():
    from comfyui_pare.compute import block_macs
    from comfyui_pare.wan import WAN21_1_3B, BlockWidth

    spec = RouterSpec(num_blocks=30, dim=1536)
    block = block_macs(WAN21_1_3B, BlockWidth.full(WAN21_1_3B), 32760).total
    assert BlockRouter(spec).macs(32760) < 1e-3 * block


# ------------------------------------------------------------------------------------------ hand-set routers


def test_constant_router_ignores_inputs():
    logits = [3.0, -2.0, 0.5, -0.5, 10.0, -10.0]
    r = BlockRouter.constant(SPEC, logits)
    out = r(torch.tensor([0.0, 500.0, 1000.0]), torch.randn(3, 11, 16) * 50)
    assert torch.equal(out, torch.tensor([logits] * 3))
    assert _rows(decide(out, RoutingPolicy(threshold=0.5))) == [{0, 2, 4}] * 3


def test_timestep_switch_router():
    early, late = [4.0, -4.0, 4.0, -4.0, 4.0, 4.0], [-4.0, 4.0, 4.0, -4.0, -4.0, 4.0]
    r = BlockRouter.timestep_switch(SPEC, 500.0, early, late)
    ts = torch.tensor([1000.0, 900.0, 500.5, 499.5, 100.0, 0.0])
    out = r(ts, torch.randn(6, 5, 16))
    torch.testing.assert_close(out, torch.tensor([early] * 3 + [late] * 3), atol=0.1, rtol=0)
    assert _rows(decide(out, RoutingPolicy(threshold=0.5))) == [{0, 2, 4, 5}] * 3 + [{1, 2, 5}] * 3


def test_per_frame_timestep_decides_per_sample_from_the_noisy_frames():
    # Wan2.2 TI2V-5B with a start image: ComfyUI passes [rows, latent frames], the clean first frame at 0. Each row
    # decides as a text-to-video call at its noisy frames' t would; cond and uncond rows stay independent.
    early, late = [4.0, -4.0, 4.0, -4.0, 4.0, 4.0], [-4.0, 4.0, 4.0, -4.0, -4.0, 4.0]
    r = BlockRouter.timestep_switch(SPEC, 500.0, early, late)
    tokens = torch.randn(2, 5, 16)
    per_frame = torch.tensor([[0.0, 900.0, 900.0, 900.0], [0.0, 100.0, 100.0, 100.0]])
    out = r(per_frame, tokens)
    assert torch.equal(out, r(torch.tensor([900.0, 100.0]), tokens))
    torch.testing.assert_close(out, torch.tensor([early, late]), atol=0.1, rtol=0)
    with pytest.raises(ValueError, match=r"timestep \[batch\] or \[batch, latent frames\]"):
        r(per_frame[:, None], tokens)
    with pytest.raises(ValueError, match="3 timesteps for a batch of 2"):
        r(torch.zeros(3, 4), tokens)


# ------------------------------------------------------------------------------------------ decisions


def test_threshold_policy():
    logits = torch.tensor([[0.0, 1.0, -1.0, 5.0]])
    assert _rows(decide(logits, RoutingPolicy(threshold=0.5))) == [{1, 3}]  # sigmoid(0) = 0.5 is not > 0.5
    assert _rows(decide(logits, RoutingPolicy(threshold=0.9))) == [{3}]
    assert _rows(decide(logits, RoutingPolicy(threshold=1.0))) == [set()]
    assert _rows(decide(logits, RoutingPolicy(threshold=1.0, pin_first=1, pin_last=1))) == [{0, 3}]
    # threshold overrides the budget
    assert _rows(decide(logits, RoutingPolicy(budget=0.25, threshold=0.0))) == [{0, 1, 2, 3}]


def test_budget_one_runs_everything():
    logits = torch.full((2, 5), -100.0)
    assert decide(logits, RoutingPolicy(budget=1.0)).all()
    assert RoutingPolicy().runs_everything and not RoutingPolicy(budget=0.9).runs_everything


@pytest.mark.parametrize(
    "logits, costs, policy, expected",
    [
        ([3, 1, 2, 0], None, RoutingPolicy(budget=0.5), {0, 2}),
        ([0, 3, 2, 1], None, RoutingPolicy(budget=0.5, pin_first=1), {0, 1}),
        ([0, 3, 2, 1], None, RoutingPolicy(budget=0.5, pin_last=1), {1, 3}),
        ([0, 3, 2, 1], None, RoutingPolicy(budget=0.0, pinned=(2,)), {2}),
        ([1, 1, 1, 1], None, RoutingPolicy(budget=0.5), {0, 1}),  # ties: lower index first
        ([1, 1, 2, 1], None, RoutingPolicy(budget=0.74), {2, 0}),
        # costs 4,1,1,2 (cap 4): walk 1 (1), 2 (2), 0 would make 6 -> stop; 3 is not tried past the stop
        ([1, 3, 2, 0.5], [4, 1, 1, 2], RoutingPolicy(budget=0.5), {1, 2}),
        ([1, 3, 2, 0.5], [4, 1, 1, 2], RoutingPolicy(budget=0.75), {0, 1, 2}),
        # pinned block alone over the budget still runs, and nothing else does
        ([0, 3, 2, 1], [4, 1, 1, 2], RoutingPolicy(budget=0.25, pinned=(0,)), {0}),
        ([0, 3, 2, 1], [4, 1, 1, 2], RoutingPolicy(budget=0.75, pinned=(0,)), {0, 1, 2}),
        ([float("nan"), 3, 2, 1], None, RoutingPolicy(budget=0.75), {1, 2, 3}),
    ],
)
def test_budget_policy_exact_sets(logits, costs, policy, expected):
    assert _rows(decide(torch.tensor([logits], dtype=torch.float32), policy, costs)) == [expected]


def test_budget_is_exact_despite_float_rounding():
    logits = torch.arange(10, dtype=torch.float32)[None]
    assert _rows(decide(logits, RoutingPolicy(budget=0.3))) == [{7, 8, 9}]
    costs = torch.tensor([10**12 + 7] * 10)  # real MAC counts are ~1e12
    assert _rows(decide(logits, RoutingPolicy(budget=0.3), costs)) == [{7, 8, 9}]


def test_decisions_are_per_sample():
    logits = torch.tensor([[5.0, -1.0, 2.0, 0.0], [-1.0, 5.0, 0.0, 2.0]])
    assert _rows(decide(logits, RoutingPolicy(budget=0.5))) == [{0, 2}, {1, 3}]
    assert _rows(decide(logits, RoutingPolicy(threshold=0.6))) == [{0, 2}, {1, 3}]


def test_decide_is_deterministic():
    logits = torch.randn(8, 40)
    costs = torch.randint(1, 100, (40,))
    a = decide(logits, RoutingPolicy(budget=0.4, pin_first=1), costs)
    assert torch.equal(a, decide(logits.clone(), RoutingPolicy(budget=0.4, pin_first=1), costs))


@pytest.mark.parametrize("kwargs, name", [
    ({"budget": 1.5}, "budget"), ({"budget": -0.1}, "budget"), ({"threshold": 2.0}, "threshold"),
    ({"pin_first": -1}, "pin_first"),
])
def test_policy_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RoutingPolicy(**kwargs)


def test_policy_pinned_out_of_range_and_bad_costs():
    with pytest.raises(ValueError, match="out of range"):
        decide(torch.zeros(1, 4), RoutingPolicy(budget=0.5, pinned=(4,)))
    with pytest.raises(ValueError, match="one value per block"):
        decide(torch.zeros(1, 4), RoutingPolicy(budget=0.5), [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        decide(torch.zeros(1, 4), RoutingPolicy(budget=0.5), [1, -2, 1, 1])


@pytest.mark.parametrize("kwargs", [
    {"num_blocks": 0}, {"dim": 0}, {"freq_dim": 7}, {"hidden": 0}, {"text_dim": -1},
    {"default_threshold": 1.5}, {"train_budget": 2.0},
])
def test_spec_validation(kwargs):
    base = {"num_blocks": 4, "dim": 8}
    with pytest.raises(ValueError):
        RouterSpec(**{**base, **kwargs})


# ------------------------------------------------------------------------------------------ files


def _trained_router(spec: RouterSpec = SPEC) -> BlockRouter:
    torch.manual_seed(0)
    r = BlockRouter(spec)
    with torch.no_grad():
        for p in r.parameters():
            p.copy_(torch.randn_like(p))
    return r


def _write(path, tensors, meta_obj):
    md = {"pare_router": json.dumps(meta_obj)} if meta_obj is not None else None
    save_file(tensors, str(path), metadata=md)


def test_save_load_roundtrip_bit_identical(tmp_path):
    spec = RouterSpec(num_blocks=6, dim=16, freq_dim=32, text_dim=8, hidden=8, model_fingerprint="abc",
                      default_threshold=0.4, train_budget=0.6)
    r = _trained_router(spec)
    path = tmp_path / "router.safetensors"
    save_router(path, r)
    loaded = load_router(path)
    assert loaded.spec == spec and not loaded.training
    args = (torch.tensor([800.0, 20.0]), torch.randn(2, 13, 16), torch.randn(2, 5, 8))
    assert torch.equal(r(*args), loaded(*args))


def test_truncated_file(tmp_path):
    path = tmp_path / "router.safetensors"
    save_router(path, _trained_router())
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(PareFileError, match="truncated"):
        load_router(path)


def test_ckpt_refused(tmp_path):
    path = tmp_path / "router.ckpt"
    torch.save(_trained_router().state_dict(), path)
    with pytest.raises(PareFileError, match="pickle"):
        load_router(path)


def test_plain_safetensors_without_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(_trained_router().state_dict(), str(path))
    with pytest.raises(PareFormatError, match="not a PARE router file"):
        load_router(path)


def test_unknown_version(tmp_path):
    path = tmp_path / "future.safetensors"
    _write(path, _trained_router().state_dict(), {**SPEC.to_json(), "format_version": 3})
    with pytest.raises(PareFormatError, match="version 3"):
        load_router(path)


def test_wrong_tensor_shape(tmp_path):
    path = tmp_path / "bad.safetensors"
    sd = dict(_trained_router().state_dict())
    sd["fc2.weight"] = torch.zeros(5, SPEC.hidden)
    _write(path, sd, SPEC.to_json())
    with pytest.raises(PareFormatError, match=r"'fc2\.weight' has shape \[5, 8\], expected \[6, 8\]"):
        load_router(path)


def test_missing_and_non_float_tensors(tmp_path):
    sd = dict(_trained_router().state_dict())
    path = tmp_path / "missing.safetensors"
    _write(path, {k: v for k, v in sd.items() if k != "bias"}, SPEC.to_json())
    with pytest.raises(PareFormatError, match="'bias' is missing"):
        load_router(path)
    path = tmp_path / "int.safetensors"
    _write(path, {**sd, "bias": torch.zeros(6, dtype=torch.int64)}, SPEC.to_json())
    with pytest.raises(PareFormatError, match="dtype I64"):
        load_router(path)


def test_check_router_fits(caplog):
    spec = RouterSpec(num_blocks=30, dim=1536, model_fingerprint="aaaa")
    with pytest.raises(PareFormatError, match="router r.safetensors was trained for 30 blocks but the model has 6"):
        check_router_fits(spec, 6, 1536, source="r.safetensors")
    with pytest.raises(PareFormatError, match="dim is 5120"):
        check_router_fits(spec, 30, 5120)
    check_router_fits(spec, 30, 1536, fingerprint="aaaa")
    with caplog.at_level(logging.WARNING, logger="comfyui_pare.router"):
        check_router_fits(spec, 30, 1536, fingerprint="bbbb", source="r.safetensors")
    assert "trained for model aaaa" in caplog.text
