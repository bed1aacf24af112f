"""PARE Load Pruned Wan through a real ComfyUI server, against the stock UNETLoader as the reference."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_latent
from graphs import pare_loader, sample_graph, stock_loader
from helpers import PACK_NODES, STOCK_I2V, STOCK_T2V, write_conditioning_pair, write_plan, write_teacher, zeroed_teacher

from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.wan_reader import load_checkpoint, read_meta
from scripts.comfy_harness import PromptError

# Tests marked every_comfyui also run on ComfyUI 0.8.0 (the rest on the pinned 0.3.75 only, for CI time).
pytestmark = pytest.mark.comfy
POS, NEG = "cond4096_pos.safetensors", "cond4096_neg.safetensors"


@pytest.fixture(scope="module")
def models(comfy, tmp_path_factory) -> dict[str, Path]:
    """Teachers with stock-loadable dims and their students, made with the `prune` CLI."""
    work = tmp_path_factory.mktemp("models")
    dm = comfy.base / "models" / "diffusion_models"
    write_conditioning_pair(comfy.base / "input", POS, NEG, 4096)
    teacher = write_teacher(dm / "stock_t2v_teacher.safetensors", STOCK_T2V, seed=3)
    write_teacher(dm / "stock_i2v_teacher.safetensors", STOCK_I2V, seed=4)
    d = STOCK_T2V
    plans = {
        "zero": [{"heads": list(range(d.num_heads)), "ffn": list(range(d.ffn_dim))}, {}, {}],
        "ffn": [{"ffn": list(range(0, d.ffn_dim, 2))}, {"ffn": list(range(100, 300))}, {}],
        "heads": [{"heads": [0, 2]}, {"heads": [3]}, {"heads": [1, 2, 3], "ffn": list(range(200))}],
    }
    for name, blocks in plans.items():
        cli("prune", "--teacher", str(dm / "stock_t2v_teacher.safetensors"),
            "--plan", str(write_plan(work / f"{name}.json", blocks)), "--out", str(dm / f"student_{name}.safetensors"),
            "--no-align")  # widths off the grain on purpose: the loader pads them
    return {"teacher": teacher, "dm": dm, "plans": plans}


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "comfyui_pare", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


def latent(comfy, loader, **kw) -> torch.Tensor:
    g, save = sample_graph(loader, positive=POS, negative=NEG, **kw)
    return run_latent(comfy, g, save)


@pytest.mark.every_comfyui
@pytest.mark.parametrize("sampler,scheduler", [("euler", "simple"), ("uni_pc", "simple")])
def test_zero_pruned_is_bit_identical_to_stock_loader(comfy, models, sampler, scheduler):
    kw = dict(sampler=sampler, scheduler=scheduler, cfg=4.0, steps=3, seed=11)
    ours = latent(comfy, pare_loader("student_zero.safetensors"), **kw)
    stock = latent(comfy, stock_loader("stock_t2v_teacher.safetensors"), **kw)
    assert torch.equal(ours, stock)
    assert ours.abs().sum() > 0


@pytest.mark.every_comfyui
def test_zero_pruned_i2v_is_bit_identical_to_stock_loader(comfy, models):
    kw = dict(variant="i2v", cfg=3.0, steps=2, seed=5)
    ours = latent(comfy, pare_loader("stock_i2v_teacher.safetensors"), **kw)
    stock = latent(comfy, stock_loader("stock_i2v_teacher.safetensors"), **kw)
    assert torch.equal(ours, stock)


@pytest.mark.every_comfyui
@pytest.mark.parametrize("plan", ["ffn", "heads"])
def test_pruning_equals_zeroed_teacher(comfy, models, plan):
    d = STOCK_T2V
    zeroed = zeroed_teacher(models["teacher"], models["plans"][plan], d.head_dim, d.num_heads, d.ffn_dim)
    name = f"zeroed_{plan}.safetensors"
    save_atomic(models["dm"] / name, zeroed, {"format": "pt"})
    kw = dict(cfg=4.0, steps=3, seed=21, sampler="euler")
    ours = latent(comfy, pare_loader(f"student_{plan}.safetensors"), **kw)
    ref = latent(comfy, stock_loader(name), **kw)
    unpruned = latent(comfy, stock_loader("stock_t2v_teacher.safetensors"), **kw)
    assert not torch.allclose(ref, unpruned, atol=1e-3), "pruning must change the output for this test to mean anything"
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_student_files_carry_their_widths(models):
    meta, _ = read_meta(models["dm"] / "student_heads.safetensors")
    assert [b.heads for b in meta.blocks] == [(0, 2), (3,), (1, 2, 3)]
    assert meta.blocks[2].ffn == tuple(range(200))
    sd, _ = load_checkpoint(models["dm"] / "student_heads.safetensors")
    assert sd["blocks.1.self_attn.q.weight"].shape == (128, 512)
    assert sd["blocks.1.self_attn.o.weight"].shape == (512, 128)
    assert torch.equal(sd["blocks.0.self_attn.q.weight"][128:], models["teacher"]["blocks.0.self_attn.q.weight"][256:384])


@pytest.mark.every_comfyui
def test_fp8_weights_sample(comfy, models):
    kw = dict(cfg=4.0, steps=3, seed=31)
    fp8 = latent(comfy, pare_loader("student_heads.safetensors", "fp8_e4m3fn"), **kw)
    full = latent(comfy, pare_loader("student_heads.safetensors"), **kw)
    assert torch.isfinite(fp8).all()
    assert not torch.equal(fp8, full)  # the weights really were stored in fp8
    rel = (fp8 - full).norm() / full.norm()
    assert rel < 0.25, f"fp8 run drifted too far from fp32 ({rel:.3f})"


@pytest.mark.every_comfyui
def test_heads_other_than_128_load(comfy, assets_dir):
    """The tiny default has head dim 32 and text dim 64, which ComfyUI's own detection cannot load."""
    g, save = sample_graph(pare_loader("pare_tiny_t2v_teacher.safetensors"), cfg=2.0, steps=2)
    out = run_latent(comfy, g, save)
    assert out.shape == (1, 16, 3, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(PromptError):
        g, save = sample_graph(stock_loader("pare_tiny_t2v_teacher.safetensors"), cfg=2.0, steps=2)
        run_latent(comfy, g, save)


# -- bad inputs: a clear error in ComfyUI's execution error, and the server keeps serving ----------------

def _bad_files(dm: Path, teacher_path: Path, tmp: Path) -> dict[str, tuple[str, list[str]]]:
    data = teacher_path.read_bytes()
    (dm / "bad_truncated.safetensors").write_bytes(data[: len(data) // 2])
    save_atomic(dm / "bad_not_wan.safetensors", {"encoder.weight": torch.zeros(4, 4)}, {"format": "pt"})
    sd, meta = load_checkpoint(dm / "student_heads.safetensors")
    header = meta.to_header()
    lying = header["pare"].replace('"heads":[3]', '"heads":[0,3]')
    save_atomic(dm / "bad_metadata_shapes.safetensors", sd, {**header, "pare": lying})
    out_of_range = header["pare"].replace('"heads":[3]', '"heads":[7]')
    save_atomic(dm / "bad_head_index.safetensors", sd, {**header, "pare": out_of_range})
    marker = tmp / "unpickled.marker"

    class Payload:  # unpickling this would create the marker file
        def __reduce__(self):
            return (Path.touch, (marker,))

    (dm / "bad_pickle.ckpt").write_bytes(pickle.dumps(Payload()))
    return {
        "bad_truncated.safetensors": ("truncated", ["bad_truncated.safetensors"]),
        "bad_not_wan.safetensors": ("not a Wan diffusion model", ["encoder.weight"]),
        "bad_metadata_shapes.safetensors": ("blocks.1.self_attn.q.weight", ["[128, 512]", "[256, 512]"]),
        "bad_head_index.safetensors": ("index 7 is out of range", ["block 1 heads"]),
        "bad_pickle.ckpt": ("pickle", ["bad_pickle.ckpt"]),
    }, marker


def test_bad_inputs_fail_clearly_and_server_keeps_serving(comfy, models, tmp_path):
    cases, marker = _bad_files(models["dm"], models["dm"] / "stock_t2v_teacher.safetensors", tmp_path)
    for name, (must, also) in cases.items():
        g, save = sample_graph(pare_loader(name), positive=POS, negative=NEG, steps=1)
        with pytest.raises(PromptError) as err:
            comfy.run(g.to_json())
        message = str(err.value)
        assert must in message and all(a in message for a in also), f"{name}: {message}"
        # ... and the same file through the CLI
        proc = subprocess.run([sys.executable, "-m", "comfyui_pare", "inspect", str(models["dm"] / name)],
                              cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2 and must in proc.stderr, proc.stderr
        ok = latent(comfy, pare_loader("student_ffn.safetensors"), steps=1, seed=len(name))
        assert torch.isfinite(ok).all()
    assert not marker.exists(), "a pickle file was unpickled"


def test_nodes_listed_with_tooltips(comfy):
    info = comfy.object_info()
    assert sorted(k for k, v in info.items() if v["category"].startswith("PARE")) == sorted(PACK_NODES)
    for node_id in PACK_NODES:
        assert node_id in info, f"{node_id} missing; log:\n{comfy.log_tail()}"
        node = info[node_id]
        assert node["category"].startswith("PARE") and node["description"]
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    failed = [ln for ln in comfy.log_text().splitlines() if "IMPORT FAILED" in ln and "comfyui-pare" in ln]
    assert not failed, failed


@pytest.mark.every_comfyui
@pytest.mark.parametrize("weight_dtype", ["default", "fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fn_fast"])
def test_bf16_prefixed_plain_file_matches_stock_for_every_weight_dtype(comfy, models, weight_dtype):
    """A plain bf16 Wan file with ComfyUI's 'model.diffusion_model.' prefix, as checkpoints in the wild."""
    name = "plain_bf16_prefixed.safetensors"
    if not (models["dm"] / name).exists():
        sd = {f"model.diffusion_model.{k}": v.to(torch.bfloat16) for k, v in models["teacher"].items()}
        save_atomic(models["dm"] / name, sd, {})
    kw = dict(cfg=4.0, steps=2, seed=41)
    ours = latent(comfy, pare_loader(name, weight_dtype), **kw)
    stock = latent(comfy, stock_loader(name, weight_dtype), **kw)
    assert torch.equal(ours, stock)
