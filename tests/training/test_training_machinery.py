"""Training machinery: typed TOML configs, checkpoint folders and resume, the calibration sample format."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from comfyui_pare import calibration
from comfyui_pare.errors import PareFormatError
from comfyui_pare.safetensors_io import save_atomic
from training.checkpointing import CheckpointError, list_checkpoints, resolve_resume
from training.config import ConfigError, InputPath, load_config, to_toml
from training.loop import TrainConfig, Trainer
from training.parallel import DistInfo


@dataclass
class _Data:
    samples: InputPath
    sizes: list[int] = field(default_factory=lambda: [1, 2])


@dataclass
class _Cfg:
    data: _Data
    train: TrainConfig
    name: str = "run"


def _write(tmp: Path, text: str) -> Path:
    (tmp / "samples").mkdir(exist_ok=True)
    p = tmp / "cfg.toml"
    p.write_text(text)
    return p


GOOD = """
[data]
samples = "samples"
[train]
output_dir = "out"
steps = 4
learning_rate = 1
"""


def test_config_resolves_paths_and_round_trips(tmp_path):
    cfg = load_config(_Cfg, _write(tmp_path, GOOD))
    assert cfg.data.samples == str((tmp_path / "samples").resolve())
    assert cfg.train.output_dir == str((tmp_path / "out").resolve())
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    saved = tmp_path / "elsewhere" / "config.toml"
    saved.parent.mkdir()
    saved.write_text(to_toml(cfg))
    assert load_config(_Cfg, saved) == cfg  # absolute paths: loads the same from any folder
    over = load_config(_Cfg, _write(tmp_path, GOOD), ["train.steps=9", "train.device=cpu", "data.sizes=[3]"])
    assert (over.train.steps, over.train.device, over.data.sizes) == (9, "cpu", [3])


@pytest.mark.parametrize("text,field", [
    (GOOD + "bogus = 1\n", "train.bogus"),
    (GOOD.replace("steps = 4", 'steps = "four"'), "train.steps"),
    (GOOD.replace("steps = 4", "steps = 4.5"), "train.steps"),
    (GOOD.replace('samples = "samples"', 'samples = "nowhere"'), "data.samples"),
    (GOOD.replace("steps = 4", "steps = 4\nmixed_precision = \"fp8\""), "train.mixed_precision"),
    (GOOD.replace("steps = 4", "steps = 0"), "train.steps"),
    (GOOD.replace('output_dir = "out"\n', ""), "train.output_dir"),
    (GOOD.replace("[data]", "[data]\nsizes = [1, true]"), "data.sizes[1]"),
])
def test_config_errors_name_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError, match=re.escape(f"'{field}'")):
        load_config(_Cfg, _write(tmp_path, text))


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 1)])

    def forward(self, x):
        return self.blocks[1](torch.tanh(self.blocks[0](x)))


def _train(out: Path, steps: int, resume: str | None = None, ema: float = 0.0) -> dict[str, torch.Tensor]:
    cfg = TrainConfig(output_dir=str(out), steps=steps, batch_size=3, learning_rate=0.05, checkpointing_steps=2,
                      checkpoints_total_limit=2, ema_decay=ema)
    model = _Toy()

    def loss_fn(step, gen):
        x = torch.randn(3, 4, generator=gen)
        return (model(x) - x.sum(1, keepdim=True)).pow(2).mean(), {}

    trainer = Trainer(cfg, DistInfo(), model, loss_fn, config=cfg)
    trainer.run(resume)
    trainer.final_weights()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_from_checkpoint_is_bitwise_equal(tmp_path, ema):
    full = _train(tmp_path / "a", 6, ema=ema)
    _train(tmp_path / "b", 4, ema=ema)  # stops at 4: the same as a run killed after checkpoint-4
    resumed = _train(tmp_path / "b", 6, resume="latest", ema=ema)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [4, 6]  # total limit 2
    ck = tmp_path / "b" / "checkpoint-6"
    assert {p.name for p in ck.iterdir()} >= {"model", "optimizer", "rng.safetensors", "config.toml",
                                              "trainer_state.json"}
    assert json.loads((ck / "trainer_state.json").read_text())["step"] == 6
    assert not list((ck / "model").glob("*.distcp"))  # safetensors storage, nothing pickled
    rows = (tmp_path / "b" / "loss.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5", "6"]
    assert (tmp_path / "b" / "loss.png").stat().st_size > 0


def test_resume_ignores_partial_checkpoint_and_rejects_bad_names(tmp_path):
    _train(tmp_path, 2)
    (tmp_path / ".checkpoint-4.tmp").mkdir()  # what a kill during a save leaves behind
    assert resolve_resume(tmp_path, "latest").name == "checkpoint-2"
    assert resolve_resume(tmp_path / "fresh", "latest") is None
    with pytest.raises(CheckpointError, match="checkpoint-9"):
        resolve_resume(tmp_path, "checkpoint-9")


def _sample(path: Path, **kw) -> Path:
    args = dict(context=torch.randn(7, 64), latent_shape=[16, 2, 4, 4], seed=3, prompt="a red circle",
                latent=torch.randn(16, 2, 4, 4))
    args.update(kw)
    return calibration.write_sample(path, args.pop("context"), **args)


def test_calibration_sample_round_trip(tmp_path):
    p = _sample(tmp_path / "s0.safetensors", clip_fea=torch.randn(257, 1280))
    s = calibration.read_sample(p)
    assert (s.latent_shape, s.seed, s.prompt, tuple(s.context.shape)) == ((16, 2, 4, 4), 3, "a red circle", (7, 64))
    assert s.clip_fea.shape == (257, 1280) and s.latent.shape == (16, 2, 4, 4)
    _sample(tmp_path / "s1.safetensors", latent=None)
    assert [p.name for p in calibration.list_samples(tmp_path)] == ["s0.safetensors", "s1.safetensors"]
    assert calibration.read_folder(tmp_path)[1].latent is None


def _raw(path: Path, tensors: dict, meta: dict | None) -> Path:
    save_atomic(path, tensors, {} if meta is None else {"pare_calibration": json.dumps(meta)})
    return path


@pytest.mark.parametrize("tensors,meta,field", [
    ({"context": torch.randn(4, 8)}, None, "pare_calibration"),
    ({"context": torch.randn(4, 8)}, {"format_version": 1, "seed": 1}, "latent_shape"),
    ({"context": torch.randn(4, 8)}, {"format_version": 1, "latent_shape": [16, 2, 4], "seed": 1}, "latent_shape"),
    ({"context": torch.randn(4, 8)}, {"format_version": 1, "latent_shape": [16, 1, 2, 2], "seed": "x"}, "seed"),
    ({"context": torch.randn(8)}, {"format_version": 1, "latent_shape": [16, 1, 2, 2], "seed": 1}, "context"),
    ({"clip_fea": torch.randn(257, 1280)}, {"format_version": 1, "latent_shape": [16, 1, 2, 2], "seed": 1}, "context"),
    ({"context": torch.randn(4, 8), "latent": torch.randn(16, 1, 2, 3)},
     {"format_version": 1, "latent_shape": [16, 1, 2, 2], "seed": 1}, "latent"),
    ({"context": torch.randn(4, 8), "clip_fea": torch.randn(256, 1280)},
     {"format_version": 1, "latent_shape": [16, 1, 2, 2], "seed": 1}, "clip_fea"),
    ({"context": torch.randn(4, 8), "noise": torch.randn(2)},
     {"format_version": 1, "latent_shape": [16, 1, 2, 2], "seed": 1}, "noise"),
])
def test_malformed_sample_names_file_and_field(tmp_path, tensors, meta, field):
    _raw(tmp_path / "bad.safetensors", tensors, meta)
    _sample(tmp_path / "good.safetensors")
    with pytest.raises(PareFormatError, match=rf"bad\.safetensors.*'{field}'"):
        calibration.read_folder(tmp_path)


def test_folder_errors(tmp_path):
    with pytest.raises(PareFormatError, match="no calibration samples"):
        calibration.list_samples(tmp_path)
    _sample(tmp_path / "a.safetensors")
    _sample(tmp_path / "b.safetensors", context=torch.randn(5, 32))
    with pytest.raises(PareFormatError, match=r"b\.safetensors.*text dim 32"):
        calibration.read_folder(tmp_path)


def test_activation_checkpointing_gives_the_same_gradients():
    from comfyui_pare.pruned import PrunedWanMeta
    from comfyui_pare.wan import WanDims
    from training.model import WanTransformer
    from training.parallel import checkpoint_activations
    from training.tiny import random_wan_state_dict

    dims = WanDims(dim=64, num_heads=4, ffn_dim=64, num_layers=2, text_dim=16)
    grads, calls = [], []
    for checkpointed in (False, True):
        model = WanTransformer.from_state_dict(random_wan_state_dict(dims, seed=1), PrunedWanMeta.teacher(dims))
        model.train().requires_grad_(True)
        if checkpointed:
            checkpoint_activations(model)
        count = [0]
        model.blocks[1].ffn.register_forward_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
        gen = torch.Generator().manual_seed(0)
        x, ctx = torch.randn(2, 16, 2, 4, 4, generator=gen), torch.randn(2, 5, 16, generator=gen)
        model(x, torch.tensor([300.0, 800.0]), ctx).pow(2).mean().backward()
        calls.append(count[0])
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        assert [k for k, _ in model.named_parameters()] == list(grads[0])  # names unchanged
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
    assert calls == [1, 2]  # checkpointed: the block ran again in the backward pass
