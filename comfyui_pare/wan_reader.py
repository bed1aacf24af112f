"""One reader for every Wan checkpoint layout users download, tensor by tensor.

Layouts (``WanReader.layout``):

- ``original``: Wan-AI's key names (``blocks.0.self_attn.q.weight``), one file; PARE students use it too.
- ``original-sharded``: the same names over ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` shards and
  their ``*.safetensors.index.json`` (Wan2.1-T2V/I2V-14B, the Wan2.2-A14B expert folders).
- ``comfyui-prefixed``: original names behind ``model.diffusion_model.`` or ``diffusion_model.``.
- ``diffusers`` / ``diffusers-sharded``: ``WanTransformer3DModel`` names (``blocks.0.attn1.to_q.weight``,
  ``condition_embedder.*``, ``scale_shift_table``), renamed to the original names on read (``wan.diffusers_key``).

Any of them may be *fp8_scaled* (ComfyUI's ``*_fp8_scaled`` files): a ``scaled_fp8`` marker tensor whose dtype is
the weights' fp8 dtype, and 0-d F32 ``scale_weight`` / ``scale_input`` beside a linear's fp8 weight. The real weight
is ``weight * scale_weight`` (ComfyUI's ``comfy/ops.py: scaled_fp8_ops``). The reader keeps scales with their
weights (``scale``/``input_scale``), never as keys of their own.

Tensors are read one at a time with plain reads at their offsets in the (validated) header, straight into the
returned tensor (``safetensors_io.read_into``): nothing of the file stays mapped, so what is resident is the tensors
the caller still holds, and a rank reading only its rows of a tensor reads only those bytes. This runs at the
disk's speed (measured on a cached 0.56 GB file, 879 half-tensor reads: 1.6-1.8 GB/s, where ``safe_open(...)
.get_slice`` per tensor gave 0.1 GB/s). Pickle files are refused before they are read (``safetensors_io``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import PareFileError, PareFormatError
from .pruned import FLOAT_DTYPES, METADATA_KEY, PrunedWanMeta, check_tensors, meta_from_header
from .quant_layout import (
    COMFY_QUANT,
    MARKER,
    PER_LAYER,
    SCALE_INPUT,
    SCALE_SUFFIXES,
    SCALE_WEIGHT,
    SCALED_FP8_MARKER,
    STORED_NAME,
    LayerQuant,
    decode_config_tensor,
    header_layer_configs,
    marker_for,
)
from .safetensors_io import data_start, read_header, read_into, torch_dtype
from .wan import KNOWN_PREFIXES, diffusers_key

logger = logging.getLogger(__name__)

ORIGINAL, ORIGINAL_SHARDED, COMFYUI_PREFIXED = "original", "original-sharded", "comfyui-prefixed"
DIFFUSERS, DIFFUSERS_SHARDED = "diffusers", "diffusers-sharded"
LAYOUTS = (ORIGINAL, ORIGINAL_SHARDED, COMFYUI_PREFIXED, DIFFUSERS, DIFFUSERS_SHARDED)

INDEX_SUFFIX = ".safetensors.index.json"
_SHARD_RE = re.compile(r".*-(\d+)-of-(\d+)\.safetensors")
_PIPELINE_SUBFOLDER = "transformer"  # a diffusers pipeline keeps the Wan transformer here
# Keys that show where the diffusion model's tensors start (the first is original, the others diffusers).
_ANCHORS = ("head.modulation", "scale_shift_table", "patch_embedding.weight")
_DIFFUSERS_MARKS = ("scale_shift_table", "condition_embedder.time_proj.weight", "proj_out.weight")


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives: the file, its name there, its safetensors dtype and its shape."""

    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of its data in the file


def _index_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(INDEX_SUFFIX))


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, list[Path], dict[str, str] | None]:
    """(the file that describes the checkpoint, its safetensors files, the index's key -> file map or None).

    Accepts a .safetensors file, a shard of a sharded release (its index beside it is used), an index file, a
    folder holding one of them, or a diffusers pipeline folder (its ``transformer/``).
    """
    p = Path(path)
    if p.is_dir():
        indexes = _index_files(p)
        singles = sorted(q for q in p.iterdir() if q.name.endswith(".safetensors"))
        if len(indexes) == 1:
            return resolve_checkpoint(indexes[0])
        if len(indexes) > 1:
            raise PareFileError(f"{p}: folder holds several index files ({', '.join(q.name for q in indexes)}); "
                                "name the one to load")
        if len(singles) == 1:
            return resolve_checkpoint(singles[0])
        if not singles and (p / _PIPELINE_SUBFOLDER).is_dir():
            return resolve_checkpoint(p / _PIPELINE_SUBFOLDER)
        if not singles:
            raise PareFileError(f"{p}: folder holds no .safetensors file and no {INDEX_SUFFIX}")
        raise PareFileError(f"{p}: folder holds {len(singles)} .safetensors files and no index "
                            f"({', '.join(q.name for q in singles[:4])}); name the file to load")
    if p.name.endswith(INDEX_SUFFIX):
        return p, *_read_index(p)
    if _SHARD_RE.fullmatch(p.name) and p.is_file():
        for index in _index_files(p.parent):
            files, weight_map = _read_index(index)
            if p.resolve() in [f.resolve() for f in files]:
                return index, files, weight_map
        m = _SHARD_RE.fullmatch(p.name)
        raise PareFileError(f"{p}: this is shard {int(m[1])} of {int(m[2])} of a sharded checkpoint, and no "
                            f"{INDEX_SUFFIX} beside it lists it; keep the shards and their index together and "
                            "load the index (or the folder)")
    return p, [p], None


def _read_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    if not index.is_file():
        raise PareFileError(f"{index}: no such file")
    try:
        obj = json.loads(index.read_text(encoding="utf-8"))
        weight_map = obj["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise PareFileError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e}); it needs a "
                            "'weight_map' of tensor name -> shard file") from e
    files = []
    for name in dict.fromkeys(weight_map.values()):
        shard = index.parent / name
        if os.sep in name or "/" in name or not shard.is_file():
            raise PareFileError(f"{index}: shard '{name}' is missing from {index.parent}; download every shard")
        files.append(shard)
    return files, {k: str(index.parent / v) for k, v in weight_map.items()}


class WanReader:
    """A validated Wan checkpoint in any supported layout, read lazily. Use ``open_wan``."""

    def __init__(self, path: str | os.PathLike):
        self.bytes_read = 0  # tensor bytes read from the files so far, and the seconds spent reading them
        self.read_seconds = 0.0
        self.path, files, weight_map = resolve_checkpoint(path)
        self.files = [str(f) for f in files]
        source = str(self.path)
        stored, metadata = self._read_headers(files, weight_map, source)
        self.metadata: dict[str, str] = metadata
        self.prefix = _find_prefix(stored)
        weights, scales, marker, others, quant_tensors, layouts = self._split(stored)
        diffusers = "head.modulation" not in weights and any(k in weights for k in _DIFFUSERS_MARKS)
        if diffusers:
            weights, scales = _rename_diffusers(weights, scales, source)
        sharded = weight_map is not None
        if diffusers:
            self.layout = DIFFUSERS_SHARDED if sharded else DIFFUSERS
        elif self.prefix:
            self.layout = COMFYUI_PREFIXED
        else:
            self.layout = ORIGINAL_SHARDED if sharded else ORIGINAL
        shapes = {k: v.shape for k, v in weights.items()}
        if others:
            raise PareFormatError(f"{source}: {len(others)} unexpected tensor(s) outside the Wan diffusion model "
                                  f"(its keys start with '{self.prefix}'), e.g. '{others[0]}'")
        self.meta: PrunedWanMeta = meta_from_header(metadata, shapes, source)
        check_tensors(self.meta, shapes, {k: v.dtype for k, v in weights.items()}, source,
                      stored_name=lambda k: weights[k].name if k in weights else self.prefix + k,
                      has_metadata=METADATA_KEY in metadata)
        self._layer_quant = self._layer_configs(quant_tensors, metadata, weights, source)
        if self._layer_quant:
            layouts.add(PER_LAYER)
        if marker is not None:
            layouts.add(MARKER)
        if len(layouts) > 1:
            raise PareFormatError(f"{source}: mixes ComfyUI's two scaled fp8 layouts (a '{SCALED_FP8_MARKER}' "
                                  f"marker / scale_weight, and per-layer weight_scale / .{COMFY_QUANT}); re-save it "
                                  "in one of them")
        self.quant_layout: str | None = layouts.pop() if layouts else None
        self._check_scales(weights, scales, marker, source)
        order = list(self.meta.expected_shapes())
        self._weights = {k: weights[k] for k in order}
        self._scales = scales
        self._marker = marker
        self.scaled_fp8 = self.quant_layout is not None
        self.scaled_fp8_dtype: torch.dtype | None = None
        if marker is not None:
            # ComfyUI (model_detection.model_config_from_unet): the marker's dtype, an F32 marker meaning e4m3fn.
            dtype = torch_dtype(marker.dtype, f"{source}: '{marker.name}'")
            self.scaled_fp8_dtype = torch.float8_e4m3fn if dtype == torch.float32 else dtype
        elif self._layer_quant:
            dtypes = {c.dtype for c in self._layer_quant.values()}
            self.scaled_fp8_dtype = dtypes.pop() if len(dtypes) == 1 else None

    # -- reading the headers ------------------------------------------------------------------------------------

    @staticmethod
    def _read_headers(files: list[Path], weight_map: dict[str, str] | None, source: str
                      ) -> tuple[dict[str, StoredTensor], dict[str, str]]:
        stored: dict[str, StoredTensor] = {}
        metadata: dict[str, str] = {}
        for f in files:
            entries, meta = read_header(f)
            start = data_start(f)
            for key, value in meta.items():
                if key in metadata and metadata[key] != value and key == METADATA_KEY:
                    raise PareFormatError(f"{source}: shards disagree on their '{key}' metadata ({f.name})")
                metadata.setdefault(key, value)
            for name, e in entries.items():
                if name in stored:
                    raise PareFormatError(f"{source}: tensor '{name}' is in two shards ({Path(stored[name].file).name} "
                                          f"and {f.name})")
                if weight_map is not None and weight_map.get(name) not in (None, str(f)):
                    raise PareFormatError(f"{source}: the index puts '{name}' in {Path(weight_map[name]).name}, but it "
                                          f"is in {f.name}")
                stored[name] = StoredTensor(str(f), name, str(e.get("dtype")), tuple(int(n) for n in e.get("shape", ())),
                                            start + int(e["data_offsets"][0]))
        if weight_map is not None:
            lost = [k for k in weight_map if k not in stored]
            if lost:
                raise PareFormatError(f"{source}: the index lists {len(lost)} tensor(s) its shards do not hold, e.g. "
                                      f"'{lost[0]}' (expected in {Path(weight_map[lost[0]]).name}); a shard is "
                                      "incomplete or from another download")
        return stored, metadata

    def _split(self, stored: dict[str, StoredTensor]):
        """(weights, scales by weight key and canonical kind, the scaled_fp8 marker, keys outside the prefix,
        per-layer quantization config tensors by weight key, the scale layouts seen)."""
        weights: dict[str, StoredTensor] = {}
        scales: dict[str, dict[str, StoredTensor]] = {}
        quant: dict[str, StoredTensor] = {}
        layouts: set[str] = set()
        marker = None
        others: list[str] = []
        for name, st in stored.items():
            if name in (SCALED_FP8_MARKER, self.prefix + SCALED_FP8_MARKER):
                marker = st
                continue
            if not name.startswith(self.prefix):
                others.append(name)
                continue
            key = name[len(self.prefix):]
            base, _, suffix = key.rpartition(".")
            if suffix in SCALE_SUFFIXES and base:
                layout, kind = SCALE_SUFFIXES[suffix]
                layouts.add(layout)
                scales.setdefault(f"{base}.weight", {})[kind] = st
            elif suffix == COMFY_QUANT and base:
                quant[f"{base}.weight"] = st
            else:
                weights[key] = st
        return weights, scales, marker, others, quant, layouts

    def _layer_configs(self, quant: dict[str, StoredTensor], metadata: dict[str, str],
                       weights: dict[str, StoredTensor], source: str) -> dict[str, LayerQuant]:
        """Per-layer configs by weight key, from ``.comfy_quant`` tensors or the ``_quantization_metadata`` header."""
        configs = {k: decode_config_tensor(self._read(st), f"{source}: '{st.name}'") for k, st in quant.items()}
        for layer, conf in header_layer_configs(metadata, source).items():
            configs.setdefault(f"{layer.removeprefix(self.prefix)}.weight", conf)
        for key in configs:
            if key not in weights:
                raise PareFormatError(f"{source}: a quantization config names layer '{key[:-len('.weight')]}', "
                                      "which the file does not have")
        return configs

    def _check_scales(self, weights: dict[str, StoredTensor], scales: dict[str, dict[str, StoredTensor]],
                      marker: StoredTensor | None, source: str) -> None:
        for key, kinds in scales.items():
            st = next(iter(kinds.values()))
            if key not in weights:
                raise PareFormatError(f"{source}: '{st.name}' scales a weight the file does not have "
                                      f"('{self.prefix}{key}')")
            if marker is None and key not in self._layer_quant:
                raise PareFormatError(f"{source}: '{st.name}' is an fp8 scale, but the file has neither a "
                                      f"'{SCALED_FP8_MARKER}' marker nor a quantization config for its layer, so "
                                      "ComfyUI would ignore the scales; the file is incomplete")
            for s in kinds.values():
                n = 1
                for d in s.shape:
                    n *= d
                if n != 1 or s.dtype not in FLOAT_DTYPES:
                    raise PareFormatError(f"{source}: '{s.name}' has shape {list(s.shape)} and dtype {s.dtype}; "
                                          "ComfyUI's scaled fp8 reads one floating-point scale per tensor")

    # -- the public API -----------------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Weight keys in the original layout, without prefix, in the canonical order (scales are not keys)."""
        return list(self._weights)

    def __contains__(self, key: str) -> bool:
        return key in self._weights

    def stored(self, key: str) -> StoredTensor:
        try:
            return self._weights[key]
        except KeyError:
            raise PareFormatError(f"{self.path}: no tensor '{key}' in this Wan checkpoint") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.stored(key).shape

    def dtype(self, key: str) -> torch.dtype:
        st = self.stored(key)
        return torch_dtype(st.dtype, f"{self.path}: '{st.name}'")

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor as stored (fp8 stays fp8), read now from its file."""
        return self._read(self.stored(key))

    def scale(self, key: str) -> torch.Tensor | None:
        """The ``scale_weight`` of a scaled fp8 weight (0-d F32), or None."""
        st = self._scales.get(key, {}).get(SCALE_WEIGHT)
        return None if st is None else self._read(st)

    def input_scale(self, key: str) -> torch.Tensor | None:
        """The ``scale_input`` stored beside a scaled fp8 weight, or None."""
        st = self._scales.get(key, {}).get(SCALE_INPUT)
        return None if st is None else self._read(st)

    def layer_quant(self, key: str) -> LayerQuant | None:
        """The per-layer quantization config of a weight (per-layer layout), or None."""
        return self._layer_quant.get(key)

    def stored_scale_name(self, kind: str) -> str:
        """The suffix this file's layout gives a scale of canonical ``kind`` (``scale_weight`` / ``scale_input``)."""
        return STORED_NAME[(self.quant_layout or MARKER, kind)]

    def marker(self) -> torch.Tensor | None:
        """The ``scaled_fp8`` marker tensor as stored (its element count tells ComfyUI about fp8 matmuls)."""
        return None if self._marker is None else self._read(self._marker)

    def dequantized(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The real weight: ``weight * scale_weight`` in fp32 (as ComfyUI's ``convert_weight``), else a cast."""
        t = self.tensor(key)
        s = self.scale(key)
        if s is not None:
            t = t.to(torch.float32) * s.to(torch.float32)
        return t.to(dtype)

    def rows(self, key: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) of the real weight, and only those read from the file: what one rank of a sharded model owns. Scaled fp8 weights are dequantized as
        ``dequantized`` does (the scale is one number per tensor, so a slice dequantizes alone); ``dtype`` casts."""
        st = self.stored(key)
        if not 0 <= start <= stop <= (st.shape[0] if st.shape else 1):
            raise PareFormatError(f"{st.file}: rows {start}:{stop} are outside tensor '{st.name}' of shape "
                                  f"{list(st.shape)}")
        t = self._read(st, (start, stop))
        s = self.scale(key)
        if s is not None:
            t = t.to(torch.float32) * s.to(torch.float32)
        return t if dtype is None else t.to(dtype)

    def state_dict(self, dequantize: bool = True, dtype: torch.dtype | None = None,
                   quant_layout: str | None = None) -> dict[str, torch.Tensor]:
        """Every tensor at once (small models). ``dequantize``: scaled fp8 weights as fp32 real weights, the rest as
        stored (or all cast to ``dtype``). Without it: ComfyUI's own layout, raw weights plus their scales, in the
        file's quantization layout or in ``quant_layout`` (``"scaled_fp8"``: the marker layout ComfyUI 0.3.x reads,
        also for a per-layer file)."""
        if dequantize:
            return {k: (self.dequantized(k, dtype or torch.float32) if k in self._scales or dtype is not None
                        else self.tensor(k)) for k in self._weights}
        sd = {k: self.tensor(k) if dtype is None else self.tensor(k).to(dtype) for k in self._weights}
        layout = quant_layout or self.quant_layout or MARKER
        for key, kinds in self._scales.items():
            base = key[: -len(".weight")]
            for kind, st in kinds.items():
                sd[f"{base}.{STORED_NAME[(layout, kind)]}"] = self._read(st)
        if layout == PER_LAYER:
            for key, conf in self._layer_quant.items():
                sd[f"{key[: -len('.weight')]}.{COMFY_QUANT}"] = conf.encode()
        elif self._marker is not None:
            sd[SCALED_FP8_MARKER] = self._read(self._marker)
        elif self._layer_quant:  # per-layer file for a ComfyUI that reads the marker layout only
            sd[SCALED_FP8_MARKER] = marker_for(list(self._layer_quant.values()), str(self.path))
            for key in self._layer_quant:  # the per-layer layout drops input scales of 1.0; 0.3.x expects them
                sd.setdefault(f"{key[: -len('.weight')]}.{SCALE_INPUT}", torch.ones((), dtype=torch.float32))
        return sd

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, stored tensor), one read at a time."""
        for key in self._weights:
            yield key, self.tensor(key)

    def describe_format(self) -> dict:
        """What ``inspect`` reports about the file itself."""
        out = {"layout": self.layout, "files": len(self.files), "scaled_fp8": self.scaled_fp8}
        if self.scaled_fp8:
            out["quant_layout"] = self.quant_layout
            out["scaled_fp8_dtype"] = str(self.scaled_fp8_dtype).removeprefix("torch.")
            out["scaled_weights"] = len(self._scales)
        dtypes: dict[str, int] = {}
        for st in self._weights.values():
            dtypes[st.dtype] = dtypes.get(st.dtype, 0) + 1
        out["weight_dtypes"] = dtypes
        return out

    def rows_into(self, key: str, start: int, stop: int, out: torch.Tensor) -> None:
        """``out[...] = rows(key, start, stop)`` in ``out``'s dtype. When the file stores that dtype unscaled and
        ``out`` is a contiguous CPU tensor, the bytes are read straight into it (no intermediate tensor)."""
        st = self.stored(key)
        direct = (self.dtype(key) == out.dtype and key not in self._scales and out.device.type == "cpu"
                  and out.is_contiguous() and out.numel() == (stop - start) * math.prod(st.shape[1:]))
        if not direct:
            out.copy_(self.rows(key, start, stop, out.dtype).reshape(out.shape))
            return
        if not 0 <= start <= stop <= (st.shape[0] if st.shape else 1):
            raise PareFormatError(f"{st.file}: rows {start}:{stop} are outside tensor '{st.name}' of shape "
                                  f"{list(st.shape)}")
        self._read(st, (start, stop), out)

    def _read(self, st: StoredTensor, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None
              ) -> torch.Tensor:
        """The tensor, or only its rows ``rows`` = (start, stop) of the first dimension (contiguous bytes: tensors
        are stored row-major), read into ``out`` (contiguous, the stored dtype) or a new tensor."""
        dtype = torch_dtype(st.dtype, f"{st.file}: '{st.name}'")
        start, stop = rows if rows is not None else (0, st.shape[0] if st.shape else 1)
        if out is None:
            out = torch.empty(st.shape if rows is None else (stop - start, *st.shape[1:]), dtype=dtype)
        row_bytes = dtype.itemsize * math.prod(st.shape[1:])
        began = time.perf_counter()
        read_into(st.file, st.offset + start * row_bytes, out)
        self.read_seconds += time.perf_counter() - began
        self.bytes_read += out.nbytes
        return out

    def close(self) -> None:
        """Nothing stays open between reads; kept so the reader is a context manager like a file."""

    def __enter__(self) -> "WanReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _find_prefix(stored: dict[str, StoredTensor]) -> str:
    for prefix in KNOWN_PREFIXES:
        if any(prefix + anchor in stored for anchor in _ANCHORS):
            return prefix
    return ""


def _rename_diffusers(weights: dict[str, StoredTensor], scales: dict[str, dict[str, StoredTensor]], source: str
                      ) -> tuple[dict[str, StoredTensor], dict[str, dict[str, StoredTensor]]]:
    """diffusers names -> original names. A name with no original twin is kept, so the checks report it."""
    renamed: dict[str, StoredTensor] = {}
    for key, st in weights.items():
        new = diffusers_key(key) or key
        if new in renamed:
            raise PareFormatError(f"{source}: '{st.name}' and '{renamed[new].name}' both map to Wan's '{new}'; "
                                  "the file mixes diffusers and original names")
        renamed[new] = st
    return renamed, {(diffusers_key(k) or k): v for k, v in scales.items()}


def open_wan(path: str | os.PathLike) -> WanReader:
    """Open and validate a Wan checkpoint in any layout (see the module docstring); use it as a context manager."""
    reader = WanReader(path)
    logger.debug("%s: %s layout, %d file(s)%s", reader.path, reader.layout, len(reader.files),
                 ", fp8_scaled" if reader.scaled_fp8 else "")
    return reader


def read_meta(path: str | os.PathLike) -> tuple[PrunedWanMeta, str]:
    """Validate a Wan checkpoint's headers without loading tensors: (metadata, the key prefix the file uses).

    Kept for callers of the single-file API; ``open_wan`` reads every layout.
    """
    with open_wan(path) as reader:
        return reader.meta, reader.prefix


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], PrunedWanMeta]:
    """Load and validate a Wan checkpoint in any layout; original keys, tensors as stored (scales applied
    for fp8_scaled files). See ``open_wan`` for streaming and the raw scaled layout."""
    with open_wan(path) as reader:
        return reader.state_dict(), reader.meta
