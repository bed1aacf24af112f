"""LoRA core: every key style parses to one canonical form, slicing for a pruned student is exact, bad files error.

How exactness is proven (``test_sliced_lora_matches_pruned_merge``): the teacher weights are arbitrary fp32, but
every low-rank factor holds small dyadic values (k / 8 with |k| <= 8) and the ranks are <= 8, so each entry of
up @ down is a sum of at most 8 multiples of 2**-6 bounded by 8: exactly representable in fp32 whatever the
summation order, blocking or FMA use of the BLAS. The scales (strength 0.5 / 1.0, alpha / rank in {0.5, 1, 2})
are powers of two, so scaling is exact too. Hence the full delta restricted to the kept rows/columns is
bit-identical to the delta built from the sliced factors, and both sides finish with the same single fp32 add
W[i] + delta[i] of identical operands: max abs error 0, asserted with torch.equal. Full ``.diff``/``.diff_b``
tensors are arbitrary Gaussians (elementwise scaling by a power of two commutes with selection exactly).
Separately, ``test_slice_only_selects`` shows on arbitrary (non-dyadic, bf16) tensors that slicing is pure
index selection and keeps dtypes, and ``test_merged_delta_formula`` pins the merge formula itself.
"""

from __future__ import annotations

import logging

import pytest
import torch
from lora_files import STYLES, random_lora, write_style
from safetensors.torch import save_file

from comfyui_pare.__main__ import main
from comfyui_pare.alignment import loaded_meta, pad_lora
from comfyui_pare.errors import PareFileError, PareFormatError
from comfyui_pare.lora import (
    LoraPatch,
    ParsedLora,
    check_lora_base,
    load_lora_file,
    merged_deltas,
    parse_lora,
    slice_lora,
    to_standard_state_dict,
)
from comfyui_pare.pruned import PrunedWanMeta, save_checkpoint
from comfyui_pare.surgery import BlockPlan, PrunePlan, prune_state_dict
from comfyui_pare.wan import WAN21_1_3B, WAN21_14B
from training.tiny import TINY_I2V, TINY_T2V, random_wan_state_dict

PLAN_BLOCKS = {  # block -> (kept heads, kept FFN neurons); None keeps all. Blocks 1 and 4 stay whole.
    0: ((0, 2, 3, 5, 7), tuple(range(0, 512, 2))),
    2: ((1, 6), None),
    3: (None, tuple(j for j in range(512) if j % 5)),
    5: ((0, 1, 2, 3, 4, 5, 6), (3, 17, 100, 511)),
}


def make_plan(dims) -> PrunePlan:
    return PrunePlan(tuple(BlockPlan(*PLAN_BLOCKS.get(i, (None, None))) for i in range(dims.num_layers)))


@pytest.fixture(scope="module", params=[TINY_T2V, TINY_I2V], ids=["t2v", "i2v"])
def setup(request):
    dims = request.param
    teacher = random_wan_state_dict(dims, seed=1)
    meta = PrunedWanMeta.teacher(dims)
    student, student_meta = prune_state_dict(teacher, meta, make_plan(dims))
    return dims, teacher, meta, student, student_meta


def assert_same_patches(a: ParsedLora, b: ParsedLora) -> None:
    assert a.patches.keys() == b.patches.keys()
    for module, pa in a.patches.items():
        pb = b.patches[module]
        assert pa.alpha == pb.alpha, module
        for part in ("up", "down", "diff", "diff_b"):
            ta, tb = getattr(pa, part), getattr(pb, part)
            assert (ta is None) == (tb is None), (module, part)
            if ta is not None:
                assert ta.dtype == tb.dtype and torch.equal(ta, tb), (module, part)


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_sliced_lora_matches_pruned_merge(setup, strength):
    dims, teacher, meta, student, student_meta = setup
    parsed = parse_lora(write_style(random_lora(dims), "diffusion_model"), "full.safetensors")
    check_lora_base(parsed, dims)
    sliced = slice_lora(parsed, student_meta)

    full_delta = merged_deltas(parsed, strength, meta.expected_shapes())
    merged_teacher = {k: teacher[k] + full_delta[k] if k in full_delta else teacher[k] for k in teacher}
    reference, _ = prune_state_dict(merged_teacher, meta, make_plan(dims))

    delta = merged_deltas(sliced, strength, student_meta.expected_shapes())
    assert set(delta) == set(full_delta)  # every patch survives slicing
    assert set(delta) <= set(student)
    for key, w in student.items():
        got = w + delta[key] if key in delta else w
        assert got.shape == reference[key].shape, key
        assert torch.equal(got, reference[key]), f"{key}: max abs err {(got - reference[key]).abs().max()}"


@pytest.mark.parametrize("style", [s for s in STYLES if s != "diffusion_model"])
def test_all_key_styles_parse_alike(setup, style):
    dims = setup[0]
    patches = random_lora(dims, seed=3)
    want = parse_lora(write_style(patches, "diffusion_model"), "ref")
    got = parse_lora(write_style(patches, style), style)
    assert not got.unmatched and not got.ignored
    assert_same_patches(got, want)
    assert len(want.patches) == len(patches)


def test_tricky_underscored_names_resolve():
    sd = {f"lora_unet_{n}.diff": torch.zeros(1) for n in (
        "blocks_0_ffn_0", "blocks_11_cross_attn_norm_k_img", "time_projection_1", "text_embedding_0",
        "head_head", "head_modulation", "blocks_2_modulation", "blocks_3_self_attn_norm_q", "img_emb_proj_4")}
    sd["lora_unet_blocks_0_ffn_1.diff"] = torch.zeros(1)  # ffn.1 is the GELU: no parameters, so no module
    parsed = parse_lora(sd, "t")
    assert sorted(parsed.patches) == sorted([
        "blocks.0.ffn.0", "blocks.11.cross_attn.norm_k_img", "time_projection.1", "text_embedding.0", "head.head",
        "head.modulation", "blocks.2.modulation", "blocks.3.self_attn.norm_q", "img_emb.proj.4"])
    assert parsed.unmatched == ["lora_unet_blocks_0_ffn_1.diff"]


def test_slice_only_selects(setup):
    dims, _, _, _, student_meta = setup
    parsed = parse_lora(write_style(random_lora(dims, seed=5, dyadic=False, dtype=torch.bfloat16), "diffusers"), "x")
    sliced = slice_lora(parsed, student_meta)
    hd = dims.head_dim
    heads, ffn = PLAN_BLOCKS[0]
    rows = torch.tensor([h * hd + c for h in heads for c in range(hd)])
    neurons = torch.tensor(ffn)
    full, cut = parsed.patches, sliced.patches
    assert torch.equal(cut["blocks.0.self_attn.q"].up, full["blocks.0.self_attn.q"].up[rows])
    assert torch.equal(cut["blocks.0.self_attn.q"].down, full["blocks.0.self_attn.q"].down)
    assert torch.equal(cut["blocks.0.self_attn.q"].diff_b, full["blocks.0.self_attn.q"].diff_b[rows])
    assert torch.equal(cut["blocks.0.self_attn.o"].down, full["blocks.0.self_attn.o"].down[:, rows])
    assert torch.equal(cut["blocks.0.self_attn.o"].diff_b, full["blocks.0.self_attn.o"].diff_b)  # o's bias is dim
    assert torch.equal(cut["blocks.0.self_attn.norm_k"].diff, full["blocks.0.self_attn.norm_k"].diff[rows])
    assert torch.equal(cut["blocks.0.ffn.0"].up, full["blocks.0.ffn.0"].up[neurons])
    assert torch.equal(cut["blocks.0.ffn.2"].down, full["blocks.0.ffn.2"].down[:, neurons])
    assert torch.equal(cut["blocks.5.ffn.0"].diff, full["blocks.5.ffn.0"].diff[torch.tensor(PLAN_BLOCKS[5][1])])
    assert torch.equal(cut["blocks.5.ffn.2"].diff, full["blocks.5.ffn.2"].diff[:, torch.tensor(PLAN_BLOCKS[5][1])])
    for module, p in cut.items():
        q = full[module]
        assert p.alpha == q.alpha and p.rank == q.rank  # the scale alpha / rank is untouched
        for part in ("up", "down", "diff", "diff_b"):
            if getattr(p, part) is not None:
                assert getattr(p, part).dtype == torch.bfloat16
        if not module.startswith(("blocks.0.", "blocks.2.", "blocks.3.", "blocks.5.")) or "cross_attn" in module:
            assert p is q  # unpruned blocks, cross-attention, norms, modulation and globals pass through


def test_merged_delta_formula():
    up, down = torch.randn(6, 4), torch.randn(4, 5)
    diff, diff_b = torch.randn(6, 5), torch.randn(6)
    parsed = ParsedLora("t", {"a": LoraPatch("a", up, down, alpha=2.0, diff_b=diff_b),
                              "b": LoraPatch("b", up, down),
                              "c": LoraPatch("c", up, down, alpha=2.0, diff=diff),
                              "blocks.0.modulation": LoraPatch("blocks.0.modulation", diff=diff)})
    d = merged_deltas(parsed, 0.5)
    assert torch.equal(d["a.weight"], (0.5 * (2.0 / 4)) * (up @ down))
    assert torch.equal(d["a.bias"], 0.5 * diff_b)
    assert torch.equal(d["b.weight"], 0.5 * (up @ down))  # no alpha: scale 1, as in ComfyUI
    assert torch.equal(d["c.weight"], 0.5 * diff)  # ComfyUI lets a .diff replace the low-rank pair
    assert torch.equal(d["blocks.0.modulation"], 0.5 * diff)  # modulation is a bare parameter, no ".weight"


def test_standard_layout_round_trip(setup, tmp_path):
    dims, *_, student_meta = setup
    sliced = slice_lora(parse_lora(write_style(random_lora(dims, seed=7), "lora_unet"), "x"), student_meta)
    sd = to_standard_state_dict(sliced)
    assert all(k.startswith("diffusion_model.") for k in sd)
    alphas = [v for k, v in sd.items() if k.endswith(".alpha")]
    assert alphas and all(a.dim() == 0 and a.dtype == torch.float32 for a in alphas)
    save_file(sd, str(tmp_path / "std.safetensors"))
    assert_same_patches(load_lora_file(tmp_path / "std.safetensors"), sliced)


def shaped_lora(dim: int, key: str = "diffusion_model.blocks.0.self_attn.q") -> dict[str, torch.Tensor]:
    return {f"{key}.lora_down.weight": torch.zeros(4, dim), f"{key}.lora_up.weight": torch.zeros(dim, 4),
            f"{key.rsplit('.', 1)[0]}.norm_k.diff": torch.zeros(dim)}


@pytest.mark.parametrize("dim,base", [(5120, "Wan2.1 14B"), (1536, "Wan2.1 1.3B"), (512, "a model with dim 512")])
def test_wrong_base_names_base_and_key(dim, base):
    with pytest.raises(PareFormatError) as e:
        check_lora_base(parse_lora(shaped_lora(dim), "big.safetensors"), TINY_T2V)
    msg = str(e.value)
    assert base in msg and "big.safetensors" in msg and "diffusion_model.blocks.0.self_attn" in msg
    check_lora_base(parse_lora(shaped_lora(5120), "ok"), WAN21_14B)  # the same file fits its own base
    assert WAN21_1_3B.dim == 1536


def test_i2v_lora_on_t2v_model():
    sd = {"diffusion_model.blocks.1.cross_attn.k_img.lora_down.weight": torch.zeros(4, 256),
          "diffusion_model.blocks.1.cross_attn.k_img.lora_up.weight": torch.zeros(256, 4)}
    with pytest.raises(PareFormatError, match=r"I2V.*cross_attn\.k_img.*T2V"):
        check_lora_base(parse_lora(sd, "i2v.safetensors"), TINY_T2V)
    check_lora_base(parse_lora(sd, "i2v.safetensors"), TINY_I2V)


@pytest.mark.parametrize("sd,fragment", [
    ({"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(4, 256),
      "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.zeros(300, 4)},
     r"'diffusion_model\.blocks\.0\.ffn\.0\.lora_up\.weight' has shape \[300, 4\], expected \[512, 4\]"),
    ({"diffusion_model.blocks.0.self_attn.q.diff": torch.zeros(128, 256)},  # already pruned: teacher expected
     r"self_attn\.q\.diff' has shape \[128, 256\], expected \[256, 256\]"),
    ({"diffusion_model.blocks.9.self_attn.q.diff": torch.zeros(256, 256)}, r"block 9.*has 6 blocks"),
    ({"diffusion_model.blocks.0.self_attn.norm_q.diff_b": torch.zeros(256)}, r"has none"),
    ({"diffusion_model.blocks.0.modulation.lora_down.weight": torch.zeros(4, 256),
      "diffusion_model.blocks.0.modulation.lora_up.weight": torch.zeros(6, 4)}, r"only be patched with a \.diff"),
])
def test_shape_errors_name_key_and_shapes(sd, fragment):
    with pytest.raises(PareFormatError, match=fragment):
        check_lora_base(parse_lora(sd, "bad.safetensors"), TINY_T2V)


def test_incomplete_and_ambiguous_files():
    with pytest.raises(PareFormatError, match="no matching down"):
        parse_lora({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(256, 4)}, "x")
    with pytest.raises(PareFormatError, match="two key styles"):
        parse_lora({"diffusion_model.blocks.0.self_attn.q.diff": torch.zeros(1),
                    "lora_unet_blocks_0_self_attn_q.diff": torch.zeros(1)}, "x")
    with pytest.raises(PareFormatError, match="DoRA"):
        parse_lora({"diffusion_model.blocks.0.self_attn.q.dora_scale": torch.zeros(1)}, "x")


def test_not_a_lora_and_broken_files(tmp_path):
    model = tmp_path / "model.safetensors"
    save_file(random_wan_state_dict(TINY_T2V), str(model))
    with pytest.raises(PareFormatError, match="not a Wan LoRA: not a LoRA file"):
        load_lora_file(model)
    sd_lora = tmp_path / "sd15.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}, str(sd_lora))
    with pytest.raises(PareFormatError, match="not a Wan LoRA: none of its 2 LoRA keys.*lora_unet_down_blocks"):
        load_lora_file(sd_lora)
    with pytest.raises(PareFormatError, match="not a LoRA file"):
        check_lora_base(ParsedLora("empty", {}), TINY_T2V)
    good = tmp_path / "good.safetensors"
    save_file(write_style(random_lora(TINY_T2V), "diffusion_model"), str(good))
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(PareFileError, match="truncated"):
        load_lora_file(truncated)
    pickle = tmp_path / "lora.pt"
    torch.save({"a": torch.zeros(1)}, pickle)
    with pytest.raises(PareFileError, match="pickle"):
        load_lora_file(pickle)


def test_unmatched_keys_reported():
    sd = write_style(random_lora(TINY_T2V)[:3], "diffusion_model")
    extra = ["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
             "diffusion_model.blocks.0.norm1.diff", "diffusion_model.blocks.0.self_attn.q.weird"]
    parsed = parse_lora({**sd, **dict.fromkeys(extra, torch.zeros(1))}, "x")
    assert parsed.unmatched == extra and len(parsed.patches) == 3
    orphan = parse_lora({**sd, "diffusion_model.blocks.4.ffn.2.alpha": torch.tensor(1.0)}, "x")
    assert orphan.ignored == ["diffusion_model.blocks.4.ffn.2.alpha"] and not orphan.unmatched


def test_cli_round_trip(setup, tmp_path, caplog, capsys):
    dims, _, _, student, student_meta = setup
    model, lora, out = tmp_path / "student.safetensors", tmp_path / "lora.safetensors", tmp_path / "o" / "s.safetensors"
    save_checkpoint(model, student, student_meta)
    sd = write_style(random_lora(dims, seed=11), "diffusers")
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(2, 2)
    save_file(sd, str(lora))
    with caplog.at_level(logging.INFO):
        assert main(["lora-slice", "--model", str(model), "--lora", str(lora), "--out", str(out)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 key(s) match no Wan module" in w and "lora_te_text_model" in w for w in warnings)
    # Cut to the student's widths and zero-padded to the widths PARE Load Pruned Wan builds (tensor-core grain)
    loaded = loaded_meta(student_meta)
    expected = pad_lora(slice_lora(parse_lora(sd, "x"), student_meta), student_meta, loaded.expected_shapes())
    # (through the file layout: alphas are stored as fp32 scalars, and padded q/k pairs carry s in their alpha)
    assert_same_patches(load_lora_file(out), parse_lora(to_standard_state_dict(expected), "x"))
    assert load_lora_file(out).patches["blocks.0.ffn.0"].up.shape[0] == loaded.blocks[0].ffn_dim == 256
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temporary behind

    assert main(["lora-slice", "--model", str(model), "--lora", str(model), "--out", str(tmp_path / "x.st")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "x.st").exists()
    assert main(["lora-slice", "--model", str(model), "--lora", str(lora), "--out", str(model)]) == 2


def test_lightx2v_release_keys_diff_m_and_5d_patch_embedding_diff():
    """lightx2v's distill LoRAs: ``blocks.N.diff_m`` / ``head.diff_m`` (modulation deltas) and a 5-D conv ``.diff``."""
    gen = torch.Generator().manual_seed(5)
    shapes = PrunedWanMeta.teacher(TINY_T2V).expected_shapes()
    sd = {f"diffusion_model.blocks.{i}.diff_m": torch.randn(shapes[f"blocks.{i}.modulation"], generator=gen)
          for i in range(TINY_T2V.num_layers)}
    sd["diffusion_model.head.diff_m"] = torch.randn(shapes["head.modulation"], generator=gen)
    sd["diffusion_model.patch_embedding.diff"] = torch.randn(shapes["patch_embedding.weight"], generator=gen)
    sd["diffusion_model.patch_embedding.diff_b"] = torch.randn(shapes["patch_embedding.bias"], generator=gen)
    sd["diffusion_model.blocks.2.self_attn.q.lora_down.weight"] = torch.randn(4, 256, generator=gen)
    sd["diffusion_model.blocks.2.self_attn.q.lora_up.weight"] = torch.randn(256, 4, generator=gen)
    sd["diffusion_model.blocks.2.self_attn.q.diff_b"] = torch.randn(256, generator=gen)
    parsed = parse_lora(sd, "lightx2v.safetensors")
    assert not parsed.unmatched and not parsed.ignored
    assert parsed.patches["patch_embedding"].diff.dim() == 5
    student = slice_lora(parsed, PrunedWanMeta.teacher(TINY_T2V))
    deltas = merged_deltas(student, strength=0.5)
    for i in range(TINY_T2V.num_layers):
        assert torch.equal(deltas[f"blocks.{i}.modulation"], 0.5 * sd[f"diffusion_model.blocks.{i}.diff_m"])
    assert torch.equal(deltas["head.modulation"], 0.5 * sd["diffusion_model.head.diff_m"])
    assert torch.equal(deltas["patch_embedding.weight"], 0.5 * sd["diffusion_model.patch_embedding.diff"])
    # the same delta under both spellings in one file is ambiguous, and refused naming both keys
    with pytest.raises(PareFormatError, match=r"'diffusion_model\.blocks\.0\.modulation\.diff' and "
                                              r"'diffusion_model\.blocks\.0\.diff_m' both give the diff"):
        parse_lora({**sd, "diffusion_model.blocks.0.modulation.diff": sd["diffusion_model.blocks.0.diff_m"]})
    # lora_unet_ spelling of the owner
    unet = parse_lora({"lora_unet_blocks_3.diff_m": sd["diffusion_model.blocks.3.diff_m"]})
    assert list(unet.patches) == ["blocks.3.modulation"]
