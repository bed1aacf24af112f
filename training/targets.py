"""Teacher velocity targets computed once and reused across epochs and stages (``[data] target_draws`` and
``target_cache``).

At 14B the frozen teacher's forward is most of a step. With ``target_draws = K`` every sample has K fixed
flow-matching draws (sigma and noise from a generator seeded by the sample file's SHA-256, ``train.seed`` and the
draw number), and a step draws (sample, draw) pairs instead of fresh sigmas and noise. The teacher's velocity for a
(sample, draw) is then the same every time it comes up, so ``python -m training cache-targets --config ...``
computes each once (one row at a time) into ``target_cache``, and ``distill`` / ``route`` read it instead of
running the teacher. Without the cache the same rows are computed by the teacher one at a time, so a run with the
cache gives bitwise the same losses as one without (same device and settings).

A cache file (``<cache>/<sample file stem>.safetensors``: ``velocity`` [K, C, F, H, W], ``sigma`` [K]) records in
its ``pare_targets`` metadata the teacher's fingerprint (its Wan meta, the SHA-256 of its files' first and last MiB
(headers included), the teacher dtype and mixed precision), the sample file's SHA-256 and the settings that
decide the inputs (the [flow] fields, ``train.seed``, ``data.target_draws``, the padded context length). Any
difference is refused with an error naming the field and both values.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from comfyui_pare.safetensors_io import load_tensors, save_atomic
from comfyui_pare.wan_reader import open_wan

from .config import ConfigError

FORMAT_VERSION = 1
METADATA_KEY = "pare_targets"
_SAMPLE_BYTES = 1 << 20  # of each teacher file's start and end, hashed into its fingerprint


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def teacher_fingerprint(path: str | os.PathLike, teacher_dtype: str, mixed_precision: str) -> dict[str, str]:
    """What identifies the teacher's outputs without hashing all of its (tens of GB of) weights."""
    h = hashlib.sha256()
    with open_wan(path) as reader:
        meta = reader.meta.fingerprint()
        for name in reader.files:
            size = os.path.getsize(name)
            with open(name, "rb") as f:  # the header is in the first MiB
                h.update(f.read(min(size, _SAMPLE_BYTES)))
                f.seek(max(0, size - _SAMPLE_BYTES))
                h.update(f.read())
    return {"teacher.meta": meta, "teacher.weights_sha256": h.hexdigest(), "model.teacher_dtype": teacher_dtype,
            "train.mixed_precision": mixed_precision}


def settings_of(cfg, context_length: int) -> dict[str, object]:
    """The settings that decide a (sample, draw)'s model input."""
    flow = cfg.flow
    return {"flow.shift": flow.shift, "flow.weighting_scheme": flow.weighting_scheme,
            "flow.logit_mean": flow.logit_mean, "flow.logit_std": flow.logit_std, "flow.mode_scale": flow.mode_scale,
            "train.seed": cfg.train.seed, "data.target_draws": cfg.data.target_draws,
            "context_length": context_length}


def draw_generator(sample_sha256: str, seed: int, draw: int) -> torch.Generator:
    """The generator of draw ``draw`` of a sample: the same for the same sample file in any folder or order."""
    key = hashlib.sha256(f"{sample_sha256}:{seed}:{draw}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))


class TargetCache:
    """The cache folder of one run: reads and checks a sample's targets, writes them (``cache-targets``)."""

    def __init__(self, folder: str | os.PathLike, teacher: dict[str, str], settings: dict[str, object]) -> None:
        self.folder, self.expected = Path(folder), {**teacher, **settings}
        self._last: tuple[str, torch.Tensor] | None = None  # (sample sha, velocities) of the last file read

    def path_for(self, sample_path: str | os.PathLike) -> Path:
        return self.folder / f"{Path(sample_path).stem}.safetensors"

    def velocity(self, sample_path: str, sample_sha256: str, draw: int) -> torch.Tensor:
        """The cached teacher velocity [1, C, F, H, W] of ``draw`` of a sample; refuses a stale or missing entry."""
        if self._last is None or self._last[0] != sample_sha256:
            self._last = (sample_sha256, self._read(sample_path, sample_sha256))
        return self._last[1][draw:draw + 1]

    def _read(self, sample_path: str, sample_sha256: str) -> torch.Tensor:
        path = self.path_for(sample_path)
        if not path.is_file():
            raise ConfigError(f"config field 'data.target_cache': no cached targets for {sample_path} ({path}); "
                              "run `python -m training cache-targets --config ...` first")
        tensors, meta = load_tensors(path)
        recorded = json.loads(meta.get(METADATA_KEY, "{}"))
        stale = [f"'{k}' is {recorded.get(k)!r} in the cache, {v!r} in this run"
                 for k, v in {**self.expected, "sample_sha256": sample_sha256}.items() if recorded.get(k) != v]
        if stale:
            raise ConfigError(f"config field 'data.target_cache': {path} is stale for this run: " + "; ".join(stale)
                              + "; rebuild it with `python -m training cache-targets`")
        return tensors["velocity"]

    def write(self, sample_path: str, sample_sha256: str, velocity: torch.Tensor, sigma: torch.Tensor) -> Path:
        path = self.path_for(sample_path)
        meta = {**self.expected, "sample_sha256": sample_sha256, "format_version": FORMAT_VERSION,
                "sample": Path(sample_path).name}
        save_atomic(path, {"velocity": velocity.contiguous(), "sigma": sigma.contiguous()},
                    {METADATA_KEY: json.dumps(meta), "format": "pt"})
        return path
