"""The model-family spec: its numbers against ComfyUI's own source, the metadata it adds, and that it is the only
place in the tree that states a patch size, a VAE stride or a latent statistic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from comfyui_pare.errors import PareFormatError
from comfyui_pare.model_family import FAMILIES, detect_family
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.wan import WanDims
from comfyui_pare.wan_reader import read_meta
from scripts.comfy_harness import INSTALLS
from training.tiny import TINY_T2V, TINY_TI2V_5B, TINY_VACE, random_wan_state_dict

REPO = Path(__file__).resolve().parents[2]


def _comfy_file(rel: str) -> str:
    for install in INSTALLS.values():
        path = Path(install.comfy_dir) / rel
        if path.exists():
            return path.read_text()
    pytest.skip(f"no ComfyUI source tree with {rel}")


def _numbers(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in re.findall(r"-?\d+\.\d+", text))


@pytest.mark.parametrize("cls, family", [("Wan21", "wan2.1-t2v"), ("Wan22", "wan2.2-ti2v-5b")])
def test_latent_statistics_are_comfyuis(cls, family):
    src = _comfy_file("comfy/latent_formats.py")
    body = re.search(rf"class {cls}\(.*?(?=\nclass )", src, re.S)[0]
    mean = _numbers(re.search(r"latents_mean = torch.tensor\(\[(.*?)\]", body, re.S)[1])
    std = _numbers(re.search(r"latents_std = torch.tensor\(\[(.*?)\]", body, re.S)[1])
    latent = FAMILIES[family].latent
    assert (latent.mean, latent.std) == (mean, std)
    assert latent.channels == int(re.search(r"latent_channels = (\d+)", body)[1])


def test_detection_names_are_comfyuis():
    src = _comfy_file("comfy/supported_models.py")
    for fam in FAMILIES.values():
        body = re.search(rf"class {fam.comfy_class}\(.*?(?=\nclass )", src, re.S)
        assert body, fam.comfy_class
        assert f'"model_type": "{fam.model_type}"' in body[0], fam.name
        if fam.latent.channels == 48:
            assert "latent_formats.Wan22" in body[0]


def test_ti2v_5b_tokens_at_720p():
    # 1280x704x121 through the 16x VAE: 31 latent frames of 44 x 80, patched 1x2x2 -> 31 x 22 x 40.
    assert FAMILIES["wan2.2-ti2v-5b"].tokens_for(121, 704, 1280) == 31 * 22 * 40
    assert FAMILIES["wan2.1-t2v"].tokens_for(81, 480, 832) == 21 * 30 * 52


def test_family_is_stored_and_older_files_infer_it(tmp_path):
    meta = PrunedWanMeta.teacher(TINY_TI2V_5B)
    obj = meta.to_json()
    assert obj["family"] == "wan2.2-ti2v-5b"
    old = {k: v for k, v in obj.items() if k != "family"}  # a file from before the family was stored
    again = PrunedWanMeta.from_json(old)
    assert again.dims.family == "wan2.2-ti2v-5b" and again.fingerprint() == meta.fingerprint()
    vace = PrunedWanMeta.teacher(TINY_VACE)
    assert PrunedWanMeta.from_json(json.loads(json.dumps(vace.to_json()))) == vace
    path = tmp_path / "vace.safetensors"  # a plain file: the family is told by its keys
    save_atomic(path, random_wan_state_dict(TINY_VACE, seed=1), {"format": "pt"})
    got, _ = read_meta(path)
    assert got.dims.family == "wan2.1-vace" and got.dims.vace_layers == TINY_VACE.vace_layers


def test_a_family_disagreeing_with_the_dims_is_refused():
    with pytest.raises(ValueError, match="Wan2.2 TI2V-5B model has t2v blocks and 48 output channels"):
        WanDims.from_dict({**TINY_T2V.to_dict(), "family": "wan2.2-ti2v-5b"})


@pytest.mark.parametrize("key, title", [
    ("control_adapter.conv.weight", "Wan2.2 Fun-Camera"),
    ("casual_audio_encoder.encoder.final_linear.weight", "Wan2.2 S2V"),
    ("audio_proj.audio_proj_glob_1.layer.bias", "Wan2.1 HuMo"),
    ("face_adapter.fuser_blocks.0.k_norm.weight", "Wan2.2 Animate"),
])
def test_unsupported_heads_are_refused_by_name(tmp_path, key, title):
    path = tmp_path / "t.safetensors"
    sd = random_wan_state_dict(TINY_T2V)
    sd[key] = sd["head.modulation"].new_zeros(4)
    save_atomic(path, sd, {"format": "pt"})
    assert detect_family({k: tuple(v.shape) for k, v in sd.items()}).title == title
    with pytest.raises(PareFormatError, match=f"a {title} model .*missing"):
        read_meta(path)


# What the spec alone may state. Patterns: a VAE stride or patch-size tuple, a division of a pixel size by the VAE
# stride or of a latent size by the patch, and the first numbers of each latent statistic. (1, 2, 2) as the
# *token-merging* stride of AsymRnR (token_reduction, token_schedule, token_calibration, their benchmarks) is a
# different quantity and is not matched: the pattern looks for the patch / VAE names beside it.
_SPEC_ONLY = [
    r"PATCH_SIZE\s*=", r"VAE_STRIDE", r"patch_size\s*=\s*\(1,\s*2,\s*2\)", r"kernel_size=\(1,\s*2,\s*2\)",
    r"\(4,\s*(8|16),\s*(8|16)\)", r"(height|width|length|frames|SIZE)\s*-?\s*1?\)?\s*//\s*(4|8|16)\b",
    r"0\.7571", r"2\.8184", r"0\.2289", r"0\.4765", r"LATENTS_(MEAN|STD)",
]


def test_no_second_copy_of_a_family_fact():
    allowed = {REPO / "comfyui_pare" / "model_family.py"}
    hits = []
    for folder in ("comfyui_pare", "nodes", "training", "benchmarks", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path in allowed:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                for pattern in _SPEC_ONLY:
                    if re.search(pattern, line):
                        hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not hits, "family facts outside comfyui_pare/model_family.py:\n" + "\n".join(hits)


def test_vace_prune_keeps_the_vace_stream_whole_and_refuses_depth_pruning():
    from comfyui_pare.surgery import PrunePlan, prune_state_dict

    sd = random_wan_state_dict(TINY_VACE, seed=2)
    teacher = PrunedWanMeta.teacher(TINY_VACE)
    plan = PrunePlan.from_json({"blocks": [{"heads": [0, 3], "ffn": list(range(0, 512, 4))}] * TINY_VACE.num_layers})
    out, meta = prune_state_dict(sd, teacher, plan)
    vace = [k for k in sd if k.startswith("vace_")]
    assert vace and all(torch.equal(out[k], sd[k]) for k in vace)
    assert out["blocks.2.ffn.0.weight"].shape[0] == 128 and meta.dims.vace_hint_blocks == (0, 2, 4)
    with pytest.raises(PareFormatError, match="cannot lose whole blocks.*VACE hints"):
        prune_state_dict(sd, teacher, PrunePlan.from_json({"blocks": [{}] * 6, "kept_blocks": [0, 1, 2, 4, 5]}))


def test_calibration_samples_take_5b_latents(tmp_path):
    from comfyui_pare.calibration import read_sample, write_sample

    latent = torch.randn(48, 3, 4, 4)
    write_sample(tmp_path / "s.safetensors", torch.randn(6, 64), latent_shape=(48, 3, 4, 4), seed=1, latent=latent)
    assert torch.equal(read_sample(tmp_path / "s.safetensors").latent, latent)
    with pytest.raises(PareFormatError, match=r"channels of a Wan latent first \(\[16, 48\]\)"):
        write_sample(tmp_path / "t.safetensors", torch.randn(6, 64), latent_shape=(32, 3, 4, 4), seed=1)
