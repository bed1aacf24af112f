"""The plain-torch Wan transformer and sampler against ComfyUI 0.3.75 (imported as a library) and diffusers.

Measured errors go to the log and to junit properties (``record_property``), so a run with ``-o log_cli=true``
or ``--junitxml`` shows them.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from helpers import diffusers_module

import comfy_library as comfy_lib_module
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.surgery import BlockPlan, PrunePlan, prune_state_dict
from comfyui_pare.wan import WanDims
from training import sampling
from training.model import WanTransformer
from training.tiny import TINY_I2V, TINY_T2V, random_wan_state_dict

logger = logging.getLogger(__name__)

# Head dim 128 and text dim 4096, so ComfyUI's own detection (comfy.sd) loads it for the end-to-end sampler test.
STOCK_SMALL = WanDims(dim=256, num_heads=2, ffn_dim=256, num_layers=2, text_dim=4096)
FP32_TOL = 2e-5  # outputs are O(1-5); independent fp32 implementations differ by a few ulps per op


@pytest.fixture(scope="module")
def comfy_lib():
    """ComfyUI's ``comfy`` package, imported as a library on the CPU (not the server fixture ``comfy``)."""
    try:
        comfy_lib_module.import_comfy("cpu")
    except comfy_lib_module.ComfyNotFound as e:
        pytest.skip(str(e))
    import comfy.latent_formats
    import comfy.ldm.wan.model
    import comfy.model_sampling
    import comfy.ops
    import comfy.sample
    import comfy.samplers
    import comfy.sd

    return comfy


def comfy_wan(comfy, dims: WanDims, sd: dict[str, torch.Tensor]):
    model = comfy.ldm.wan.model.WanModel(
        model_type=dims.variant, in_dim=dims.in_dim, dim=dims.dim, ffn_dim=dims.ffn_dim, text_dim=dims.text_dim,
        out_dim=dims.out_dim, num_heads=dims.num_heads, num_layers=dims.num_layers,
        operations=comfy.ops.disable_weight_init, dtype=torch.float32)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def inputs(dims: WanDims, batch: int = 2, hw: tuple[int, int] = (7, 10), text_tokens: int = 12, seed: int = 1):
    """x, timestep, context, clip_fea; odd H exercises ComfyUI's circular padding to the patch size."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dims.in_dim, 3, *hw, generator=g)
    t = torch.linspace(950.0, 120.0, batch)
    ctx = torch.randn(batch, text_tokens, dims.text_dim, generator=g)
    clip = torch.randn(batch, 257, 1280, generator=g) if dims.variant == "i2v" else None
    return x, t, ctx, clip


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def report(record_property, name: str, err: float) -> None:
    record_property(name, err)
    logger.info("%s: max abs err %.3g", name, err)


@pytest.fixture(scope="module")
def t2v():
    sd = random_wan_state_dict(TINY_T2V, seed=0)
    return sd, WanTransformer.from_state_dict(sd, PrunedWanMeta.teacher(TINY_T2V))


# ---------------------------------------------------------------------------------------------- (a) ComfyUI


@pytest.mark.parametrize("dims,with_clip", [(TINY_T2V, False), (TINY_I2V, True), (TINY_I2V, False)],
                         ids=["t2v", "i2v", "i2v-no-clip"])
@torch.no_grad()
def test_matches_comfyui_wanmodel(comfy_lib, record_property, dims, with_clip):
    sd = random_wan_state_dict(dims, seed=3)
    ours = WanTransformer.from_state_dict(sd, PrunedWanMeta.teacher(dims))
    x, t, ctx, clip = inputs(dims)
    clip = clip if with_clip else None
    ref = comfy_wan(comfy_lib, dims, sd)(x, t, ctx, clip_fea=clip)
    out = ours(x, t, ctx, clip_fea=clip)
    err = max_err(out, ref)
    report(record_property, f"comfyui_{dims.variant}{'' if with_clip or dims.variant == 't2v' else '_noclip'}", err)
    assert ref.abs().max() > 0.5  # a real signal, not a degenerate zero
    assert err < FP32_TOL


# ---------------------------------------------------------------------------------------------- (b) pruning


def zeroed_teacher(sd: dict[str, torch.Tensor], meta: PrunedWanMeta, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """The teacher with the plan's pruned heads / neurons zeroed and its q/k norms scaled by sqrt(kept / total):
    an RMS over all channels with the pruned ones at zero is sqrt(kept / total) times the RMS over the kept ones."""
    dims, out = meta.dims, {k: v.clone() for k, v in sd.items()}
    for i, bp in enumerate(plan.blocks):
        p, hd = f"blocks.{i}.", dims.head_dim
        if bp.heads is not None:
            drop = [h for h in range(dims.num_heads) if h not in bp.heads]
            rows = torch.tensor([h * hd + c for h in drop for c in range(hd)], dtype=torch.long)
            for name in ("q", "k", "v"):
                out[f"{p}self_attn.{name}.weight"][rows] = 0
                out[f"{p}self_attn.{name}.bias"][rows] = 0
            out[f"{p}self_attn.o.weight"][:, rows] = 0
            scale = (len(bp.heads) / dims.num_heads) ** 0.5
            out[f"{p}self_attn.norm_q.weight"] *= scale
            out[f"{p}self_attn.norm_k.weight"] *= scale
        if bp.ffn is not None:
            drop = torch.tensor([j for j in range(dims.ffn_dim) if j not in bp.ffn], dtype=torch.long)
            out[f"{p}ffn.0.weight"][drop] = 0
            out[f"{p}ffn.0.bias"][drop] = 0
            out[f"{p}ffn.2.weight"][:, drop] = 0
    return out


@pytest.mark.parametrize("dims", [TINY_T2V, TINY_I2V], ids=["t2v", "i2v"])
@torch.no_grad()
def test_pruned_student_equals_zeroed_teacher(comfy_lib, record_property, dims):
    sd, meta = random_wan_state_dict(dims, seed=4), PrunedWanMeta.teacher(dims)
    plan = PrunePlan((BlockPlan(heads=(0, 2, 5)), BlockPlan(ffn=tuple(range(0, 512, 3))),
                      BlockPlan(heads=(7,), ffn=tuple(range(100))), BlockPlan(), BlockPlan(heads=(1, 2, 3, 4, 5, 6)),
                      BlockPlan(heads=(0, 4), ffn=(5, 9, 300))))
    student_sd, student_meta = prune_state_dict(sd, meta, plan)
    student = WanTransformer.from_state_dict(student_sd, student_meta)
    assert student.blocks[0].self_attn.q.weight.shape == (3 * dims.head_dim, dims.dim)
    x, t, ctx, clip = inputs(dims)
    # The reference is ComfyUI's own full-width model on the zeroed teacher.
    ref = comfy_wan(comfy_lib, dims, zeroed_teacher(sd, meta, plan))(x, t, ctx, clip_fea=clip)
    out = student(x, t, ctx, clip_fea=clip)
    err = max_err(out, ref)
    report(record_property, f"pruned_vs_zeroed_{dims.variant}", err)
    unpruned = WanTransformer.from_state_dict(sd, meta)(x, t, ctx, clip_fea=clip)
    assert max_err(unpruned, ref) > 1e-2  # the plan really changes the output
    assert err < FP32_TOL


# ---------------------------------------------------------------------------------------------- (c) diffusers


def to_diffusers(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Original Wan keys -> diffusers WanTransformer3DModel keys (docs/comfyui_notes.md)."""
    out = {}
    for key, t in sd.items():
        if key.endswith("modulation"):  # a bare parameter, not a module's weight
            out[diffusers_module(key)] = t
        else:
            module, param = key.rsplit(".", 1)
            out[f"{diffusers_module(module)}.{param}"] = t
    return out


@pytest.mark.parametrize("dims", [TINY_T2V, TINY_I2V], ids=["t2v", "i2v"])
@torch.no_grad()
def test_matches_diffusers(record_property, dims):
    diffusers = pytest.importorskip("diffusers")
    sd = random_wan_state_dict(dims, seed=5)
    ref_model = diffusers.WanTransformer3DModel(
        num_attention_heads=dims.num_heads, attention_head_dim=dims.head_dim, in_channels=dims.in_dim,
        out_channels=dims.out_dim, text_dim=dims.text_dim, ffn_dim=dims.ffn_dim, num_layers=dims.num_layers,
        image_dim=1280 if dims.variant == "i2v" else None,
        added_kv_proj_dim=dims.dim if dims.variant == "i2v" else None).eval()
    ref_model.load_state_dict(to_diffusers(sd, dims.num_layers), strict=True)
    # diffusers splits I2V context as "all but the last 512 tokens are image tokens": give it 512 text tokens.
    x, t, ctx, clip = inputs(dims, hw=(8, 10), text_tokens=512 if dims.variant == "i2v" else 12)
    ref = ref_model(x, t, ctx, encoder_hidden_states_image=clip, return_dict=False)[0]
    out = WanTransformer.from_state_dict(sd, PrunedWanMeta.teacher(dims))(x, t, ctx, clip_fea=clip)
    err = max_err(out, ref)
    report(record_property, f"diffusers_{dims.variant}", err)
    # diffusers differs from ComfyUI itself by the same amount (~6e-6 of the output scale): a relative bound.
    assert err < 1e-5 * ref.abs().max().item()


# ---------------------------------------------------------------------------------------------- (d) block mask


class _Identity(torch.nn.Module):
    def forward(self, x, *args, **kwargs):
        return x


@torch.no_grad()
def test_block_mask_all_true_is_bit_identical(t2v):
    _, model = t2v
    x, t, ctx, _ = inputs(TINY_T2V, batch=3)
    mask = torch.ones(3, model.num_blocks, dtype=torch.bool)
    assert torch.equal(model(x, t, ctx, block_mask=mask), model(x, t, ctx))


@torch.no_grad()
def test_block_mask_skip_equals_identity_block(comfy_lib, record_property, t2v):
    sd, model = t2v
    x, t, ctx, _ = inputs(TINY_T2V, batch=2)
    mask = torch.ones(2, model.num_blocks, dtype=torch.bool)
    mask[:, 2] = False
    out = model(x, t, ctx, block_mask=mask)
    ident = copy.deepcopy(model)
    ident.blocks[2] = _Identity()
    assert torch.equal(out, ident(x, t, ctx))
    # ComfyUI's official skip: a "dit"/"double_block" replace patch that returns its input.
    skip = {"patches_replace": {"dit": {("double_block", 2): lambda args, extra: {"img": args["img"]}}}}
    ref = comfy_wan(comfy_lib, TINY_T2V, sd)(x, t, ctx, transformer_options=skip)
    err = max_err(out, ref)
    report(record_property, "skip_block_vs_comfyui_patch", err)
    assert err < FP32_TOL
    assert max_err(out, model(x, t, ctx)) > 1e-3


@torch.no_grad()
def test_block_mask_rows_equal_samples_run_alone(record_property, t2v):
    _, model = t2v
    x, t, ctx, _ = inputs(TINY_T2V, batch=3)
    mask = torch.ones(3, model.num_blocks, dtype=torch.bool)
    mask[1, [1, 3]] = False
    mask[2, [0, 5]] = False
    mask[:, 4] = False  # skipped by every row
    out, states = model(x, t, ctx, block_mask=mask, return_hidden_states=True)
    assert len(states) == model.num_blocks + 1 and states[0].shape == (3, 3 * 4 * 5, TINY_T2V.dim)
    assert torch.equal(states[4], states[5])  # block 4 ran for nobody
    err = 0.0
    for b in range(3):
        alone = model(x[b:b + 1], t[b:b + 1], ctx[b:b + 1], block_mask=mask[b:b + 1])
        err = max(err, max_err(out[b:b + 1], alone))
    report(record_property, "mixed_rows_vs_alone", err)
    assert err < 1e-5


def test_block_mask_shape_is_checked(t2v):
    _, model = t2v
    x, t, ctx, _ = inputs(TINY_T2V, batch=2)
    with pytest.raises(ValueError, match="block_mask"):
        model(x, t, ctx, block_mask=torch.ones(2, model.num_blocks - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_mask"):
        model(x, t, ctx, block_mask=torch.ones(2, model.num_blocks))


def test_patch_embed_and_checkpoint_roundtrip(tmp_path, t2v):
    from comfyui_pare.pruned import save_checkpoint

    sd, model = t2v
    path = tmp_path / "teacher.safetensors"
    save_checkpoint(path, sd, PrunedWanMeta.teacher(TINY_T2V))
    loaded = WanTransformer.from_checkpoint(path)
    x, t, ctx, _ = inputs(TINY_T2V)
    assert loaded.patch_embed(x).shape == (2, 3 * 4 * 5, TINY_T2V.dim)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ctx), model(x, t, ctx))
    with pytest.raises(RuntimeError, match="Missing key"):
        WanTransformer.from_state_dict({k: v for k, v in sd.items() if k != "head.head.bias"},
                                       PrunedWanMeta.teacher(TINY_T2V))


# ---------------------------------------------------------------------------------------------- (e) sampling


def comfy_model_sampling(comfy, shift: float):
    """What the ModelSamplingSD3 node installs (comfy_extras/nodes_model_advanced.py)."""
    class ModelSamplingAdvanced(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    ms = ModelSamplingAdvanced()
    ms.set_parameters(shift=shift, multiplier=1000)
    return ms


@pytest.mark.parametrize("scheduler", ["simple", "normal"])
def test_flow_sigmas_equal_comfyui(comfy_lib, scheduler):
    for shift in (1.0, 3.0, 5.0, 8.0, 0.5):
        ms = comfy_model_sampling(comfy_lib, shift)
        assert torch.equal(sampling.flow_sigma_table(shift), ms.sigmas)
        for steps in (1, 2, 4, 7, 20, 50, 1000):
            ours = sampling.flow_sigmas(steps, shift, scheduler)
            ref = comfy_lib.samplers.calculate_sigmas(ms, scheduler, steps)
            assert ours.dtype == ref.dtype and torch.equal(ours, ref), (shift, steps)
        for pct in (0.0, 0.1, 0.5, 0.875, 1.0):
            assert sampling.percent_to_sigma(pct, shift) == float(ms.percent_to_sigma(pct))
    with pytest.raises(ValueError, match="scheduler"):
        sampling.flow_sigmas(4, 5.0, "karras")


def test_noise_and_latent_format_equal_comfyui(comfy_lib):
    for shape, seed in (((1, 16, 3, 8, 8), 0), ((1, 16, 5, 6, 10), 123456789), ((2, 16, 2, 4, 4), 7)):
        with torch.random.fork_rng(devices=[]):  # prepare_noise seeds the global generator
            ref = comfy_lib.sample.prepare_noise(torch.zeros(shape), seed)
        assert torch.equal(sampling.initial_noise(shape, seed), ref)
    fmt = comfy_lib.latent_formats.Wan21()
    lat = torch.randn(1, 16, 2, 4, 4)
    assert torch.equal(sampling.process_in(lat), fmt.process_in(lat))
    assert torch.equal(sampling.process_out(lat), fmt.process_out(lat))


@pytest.mark.parametrize("cfg,steps", [(5.0, 3), (1.0, 2)])
@torch.no_grad()
def test_euler_cfg_run_equals_comfyui_ksampler(comfy_lib, record_property, cfg, steps):
    """comfy.sample.sample (KSampler: euler, simple, ModelSamplingSD3 shift 5) on a model loaded by ComfyUI's own
    loader, against ksampler_euler driving (1) ComfyUI's diffusion model and (2) our WanTransformer."""
    dims, shift, seed = STOCK_SMALL, 5.0, 42
    sd = random_wan_state_dict(dims, seed=6)
    patcher = comfy_lib.sd.load_diffusion_model_state_dict(dict(sd))
    assert patcher.model.diffusion_model.num_heads == dims.num_heads
    patcher.add_object_patch("model_sampling", comfy_model_sampling(comfy_lib, shift))
    g = torch.Generator().manual_seed(9)
    pos, neg = torch.randn(1, 8, dims.text_dim, generator=g), torch.randn(1, 8, dims.text_dim, generator=g)
    latent = torch.zeros(1, 16, 3, 8, 8)
    noise = comfy_lib.sample.prepare_noise(latent, seed)
    ref = comfy_lib.sample.sample(patcher, noise, steps, cfg, "euler", "simple", [[pos, {}]], [[neg, {}]], latent,
                              seed=seed, disable_pbar=True)

    sigmas = sampling.flow_sigmas(steps, shift)
    cond, uncond = sampling.Conditioning(pos), sampling.Conditioning(neg)
    args = (sampling.initial_noise(latent.shape, seed), sigmas, cond, uncond, cfg)
    via_comfy_model = sampling.ksampler_euler(patcher.model.diffusion_model, *args)
    ours = sampling.ksampler_euler(WanTransformer.from_state_dict(sd, PrunedWanMeta.teacher(dims)), *args)
    err_sampler, err_model = max_err(via_comfy_model, ref), max_err(ours, ref)
    report(record_property, f"euler_cfg{cfg:g}_same_model", err_sampler)
    report(record_property, f"euler_cfg{cfg:g}_our_model", err_model)
    assert err_sampler < 1e-6  # same model function: only the sampling logic differs
    assert err_model < 1e-4  # latents are O(1-5) after process_out


@torch.no_grad()
def test_cfg_denoise_semantics(t2v):
    _, model = t2v
    x, t, ctx, _ = inputs(TINY_T2V, batch=1)
    sigma = torch.tensor([0.7])
    cond, uncond = sampling.Conditioning(ctx), sampling.Conditioning(ctx[:, :4])
    d_cond = x - model(x, sigma * 1000, ctx) * 0.7
    d_unc = x - model(x, sigma * 1000, ctx[:, :4]) * 0.7
    assert torch.equal(sampling.cfg_denoise(model, x, sigma, cond, uncond, 1.0), d_cond)
    out = sampling.cfg_denoise(model, x, sigma, cond, uncond, 4.0)  # 12 vs 4 tokens: batched with repetition
    assert max_err(out, d_unc + 4.0 * (d_cond - d_unc)) < 1e-4
    with pytest.raises(ValueError, match="uncond"):
        sampling.cfg_denoise(model, x, sigma, cond, None, 4.0)
