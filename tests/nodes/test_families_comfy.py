"""Wan2.2 TI2V-5B and Wan2.1 VACE through a real ComfyUI: PARE's loader, static schedule and router against ComfyUI's
own stock loader on the zeroed teacher and on the teacher with the skipped blocks made identity.

Tiny teachers of the real key layouts with stock-loadable dims (head dim 128, text dim 4096). The 5B runs the
start-image path: ComfyUI's own Wan22ImageToVideoLatent (test node PARETestTI2VLatent, a stand-in for the 160-wide
Wan2.2 VAE's encode), so the model gets a per-frame timestep [rows, latent frames] with the first frame clean.
VACE runs through ComfyUI's WanVaceToVideo with the tiny Wan2.1 VAE and a control video.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_latent
from graphs import Graph, out, pare_loader, stock_loader
from helpers import write_conditioning, write_plan, write_teacher, zeroed_teacher

from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.router import BlockRouter, RouterSpec, save_router
from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.wan import WanDims
from scripts import tiny_assets

pytestmark = [pytest.mark.comfy, pytest.mark.every_comfyui]
POS, NEG = "cond4096_pos.safetensors", "cond4096_neg.safetensors"
STOCK_5B = WanDims(dim=512, num_heads=4, ffn_dim=384, num_layers=3, text_dim=4096, in_dim=48, out_dim=48)
STOCK_VACE = WanDims(dim=256, num_heads=2, ffn_dim=256, num_layers=4, text_dim=4096, vace_layers=2, vace_in_dim=96)
PLANS = {"ti2v": [{"heads": [0, 2], "ffn": list(range(0, 384, 2))}, {"heads": [3]}, {}],
         "vace": [{"heads": [1]}, {"ffn": list(range(100))}, {}, {"heads": [0], "ffn": list(range(0, 256, 3))}]}
SKIP = 1  # the block the static schedule and the constant router skip


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    work = tmp_path_factory.mktemp("families")
    dm = comfy.base / "models" / "diffusion_models"
    write_conditioning(comfy.base / "input" / POS, 4096, seed=1)
    write_conditioning(comfy.base / "input" / NEG, 4096, seed=2)
    teachers = {}
    for name, dims in (("ti2v", STOCK_5B), ("vace", STOCK_VACE)):
        sd = teachers[name] = write_teacher(dm / f"{name}_teacher.safetensors", dims, seed=7)
        zeroed = zeroed_teacher(sd, PLANS[name], dims.head_dim, dims.num_heads, dims.ffn_dim)
        save_atomic(dm / f"{name}_zeroed.safetensors", zeroed, {"format": "pt"})
        identity = {k: v.clone() for k, v in sd.items()}  # block SKIP adds nothing: an identity block
        for part in ("self_attn.o", "cross_attn.o", "ffn.2"):
            for suffix in ("weight", "bias"):
                identity[f"blocks.{SKIP}.{part}.{suffix}"].zero_()
        save_atomic(dm / f"{name}_identity.safetensors", identity, {"format": "pt"})
        proc = subprocess.run([sys.executable, "-m", "comfyui_pare", "prune", "--teacher", str(dm / f"{name}_teacher.safetensors"),
                               "--plan", str(write_plan(work / f"{name}.json", PLANS[name])),
                               "--out", str(dm / f"{name}_student.safetensors"), "--no-align"],
                              cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        routers = comfy.base / "models" / "pare_routers"
        routers.mkdir(parents=True, exist_ok=True)
        logits = [5.0] * dims.num_layers
        logits[SKIP] = -5.0
        spec = RouterSpec(num_blocks=dims.num_layers, dim=dims.dim, model_fingerprint=PrunedWanMeta.teacher(dims).fingerprint())
        save_router(routers / f"{name}_skip.safetensors", BlockRouter.constant(spec, logits))
    return teachers


def graph(family: str, loader: tuple[str, dict], routing: str = "", start_image: bool = True) -> tuple[Graph, str]:
    """loader -> [routing] -> ModelSamplingSD3 -> KSampler (CFG 3, 3 steps) on the family's latent -> SaveLatent."""
    g = Graph()
    model = g.add(loader[0], **loader[1])
    if routing == "static":
        model = g.add("PAREStaticSchedule", model=out(model), schedule=f"{SKIP}-{SKIP}@0.0-1.0")
    elif routing == "router":
        r = g.add("PARELoadRouter", router_name=f"{family}_skip.safetensors")
        model = g.add("PAREApplyRouter", model=out(model), router=out(r), mode="threshold", budget=1.0,
                      threshold=0.5, pin_first=0, pin_last=0)
    model = g.add("ModelSamplingSD3", model=out(model), shift=5.0)
    pos, neg = out(g.add("PARELoadConditioning", file=POS)), out(g.add("PARELoadConditioning", file=NEG))
    if family == "ti2v":
        image = {"start_image": out(g.add("EmptyImage", width=64, height=64, batch_size=1, color=0x4080C0))}
        latent = out(g.add("PARETestTI2VLatent", width=64, height=64, length=9, **(image if start_image else {})))
    else:
        vae = g.add("VAELoader", vae_name=tiny_assets.VAE)
        control = g.add("EmptyImage", width=64, height=64, batch_size=9, color=0x808040)
        vace = g.add("WanVaceToVideo", positive=pos, negative=neg, vae=out(vae), width=64, height=64, length=9,
                     batch_size=1, strength=1.0, control_video=out(control))
        pos, neg, latent = out(vace, 0), out(vace, 1), out(vace, 2)
    sampled = g.add("KSampler", model=out(model), seed=3, steps=3, cfg=3.0, sampler_name="euler", scheduler="simple",
                    positive=pos, negative=neg, latent_image=latent, denoise=1.0)
    return g, g.add("SaveLatent", samples=out(sampled), filename_prefix=f"fam_{family}")


def sample(comfy, family: str, loader: tuple[str, dict], **kw) -> torch.Tensor:
    return run_latent(comfy, *graph(family, loader, **kw))


@pytest.mark.parametrize("family", ["ti2v", "vace"])
def test_student_equals_stock_on_zeroed_teacher(comfy, files, family):
    ours = sample(comfy, family, pare_loader(f"{family}_student.safetensors"))
    ref = sample(comfy, family, stock_loader(f"{family}_zeroed.safetensors"))
    unpruned = sample(comfy, family, stock_loader(f"{family}_teacher.safetensors"))
    assert ours.shape[1] == (48 if family == "ti2v" else 16)
    assert not torch.allclose(ref, unpruned, atol=1e-3), "pruning must change the output for this test to mean anything"
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(sample(comfy, family, pare_loader(f"{family}_teacher.safetensors")), unpruned)


@pytest.mark.parametrize("family", ["ti2v", "vace"])
def test_static_skip_and_router_equal_identity_blocks(comfy, files, family):
    # VACE: the stock forward adds block 0's hint after block 0 whatever the block did, so skipping a hinted block
    # keeps its hint; the identity-block teacher runs the stock forward with that block adding nothing.
    identity = sample(comfy, family, stock_loader(f"{family}_identity.safetensors"))
    full = sample(comfy, family, stock_loader(f"{family}_teacher.safetensors"))
    assert not torch.allclose(identity, full, atol=1e-3)
    for routing in ("static", "router"):
        skipped = sample(comfy, family, stock_loader(f"{family}_teacher.safetensors"), routing=routing)
        torch.testing.assert_close(skipped, identity, rtol=1e-5, atol=1e-5)


def test_ti2v_router_without_start_image(comfy, files):
    # Text-to-video on the 5B (one timestep per row) through the same router.
    skipped = sample(comfy, "ti2v", stock_loader("ti2v_teacher.safetensors"), routing="router", start_image=False)
    static = sample(comfy, "ti2v", stock_loader("ti2v_teacher.safetensors"), routing="static", start_image=False)
    assert torch.equal(skipped, static)
