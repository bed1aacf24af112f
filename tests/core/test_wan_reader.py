"""The checkpoint reader: every release layout reads as the same model, prunes to the same student, streams.

The files are written with each release's real key names (``layouts.py``) at reduced size. Students are compared
bit for bit: a layout may change names, sharding and prefixes, never a tensor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from helpers import write_plan
from layouts import dequantize, scale_to_fp8, to_diffusers, write_original, write_sharded
from safetensors import safe_open

from comfyui_pare.__main__ import main
from comfyui_pare.errors import PareFileError, PareFormatError
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.safetensors_io import read_header, save_atomic
from comfyui_pare.surgery import PrunePlan, prune_state_dict
from comfyui_pare.wan import WanDims
from comfyui_pare.wan_reader import open_wan
from training.tiny import random_wan_state_dict

# Head dim 128 (what a file without PARE metadata is read with), small everything else.
T2V = WanDims(dim=256, num_heads=2, ffn_dim=96, num_layers=2, text_dim=32)
I2V = WanDims(dim=256, num_heads=2, ffn_dim=96, num_layers=2, text_dim=32, in_dim=36, variant="i2v")
WAN22_I2V_EXPERT = WanDims(dim=256, num_heads=2, ffn_dim=96, num_layers=2, text_dim=32, in_dim=36)  # no CLIP branch
PLAN = [{"heads": [1], "ffn": list(range(0, 96, 3))}, {"ffn": [5, 7, 90]}]


def _write(kind: str, root: Path, sd: dict) -> tuple[Path, str]:
    """Write ``sd`` (original layout) as release ``kind``; (path to open, the layout the reader must report)."""
    if kind == "original":
        return write_original(root / "wan.safetensors", sd), "original"
    if kind == "model.diffusion_model.":
        return write_original(root / "wan.safetensors", sd, prefix=kind), "comfyui-prefixed"
    if kind == "diffusion_model.":
        return write_original(root / "wan.safetensors", sd, prefix=kind), "comfyui-prefixed"
    if kind == "sharded-index":
        return write_sharded(root / "Wan2.1-T2V-14B", sd), "original-sharded"
    if kind == "sharded-folder":
        write_sharded(root / "Wan2.1-T2V-14B", sd)
        return root / "Wan2.1-T2V-14B", "original-sharded"
    if kind == "sharded-one-shard":  # what a user picks in a file list: a shard, with its index beside it
        write_sharded(root / "high_noise_model", sd)
        return root / "high_noise_model" / "diffusion_pytorch_model-00002-of-00003.safetensors", "original-sharded"
    if kind == "diffusers":
        return write_original(root / "diffusion_pytorch_model.safetensors", to_diffusers(sd)), "diffusers"
    if kind == "diffusers-pipeline":  # Wan2.1-T2V-1.3B-Diffusers: model_index.json + transformer/ shards
        (root / "pipe").mkdir()
        (root / "pipe" / "model_index.json").write_text("{}")
        write_sharded(root / "pipe" / "transformer", to_diffusers(sd), shards=2)
        return root / "pipe", "diffusers-sharded"
    raise AssertionError(kind)


LAYOUTS = ["original", "model.diffusion_model.", "diffusion_model.", "sharded-index", "sharded-folder",
           "sharded-one-shard", "diffusers", "diffusers-pipeline"]
SCALED_LAYOUTS = ["original", "model.diffusion_model.", "sharded-index"]


def _raw(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-for-bit equal, whatever the dtype (fp8 included)."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def _prune(teacher: Path, out: Path, plan: Path) -> dict[str, torch.Tensor]:
    assert main(["prune", "--no-align", "--teacher", str(teacher), "--plan", str(plan), "--out", str(out)]) == 0
    return _raw(out)


@pytest.fixture(scope="module")
def teacher_sd():
    return random_wan_state_dict(T2V, seed=7, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def reference(teacher_sd, tmp_path_factory):
    """The student of the original-layout file (plain and fp8_scaled): what every other layout must give."""
    root = tmp_path_factory.mktemp("ref")
    plan = write_plan(root / "plan.json", PLAN)
    plain = _prune(write_original(root / "plain.safetensors", teacher_sd), root / "s.safetensors", plan)
    scaled = scale_to_fp8(teacher_sd)
    scaled_student = _prune(write_original(root / "scaled.safetensors", scaled), root / "ss.safetensors", plan)
    return {"plan": plan, "plain": plain, "scaled": scaled, "scaled_student": scaled_student}


@pytest.mark.parametrize("kind", LAYOUTS)
def test_every_layout_reads_as_the_original_and_prunes_to_the_same_student(kind, teacher_sd, reference, tmp_path):
    path, layout = _write(kind, tmp_path, teacher_sd)
    with open_wan(path) as r:
        assert r.layout == layout and not r.scaled_fp8
        assert r.meta == PrunedWanMeta.teacher(T2V)
        assert r.keys() == list(r.meta.expected_shapes())
        _same(r.state_dict(dequantize=False), teacher_sd)
    _same(_prune(path, tmp_path / "student.safetensors", reference["plan"]), reference["plain"])


@pytest.mark.parametrize("kind", SCALED_LAYOUTS)
def test_fp8_scaled_layouts_prune_to_a_scaled_student(kind, reference, tmp_path):
    scaled = reference["scaled"]
    path, layout = _write(kind, tmp_path, scaled)
    with open_wan(path) as r:
        assert r.layout == layout and r.scaled_fp8 and r.scaled_fp8_dtype == torch.float8_e4m3fn
        assert "scaled_fp8" not in r.keys() and not any(k.endswith("scale_weight") for k in r.keys())
        _same(r.state_dict(dequantize=False), scaled)
        key = "blocks.1.ffn.2.weight"
        assert r.tensor(key).dtype == torch.float8_e4m3fn
        assert torch.equal(r.scale(key), scaled["blocks.1.ffn.2.scale_weight"])
        assert torch.equal(r.dequantized(key), scaled[key].float() * scaled["blocks.1.ffn.2.scale_weight"])
        assert r.scale("blocks.1.ffn.2.bias") is None
    student = _prune(path, tmp_path / "student.safetensors", reference["plan"])
    _same(student, reference["scaled_student"])


def test_scaled_student_keeps_fp8_rows_their_scales_and_the_marker(reference):
    """Checked against plain indexing of the scaled teacher, and against pruning the dequantized teacher."""
    scaled, student = reference["scaled"], reference["scaled_student"]
    rows = list(range(128, 256))  # block 0 keeps head 1 of 2 (head dim 128)
    neurons = list(range(0, 96, 3))
    t = scaled
    assert torch.equal(student["blocks.0.self_attn.q.weight"].view(torch.uint8),
                       t["blocks.0.self_attn.q.weight"].view(torch.uint8)[rows])
    assert torch.equal(student["blocks.0.self_attn.o.weight"].view(torch.uint8),
                       t["blocks.0.self_attn.o.weight"].view(torch.uint8)[:, rows])
    assert torch.equal(student["blocks.0.ffn.2.weight"].view(torch.uint8),
                       t["blocks.0.ffn.2.weight"].view(torch.uint8)[:, neurons])
    for key in [k for k in t if k.endswith((".scale_weight", ".scale_input"))]:
        assert student[key].shape == () and torch.equal(student[key], t[key]), key
    assert student["scaled_fp8"].dtype == torch.float8_e4m3fn and student["scaled_fp8"].numel() == 0
    expected, _ = prune_state_dict(dequantize(scaled), PrunedWanMeta.teacher(T2V), PrunePlan.from_json({"blocks": PLAN}))
    ours = dequantize(student)
    assert ours.keys() == expected.keys() and all(torch.equal(ours[k], expected[k]) for k in ours)


@pytest.mark.parametrize("dims,kind,scaled", [(I2V, "original", False), (I2V, "original", True),
                                              (WAN22_I2V_EXPERT, "sharded-folder", False),
                                              (WAN22_I2V_EXPERT, "sharded-index", True)])
def test_i2v_and_wan22_expert_files(dims, kind, scaled, tmp_path):
    """Wan2.1 I2V (CLIP branch) and a Wan2.2 I2V-A14B expert (in_dim 36, no CLIP branch): same reader, same keys."""
    sd = random_wan_state_dict(dims, seed=3, dtype=torch.bfloat16)
    stored = scale_to_fp8(sd) if scaled else sd
    path, _ = _write(kind, tmp_path, stored)
    with open_wan(path) as r:
        assert r.meta.dims == dims and r.scaled_fp8 == scaled
        _same(r.state_dict(dequantize=False), stored)


def test_inspect_reports_layout_and_fp8_scaled(reference, tmp_path, capsys):
    path, _ = _write("model.diffusion_model.", tmp_path, reference["scaled"])
    assert main(["inspect", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["file"]["layout"] == "comfyui-prefixed" and info["file"]["scaled_fp8"] is True
    assert info["file"]["scaled_fp8_dtype"] == "float8_e4m3fn" and info["file"]["scaled_weights"] == 2 * 10 + 6
    assert info["teacher"]["head_dim"] == 128 and not info["pruned"]
    student = tmp_path / "student.safetensors"
    _prune(path, student, reference["plan"])
    assert main(["inspect", str(student)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pruned"] and info["file"] == {**info["file"], "layout": "original", "scaled_fp8": True}


# -- bad inputs --------------------------------------------------------------------------------------------------

def test_bad_layouts_fail_naming_the_file_and_key(teacher_sd, reference, tmp_path):
    index = write_sharded(tmp_path / "sharded", teacher_sd)
    shard = tmp_path / "sharded" / "diffusion_pytorch_model-00002-of-00003.safetensors"
    lone = tmp_path / "lone"
    lone.mkdir()
    os.link(shard, lone / shard.name)
    with pytest.raises(PareFileError, match=r"shard 2 of 3 .* no .*index\.json"):
        open_wan(lone / shard.name)
    obj = json.loads(index.read_text())
    obj["weight_map"]["blocks.9.ffn.0.weight"] = shard.name
    bad_index = tmp_path / "sharded" / "bad.safetensors.index.json"
    bad_index.write_text(json.dumps(obj))
    with pytest.raises(PareFormatError, match=r"bad\.safetensors\.index\.json.*'blocks\.9\.ffn\.0\.weight'"):
        open_wan(bad_index)
    with pytest.raises(PareFileError, match="several index files"):
        open_wan(tmp_path / "sharded")
    shard.unlink()
    with pytest.raises(PareFileError, match=r"shard 'diffusion_pytorch_model-00002-of-00003\.safetensors' is missing"):
        open_wan(index)
    (tmp_path / "notjson.safetensors.index.json").write_text("{")
    with pytest.raises(PareFileError, match="not a valid safetensors index"):
        open_wan(tmp_path / "notjson.safetensors.index.json")

    scaled = dict(reference["scaled"])
    no_marker = {k: v for k, v in scaled.items() if k != "scaled_fp8"}
    save_atomic(tmp_path / "no_marker.safetensors", no_marker, {})
    with pytest.raises(PareFormatError, match=r"no_marker\.safetensors: '[a-z_.0-9]+\.scale_weight' is an fp8 scale.*neither "
                                              r"a 'scaled_fp8' marker nor a quantization config"):
        open_wan(tmp_path / "no_marker.safetensors")
    per_row = {**scaled, "blocks.0.ffn.0.scale_weight": torch.ones(96, 1)}
    save_atomic(tmp_path / "per_row.safetensors", per_row, {})
    with pytest.raises(PareFormatError, match=r"'blocks\.0\.ffn\.0\.scale_weight' has shape \[96, 1\]"):
        open_wan(tmp_path / "per_row.safetensors")
    orphan = {**scaled, "blocks.0.nothing.scale_weight": torch.ones(())}
    save_atomic(tmp_path / "orphan.safetensors", orphan, {})
    with pytest.raises(PareFormatError, match=r"'blocks\.0\.nothing\.scale_weight' scales a weight"):
        open_wan(tmp_path / "orphan.safetensors")
    save_atomic(tmp_path / "mixed.safetensors", teacher_sd, {"_quantization_metadata": "{}"})
    with pytest.raises(PareFormatError, match=r"mixed\.safetensors: header '_quantization_metadata' is not a JSON "
                                              r"object with 'layers'"):
        open_wan(tmp_path / "mixed.safetensors")
    nvfp4 = {"format_version": "1.0", "layers": {"blocks.0.ffn.0": {"format": "nvfp4"}}}
    save_atomic(tmp_path / "nvfp4.safetensors", teacher_sd, {"_quantization_metadata": json.dumps(nvfp4)})
    with pytest.raises(PareFormatError, match=r"layer 'blocks\.0\.ffn\.0'.*format 'nvfp4' is not one PARE can prune"):
        open_wan(tmp_path / "nvfp4.safetensors")
    both = {**scaled, "blocks.0.ffn.0.comfy_quant": torch.tensor(list(b'{"format": "float8_e4m3fn"}'),
                                                                 dtype=torch.uint8)}
    save_atomic(tmp_path / "both.safetensors", both, {})
    with pytest.raises(PareFormatError, match=r"both\.safetensors: mixes ComfyUI's two scaled fp8 layouts"):
        open_wan(tmp_path / "both.safetensors")
    diffusers = to_diffusers(teacher_sd)
    diffusers["blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(2, 256)
    save_atomic(tmp_path / "dif.safetensors", diffusers, {})
    with pytest.raises(PareFormatError, match=r"unexpected tensor.*'blocks\.0\.attn1\.to_q\.lora_A\.weight'"):
        open_wan(tmp_path / "dif.safetensors")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        write_original(two / name, teacher_sd)
    with pytest.raises(PareFileError, match="2 .safetensors files and no index"):
        open_wan(two)


def test_prune_refuses_to_overwrite_its_teacher(teacher_sd, reference, tmp_path, capsys):
    path = write_original(tmp_path / "t.safetensors", teacher_sd)
    before = path.read_bytes()
    assert main(["prune", "--teacher", str(path), "--plan", str(reference["plan"]), "--out", str(path)]) == 2
    assert "teacher file itself" in capsys.readouterr().err and path.read_bytes() == before


# -- written files ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_mode_the_umask_gives(umask, teacher_sd, reference, tmp_path):
    old = os.umask(umask)
    try:
        save_atomic(tmp_path / "a.safetensors", {"w": torch.zeros(2)}, {})
        student = tmp_path / "s.safetensors"
        _prune(write_original(tmp_path / "t.safetensors", teacher_sd), student, reference["plan"])
        probe = tmp_path / "probe"
        probe.open("w").close()  # what open() gives
    finally:
        os.umask(old)
    want = probe.stat().st_mode & 0o777
    assert want == 0o666 & ~umask
    for f in ("a.safetensors", "t.safetensors", "s.safetensors"):
        assert (tmp_path / f).stat().st_mode & 0o777 == want, f
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "probe", "s.safetensors", "t.safetensors"]


def test_streaming_writer_output_is_a_valid_safetensors_file(tmp_path):
    """safetensors' own reader accepts it (offsets, alignment, metadata), for every dtype a model file has."""
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2).half(),
               "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn), "e5m2": torch.randn(3).to(torch.float8_e5m2),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, dtype=torch.float8_e4m3fn),
               "i64": torch.arange(3)}
    save_atomic(tmp_path / "x.safetensors", tensors, {"k": "v"})
    _same(_raw(tmp_path / "x.safetensors"), tensors)
    entries, meta = read_header(tmp_path / "x.safetensors")
    assert meta == {"k": "v"}
    for key, e in entries.items():
        assert e["data_offsets"][0] % tensors[key].element_size() == 0, key


# -- memory --------------------------------------------------------------------------------------------------------

MEMORY_PROBE = r"""
import json, math, sys
import torch
torch.set_num_threads(1)
from comfyui_pare.surgery import PrunePlan, prune_file
from comfyui_pare.wan_reader import open_wan

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

teacher, plan, out = sys.argv[1:4]
plan = PrunePlan.load(plan)
with open_wan(teacher) as reader:
    largest = max(math.prod(reader.shape(k)) * reader.dtype(k).itemsize for k in reader.keys())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size to the current one
    base = status("VmRSS")
    prune_file(reader, plan, out)
    peak = status("VmHWM")
print(json.dumps({"peak_over_baseline": peak - base, "largest_tensor": largest}))
"""


def test_prune_streams_with_peak_memory_near_one_tensor(tmp_path):
    """A 144 MB teacher (8 blocks of 16 MB, largest tensor 6.3 MB): prune's resident peak above its baseline stays
    within a few of its largest tensors, measured as the process's peak resident size (VmHWM, reset first)."""
    dims = WanDims(dim=512, num_heads=4, ffn_dim=2048, num_layers=8, text_dim=256)
    teacher = tmp_path / "teacher.safetensors"
    write_original(teacher, random_wan_state_dict(dims, seed=1))
    size = teacher.stat().st_size
    plan = write_plan(tmp_path / "plan.json", [{"heads": [0, 2], "ffn": list(range(0, 2048, 2))}] * dims.num_layers)
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(teacher), str(plan), str(tmp_path / "s.safetensors")],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    peak, largest = result["peak_over_baseline"], result["largest_tensor"]
    assert largest == 6 * 512 * 512 * 4 and size > 90e6  # time_projection.1 is the largest tensor here
    assert peak < 3 * largest + 8e6, f"prune peaked at {peak / 1e6:.1f} MB over its baseline for a {size / 1e6:.0f} MB file"
    with open_wan(tmp_path / "s.safetensors") as r:
        assert r.meta.blocks[0].heads == (0, 2) and r.shape("blocks.7.ffn.2.weight") == (512, 1024)
