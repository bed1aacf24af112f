"""Reading and writing safetensors files safely.

Only safetensors is ever read: a pickle checkpoint (.ckpt/.pt/.pth/.bin) is refused before any byte of it is
interpreted, because unpickling an untrusted file runs code. Writes go to a temporary file in the target
folder and are renamed into place, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import PareFileError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """Return (tensor entries, __metadata__) of a safetensors file, after checking it is one and is whole."""
    path = str(path)
    if not os.path.isfile(path):
        raise PareFileError(f"{path}: no such file")
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise PareFileError(
            f"{path}: refusing a pickle checkpoint ({Path(path).suffix}); PARE loads only .safetensors files, "
            "because unpickling runs code from the file. Convert it to safetensors with a trusted tool first."
        )
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PareFileError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        raw = f.read(n) if 0 < n <= _MAX_HEADER and 8 + n <= size else b""
    if not raw.startswith(b"{"):
        # Only now look at the magic bytes: a safetensors header length can start with 0x80 or "PK" too.
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise PareFileError(
                f"{path}: this is a pickle/zip PyTorch checkpoint, not safetensors; it was not loaded "
                "(unpickling runs code). Convert it to safetensors with a trusted tool first."
            )
        raise PareFileError(
            f"{path}: not a valid safetensors file (header length {n} does not fit the file size {size}, or the "
            "header is not JSON); it may be truncated or of another format"
        )
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PareFileError(f"{path}: safetensors header is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(header, dict):
        raise PareFileError(f"{path}: safetensors header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for key, entry in header.items():
        try:
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise PareFileError(f"{path}: safetensors entry '{key}' is malformed; the file is corrupt") from e
    if 8 + n + end > size:
        raise PareFileError(
            f"{path}: file is truncated: its header describes {8 + n + end} bytes but it has {size}; "
            "re-download or re-export it"
        )
    return header, metadata


def load_tensors(path: str | os.PathLike, keys: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors (all, or the given keys) and the metadata of a checked safetensors file, on the CPU."""
    header, metadata = read_header(path)
    wanted = list(header) if keys is None else keys
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in wanted:
                out[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types; name the file either way
        raise PareFileError(f"{path}: could not read tensors ({type(e).__name__}: {e})") from e
    return out, metadata


def save_atomic(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a model file should be as readable as any other
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (JSON, TOML, CSV) via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
