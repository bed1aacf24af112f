"""Calibration samples: one ``.safetensors`` file per prompt, the input of ``python -m training calibrate``.

A sample holds what the teacher needs to run on one of the user's own prompts:

* ``context`` [L, text_dim]: the text encoder's output (umT5-XXL for Wan2.1, as ComfyUI's encode returns it);
* ``clip_fea`` [257, 1280] (optional, I2V): CLIP ViT-H penultimate states of the start image;
* ``latent`` [16, T, H, W] (optional): a clean latent as ComfyUI's LATENT holds it (the VAE's latent space,
  before the model's ``process_in``).

Header metadata key ``pare_calibration`` holds JSON
``{"format_version": 1, "latent_shape": [16, T, H, W], "seed": int, "prompt": str}``: the latent shape and the
noise seed fix the noised inputs even when no latent is stored. This module is plain torch (the node pack writes
samples, training reads them); every error names the file and the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import PareFormatError
from .model_family import FAMILIES
from .safetensors_io import load_tensors, read_header, save_atomic
from .wan import CLIP_DIM, CLIP_TOKENS

FORMAT_VERSION = 1
METADATA_KEY = "pare_calibration"
LATENT_CHANNELS = frozenset(f.latent.channels for f in FAMILIES.values())  # 16 (Wan2.1 VAE), 48 (Wan2.2 5B VAE)
SUFFIX = ".safetensors"
_TENSORS = ("context", "clip_fea", "latent")


@dataclass
class CalibrationSample:
    """One calibration prompt. ``latent`` is in the VAE's latent space (ComfyUI's LATENT), or None."""

    context: torch.Tensor  # [L, text_dim]
    latent_shape: tuple[int, int, int, int]  # (16, T, H, W)
    seed: int
    prompt: str = ""
    clip_fea: torch.Tensor | None = None  # [257, 1280]
    latent: torch.Tensor | None = None  # [16, T, H, W]
    path: str = ""

    def metadata(self) -> dict:
        return {"format_version": FORMAT_VERSION, "latent_shape": list(self.latent_shape), "seed": self.seed,
                "prompt": self.prompt}


def _fail(path: str, field: str, why: str) -> PareFormatError:
    return PareFormatError(f"{path}: calibration sample field '{field}' {why}")


def _check_latent_shape(value, path: str) -> tuple[int, int, int, int]:
    if (not isinstance(value, list) or len(value) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise _fail(path, "latent_shape", f"must be a list of 4 positive integers [16, T, H, W], got {value!r}")
    if value[0] not in LATENT_CHANNELS:
        raise _fail(path, "latent_shape", f"must have the channels of a Wan latent first ({sorted(LATENT_CHANNELS)}), "
                    f"got {value}")
    return tuple(value)


def _check_tensor(t: torch.Tensor, path: str, field: str, ndim: int, shape: tuple | None = None) -> None:
    if not t.is_floating_point():
        raise _fail(path, field, f"must be a floating point tensor, got {t.dtype}")
    if t.ndim != ndim or (shape is not None and tuple(t.shape) != tuple(shape)):
        want = list(shape) if shape is not None else f"{ndim} dimensions"
        raise _fail(path, field, f"has shape {list(t.shape)}, expected {want}")
    if not torch.isfinite(t).all():
        raise _fail(path, field, "contains NaN or infinite values")


def validate(sample: CalibrationSample, path: str = "<sample>") -> None:
    """Check shapes, dtypes and metadata; raises ``PareFormatError`` naming the file and the field."""
    _check_latent_shape(list(sample.latent_shape), path)
    if isinstance(sample.seed, bool) or not isinstance(sample.seed, int):
        raise _fail(path, "seed", f"must be an integer, got {sample.seed!r}")
    if not isinstance(sample.prompt, str):
        raise _fail(path, "prompt", f"must be a string, got {type(sample.prompt).__name__}")
    _check_tensor(sample.context, path, "context", 2)
    if sample.context.shape[0] < 1:
        raise _fail(path, "context", "has no tokens")
    if sample.clip_fea is not None:
        _check_tensor(sample.clip_fea, path, "clip_fea", 2, (CLIP_TOKENS, CLIP_DIM))
    if sample.latent is not None:
        _check_tensor(sample.latent, path, "latent", 4, sample.latent_shape)


def write_sample(path: str | os.PathLike, context: torch.Tensor, *, latent_shape: tuple[int, ...] | list[int],
                 seed: int, prompt: str = "", clip_fea: torch.Tensor | None = None,
                 latent: torch.Tensor | None = None) -> Path:
    """Validate and write one sample atomically (float32 tensors on the CPU). Returns the path."""
    sample = CalibrationSample(
        context=context.detach().float().cpu().contiguous(), latent_shape=tuple(int(s) for s in latent_shape),
        seed=int(seed), prompt=prompt,
        clip_fea=None if clip_fea is None else clip_fea.detach().float().cpu().contiguous(),
        latent=None if latent is None else latent.detach().float().cpu().contiguous(),
    )
    validate(sample, str(path))
    tensors = {k: getattr(sample, k) for k in _TENSORS if getattr(sample, k) is not None}
    save_atomic(path, tensors, {METADATA_KEY: json.dumps(sample.metadata()), "format": "pt"})
    return Path(path)


def read_sample(path: str | os.PathLike) -> CalibrationSample:
    """Read and validate one sample file."""
    path = str(path)
    entries, metadata = read_header(path)
    if METADATA_KEY not in metadata:
        raise _fail(path, METADATA_KEY, "is missing from the header metadata (not a PARE calibration sample; "
                    "write samples with the PARE Save Calibration Sample node)")
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise _fail(path, METADATA_KEY, f"is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise _fail(path, METADATA_KEY, "must be a JSON object")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _fail(path, "format_version", f"must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise _fail(path, "format_version", f"is {version}, newer than this version reads ({FORMAT_VERSION})")
    for field in ("latent_shape", "seed"):
        if field not in meta:
            raise _fail(path, field, "is missing from the metadata")
    unknown = sorted(set(entries) - set(_TENSORS))
    if unknown:
        raise _fail(path, unknown[0], f"is not a calibration tensor (expected {list(_TENSORS)})")
    if "context" not in entries:
        raise _fail(path, "context", "is missing (the text encoder output [L, text_dim] is required)")
    tensors, _ = load_tensors(path)
    sample = CalibrationSample(
        context=tensors["context"], latent_shape=_check_latent_shape(meta["latent_shape"], path),
        seed=meta["seed"], prompt=meta.get("prompt", ""), clip_fea=tensors.get("clip_fea"),
        latent=tensors.get("latent"), path=path,
    )
    validate(sample, path)
    return sample


def list_samples(folder: str | os.PathLike) -> list[Path]:
    """The sample files of a folder (sorted by name; hidden and temporary files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PareFormatError(f"{folder}: calibration sample folder not found")
    files = sorted(p for p in folder.iterdir() if p.suffix == SUFFIX and not p.name.startswith(".") and p.is_file())
    if not files:
        raise PareFormatError(f"{folder}: no calibration samples (*{SUFFIX}) in this folder")
    return files


def read_folder(folder: str | os.PathLike) -> list[CalibrationSample]:
    """Read and validate every sample of a folder; all must share one text dim (one text encoder)."""
    samples = [read_sample(p) for p in list_samples(folder)]
    dims = {s.context.shape[-1] for s in samples}
    if len(dims) > 1:
        first = samples[0]
        odd = next(s for s in samples if s.context.shape[-1] != first.context.shape[-1])
        raise _fail(odd.path, "context", f"has text dim {odd.context.shape[-1]} but {first.path} has "
                    f"{first.context.shape[-1]}; one folder holds samples from one text encoder")
    return samples
