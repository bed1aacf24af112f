"""PARE LoRA Loader through a real ComfyUI server, against the stock LoraLoaderModelOnly as the reference.

Why most comparisons are bit-exact (torch.equal): the node hands ComfyUI the same tensors the CLI writes
(index selection only) through ComfyUI's own ``load_lora``, so both branches run identical patch objects through
identical arithmetic. Across key styles the parsed tensors are identical too. For the dense ``.diff`` style the
low-rank factors are dyadic (k / 128, |k| <= 8, rank 4) and alpha / rank is a power of two, so
``alpha / rank * up @ down`` is exact in fp32 whichever way it is summed; ComfyUI then adds the same fp32 delta to
the same fp32 weight either way. Compared to fp32 tolerance instead:
- stacking in the other order computes ``(W + a) + b`` instead of ``(W + b) + a``, which rounds differently;
- the hand-merged modulation reference: it is one fp32 add of the same operands, so in practice exact too, but it
  goes through another file and the loader's own weight path, so it is held to a tight tolerance (1e-6), not
  to bit equality.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_latent
from graphs import pare_loader, sample_graph, stock_loader
from helpers import STOCK_T2V, write_conditioning_pair, write_plan, write_teacher
from lora_files import FILE_STYLES, make_lora, write_lora
from safetensors.torch import load_file

from comfyui_pare.pruned import save_checkpoint
from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.wan_reader import load_checkpoint
from scripts import tiny_assets
from scripts.comfy_harness import PromptError
from training.tiny import TINY_T2V

# Tests marked every_comfyui also run on ComfyUI 0.8.0 (the rest on the pinned 0.3.75 only, for CI time).
pytestmark = pytest.mark.comfy
POS, NEG = "lora_cond4096_pos.safetensors", "lora_cond4096_neg.safetensors"
STUDENT, TEACHER = "lora_tiny_student.safetensors", tiny_assets.TEACHER_T2V
STOCK_TEACHER = "lora_stock_t2v_teacher.safetensors"
PLAN = [  # tiny T2V: 6 blocks of 8 heads (head dim 32) and 512 FFN neurons; blocks 1 and 4 stay whole
    {"heads": [0, 2, 3, 5, 7], "ffn": list(range(0, 512, 2))}, {},
    {"heads": [1, 6]}, {"ffn": [j for j in range(512) if j % 5]},
    {}, {"heads": [0, 1, 2, 3, 4, 5, 6], "ffn": [3, 17, 100, 511]},
]
# -- fixtures and graph helpers ----------------------------------------------------------------------------

def cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "comfyui_pare", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory) -> dict[str, str]:
    """The tiny student (pruned with the CLI), LoRAs in every style, a CLI-sliced LoRA, stock-dims files."""
    work = tmp_path_factory.mktemp("lora")
    dm, loras = comfy.base / "models" / "diffusion_models", comfy.base / "models" / "loras"
    cli("prune", "--no-align", "--teacher", str(dm / TEACHER), "--plan", str(write_plan(work / "plan.json", PLAN)),
        "--out", str(dm / STUDENT))
    full = make_lora(TINY_T2V, seed=1)
    f = {style: write_lora(loras / f"lora_tiny_{style}.safetensors", full, style) for style in FILE_STYLES}
    f["no_mod"] = write_lora(loras / "lora_tiny_no_mod.safetensors", make_lora(TINY_T2V, seed=1, modulation=False))
    f["other"] = write_lora(loras / "lora_tiny_other.safetensors", make_lora(TINY_T2V, seed=2))
    f["mod_only"] = write_lora(loras / "lora_tiny_mod_only.safetensors", make_lora(TINY_T2V, seed=3, low_rank=False))
    f["junk_keys"] = write_lora(loras / "lora_tiny_junk_keys.safetensors", full, extra={
        f"lora_te_text_model_encoder_layers_{i}_mlp_fc1.lora_down.weight": torch.zeros(4, 8) for i in range(5)})
    f["sliced"] = "lora_tiny_no_mod_sliced.safetensors"
    cli("lora-slice", "--model", str(dm / STUDENT), "--lora", str(loras / f["no_mod"]),
        "--out", str(loras / f["sliced"]))
    write_teacher(dm / STOCK_TEACHER, STOCK_T2V, seed=5)
    write_conditioning_pair(comfy.base / "input", POS, NEG, 4096, seeds=(6, 7))
    stock = make_lora(STOCK_T2V, seed=4, modulation=False)
    f["stock"] = write_lora(loras / "lora_stock_dims.safetensors", stock)
    f["stock_diffusers"] = write_lora(loras / "lora_stock_dims_diffusers.safetensors", stock, "diffusers")
    return f


def pare_lora(name: str, strength: float = 1.0) -> tuple[str, dict]:
    return "PARELoraLoader", {"lora_name": name, "strength_model": strength}


def stock_lora(name: str, strength: float = 1.0) -> tuple[str, dict]:
    return "LoraLoaderModelOnly", {"lora_name": name, "strength_model": strength}


def tiny(comfy, loras: list[tuple[str, dict]] = (), model: str = STUDENT, **kw) -> torch.Tensor:
    kw = {"steps": 2, "cfg": 3.0, "seed": 3, **kw}
    g, save = sample_graph(pare_loader(model), model_patches=list(loras), **kw)
    return run_latent(comfy, g, save)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, atol=1e-3)


# -- acceptance -----------------------------------------------------------------------------------------

@pytest.mark.every_comfyui
def test_node_equals_stock_loader_with_cli_sliced_lora(comfy, files):
    base = tiny(comfy)
    ours = tiny(comfy, [pare_lora(files["no_mod"], 0.8)])
    stock = tiny(comfy, [stock_lora(files["sliced"], 0.8)])
    assert differs(ours, base), "the LoRA must change the output for this test to mean anything"
    assert torch.equal(ours, stock)
    assert "PARE LoRA: applied" in comfy.log_text() and "sliced 24 modules to the pruned widths" in comfy.log_text()


@pytest.mark.parametrize("style", [s for s in FILE_STYLES if s != "diffusion_model"])
def test_every_key_style_equals_the_diffusion_model_style(comfy, files, style):
    reference = tiny(comfy, [pare_lora(files["diffusion_model"])])
    assert torch.equal(tiny(comfy, [pare_lora(files[style])]), reference)


def test_stacking_is_order_independent_and_unpatches(comfy, files):
    a, b = pare_lora(files["diffusion_model"], 0.7), pare_lora(files["other"], -0.5)
    ab, ba = tiny(comfy, [a, b], seed=4), tiny(comfy, [b, a], seed=4)
    torch.testing.assert_close(ab, ba, rtol=1e-5, atol=1e-5)  # (W + a) + b vs (W + b) + a: fp32 rounding only
    assert differs(ab, tiny(comfy, [a], seed=4)) and differs(ab, tiny(comfy, [b], seed=4))
    # The patched weights, modulation tables included, are restored when the plain model runs next.
    after = tiny(comfy, seed=8, prefix="after_lora")
    comfy.free()
    fresh = tiny(comfy, seed=8, prefix="fresh_load")
    assert torch.equal(after, fresh)


@pytest.mark.every_comfyui
def test_unpruned_model_equals_stock_loader_bit_for_bit(comfy, files):
    def run(loader, loras=()):
        g, save = sample_graph(loader, model_patches=list(loras), positive=POS, negative=NEG, steps=2, seed=9)
        return run_latent(comfy, g, save)

    ours = run(stock_loader(STOCK_TEACHER), [pare_lora(files["stock"], 0.6)])
    stock = run(stock_loader(STOCK_TEACHER), [stock_lora(files["stock"], 0.6)])
    assert differs(ours, run(stock_loader(STOCK_TEACHER)))
    assert torch.equal(ours, stock)
    assert torch.equal(run(pare_loader(STOCK_TEACHER), [pare_lora(files["stock"], 0.6)]), stock)
    # diffusers names: ours applies them, stock 0.3.75 does not map them (its output stays the plain model's)
    assert torch.equal(run(stock_loader(STOCK_TEACHER), [pare_lora(files["stock_diffusers"], 0.6)]), stock)


@pytest.mark.every_comfyui
def test_modulation_diff_is_applied_and_equals_hand_merged_weights(comfy, files):
    dm, loras = comfy.base / "models" / "diffusion_models", comfy.base / "models" / "loras"
    strength = 0.5
    sd, meta = load_checkpoint(dm / STUDENT)
    for key, d in diff_tensors(loras / files["mod_only"]).items():
        sd[key] = sd[key] + strength * d
    save_checkpoint(dm / "lora_tiny_student_mod_merged.safetensors", sd, meta)

    base = tiny(comfy)
    ours = tiny(comfy, [pare_lora(files["mod_only"], strength)])
    reference = tiny(comfy, model="lora_tiny_student_mod_merged.safetensors")
    assert differs(ours, base)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    # What the node fixes: stock 0.3.75 accepts these patches but never merges them.
    assert torch.equal(tiny(comfy, [stock_lora(files["mod_only"], strength)]), base)


def diff_tensors(path: Path) -> dict[str, torch.Tensor]:
    """{state-dict key: delta} of a LoRA file holding only ``diffusion_model.<key>.diff`` tensors."""
    return {k[len("diffusion_model."):-len(".diff")]: v for k, v in load_file(str(path)).items()}


def test_unmatched_keys_are_named_in_one_warning(comfy, files):
    out = tiny(comfy, [pare_lora(files["junk_keys"])])
    assert torch.equal(out, tiny(comfy, [pare_lora(files["diffusion_model"])]))
    lines = [ln for ln in comfy.log_text().splitlines() if "match no Wan module" in ln]
    assert len(lines) == 1 and "5 key(s)" in lines[0] and "lora_te_text_model_encoder_layers_0_mlp_fc1" in lines[0]


def test_bad_files_fail_clearly_and_server_keeps_serving(comfy, files):
    loras = comfy.base / "models" / "loras"
    save_atomic(loras / "bad_lora_14b.safetensors", {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 5120),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(5120, 4)}, {"format": "pt"})
    data = (loras / files["diffusion_model"]).read_bytes()
    (loras / "bad_lora_truncated.safetensors").write_bytes(data[: len(data) // 2])
    teacher, _ = load_checkpoint(comfy.base / "models" / "diffusion_models" / TEACHER)
    save_atomic(loras / "bad_lora_is_a_model.safetensors",
                {k: teacher[k] for k in list(teacher)[:6]}, {"format": "pt"})
    cases = {
        "bad_lora_14b.safetensors": ["Wan2.1 14B", "blocks.0.self_attn.q.lora_down.weight", "dim 256"],
        "bad_lora_truncated.safetensors": ["truncated"],
        "bad_lora_is_a_model.safetensors": ["not a LoRA file", "model checkpoint"],
    }
    for name, must in cases.items():
        with pytest.raises(PromptError) as err:
            tiny(comfy, [pare_lora(name)], steps=1)
        message = str(err.value)
        assert message.startswith("PARELoraLoader failed") and name in message, message
        assert all(m in message for m in must), message
        assert torch.isfinite(tiny(comfy, [pare_lora(files["no_mod"])], steps=1, seed=len(name))).all()


def test_node_listed_with_tooltips(comfy):
    info = comfy.object_info()
    assert "PARELoraLoader" in info, comfy.log_tail()
    node = info["PARELoraLoader"]
    assert node["display_name"] == "PARE LoRA Loader (pruned Wan)" and node["category"] == "PARE/lora"
    assert node["description"]
    inputs = node["input"]["required"]
    assert set(inputs) == {"model", "lora_name", "strength_model"}
    for name, spec in inputs.items():
        assert spec[1].get("tooltip"), f"PARELoraLoader.{name} has no tooltip"
    assert inputs["strength_model"][1]["default"] == 1.0 and inputs["strength_model"][1]["min"] == -100
