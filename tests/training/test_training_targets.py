"""Data at scale: the sample folder is indexed from the headers and read when drawn; the teacher's targets for fixed
draws are cached once, give bitwise the losses of recomputing them, and a stale cache is refused naming what
differs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_helpers import MICRO, distill_toml, write_micro_teacher, write_samples

import training.sample_index as sample_index
from comfyui_pare.calibration import write_sample
from comfyui_pare.errors import PareFormatError
from training.__main__ import main
from training.data import prepare_sample
from training.sample_index import SampleIndex


def test_index_reads_headers_at_start_and_samples_when_drawn(tmp_path, monkeypatch):
    folder = write_samples(tmp_path / "many", 40)
    reads: list[str] = []
    real = sample_index.read_sample
    monkeypatch.setattr(sample_index, "read_sample", lambda p: reads.append(Path(p).name) or real(p))
    index = SampleIndex(folder, MICRO, cache_size=4)
    assert reads == [] and len(index) == 40
    assert index.latent_shape == (16, 3, 4, 4) and index.context_length == 8  # tokens 6 + i % 3
    item = index[17]
    assert reads == ["s17.safetensors"]
    expected = prepare_sample(real(folder / "s17.safetensors"), MICRO)
    assert torch.equal(item.x0, expected.x0) and torch.equal(item.context, expected.context)
    assert index[17] is item and len(reads) == 1  # kept while recent
    for i in range(5):
        index[i]
    index[17]
    assert reads.count("s17.safetensors") == 2  # evicted after 4 others
    write_sample(folder / "s99.safetensors", torch.randn(6, MICRO.text_dim), latent_shape=[16, 2, 4, 4], seed=1,
                 latent=torch.randn(16, 2, 4, 4))
    with pytest.raises(PareFormatError, match=r"s99\.safetensors.*'latent_shape' is \[16, 2, 4, 4\]"):
        SampleIndex(folder, MICRO)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("targets")
    write_micro_teacher(root / "teacher.safetensors")
    write_micro_teacher(root / "other_teacher.safetensors", seed=3)
    write_micro_teacher(root / "student.safetensors", seed=7)
    return {"root": root, "samples": write_samples(root / "samples", 4)}


def _config(inputs: dict, name: str, cache: bool, teacher: str = "teacher.safetensors") -> Path:
    root = inputs["root"]
    data = f'[data]\nsamples = "{inputs["samples"]}"\ntarget_draws = 3\n'
    if cache:
        data += f'target_cache = "{root / "cache"}"\n'
    text = distill_toml(root / teacher, root / "student.safetensors", inputs["samples"], root / name,
                        "[distill]\neval_samples = 1\n", steps=4, batch_size=2, checkpointing_steps=4)
    text = text.replace(f'[data]\nsamples = "{inputs["samples"]}"\n', data)
    path = root / f"{name}.toml"
    path.write_text(text)
    return path


def test_cached_targets_give_bitwise_the_losses_of_the_teacher(inputs, one_thread, capsys):
    root = inputs["root"]
    assert main(["distill", "--config", str(_config(inputs, "recomputed", cache=False))]) == 0
    cached_cfg = _config(inputs, "cached", cache=True)
    assert main(["cache-targets", "--config", str(cached_cfg)]) == 0
    assert sorted(p.name for p in (root / "cache").iterdir()) == [f"s{i:02d}.safetensors" for i in range(4)]
    assert main(["distill", "--config", str(cached_cfg)]) == 0
    recomputed = (root / "recomputed" / "loss.csv").read_text()
    assert len(recomputed.splitlines()) == 5
    assert (root / "cached" / "loss.csv").read_text() == recomputed  # every digit of every loss

    # Stale: other settings, another teacher, another version of a sample; each refused naming what differs.
    assert main(["distill", "--config", str(cached_cfg), "--set", "flow.shift=3.0"]) == 2
    assert "'flow.shift' is 5.0 in the cache, 3.0 in this run" in capsys.readouterr().err.replace('"', "'")
    other = _config(inputs, "other", cache=True, teacher="other_teacher.safetensors")
    assert main(["distill", "--config", str(other)]) == 2
    err = capsys.readouterr().err
    assert "is stale for this run" in err and "'teacher.weights_sha256'" in err and "flow.shift" not in err
    write_sample(inputs["samples"] / "s00.safetensors", torch.randn(6, MICRO.text_dim), latent_shape=[16, 3, 4, 4],
                 seed=0, latent=torch.randn(16, 3, 4, 4))  # the same name, other content
    assert main(["distill", "--config", str(cached_cfg)]) == 2
    assert "s00.safetensors is stale for this run: 'sample_sha256'" in capsys.readouterr().err
