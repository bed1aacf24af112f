"""The toy text encoder: its core (tokenize, embed, file format) and the PARE Toy Text Encode node in the real
ComfyUI, whose conditioning must be exactly the core's (compared through a real KSampler run)."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import run_latent
from graphs import Graph, out

from comfyui_pare.errors import PareFormatError
from comfyui_pare.safetensors_io import load_tensors, save_atomic
from comfyui_pare.toy_text import ToyTextEncoder
from scripts import tiny_assets as assets
from training.toyworld import videos
from training.toyworld.teacher import TEXT_LEN, TOY_DIMS, vocabulary


def _encoder(seed: int = 0) -> ToyTextEncoder:
    torch.manual_seed(seed)
    return ToyTextEncoder(vocabulary(), 64, TEXT_LEN)


def test_every_generator_prompt_tokenizes():
    enc = _encoder()
    for i in range(200):
        assert enc.tokenize(videos.clip_at(i).prompt)
    for split in ("seen", "heldout"):
        for clip in videos.single_clips(split):
            assert len(enc.tokenize(clip.prompt)) == 5


def test_rows_are_word_plus_position_then_zero():
    enc = _encoder()
    ctx = enc(["a Blue square, moving LEFT", ""])
    assert ctx.shape == (2, TEXT_LEN, 64)
    ids = [enc.index[w] for w in ("a", "blue", "square", "moving", "left")]
    want = enc.word_embedding[ids] + enc.position_embedding[:5]
    torch.testing.assert_close(ctx[0, :5], want, rtol=0, atol=0)
    assert ctx[0, 5:].abs().sum() == 0 and ctx[1].abs().sum() == 0  # zero padding; empty prompt = all zeros


def test_bad_prompts_name_the_problem():
    enc = _encoder()
    with pytest.raises(ValueError, match=r"unknown word\(s\) \['purple'\]"):
        enc(["a purple circle moving left"])
    with pytest.raises(ValueError, match="at most 16"):
        enc([" ".join(["a"] * 17)])


def test_file_round_trip_and_bad_files(tmp_path):
    enc = _encoder(3)
    enc.save(tmp_path / "t.safetensors")
    back = ToyTextEncoder.load(tmp_path / "t.safetensors")
    assert back.vocab == enc.vocab
    p = "a yellow triangle moving up and a red circle moving down"
    torch.testing.assert_close(back([p]), enc([p]), rtol=0, atol=0)
    tensors, meta = load_tensors(tmp_path / "t.safetensors")
    save_atomic(tmp_path / "nometa.safetensors", tensors, {})
    with pytest.raises(PareFormatError, match="nometa.safetensors: not a PARE toy text encoder"):
        ToyTextEncoder.load(tmp_path / "nometa.safetensors")
    save_atomic(tmp_path / "short.safetensors", {**tensors, "word_embedding": tensors["word_embedding"][:3]}, meta)
    with pytest.raises(PareFormatError, match="short.safetensors: word_embedding \\[3, 64\\] does not match"):
        ToyTextEncoder.load(tmp_path / "short.safetensors")


def test_toy_dims_text_width_matches_the_encoder():
    assert TOY_DIMS.text_dim == 64 and TOY_DIMS.head_dim >= 32 and TOY_DIMS.num_heads >= 4


@pytest.mark.comfy
def test_node_conditioning_equals_core_encoder(comfy, tmp_path):
    """Sampling with the node's conditioning gives bit-identical latents to sampling with the core encoder's
    output saved as tensors (PARELoadConditioning), for a two-object prompt and the empty negative."""
    enc = _encoder(5)
    folder = comfy.base / "models" / "text_encoders"
    folder.mkdir(parents=True, exist_ok=True)
    enc.save(tmp_path / "pare_toy_text_test.safetensors")
    shutil.copy(tmp_path / "pare_toy_text_test.safetensors", folder / "pare_toy_text_test.safetensors")
    prompt = "a green square moving up and a blue circle moving left"
    with torch.no_grad():
        save_atomic(comfy.base / "input" / "toy_pos.safetensors", {"context": enc([prompt])[0]}, {})
        save_atomic(comfy.base / "input" / "toy_neg.safetensors", {"context": enc([""])[0]}, {})

    def graph(by_node: bool) -> tuple[Graph, str]:
        g = Graph()
        loader = g.add("PARELoadPrunedWan", unet_name=assets.TEACHER_T2V, weight_dtype="default")
        model = g.add("ModelSamplingSD3", model=out(loader), shift=3.0)
        if by_node:
            pos = g.add("PAREToyTextEncode", text_encoder="pare_toy_text_test.safetensors", text=prompt)
            neg = g.add("PAREToyTextEncode", text_encoder="pare_toy_text_test.safetensors", text="")
        else:
            pos = g.add("PARELoadConditioning", file="toy_pos.safetensors")
            neg = g.add("PARELoadConditioning", file="toy_neg.safetensors")
        latent = g.add("EmptyHunyuanLatentVideo", width=64, height=64, length=9, batch_size=1)
        s = g.add("KSampler", model=out(model), seed=3, steps=2, cfg=4.0, sampler_name="euler", scheduler="simple",
                  positive=out(pos), negative=out(neg), latent_image=out(latent), denoise=1.0)
        return g, g.add("SaveLatent", samples=out(s), filename_prefix=f"toy_text_{int(by_node)}")

    a = run_latent(comfy, *graph(True))
    b = run_latent(comfy, *graph(False))
    assert a.abs().sum() > 0
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.comfy
def test_node_names_an_unknown_word(comfy, tmp_path):
    from scripts.comfy_harness import PromptError

    folder = comfy.base / "models" / "text_encoders"
    folder.mkdir(parents=True, exist_ok=True)
    _encoder().save(folder / "pare_toy_text_err.safetensors")
    g = Graph()
    pos = g.add("PAREToyTextEncode", text_encoder="pare_toy_text_err.safetensors", text="a purple circle")
    model = g.add("PARELoadPrunedWan", unet_name=assets.TEACHER_T2V, weight_dtype="default")
    latent = g.add("EmptyHunyuanLatentVideo", width=64, height=64, length=5, batch_size=1)
    s = g.add("KSampler", model=out(model), seed=3, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple",
              positive=out(pos), negative=out(pos), latent_image=out(latent), denoise=1.0)
    g.add("SaveLatent", samples=out(s), filename_prefix="toy_err")
    with pytest.raises(PromptError, match="purple"):
        comfy.run(g.to_json())
