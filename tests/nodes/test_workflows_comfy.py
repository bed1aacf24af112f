"""The shipped workflows (UI format): their API graphs, generated with scripts/workflow_api.py, are valid against the
real server's node schema and run end to end on the tiny models (real file names swapped for the tiny stand-ins, the
text encoder for stored conditioning)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_latent
from graphs import out, pare_loader, sample_graph

from comfyui_pare.pruned import PrunedWanMeta, save_checkpoint
from comfyui_pare.router import BlockRouter, RouterSpec, save_router
from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.surgery import PrunePlan, prune_state_dict
from comfyui_pare.wan_reader import load_checkpoint
from scripts import tiny_assets
from scripts.workflow_api import ui_to_api
from training.tiny import TINY_VACE, random_wan_state_dict

pytestmark = [pytest.mark.comfy, pytest.mark.every_comfyui]
SHIPPED = sorted((REPO / "workflows").glob("*.json"))
# Real-model workflows, run here on the tiny stand-ins; the toy-world workflow runs on its own weights, queued from
# the real front end (tests/nodes/test_frontend_browser.py).
# The Wan2.2 TI2V-5B workflow needs the Wan2.2 VAE, which ComfyUI builds 160 wide (705M parameters: no tiny stand-in);
# its nodes run on the 5B start-image path in tests/nodes/test_families_comfy.py.
REAL_MODEL = [p for p in SHIPPED if not p.name.startswith("pare_toy") and "ti2v_5b" not in p.name]
SAMPLERS = ("KSampler", "KSamplerAdvanced")


def distill_style_lora(dims, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A lightx2v-style LoRA (diffusion_model.*.lora_down/up + alpha) on every linear of every block."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(dims.num_layers):
        for module, (o, n) in {"self_attn.q": (dims.dim, dims.dim), "self_attn.o": (dims.dim, dims.dim),
                               "cross_attn.v": (dims.dim, dims.dim), "ffn.0": (dims.ffn_dim, dims.dim),
                               "ffn.2": (dims.dim, dims.ffn_dim)}.items():
            key = f"diffusion_model.blocks.{i}.{module}"
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, n, generator=gen) * 0.05
            sd[f"{key}.lora_up.weight"] = torch.randn(o, rank, generator=gen) * 0.05
            sd[f"{key}.alpha"] = torch.tensor(float(rank))
    return sd


def install_tiny_world(base: Path, assets_dir: Path) -> None:
    """Pruned tiny students (T2V, I2V), a router and a distill-style LoRA in a ComfyUI base directory."""
    dm = base / "models" / "diffusion_models"
    for teacher, student in ((tiny_assets.TEACHER_T2V, "tiny_student_t2v.safetensors"),
                             (tiny_assets.TEACHER_I2V, "tiny_student_i2v.safetensors")):
        sd, meta = load_checkpoint(assets_dir / teacher)
        plan = PrunePlan.from_json({"blocks": [{"heads": [0, 2, 3, 5, 6, 7], "ffn": list(range(0, 512, 2))}] * 6})
        save_checkpoint(dm / student, *prune_state_dict(sd, meta, plan))
    vace = PrunedWanMeta.teacher(TINY_VACE)
    plan = PrunePlan.from_json({"blocks": [{"heads": [0, 2, 3, 5, 6, 7], "ffn": list(range(0, 512, 2))}] * 6})
    save_checkpoint(dm / "tiny_student_vace.safetensors",
                    *prune_state_dict(random_wan_state_dict(TINY_VACE, seed=3), vace, plan))
    spec = RouterSpec(num_blocks=6, dim=256)
    (base / "models" / "pare_routers").mkdir(parents=True, exist_ok=True)
    save_router(base / "models" / "pare_routers" / "tiny_router.safetensors",
                BlockRouter.constant(spec, [4.0, -1.0, 2.0, 1.0, -3.0, 4.0]))
    (base / "models" / "loras").mkdir(parents=True, exist_ok=True)
    save_atomic(base / "models" / "loras" / "tiny_distill_lora.safetensors", distill_style_lora(tiny_assets.TINY_T2V),
                {"format": "pt"})


@pytest.fixture(scope="module")
def tiny_world(comfy, assets_dir):
    install_tiny_world(comfy.base, assets_dir)
    return comfy


def api_graph(path: Path, info: dict) -> dict:
    return ui_to_api(json.loads(path.read_text()), info, source=path.name)


def test_shipped_workflows_are_valid_for_the_real_server(comfy):
    info = comfy.object_info()
    assert SHIPPED, "no workflows shipped"
    for path in SHIPPED:
        graph = api_graph(path, info)
        for node_id, node in graph.items():
            cls = node["class_type"]
            assert cls in info, f"{path.name}: node {node_id} uses unknown class {cls}"
            spec = info[cls]["input"]
            known = {**spec.get("required", {}), **spec.get("optional", {})}
            for name in node["inputs"]:
                head = name.split(".")[0]  # "format.codec": an input of format's chosen option (dynamic combo)
                assert head in known, f"{path.name}: {cls}.{name} is not an input of {cls}"
                assert head == name or known[head][0] == "COMFY_DYNAMICCOMBO_V3", f"{path.name}: {cls}.{name}"
            for name in spec.get("required", {}):
                assert name in node["inputs"], f"{path.name}: {cls} misses required input {name}"
            for name, value in node["inputs"].items():
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                    src = graph.get(value[0])
                    assert src is not None, f"{path.name}: {cls}.{name} links to missing node {value[0]}"
                    outputs = info[src["class_type"]]["output"]
                    assert value[1] < len(outputs), f"{path.name}: {cls}.{name} links to output {value[1]}"


def tinyfy(graph: dict, variant: str) -> dict:
    """Swap real Wan assets for the tiny stand-ins; keep the workflow's structure and sampler settings."""
    g = copy.deepcopy(graph)
    for node_id, node in list(g.items()):
        cls, inputs = node["class_type"], node["inputs"]
        if cls == "PARELoadPrunedWan":
            inputs["unet_name"] = f"tiny_student_{variant}.safetensors"
        elif cls == "PARELoadRouter":
            inputs["router_name"] = "tiny_router.safetensors"
        elif cls == "PARELoraLoader":
            inputs["lora_name"] = "tiny_distill_lora.safetensors"
        elif cls == "CLIPTextEncode":
            negative = "Negative" in node.get("_meta", {}).get("title", "")
            g[node_id] = {"class_type": "PARELoadConditioning",
                          "inputs": {"file": tiny_assets.NEGATIVE if negative else tiny_assets.POSITIVE}}
        elif cls in ("CLIPLoader", "CLIPVisionLoader", "CLIPVisionEncode"):
            del g[node_id]
        elif cls == "VAELoader":
            inputs["vae_name"] = tiny_assets.VAE
        elif cls == "LoadImage":
            g[node_id] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 3368601}}
        elif cls == "LoadVideo":  # the VACE control video: frames from EmptyImage instead
            del g[node_id]
        elif cls == "GetVideoComponents":
            g[node_id] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 9, "color": 8421440}}
        elif cls in ("EmptyHunyuanLatentVideo", "WanImageToVideo", "WanVaceToVideo"):
            inputs.update(width=64, height=64, length=9)
            inputs.pop("clip_vision_output", None)  # the tiny conditioning carries clip_fea itself
        elif cls == "KSampler":
            inputs["steps"] = min(inputs["steps"], 4)
        elif cls == "KSamplerAdvanced":  # the same split of the schedule, over 4 steps
            total = inputs["steps"]
            inputs.update(steps=4, start_at_step=round(4 * min(inputs["start_at_step"], total) / total),
                          end_at_step=round(4 * min(inputs["end_at_step"], total) / total))
    return g


@pytest.mark.parametrize("path", REAL_MODEL, ids=lambda p: p.stem)
def test_shipped_workflow_runs_on_tiny_models(tiny_world, path: Path):
    graph = api_graph(path, tiny_world.object_info())
    classes = {n["class_type"] for n in graph.values()}
    variant = "i2v" if "WanImageToVideo" in classes else "vace" if "WanVaceToVideo" in classes else "t2v"
    entry = tiny_world.run(tinyfy(graph, variant))
    saved = [n for n, v in graph.items() if v["class_type"] == "SaveVideo"]
    videos = [f for n in saved for f in tiny_world.output_files(entry, n)]
    assert videos and all(f.exists() and f.stat().st_size > 0 for f in videos), entry.get("outputs")
    reports = [n for n, v in graph.items() if v["class_type"] == "PARERoutingReport"]
    summaries = [entry["outputs"][n]["text"][0] for n, v in graph.items() if v["class_type"] == "PreviewAny"]
    assert reports and len(summaries) == len(reports)
    assert all("block calls executed" in s for s in summaries), summaries
    samplers = [v["inputs"] for v in graph.values() if v["class_type"] in SAMPLERS]
    if "distill" in path.name:  # artists' 4-step, CFG-free setting
        assert [(ks["steps"], ks["cfg"]) for ks in samplers] == [(4, 1.0)]
        assert "4 steps, 1 branch(es)" in summaries[0]
    if "wan22" in path.name:  # two experts, each routed over its half of the steps
        assert len(samplers) == 2 and all("2 steps, 2 branch(es)" in s for s in summaries), summaries


def test_lora_then_router_equals_router_then_lora(tiny_world):
    def chain(order):
        def patch(g, model):
            for step in order:
                if step == "lora":
                    model = g.add("PARELoraLoader", model=out(model), lora_name="tiny_distill_lora.safetensors",
                                  strength_model=1.0)
                else:
                    r = g.add("PARELoadRouter", router_name="tiny_router.safetensors")
                    model = g.add("PAREApplyRouter", model=out(model), router=out(r), mode="budget", budget=0.6)
            return model
        return patch

    def run(order):
        g, save = sample_graph(pare_loader("tiny_student_t2v.safetensors"), cfg=1.0, steps=4, seed=8,
                               patch_model=chain(order))
        return read_latent(tiny_world.output_files(tiny_world.run(g.to_json()), save, "latents")[0])

    a, b = run(["lora", "router"]), run(["router", "lora"])
    assert torch.equal(a, b)
    assert not torch.equal(a, run(["router"])), "the LoRA must change the output"

