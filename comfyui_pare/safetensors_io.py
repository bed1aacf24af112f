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

from .errors import PareFileError
from .untrusted import quote

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
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PareFileError(f"{path}: safetensors '__metadata__' is not an object of strings; the file is corrupt")
    end = 0
    for key, entry in header.items():
        end = max(end, _check_entry(path, key, entry))
    if 8 + n + end > size:
        raise PareFileError(
            f"{path}: file is truncated: its header describes {8 + n + end} bytes but it has {size}; "
            "re-download or re-export it"
        )
    return header, metadata


# Bytes per element of the safetensors dtypes; a dtype not listed here is not checked for its size.
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _check_entry(path: str, key: str, entry: object) -> int:
    """One tensor entry of a header: integer shape and offsets that agree (shape x element size = byte span), so
    every shape a reader trusts is backed by bytes in the file. Returns the entry's end offset."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        ints = [*shape, begin, end]
        if not isinstance(dtype, str) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                 for n in ints) or end < begin:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise PareFileError(f"{path}: safetensors entry {quote(key)} is malformed (dtype, integer shape and "
                            "data_offsets expected); the file is corrupt") from None
    numel = 1
    for n in shape:
        numel *= n
    size, span = _ITEM_BYTES.get(dtype), end - begin
    # An unknown (e.g. sub-byte) dtype still takes at least one bit per element.
    if (numel * size != span) if size is not None else ((numel + 7) // 8 > span):
        raise PareFileError(f"{path}: safetensors entry {quote(key)} declares shape {quote(shape)} ({dtype}) but "
                            f"{end - begin} bytes; the file is corrupt")
    return end


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


# torch dtype <-> safetensors dtype name (the subset model files use).
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def data_start(path: str | os.PathLike) -> int:
    """Byte offset of a safetensors file's data (8 + its header length): where ``data_offsets`` count from."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise PareFileError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    return 8 + struct.unpack("<Q", head)[0]


def read_into(path: str | os.PathLike, offset: int, out: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor ``out`` with the ``out.nbytes`` bytes at ``offset`` of ``path``: plain reads
    straight into its memory (no mapping of the file, no intermediate copy), so reading runs at the disk's speed
    and the bytes count once in the resident set."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    done = 0
    with open(path, "rb", buffering=0) as f:
        while done < len(view):
            got = os.preadv(f.fileno(), [view[done:]], offset + done)
            if got <= 0:
                raise PareFileError(f"{path}: file ends at byte {offset + done} inside a tensor that needs "
                                    f"{len(view)} bytes from {offset}; it is truncated")
            done += got


def torch_dtype(name: str, where: str = "tensor") -> torch.dtype:
    """The torch dtype of a safetensors dtype name; a clear error for one torch cannot hold."""
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise PareFileError(f"{where}: safetensors dtype {name!r} is not supported") from None


class StreamingWriter:
    """Write a safetensors file one tensor at a time, atomically.

    The header (every key's dtype and shape) is written first, so the caller declares the tensors up front and then
    hands them over in ``order``, one by one; nothing but the tensor being written is held. Tensors are laid out by
    element size, largest first, so every tensor starts at an offset aligned to its element size, as safetensors'
    own writer does. The data goes to a temporary file in the target folder, which is renamed into place only when
    every declared tensor was written; on any error it is removed.
    """

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        for key, (dtype, _) in specs.items():
            if dtype not in DTYPE_NAMES:
                raise PareFileError(f"{self.path}: cannot write tensor '{key}' of dtype {dtype}")
        # Stable sort: within one element size the caller's order is kept.
        self.order: list[str] = sorted(specs, key=lambda k: -specs[k][0].itemsize)
        self._specs = {k: (specs[k][0], tuple(int(n) for n in specs[k][1])) for k in self.order}
        self._metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._next = 0
        self._file = None
        self._tmp: str | None = None

    def _header(self) -> bytes:
        header: dict = {"__metadata__": self._metadata} if self._metadata else {}
        offset = 0
        for key in self.order:
            dtype, shape = self._specs[key]
            size = dtype.itemsize
            for n in shape:
                size *= n
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)  # the data starts 8-aligned, as safetensors pads it

    def __enter__(self) -> "StreamingWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._file = os.fdopen(fd, "wb")
        header = self._header()
        self._file.write(struct.pack("<Q", len(header)))
        self._file.write(header)
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must be ``order[i]`` with its declared dtype and shape."""
        if self._file is None:
            raise RuntimeError("StreamingWriter.write outside its 'with' block")
        if self._next >= len(self.order) or key != self.order[self._next]:
            want = self.order[self._next] if self._next < len(self.order) else "nothing (all written)"
            raise PareFileError(f"{self.path}: tensor '{key}' written out of order; expected {want}")
        dtype, shape = self._specs[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise PareFileError(f"{self.path}: tensor '{key}' is {tensor.dtype} {list(tensor.shape)}, but the header "
                                f"declares {dtype} {list(shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self._next != len(self.order):
                raise PareFileError(f"{self.path}: only {self._next} of {len(self.order)} declared tensors were "
                                    f"written (next: '{self.order[self._next]}')")
            self._file.close()
            if exc_type is None:
                os.chmod(self._tmp, _mode_from_umask())  # mkstemp makes 0600; a model file is as readable as any
                os.replace(self._tmp, self.path)
        finally:
            if not self._file.closed:
                self._file.close()
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
            self._file = None


def _mode_from_umask() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process umask."""
    try:  # Linux reports the umask without changing it (os.umask would, process-wide, for a moment)
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def save_atomic(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file via a temporary file in the same folder and an atomic rename."""
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    with StreamingWriter(path, specs, metadata) as writer:
        for key in writer.order:
            writer.write(key, tensors[key])


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (JSON, TOML, CSV) via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, _mode_from_umask())  # mkstemp makes 0600; as open() would, the umask decides
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
