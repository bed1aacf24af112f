"""The pruned-checkpoint format and the surgery, without ComfyUI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from helpers import write_plan

from comfyui_pare import safetensors_io
from comfyui_pare.errors import PareFileError, PareFormatError
from comfyui_pare.pruned import FORMAT_VERSION, WIDTH_ONLY_VERSION, PrunedWanMeta, save_checkpoint
from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.surgery import PrunePlan, prune_state_dict
from comfyui_pare.wan import WanDims
from comfyui_pare.wan_reader import load_checkpoint, read_meta
from training.tiny import TINY_I2V, TINY_T2V, random_wan_state_dict

PLAIN = WanDims(dim=256, num_heads=2, ffn_dim=64, num_layers=2, text_dim=32)


@pytest.fixture
def teacher():
    return random_wan_state_dict(TINY_T2V, seed=0), PrunedWanMeta.teacher(TINY_T2V)


def plan_of(blocks):
    return PrunePlan.from_json({"blocks": blocks})


def test_zero_pruned_plan_reproduces_every_tensor(teacher):
    sd, meta = teacher
    d = TINY_T2V
    full = [{"heads": list(range(d.num_heads)), "ffn": list(range(d.ffn_dim))} for _ in range(d.num_layers)]
    out, out_meta = prune_state_dict(sd, meta, plan_of(full))
    assert out_meta == meta and not out_meta.is_pruned
    assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)


def test_head_and_ffn_slices_are_the_right_rows_and_columns(teacher):
    sd, meta = teacher
    hd = TINY_T2V.head_dim
    blocks = [{}] * TINY_T2V.num_layers
    blocks = [*blocks[:2], {"heads": [1, 6], "ffn": [3, 10, 500]}, *blocks[3:]]
    out, m = prune_state_dict(sd, meta, plan_of(blocks))
    rows = list(range(hd, 2 * hd)) + list(range(6 * hd, 7 * hd))
    for n in ("q", "k", "v"):
        assert torch.equal(out[f"blocks.2.self_attn.{n}.weight"], sd[f"blocks.2.self_attn.{n}.weight"][rows])
        assert torch.equal(out[f"blocks.2.self_attn.{n}.bias"], sd[f"blocks.2.self_attn.{n}.bias"][rows])
    assert torch.equal(out["blocks.2.self_attn.norm_q.weight"], sd["blocks.2.self_attn.norm_q.weight"][rows])
    assert torch.equal(out["blocks.2.self_attn.o.weight"], sd["blocks.2.self_attn.o.weight"][:, rows])
    assert torch.equal(out["blocks.2.self_attn.o.bias"], sd["blocks.2.self_attn.o.bias"])
    assert torch.equal(out["blocks.2.ffn.0.weight"], sd["blocks.2.ffn.0.weight"][[3, 10, 500]])
    assert torch.equal(out["blocks.2.ffn.2.weight"], sd["blocks.2.ffn.2.weight"][:, [3, 10, 500]])
    assert torch.equal(out["blocks.2.cross_attn.q.weight"], sd["blocks.2.cross_attn.q.weight"])
    assert m.blocks[2].heads == (1, 6) and m.blocks[2].ffn == (3, 10, 500)
    assert sd["blocks.2.self_attn.q.weight"].shape[0] == TINY_T2V.dim, "input must not be modified"


def test_pruning_twice_equals_pruning_once(teacher):
    sd, meta = teacher
    n = TINY_T2V.num_layers
    first = [{"heads": [0, 1, 2, 5, 7], "ffn": list(range(0, 512, 2))}] * n
    second = [{"heads": [1, 5], "ffn": list(range(0, 512, 4))}] * n
    a, am = prune_state_dict(*prune_state_dict(sd, meta, plan_of(first)), plan_of(second))
    b, bm = prune_state_dict(sd, meta, plan_of(second))
    assert am == bm and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("blocks,message", [
    ([{}] * 5, "plan has 5 block entries but the model has 6"),
    ([{"heads": [9]}] + [{}] * 5, "index 9 is out of range [0, 7]"),
    ([{"heads": [1, 1]}] + [{}] * 5, "duplicate"),
    ([{"heads": []}] + [{}] * 5, "keeps nothing"),
    ([{"ffn": [0], "attn": [1]}] + [{}] * 5, "unknown key"),
    ([{"ffn": "all"}] + [{}] * 5, "list of integers"),
])
def test_bad_plans_are_named(teacher, blocks, message):
    sd, meta = teacher
    with pytest.raises(PareFormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        prune_state_dict(sd, meta, plan_of(blocks))


def test_keeping_an_already_pruned_head_is_refused(teacher):
    sd, meta = teacher
    n = TINY_T2V.num_layers
    sd2, meta2 = prune_state_dict(sd, meta, plan_of([{"heads": [0, 1]}] * n))
    with pytest.raises(PareFormatError, match="index 2 was already pruned"):
        prune_state_dict(sd2, meta2, plan_of([{"heads": [2]}] * n))


def test_roundtrip_and_plain_files(tmp_path, teacher):
    sd, meta = teacher
    path = tmp_path / "t.safetensors"
    save_checkpoint(path, sd, meta)
    sd2, meta2 = load_checkpoint(path)
    assert meta2 == meta and all(torch.equal(sd[k], sd2[k]) for k in sd)
    header = json.loads(safetensors_io.read_header(path)[1]["pare"])
    assert header["format_version"] == WIDTH_ONLY_VERSION and header["teacher"]["head_dim"] == 32
    # A plain Wan2.1 file (no PARE metadata, any tool prefix) is a 0%-pruned teacher with head dim 128.
    plain = random_wan_state_dict(PLAIN)
    save_atomic(tmp_path / "plain.safetensors", {f"model.diffusion_model.{k}": v for k, v in plain.items()}, {})
    sd3, meta3 = load_checkpoint(tmp_path / "plain.safetensors")
    assert meta3 == PrunedWanMeta.teacher(PLAIN) and sd3.keys() == plain.keys()


def test_i2v_variant_is_detected(tmp_path):
    save_atomic(tmp_path / "i2v.safetensors", random_wan_state_dict(
        WanDims(dim=128, num_heads=1, ffn_dim=32, num_layers=1, text_dim=16, in_dim=36, variant="i2v")), {})
    assert read_meta(tmp_path / "i2v.safetensors")[0].dims.variant == "i2v"
    save_checkpoint(tmp_path / "tiny_i2v.safetensors", random_wan_state_dict(TINY_I2V), PrunedWanMeta.teacher(TINY_I2V))
    assert read_meta(tmp_path / "tiny_i2v.safetensors")[0].dims == TINY_I2V


def test_validation_names_the_key_and_shapes(tmp_path, teacher):
    sd, meta = teacher
    bad = dict(sd)
    bad["blocks.3.ffn.2.weight"] = bad["blocks.3.ffn.2.weight"][:, :100]
    save_atomic(tmp_path / "a.safetensors", bad, meta.to_header())
    with pytest.raises(PareFormatError, match=r"'blocks.3.ffn.2.weight' has shape \[256, 100\], expected \[256, 512\]"):
        read_meta(tmp_path / "a.safetensors")
    missing = {k: v for k, v in sd.items() if k != "blocks.5.self_attn.norm_k.weight"}
    save_atomic(tmp_path / "b.safetensors", missing, meta.to_header())
    with pytest.raises(PareFormatError, match="missing.*blocks.5.self_attn.norm_k.weight"):
        read_meta(tmp_path / "b.safetensors")
    save_atomic(tmp_path / "c.safetensors", {**sd, "blocks.0.extra.weight": torch.zeros(2)}, meta.to_header())
    with pytest.raises(PareFormatError, match="unexpected.*blocks.0.extra.weight"):
        read_meta(tmp_path / "c.safetensors")
    save_atomic(tmp_path / "d.safetensors", {**sd, "head.modulation": torch.zeros(1, 2, 256, dtype=torch.int32)},
                meta.to_header())
    with pytest.raises(PareFormatError, match="'head.modulation' has dtype I32"):
        read_meta(tmp_path / "d.safetensors")
    newer = json.loads(meta.to_header()["pare"]) | {"format_version": FORMAT_VERSION + 1}
    save_atomic(tmp_path / "e.safetensors", sd, {"pare": json.dumps(newer)})
    with pytest.raises(PareFormatError, match="newer than this pack supports"):
        read_meta(tmp_path / "e.safetensors")


def test_unsafe_and_broken_files_are_refused(tmp_path, teacher):
    sd, meta = teacher
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, sd, meta)
    (tmp_path / "x.ckpt").write_bytes(good.read_bytes())
    with pytest.raises(PareFileError, match="refusing a pickle checkpoint"):
        read_meta(tmp_path / "x.ckpt")
    (tmp_path / "zip.safetensors").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(PareFileError, match="pickle/zip PyTorch checkpoint"):
        read_meta(tmp_path / "zip.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-10])
    with pytest.raises(PareFileError, match="truncated"):
        read_meta(tmp_path / "cut.safetensors")
    with pytest.raises(PareFileError, match="no such file"):
        read_meta(tmp_path / "nope.safetensors")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, teacher, monkeypatch):
    sd, meta = teacher
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, sd, meta)
    before = path.read_bytes()

    real_write = safetensors_io.StreamingWriter.write
    written = []

    def boom(self, key, tensor):  # the disk fills up after a few tensors
        written.append(key)
        if len(written) > 3:
            raise OSError("disk full")
        real_write(self, key, tensor)

    monkeypatch.setattr(safetensors_io.StreamingWriter, "write", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, sd, meta)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"], "temporary file left behind"


def test_cli_prune_and_inspect(tmp_path, teacher):
    sd, meta = teacher
    save_checkpoint(tmp_path / "t.safetensors", sd, meta)
    blocks = [{"heads": [0, 3, 4]}, {"ffn": list(range(64))}] + [{}] * 4
    plan = write_plan(tmp_path / "plan.json", blocks)
    run = [sys.executable, "-m", "comfyui_pare"]
    subprocess.run([*run, "prune", "--teacher", str(tmp_path / "t.safetensors"), "--plan", str(plan),
                    "--out", str(tmp_path / "s.safetensors"), "--no-align"], check=True, cwd=REPO)
    proc = subprocess.run([*run, "inspect", str(tmp_path / "s.safetensors")], capture_output=True, text=True,
                          cwd=REPO, check=True)
    info = json.loads(proc.stdout)
    assert info["pruned"] and info["teacher"]["head_dim"] == 32 and info["variant"] == "t2v"
    assert [(b["heads"], b["ffn"]) for b in info["blocks"][:3]] == [(3, 512), (8, 64), (8, 512)]
    assert info["blocks"][0]["kept_heads"] == [0, 3, 4]
    # 3 heads of 32 = 96 channels: off the tensor-core grain, which the loader pads to 4 heads (128)
    assert not info["alignment"]["aligned"] and info["alignment"]["unaligned"] == ["block 0 self-attention 96"]
    assert info["alignment"]["loaded_widths"][0] == {"self_attention": 128, "heads": 4, "ffn": 512}
    # By default prune rounds up instead, keeping the lowest-numbered dropped head too
    subprocess.run([*run, "prune", "--teacher", str(tmp_path / "t.safetensors"), "--plan", str(plan),
                    "--out", str(tmp_path / "a.safetensors")], check=True, cwd=REPO)
    aligned = json.loads(subprocess.run([*run, "inspect", str(tmp_path / "a.safetensors")], capture_output=True,
                                        text=True, cwd=REPO, check=True).stdout)
    assert aligned["blocks"][0]["kept_heads"] == [0, 1, 3, 4] and aligned["alignment"]["aligned"]
    bad = subprocess.run([*run, "prune", "--teacher", str(tmp_path / "t.safetensors"), "--plan",
                          str(write_plan(tmp_path / "bad.json", blocks[:2])), "--out", str(tmp_path / "o.safetensors")],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "plan has 2 block entries but the model has 6" in bad.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_compute_reports_ratios_against_the_teacher(tmp_path, teacher):
    sd, meta = teacher
    n = TINY_T2V.num_layers
    student, smeta = prune_state_dict(sd, meta, plan_of([{"heads": [0, 1, 2, 3], "ffn": list(range(128))}] * n))
    save_checkpoint(tmp_path / "s.safetensors", student, smeta)
    proc = subprocess.run([sys.executable, "-m", "comfyui_pare", "compute", str(tmp_path / "s.safetensors"),
                           "--frames", "81", "--height", "480", "--width", "832"],
                          capture_output=True, text=True, cwd=REPO, check=True)
    info = json.loads(proc.stdout)
    assert info["tokens"] == 32760
    parts = info["parts"]
    assert parts["attn_core"]["ratio"] == pytest.approx(0.5) and parts["self_attn_proj"]["ratio"] == pytest.approx(0.5)
    assert parts["ffn"]["ratio"] == pytest.approx(0.25) and parts["cross_attn"]["ratio"] == pytest.approx(1.0)
    assert 0.25 < info["per_step_block_gmacs"]["ratio"] < 1.0


@pytest.mark.parametrize("magic", [b"\x80", b"PK"])
def test_safetensors_whose_header_length_looks_like_a_pickle_magic_still_loads(tmp_path, magic):
    """The first 8 bytes are the header length; 0x80 or 'PK' there is a coincidence, not a pickle."""
    path = tmp_path / "m.safetensors"
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    for pad in range(0, 40000, 8):
        save_atomic(path, tensors, {"pad": "x" * pad})
        if path.read_bytes()[: len(magic)] == magic:
            break
    else:
        pytest.fail("could not construct the header length")
    entries, metadata = safetensors_io.read_header(path)
    assert entries["w"]["shape"] == [2, 3] and len(metadata["pad"]) == pad
    assert torch.equal(safetensors_io.load_tensors(path)[0]["w"], tensors["w"])
