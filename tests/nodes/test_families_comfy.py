"""Wan2.2 TI2V-5B and Wan2.1 VACE through a real ComfyUI: PARE's loader, static schedule and router against ComfyUI's
own stock loader on the zeroed teacher and on the teacher with the skipped blocks made identity.

Tiny teachers of the real key layouts with stock-loadable dims (head dim 128, text dim 4096). The 5B runs the
start-image path: ComfyUI's own Wan22ImageToVideoLatent (test node PARETestTI2VLatent, a stand-in for the 160-wide
Wan2.2 VAE's encode), so the model gets a per-frame timestep [rows, latent frames] with the first frame clean.
VACE runs through ComfyUI's WanVaceToVideo with the tiny Wan2.1 VAE and a control video.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_latent
from graphs import Graph, out, pare_loader, stock_loader
from helpers import write_conditioning_pair, write_plan, write_teacher, zeroed_teacher

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
    write_conditioning_pair(comfy.base / "input", POS, NEG, 4096)
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
        loras = comfy.base / "models" / "loras"
        loras.mkdir(parents=True, exist_ok=True)
        write_lora(loras / f"{name}_lora.safetensors", dims)
        proc = subprocess.run([sys.executable, "-m", "comfyui_pare", "lora-slice", "--model",
                               str(dm / f"{name}_student.safetensors"), "--lora", str(loras / f"{name}_lora.safetensors"),
                               "--out", str(loras / f"{name}_lora_sliced.safetensors")], cwd=REPO, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr
    return teachers


def write_lora(path, dims: WanDims) -> None:
    """Low-rank patches on pruned and whole layers, and for VACE on the VACE stream too (its blocks, before/after
    projections and patch embedding). Dyadic factors, so ComfyUI's merge is exact either way it is summed."""
    gen = torch.Generator().manual_seed(9)
    shapes = PrunedWanMeta.teacher(dims).expected_shapes()
    modules = [f"blocks.{i}.{m}" for i in range(dims.num_layers)
               for m in ("self_attn.q", "self_attn.o", "cross_attn.q", "ffn.0", "ffn.2")]
    modules += ["head.head", "patch_embedding"]
    if dims.vace_layers:
        modules += ["vace_patch_embedding", "vace_blocks.0.before_proj", "vace_blocks.1.after_proj",
                    "vace_blocks.0.ffn.0", "vace_blocks.1.self_attn.q"]
    sd = {}
    for m in modules:
        w = shapes[f"{m}.weight"]
        sd[f"diffusion_model.{m}.lora_up.weight"] = torch.randint(-8, 9, (w[0], 4), generator=gen) / 128
        sd[f"diffusion_model.{m}.lora_down.weight"] = torch.randint(-8, 9, (4, *w[1:]), generator=gen) / 128
        sd[f"diffusion_model.{m}.alpha"] = torch.tensor(4.0)
    save_atomic(path, sd, {"format": "pt"})


def graph(family: str, loader: tuple[str, dict], routing: str = "", start_image: bool = True,
          size: tuple[int, int, int] = (64, 64, 9), probe: str = "", lora: tuple[str, str] | None = None
          ) -> tuple[Graph, str]:
    """loader -> [routing] -> ModelSamplingSD3 -> KSampler (CFG 3, 3 steps) on the family's latent -> SaveLatent.
    ``size``: (width, height, frames); ``probe``: record each call's token grid under this tag."""
    g = Graph()
    width, height, length = size
    model = g.add(loader[0], **loader[1])
    if lora:  # (node, file): PARELoraLoader or the stock LoraLoaderModelOnly
        model = g.add(lora[0], model=out(model), lora_name=lora[1], strength_model=0.8)
    if probe:
        model = g.add("PARETestTokenGrid", model=out(model), tag=probe)
    if routing == "static":
        model = g.add("PAREStaticSchedule", model=out(model), schedule=f"{SKIP}-{SKIP}@0.0-1.0")
    elif routing == "router":
        r = g.add("PARELoadRouter", router_name=f"{family}_skip.safetensors")
        model = g.add("PAREApplyRouter", model=out(model), router=out(r), mode="threshold", budget=1.0,
                      threshold=0.5, pin_first=0, pin_last=0)
    model = g.add("ModelSamplingSD3", model=out(model), shift=5.0)
    pos, neg = out(g.add("PARELoadConditioning", file=POS)), out(g.add("PARELoadConditioning", file=NEG))
    if family == "ti2v":
        image = {"start_image": out(g.add("EmptyImage", width=width, height=height, batch_size=1, color=0x4080C0))}
        latent = out(g.add("PARETestTI2VLatent", width=width, height=height, length=length,
                           **(image if start_image else {})))
    else:
        vae = g.add("VAELoader", vae_name=tiny_assets.VAE)
        control = g.add("EmptyImage", width=64, height=64, batch_size=9, color=0x808040)
        vace = g.add("WanVaceToVideo", positive=pos, negative=neg, vae=out(vae), width=64, height=64, length=9,
                     batch_size=1, strength=1.0, control_video=out(control))
        pos, neg, latent = out(vace, 0), out(vace, 1), out(vace, 2)
    sampled = g.add("KSampler", model=out(model), seed=3, steps=3, cfg=3.0, sampler_name="euler", scheduler="simple",
                    positive=pos, negative=neg, latent_image=latent, denoise=1.0)
    if probe:
        g.add("PARETestReadGrids", samples=out(sampled), tag=probe)
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


def test_compute_counts_the_tokens_the_5b_sees(comfy, files):
    # 176 x 96 x 13 through the 16x VAE: latent 4 x 6 x 11, the width padded to the patch: grid 4 x 3 x 6.
    g, _ = graph("ti2v", stock_loader("ti2v_teacher.safetensors"), size=(176, 96, 13), probe="grid")
    entry = comfy.run(g.to_json())
    records = json.loads(entry["outputs"][g.find("PARETestReadGrids")]["text"][0])
    grids = {tuple(r["grid"]) for r in records if "grid" in r}
    seen = {r["block0_tokens"] for r in records if "block0_tokens" in r}
    assert {tuple(r["timestep"]) for r in records if "timestep" in r} == {(2, 4)}  # per frame: the start-image path
    assert grids == {(4, 3, 6)} and seen == {72}

    def compute(frames: int, height: int, width: int) -> dict:
        proc = subprocess.run([sys.executable, "-m", "comfyui_pare", "compute", str(comfy.base / "models" /
                               "diffusion_models" / "ti2v_student.safetensors"), "--frames", str(frames),
                               "--height", str(height), "--width", str(width)], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    assert compute(13, 96, 176)["tokens"] == 72
    report = compute(121, 704, 1280)  # the 5B's native 720p: 31 latent frames of 44 x 80 -> 31 x 22 x 40 tokens
    assert report["tokens"] == 31 * 22 * 40 and report["latent"] == [48, 31, 44, 80]
    assert report["family"] == "Wan2.2 TI2V-5B"


@pytest.mark.parametrize("family", ["ti2v", "vace"])
def test_pare_lora_equals_stock_lora(comfy, files, family):
    # On the student: PARE LoRA Loader with the teacher's LoRA == the stock loader with the CLI-sliced LoRA; on the
    # teacher: PARE LoRA Loader == the stock LoRA loader. VACE patches apply to the teacher-width VACE stream as is.
    student = pare_loader(f"{family}_student.safetensors")
    ours = sample(comfy, family, student, lora=("PARELoraLoader", f"{family}_lora.safetensors"))
    ref = sample(comfy, family, student, lora=("LoraLoaderModelOnly", f"{family}_lora_sliced.safetensors"))
    assert not torch.allclose(ours, sample(comfy, family, student), atol=1e-3)
    assert torch.equal(ours, ref)
    teacher = stock_loader(f"{family}_teacher.safetensors")
    assert torch.equal(sample(comfy, family, teacher, lora=("PARELoraLoader", f"{family}_lora.safetensors")),
                       sample(comfy, family, teacher, lora=("LoraLoaderModelOnly", f"{family}_lora.safetensors")))
