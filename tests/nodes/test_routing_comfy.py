"""Router-driven block skipping inside ComfyUI's sampler, through a real ComfyUI server."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import TEST_NODES, comfy_install, read_latent
from graphs import chain, out, pare_loader, routed_model_id, sample_graph, with_report
from helpers import BOUNDARY, EARLY, LATE, SPEC, N, step_sigmas
from PIL import Image

from comfyui_pare import report
from comfyui_pare.router import BlockRouter, RouterSpec, save_router
from comfyui_pare.safetensors_io import save_atomic
from scripts import tiny_assets
from scripts.comfy_harness import ComfyServer, PromptError

# Tests marked every_comfyui also run on ComfyUI 0.8.0 (the rest on the pinned 0.3.75 only, for CI time).
pytestmark = pytest.mark.comfy
KEEP_ALL = "r_keep_all.safetensors"
SWITCH = "r_switch.safetensors"
HALF = "r_half.safetensors"


def write_routers(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_router(folder / KEEP_ALL, BlockRouter.constant(SPEC, [5.0] * N))
    save_router(folder / SWITCH, BlockRouter.timestep_switch(SPEC, BOUNDARY, EARLY, LATE))
    save_router(folder / HALF, BlockRouter.constant(SPEC, [3.0, -1.0, 2.0, -2.0, 1.0, 4.0]))


@pytest.fixture(scope="module")
def routers(comfy):
    write_routers(comfy.base / "models" / "pare_routers")
    return comfy


def route(router: str | None = None, schedule: str | None = None, count_tag: str | None = None, **apply):
    """A patch_model hook for sample_graph: optional block counter, then PARE routing."""
    def patch(g, model):
        if count_tag:
            model = g.add("PARETestCountBlocks", model=out(model), tag=count_tag)
        if router:
            r = g.add("PARELoadRouter", router_name=router)
            mode = "threshold" if "threshold" in apply else "budget"
            kw = {"mode": mode, "budget": 1.0, "pin_first": 0, "pin_last": 0, **apply}
            model = g.add("PAREApplyRouter", model=out(model), router=out(r), **kw)
        if schedule:
            model = g.add("PAREStaticSchedule", model=out(model), schedule=schedule, **apply)
        return model
    return patch


def latent_of(server, g, save) -> torch.Tensor:
    entry = server.run(g.to_json())
    return read_latent(server.output_files(entry, save, "latents")[0])


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
@pytest.mark.parametrize("cfg", [1.0, 3.5])
@pytest.mark.parametrize("sampler", ["euler", "uni_pc", "dpmpp_2m"])
def test_keep_all_router_is_bit_identical(routers, variant, cfg, sampler):
    name = tiny_assets.TEACHER_T2V if variant == "t2v" else tiny_assets.TEACHER_I2V
    kw = dict(variant=variant, cfg=cfg, sampler=sampler, steps=3, seed=7)
    plain = latent_of(routers, *sample_graph(pare_loader(name), **kw))
    # threshold 0.5 makes the router really run every step (budget 1.0 alone would not consult it)
    routed = latent_of(routers, *sample_graph(pare_loader(name), patch_model=route(KEEP_ALL, threshold=0.5), **kw))
    assert torch.equal(plain, routed)


def expected_switch_map(sigmas: list[float]) -> np.ndarray:
    """[steps, blocks] bool: which blocks the switch router runs at each step."""
    rows = [np.array(EARLY if s * 1000.0 > BOUNDARY else LATE) > 0 for s in sigmas]
    return np.stack(rows)


@pytest.mark.every_comfyui
def test_switch_router_skips_exactly_and_report_shows_it(routers, tmp_path):
    steps, shift = 6, 5.0
    g, save = sample_graph(pare_loader(tiny_assets.TEACHER_T2V), cfg=3.0, steps=steps, shift=shift, seed=3,
                           patch_model=route(SWITCH, threshold=0.5, count_tag="switch"))
    img_node, txt_node = with_report(g, routed_model_id(g))
    counts_node = g.add("PARETestReadCounts", samples=out(g.find("KSampler")), tag="switch")
    entry = routers.run(g.to_json())
    expected = expected_switch_map(step_sigmas(steps, shift))
    assert expected.sum() < expected.size and (~expected).any(axis=1).all(), "every step must skip something"

    # 1. skipped blocks were never executed (counted inside each block by a test-only node)
    counts = json.loads(entry["outputs"][counts_node]["text"][0])
    assert {int(k): v for k, v in counts.items()} == {i: int(expected[:, i].sum()) for i in range(N) if expected[:, i].any()}

    # 2. the heat map is a picture whose cells are the decisions, for both CFG branches
    png = routers.output_files(entry, img_node, "images")[0]
    pixels = np.asarray(Image.open(png).convert("RGB"))
    for s in range(steps):
        for column in range(2):  # cond, uncond
            for b in range(N):
                x, y = report.cell_center(s, column, b, 2)
                want = report.EXECUTED if expected[s, b] else report.SKIPPED
                assert tuple(pixels[y, x]) == want, (s, column, b)

    # 3. the summary counts the same and logs one line per run
    summary = entry["outputs"][txt_node]["text"][0]
    ran = int(expected.sum()) * 2
    assert f"block calls executed: {ran} of {steps * N * 2}" in summary, summary
    assert "wall time of routed model calls" in summary
    assert sum("PARE router r_switch.safetensors" in ln for ln in routers.log_text().splitlines()) >= 1


@pytest.mark.every_comfyui
def test_applying_twice_is_idempotent_and_input_untouched(routers):
    kw = dict(cfg=3.0, steps=4, seed=9)
    once = latent_of(routers, *sample_graph(pare_loader(tiny_assets.TEACHER_T2V),
                                           patch_model=route(HALF, budget=0.5), **kw))

    def twice(g, model):
        return route(HALF, budget=0.5)(g, route(HALF, budget=0.5)(g, model))

    assert torch.equal(once, latent_of(routers, *sample_graph(pare_loader(tiny_assets.TEACHER_T2V),
                                                              patch_model=twice, **kw)))

    # The unrouted input model feeds a second sampler in the same prompt: routing must not leak into it.
    g, save = sample_graph(pare_loader(tiny_assets.TEACHER_T2V), patch_model=route(HALF, budget=0.5), **kw)
    ms = g.add("ModelSamplingSD3", model=out(g.find("PARELoadPrunedWan")), shift=5.0)
    k2 = g.add("KSampler", **{**g.nodes[g.find("KSampler")]["inputs"], "model": out(ms)})
    unrouted_save = g.add("SaveLatent", samples=out(k2), filename_prefix="unrouted_branch")
    entry = routers.run(g.to_json())
    unrouted = read_latent(routers.output_files(entry, unrouted_save, "latents")[0])
    plain = latent_of(routers, *sample_graph(pare_loader(tiny_assets.TEACHER_T2V), **kw))
    assert torch.equal(unrouted, plain), "routing leaked into the input model"
    assert not torch.equal(once, plain)


def _mixed_prompts() -> list[dict]:
    configs = [route(KEEP_ALL, threshold=0.5), route(HALF, budget=0.3), route(SWITCH, threshold=0.5),
               route(HALF, budget=0.6), route(SWITCH, budget=0.5), route(HALF, budget=1.0), None,
               route(schedule="1-3@0.2-0.9")]
    prompts = []
    for i in range(20):
        g, save = sample_graph(pare_loader(tiny_assets.TEACHER_T2V), cfg=3.0, steps=3, seed=100 + i,
                               patch_model=configs[i % len(configs)], prefix=f"mix{i}")
        prompts.append((g.to_json(), save))
    return prompts


# Prompts re-run alone on a fresh server: one per kind of patch (budget, switching router at a threshold, no
# routing, static schedule); all twenty still run back to back on the shared server.
FRESH = (1, 2, 6, 7)


@pytest.mark.slow
def test_twenty_mixed_prompts_match_fresh_servers(routers, assets_dir, tmp_path, comfyui_version):
    prompts = _mixed_prompts()
    ids = [routers.queue(p) for p, _ in prompts]  # all queued at once into one server
    shared = [read_latent(routers.output_files(routers.wait(i), s, "latents")[0]) for i, (_, s) in zip(ids, prompts)]

    def alone(k: int) -> torch.Tensor:
        base = tmp_path / f"fresh{k}"
        install = comfy_install(comfyui_version)
        with ComfyServer(base_dir=base, comfy_dir=install.comfy_dir, extra_custom_nodes=(TEST_NODES,)) as server:
            tiny_assets.install_assets(base)
            write_routers(base / "models" / "pare_routers")
            graph, save = prompts[k]
            return read_latent(server.output_files(server.run(graph), save, "latents")[0])

    with ThreadPoolExecutor(max_workers=2) as pool:
        fresh = dict(zip(FRESH, pool.map(alone, FRESH)))
    for k, b in fresh.items():
        assert torch.equal(shared[k], b), f"prompt {k} differs between the shared server and a fresh one"
    assert len({t.sum().item() for t in shared}) == len(shared)


def test_bad_router_inputs_fail_clearly(routers, tmp_path):
    folder = routers.base / "models" / "pare_routers"
    save_router(folder / "r_30_blocks.safetensors", BlockRouter.constant(RouterSpec(num_blocks=30, dim=256), [1.0] * 30))
    data = (folder / HALF).read_bytes()
    (folder / "r_corrupt.safetensors").write_bytes(data[: len(data) // 2])
    save_atomic(folder / "r_not_router.safetensors", {"w": torch.zeros(3)}, {"format": "pt"})
    cases = {
        "r_30_blocks.safetensors": "trained for 30 blocks but the model has 6",
        "r_corrupt.safetensors": "truncated",
        "r_not_router.safetensors": "not a PARE router file",
    }
    for name, must in cases.items():
        with pytest.raises(PromptError) as err:
            routers.run(sample_graph(pare_loader(tiny_assets.TEACHER_T2V), steps=1,
                                     patch_model=route(name, threshold=0.5))[0].to_json())
        assert must in str(err.value) and name in str(err.value), str(err.value)
        assert torch.isfinite(latent_of(routers, *sample_graph(pare_loader(tiny_assets.TEACHER_T2V), steps=1,
                                                                seed=len(name)))).all()
    for budget in (1.5, -0.1):
        with pytest.raises(PromptError) as err:
            routers.queue(sample_graph(pare_loader(tiny_assets.TEACHER_T2V), steps=1,
                                       patch_model=route(HALF, budget=budget))[0].to_json())
        assert "budget" in str(err.value), str(err.value)
    with pytest.raises(PromptError, match="block 9 does not exist"):
        routers.run(sample_graph(pare_loader(tiny_assets.TEACHER_T2V), steps=1, patch_model=route(schedule="2-9@0-1"))[0].to_json())
    assert torch.isfinite(latent_of(routers, *sample_graph(pare_loader(tiny_assets.TEACHER_T2V), steps=1, seed=77))).all()


@pytest.mark.every_comfyui
def test_static_schedule_skips_by_sigma_range(routers):
    steps, shift = 5, 5.0
    g, save = sample_graph(pare_loader(tiny_assets.TEACHER_T2V), cfg=1.0, steps=steps, shift=shift, seed=4,
                           patch_model=route(schedule="2-3@0.4-1.0", count_tag="static"))
    counts_node = g.add("PARETestReadCounts", samples=out(g.find("KSampler")), tag="static")
    entry = routers.run(g.to_json())
    counts = {int(k): v for k, v in json.loads(entry["outputs"][counts_node]["text"][0]).items()}
    # ComfyUI's percent_to_sigma for Wan's shifted flow: time_snr_shift(shift, 1 - p)
    t = 1.0 - 0.4
    sigma_start = shift * t / (1 + (shift - 1) * t)
    active = sum(1 for s in step_sigmas(steps, shift) if s <= sigma_start)
    assert 0 < active < steps
    assert counts == {0: steps, 1: steps, 2: steps - active, 3: steps - active, 4: steps, 5: steps}
    assert math.isfinite(read_latent(routers.output_files(entry, save, "latents")[0]).sum().item())


# -- a hand-set router with known per-step, per-branch decisions vs a reference outside ComfyUI --------------

def branch_router(assets_dir) -> tuple[BlockRouter, np.ndarray]:
    """The timestep switch, plus a text-reading unit that makes cond skip block 5 (uncond still runs it).

    Returns the router and delta [N] added to the cond branch's logits.
    """
    from safetensors.torch import load_file

    spec = RouterSpec(num_blocks=N, dim=SPEC.dim, text_dim=tiny_assets.TINY_T2V.text_dim, hidden=4)
    router = BlockRouter.timestep_switch(spec, BOUNDARY, EARLY, LATE)
    pos = load_file(str(assets_dir / tiny_assets.POSITIVE))["context"].mean(0)
    neg = load_file(str(assets_dir / tiny_assets.NEGATIVE))["context"].mean(0)
    k = int(torch.argmax(pos - neg))
    mid, gap = float(pos[k] + neg[k]) / 2, float(pos[k] - neg[k]) / 2
    delta = np.zeros(N)
    delta[5] = -10.0
    with torch.no_grad():
        f = spec.freq_dim + 2 * spec.dim + k  # the pooled-text feature k
        router.fc1.weight[2, f] = 20.0 / gap
        router.fc1.bias[2] = -20.0 / gap * mid  # cond: +20 -> SiLU 20; uncond: -20 -> SiLU ~0
        router.fc2.weight[:, 2] = torch.tensor(delta / 20.0, dtype=torch.float32)
    return router, delta


def test_hand_set_router_matches_core_model_reference(routers, assets_dir):
    from safetensors.torch import load_file

    from training.model import WanTransformer
    from training.sampling import Conditioning, flow_sigmas, initial_noise, ksampler_euler

    router, delta = branch_router(assets_dir)
    save_router(routers.base / "models" / "pare_routers" / "r_branch.safetensors", router)
    steps, shift, cfg, seed = 5, 5.0, 4.0, 13
    g, save = sample_graph(pare_loader(tiny_assets.TEACHER_T2V), cfg=cfg, steps=steps, shift=shift, seed=seed,
                           patch_model=route("r_branch.safetensors", threshold=0.5))
    img_node, txt_node = with_report(g, routed_model_id(g))
    entry = routers.run(g.to_json())
    ours = read_latent(routers.output_files(entry, save, "latents")[0])

    def runs(t: float, is_cond: bool) -> np.ndarray:
        return (np.array(EARLY if t > BOUNDARY else LATE) + (delta if is_cond else 0)) > 0

    sigmas = flow_sigmas(steps, shift)
    expected = {(s, br): runs(float(sigmas[s]) * 1000, br == 0) for s in range(steps) for br in (0, 1)}
    assert any((expected[s, 0] != expected[s, 1]).any() for s in range(steps)), "branches must disagree somewhere"

    # The heat map shows each branch's own decisions.
    pixels = np.asarray(Image.open(routers.output_files(entry, img_node, "images")[0]).convert("RGB"))
    for (s, br), run in expected.items():
        for b in range(N):
            x, y = report.cell_center(s, br, b, 2)
            assert tuple(pixels[y, x]) == (report.EXECUTED if run[b] else report.SKIPPED), (s, br, b)

    # Reference: the core model with the same blocks replaced by identity at those steps and branches.
    model = WanTransformer.from_checkpoint(assets_dir / tiny_assets.TEACHER_T2V)
    pos = load_file(str(assets_dir / tiny_assets.POSITIVE))["context"][None]

    def velocity(x, timestep, context, clip_fea=None):
        is_cond = [bool(torch.equal(c, pos[0])) for c in context]
        mask = torch.tensor(np.stack([runs(float(timestep[r]), is_cond[r]) for r in range(x.shape[0])]))
        with torch.no_grad():
            return model(x, timestep, context, block_mask=mask)

    neg = load_file(str(assets_dir / tiny_assets.NEGATIVE))["context"][None]
    noise = initial_noise(ours.shape, seed)
    ref = ksampler_euler(velocity, noise, sigmas, Conditioning(pos), Conditioning(neg), cfg=cfg)
    full = ksampler_euler(lambda x, t, c, f=None: model(x, t, c), noise, sigmas, Conditioning(pos),
                          Conditioning(neg), cfg=cfg)
    assert (ref - full).abs().max() > 1e-2, "skipping must matter for this comparison to mean anything"
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.every_comfyui
def test_coexists_with_other_block_patches_and_guidance(routers):
    """Another pack's double_block patch is chained (either order), and stock Skip Layer Guidance still works."""
    kw = dict(cfg=3.0, steps=4, seed=21)

    def offset(g, model):
        return g.add("PARETestOffsetBlock", model=out(model), block=2, offset=0.05)

    def slg(g, model):
        return g.add("SkipLayerGuidanceDiT", model=out(model), double_layers="3", single_layers="", scale=2.0,
                     start_percent=0.0, end_percent=1.0, rescaling_scale=0.0)

    keep_all = route(KEEP_ALL, threshold=0.5)
    for hook in (offset, slg):
        alone = latent_of(routers, *sample_graph(pare_loader(tiny_assets.TEACHER_T2V), patch_model=hook, **kw))
        plain = latent_of(routers, *sample_graph(pare_loader(tiny_assets.TEACHER_T2V), **kw))
        assert not torch.equal(alone, plain), f"{hook.__name__} must change the output"
        for order in ((hook, keep_all), (keep_all, hook)):
            both = latent_of(routers, *sample_graph(pare_loader(tiny_assets.TEACHER_T2V), patch_model=chain(*order), **kw))
            assert torch.equal(both, alone), f"{[h.__name__ for h in order]}"
    # A router that skips block 2 also skips the chained patch on it (the block's work is not done).
    skip2 = route(schedule="2@0-1")
    a = latent_of(routers, *sample_graph(pare_loader(tiny_assets.TEACHER_T2V), patch_model=chain(offset, skip2), **kw))
    b = latent_of(routers, *sample_graph(pare_loader(tiny_assets.TEACHER_T2V), patch_model=skip2, **kw))
    assert torch.equal(a, b)
