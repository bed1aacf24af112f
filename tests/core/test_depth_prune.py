"""Depth pruning (VDMini-style block removal) in the core: the pruned format's ``kept_blocks``, the surgery's
renumbering, the training-side model, and a teacher LoRA renumbered onto the student. No ComfyUI here; the node
side is in test_depth_comfy.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from comfyui_pare import safetensors_io
from comfyui_pare.errors import PareFormatError
from comfyui_pare.lora import ParsedLora, load_lora_file, merged_deltas, slice_lora
from comfyui_pare.pruned import WIDTH_ONLY_VERSION, PrunedWanMeta, describe, save_checkpoint
from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.surgery import PrunePlan, prune_state_dict
from comfyui_pare.wan import BlockWidth
from comfyui_pare.wan_reader import load_checkpoint, read_meta
from training.model import WanTransformer
from training.tiny import TINY_T2V, random_wan_state_dict

N = TINY_T2V.num_layers  # 6
KEEP = [0, 2, 3, 5]
NARROW = {"heads": [1, 2, 6], "ffn": list(range(0, 512, 3))}  # teacher block 3 is also width-pruned


@pytest.fixture(scope="module")
def teacher():
    return random_wan_state_dict(TINY_T2V, seed=0), PrunedWanMeta.teacher(TINY_T2V)


def depth_plan(keep=KEEP, narrow_block=3, n=N) -> PrunePlan:
    blocks = [NARROW if i == narrow_block else {} for i in range(n)]
    return PrunePlan.from_json({"blocks": blocks, "kept_blocks": list(keep)})


def test_kept_blocks_renumber_keys_and_compose_with_width(teacher):
    sd, meta = teacher
    out, m = prune_state_dict(sd, meta, depth_plan())
    assert m.kept_blocks == tuple(KEEP) and m.num_blocks == 4 and m.is_pruned
    assert {k.split(".")[1] for k in out if k.startswith("blocks.")} == {"0", "1", "2", "3"}
    for i, t in enumerate(KEEP):  # student block i is teacher block t, whole or narrowed
        assert torch.equal(out[f"blocks.{i}.modulation"], sd[f"blocks.{t}.modulation"])
        assert torch.equal(out[f"blocks.{i}.cross_attn.k.weight"], sd[f"blocks.{t}.cross_attn.k.weight"])
    hd = TINY_T2V.head_dim
    rows = [h * hd + c for h in NARROW["heads"] for c in range(hd)]
    assert torch.equal(out["blocks.2.self_attn.q.weight"], sd["blocks.3.self_attn.q.weight"][rows])
    assert torch.equal(out["blocks.2.ffn.2.weight"], sd["blocks.3.ffn.2.weight"][:, NARROW["ffn"]])
    assert m.blocks[2] == BlockWidth(tuple(NARROW["heads"]), tuple(NARROW["ffn"]))
    assert m.blocks[1] == BlockWidth.full(TINY_T2V)
    assert out.keys() == m.expected_shapes().keys()
    info = describe(m)
    assert info["num_blocks"] == 4 and [b["teacher_block"] for b in info["blocks"]] == KEEP
    assert info["kept_heads_fraction"] == pytest.approx((3 * 8 + 3) / (6 * 8))


def test_file_roundtrip_version_and_old_files(tmp_path, teacher):
    sd, meta = teacher
    out, m = prune_state_dict(sd, meta, depth_plan())
    save_checkpoint(tmp_path / "d.safetensors", out, m)
    sd2, m2 = load_checkpoint(tmp_path / "d.safetensors")
    assert m2 == m and all(torch.equal(sd2[k], out[k]) for k in out)
    header = json.loads(safetensors_io.read_header(tmp_path / "d.safetensors")[1]["pare"])
    assert header["format_version"] == 2 and header["kept_blocks"] == KEEP
    # Keeping every block is the width-only case: version 1, no kept_blocks, the same fingerprint as before.
    full, fm = prune_state_dict(sd, meta, depth_plan(keep=range(N), narrow_block=-1))
    assert fm == meta and fm.kept_blocks is None and fm.fingerprint() == meta.fingerprint()
    assert fm.to_json()["format_version"] == WIDTH_ONLY_VERSION and "kept_blocks" not in fm.to_json()
    assert m.fingerprint() != meta.fingerprint()


def test_depth_pruning_twice_equals_once_and_streams_like_in_memory(tmp_path, teacher):
    sd, meta = teacher
    a, am = prune_state_dict(*prune_state_dict(sd, meta, depth_plan()), depth_plan(keep=[2, 5], narrow_block=-1, n=4))
    b, bm = prune_state_dict(sd, meta, depth_plan(keep=[2, 5], narrow_block=-1))
    assert am == bm and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The streaming CLI writes the same file as the in-memory surgery.
    save_checkpoint(tmp_path / "t.safetensors", sd, meta)
    (tmp_path / "plan.json").write_text(json.dumps(depth_plan().to_json()))
    subprocess.run([sys.executable, "-m", "comfyui_pare", "prune", "--teacher", str(tmp_path / "t.safetensors"),
                    "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "s.safetensors"), "--no-align"],
                   check=True, cwd=REPO, capture_output=True)
    streamed, sm = load_checkpoint(tmp_path / "s.safetensors")
    ref, rm = prune_state_dict(sd, meta, depth_plan())
    assert sm == rm and streamed.keys() == ref.keys() and all(torch.equal(streamed[k], ref[k]) for k in ref)


def test_bad_kept_blocks_are_named(tmp_path, teacher):
    sd, meta = teacher
    with pytest.raises(PareFormatError, match="teacher block 7 is out of range"):
        prune_state_dict(sd, meta, depth_plan(keep=[0, 7]))
    with pytest.raises(PareFormatError, match="kept_blocks: has duplicate"):
        PrunePlan.from_json({"blocks": [{}] * N, "kept_blocks": [1, 1]})
    with pytest.raises(PareFormatError, match="unknown plan key"):
        PrunePlan.from_json({"blocks": [{}] * N, "keep_blocks": [1]})
    out, m = prune_state_dict(sd, meta, depth_plan())
    with pytest.raises(PareFormatError, match="teacher block 1 was already removed"):
        prune_state_dict(out, m, depth_plan(keep=[0, 1], n=4))
    # In a file's header: the file and the key are named.
    header = json.loads(m.to_header()["pare"])
    for bad, message in (([0, 2, 3, 9], "kept_blocks: index 9 is out of range"),
                         ([3, 2, 0, 5], "kept_blocks: indices must be sorted"),
                         ([0, 2, 3], "kept_blocks names 3 teacher blocks but 'blocks' lists 4"),
                         ("0-3", "'kept_blocks' must be a list")):
        save_atomic(tmp_path / "bad.safetensors", out, {"pare": json.dumps(header | {"kept_blocks": bad})})
        with pytest.raises(PareFormatError, match=f"bad.safetensors.*{message}"):
            read_meta(tmp_path / "bad.safetensors")
    no_kept = {k: v for k, v in header.items() if k != "kept_blocks"}
    save_atomic(tmp_path / "bad.safetensors", out, {"pare": json.dumps(no_kept)})
    with pytest.raises(PareFormatError, match="lists 4 blocks but the teacher has 6 and there is no 'kept_blocks'"):
        read_meta(tmp_path / "bad.safetensors")


def test_student_forward_equals_teacher_skipping_the_removed_blocks(teacher):
    """The training-side model of a depth-only student is the teacher with the removed blocks as identity."""
    sd, meta = teacher
    out, m = prune_state_dict(sd, meta, depth_plan(narrow_block=-1))
    student, full = WanTransformer.from_state_dict(out, m), WanTransformer.from_state_dict(sd, meta)
    gen = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 16, 3, 8, 8, generator=gen), torch.randn(2, 5, TINY_T2V.text_dim, generator=gen)
    t = torch.tensor([900.0, 250.0])
    mask = torch.tensor([[i in KEEP for i in range(N)]] * 2)
    with torch.no_grad():
        ours, ref, whole = student(x, t, ctx), full(x, t, ctx, block_mask=mask), full(x, t, ctx)
    assert torch.equal(ours, ref)
    assert (ours - whole).abs().max() > 1e-3, "removing blocks must change the output for this to mean anything"


def write_teacher_lora(path, seed: int) -> ParsedLora:
    """A teacher LoRA file on every block (low-rank pairs with bias deltas on the pruned layers, modulation
    diffs) and on the head, in the ``diffusion_model.*`` style; returns it parsed."""
    gen = torch.Generator().manual_seed(seed)
    shapes = PrunedWanMeta.teacher(TINY_T2V).expected_shapes()
    tensors = {}
    for i in range(N):
        for local in ("self_attn.q", "self_attn.o", "ffn.0", "ffn.2", "cross_attn.k"):
            base, w = f"diffusion_model.blocks.{i}.{local}", shapes[f"blocks.{i}.{local}.weight"]
            tensors[f"{base}.lora_up.weight"] = torch.randn(w[0], 4, generator=gen)
            tensors[f"{base}.lora_down.weight"] = torch.randn(4, w[1], generator=gen)
            tensors[f"{base}.alpha"] = torch.tensor(2.0)
            tensors[f"{base}.diff_b"] = torch.randn(w[0], generator=gen)
        tensors[f"diffusion_model.blocks.{i}.modulation.diff"] = torch.randn(shapes[f"blocks.{i}.modulation"],
                                                                             generator=gen)
    tensors["diffusion_model.head.head.diff"] = torch.randn(shapes["head.head.weight"], generator=gen)
    save_atomic(path, tensors, {"format": "pt"})
    return load_lora_file(path)


def test_teacher_lora_renumbered_equals_merge_then_prune(teacher, caplog, tmp_path):
    """Merging the teacher LoRA into the teacher and then pruning gives the same weights as pruning first and
    merging the sliced, renumbered LoRA into the student (exactly: the same deltas, the same fp32 adds)."""
    sd, meta = teacher
    parsed = write_teacher_lora(tmp_path / "teacher_lora.safetensors", seed=3)
    student, m = prune_state_dict(sd, meta, depth_plan())
    with caplog.at_level("INFO", logger="comfyui_pare.lora"):
        sliced = slice_lora(parsed, m)
    assert sorted(sliced.dropped) == sorted(k for k in parsed.patches if k.split(".")[1] in ("1", "4"))
    lines = [r.getMessage() for r in caplog.records if "are not applied" in r.getMessage()]
    assert len(lines) == 1 and "teacher block(s) [1, 4]" in lines[0]
    assert set(sliced.patches) == {f"blocks.{i}.{loc}" for i in range(4) for loc in (
        "self_attn.q", "self_attn.o", "ffn.0", "ffn.2", "cross_attn.k", "modulation")} | {"head.head"}
    assert sliced.narrowed == 4  # student block 2 (teacher 3): q, o, ffn.0, ffn.2

    merged_teacher = dict(sd)
    for k, d in merged_deltas(parsed).items():
        merged_teacher[k] = sd[k] + d
    reference, _ = prune_state_dict(merged_teacher, meta, depth_plan())
    ours = dict(student)
    for k, d in merged_deltas(sliced).items():
        ours[k] = student[k] + d
    changed = [k for k in ours if not torch.equal(ours[k], student[k])]
    assert len(changed) == 4 * 11 + 1
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
