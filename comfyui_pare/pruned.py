"""The pruned-Wan checkpoint format.

A pruned checkpoint is a safetensors file in the original Wan key layout whose per-block self-attention
and FFN tensors are narrowed to the kept heads / neurons. Its header metadata (key ``pare``, a JSON object)
makes it self-describing:

    {"format_version": 1, "variant": "t2v", "family": "wan2.1-t2v",
     "teacher": {"dim", "num_heads", "head_dim", "ffn_dim", "num_layers", "text_dim", "in_dim", "out_dim"},
     "blocks": [{"heads": [kept head indices], "ffn": [kept neuron indices]}, ...]}

Indices are in the teacher's numbering, sorted. A plain Wan file (no ``pare`` key) is read as a 0%-pruned
teacher with head dim 128, ComfyUI's own assumption, its family told by its keys as ComfyUI's detection tells it.

``family`` names the ``model_family`` entry (Wan2.2 TI2V-5B, VACE, ...); files written before it was stored read
as the family their channels imply. A VACE teacher's "teacher" object also has "vace_layers" and "vace_in_dim";
its VACE blocks are always stored at the teacher's widths. The fingerprint leaves out a family that the channels
imply, so the fingerprints of files from before (and the routers naming them) are unchanged.

A depth-pruned student (whole teacher blocks removed, VDMini style) also has ``"kept_blocks": [teacher block
indices]``, sorted: student block i (key ``blocks.i.``) is teacher block ``kept_blocks[i]``, and ``blocks`` lists
the widths of the kept blocks only. Such files say ``"format_version": 2``; files without ``kept_blocks`` are
still written as version 1, so their fingerprints and older readers are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Mapping

import torch

from .errors import PareFormatError, shape_error
from .model_family import UnsupportedFamily, detect_family, family_for, require_supported
from .safetensors_io import save_atomic
from .untrusted import quote, strict_int
from .wan import DEFAULT_HEAD_DIM, BlockWidth, WanDims, model_shapes

FORMAT_VERSION = 2  # the newest version this pack reads; 2 adds "kept_blocks"
WIDTH_ONLY_VERSION = 1
METADATA_KEY = "pare"
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class PrunedWanMeta:
    """Teacher dims plus the kept heads / FFN neurons of every block (and, depth-pruned, which blocks remain)."""

    dims: WanDims
    blocks: tuple[BlockWidth, ...]
    # Teacher indices of the blocks present, one per entry of ``blocks``; None: every teacher block, in order.
    kept_blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        kept = self.kept_blocks
        if kept is not None:
            kept = tuple(int(j) for j in kept)
            _check_indices(kept, self.dims.num_layers, "kept_blocks")
            if len(kept) != len(self.blocks):
                raise PareFormatError(f"kept_blocks names {len(kept)} teacher blocks but 'blocks' lists "
                                      f"{len(self.blocks)}; there is one width entry per kept block")
            if self.dims.vace_layers and len(kept) != self.dims.num_layers:
                raise PareFormatError(f"a {self.dims.spec.title} model cannot lose whole blocks: ComfyUI adds the "
                                      "VACE hints after fixed main blocks (every num_layers // vace_layers-th); "
                                      "prune widths, and skip blocks with a router or a static schedule")
            # Canonical form: keeping every block is the width-only case (same JSON, same fingerprint).
            object.__setattr__(self, "kept_blocks", None if len(kept) == self.dims.num_layers else kept)
        elif len(self.blocks) != self.dims.num_layers:
            raise PareFormatError(f"metadata lists {len(self.blocks)} blocks but the teacher has {self.dims.num_layers} "
                                  "and there is no 'kept_blocks' list saying which ones remain")
        for i, b in enumerate(self.blocks):
            _check_indices(b.heads, self.dims.num_heads, f"block {i} heads")
            _check_indices(b.ffn, self.dims.ffn_dim, f"block {i} ffn")

    @classmethod
    def teacher(cls, dims: WanDims) -> "PrunedWanMeta":
        return cls(dims, tuple(BlockWidth.full(dims) for _ in range(dims.num_layers)))

    @property
    def is_pruned(self) -> bool:
        # Counts suffice (indices are validated sorted, unique and in range); nothing is built from the dims.
        d = self.dims
        return self.kept_blocks is not None or any(b.num_heads != d.num_heads or b.ffn_dim != d.ffn_dim
                                                   for b in self.blocks)

    @property
    def num_blocks(self) -> int:
        """Blocks in the model this metadata describes (the teacher's count unless depth-pruned)."""
        return len(self.blocks)

    @property
    def teacher_blocks(self) -> tuple[int, ...]:
        """The teacher block index of every block present, in order."""
        return self.kept_blocks if self.kept_blocks is not None else tuple(range(self.dims.num_layers))

    def to_json(self) -> dict:
        obj = {
            "format_version": WIDTH_ONLY_VERSION if self.kept_blocks is None else FORMAT_VERSION,
            "variant": self.dims.variant,
            "family": self.dims.family,
            "teacher": {k: v for k, v in self.dims.to_dict().items() if k != "variant"},
            "blocks": [{"heads": list(b.heads), "ffn": list(b.ffn)} for b in self.blocks],
        }
        if self.kept_blocks is not None:
            obj["kept_blocks"] = list(self.kept_blocks)
        return obj

    @classmethod
    def from_json(cls, obj: Mapping, source: str = "metadata") -> "PrunedWanMeta":
        try:
            version = int(obj["format_version"])
        except (KeyError, TypeError, ValueError) as e:
            raise PareFormatError(f"{source}: PARE metadata has no valid 'format_version'") from e
        if version > FORMAT_VERSION:
            raise PareFormatError(
                f"{source}: PARE format version {version} is newer than this pack supports ({FORMAT_VERSION}); "
                "update comfyui-pare"
            )
        check_header_numbers(obj, source)
        fam = obj.get("family", "")
        if not isinstance(fam, str):
            raise PareFormatError(f"{source}: PARE metadata field 'family' must be a family name, got {quote(fam)}")
        try:
            dims = WanDims.from_dict({**obj["teacher"], "variant": obj["variant"], "family": fam})
            blocks = tuple(BlockWidth(_index_list(b["heads"], source, f"blocks[{i}].heads"),
                                      _index_list(b["ffn"], source, f"blocks[{i}].ffn"))
                           for i, b in enumerate(obj["blocks"]))
        except PareFormatError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise PareFormatError(f"{source}: PARE metadata is malformed ({type(e).__name__}: {e})") from e
        kept = obj.get("kept_blocks")
        if kept is not None and (not isinstance(kept, list)
                                 or not all(isinstance(j, int) and not isinstance(j, bool) for j in kept)):
            raise PareFormatError(f"{source}: PARE metadata key 'kept_blocks' must be a list of teacher block "
                                  f"indices (integers), got {str(kept)[:60]}")
        try:
            return cls(dims, blocks, tuple(kept) if kept is not None else None)
        except PareFormatError as e:
            raise PareFormatError(f"{source}: {e}") from None

    def to_header(self) -> dict[str, str]:
        return {METADATA_KEY: json.dumps(self.to_json(), separators=(",", ":")), "format": "pt"}

    def fingerprint(self) -> str:
        """A short hash of the architecture (teacher dims and kept indices): routers name the model they fit."""
        obj = self.to_json()
        d = self.dims
        if obj["family"] == family_for(d.in_dim, d.out_dim, d.variant == "i2v", vace=d.vace_layers > 0).name:
            del obj["family"]  # implied by the dims: hash as files from before the family was stored
        blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return model_shapes(self.dims, list(self.blocks))


# Bounds for the numbers a header states, checked with their types before anything is built from them (Wan2.1
# 14B: dim 5120, 40 heads, FFN 13824 = 2.7 x dim, 40 layers). The teacher's dim is also checked against the
# file's own 'head.modulation' (meta_from_header), whose size is backed by bytes in the file.
_TEACHER_BOUNDS = {"dim": 1 << 16, "num_heads": 1 << 12, "num_layers": 256, "text_dim": 1 << 16, "in_dim": 1 << 12,
                   "out_dim": 1 << 12, "vace_layers": 256, "vace_in_dim": 1 << 12}
MAX_FFN_PER_DIM = 64  # Wan: 2.7x-5.8x; narrow stand-ins of a real FFN (14B's 13824 at dim 256): 54x


def check_header_numbers(obj: Mapping, source: str, model_dim: int | None = None) -> None:
    """Refuse non-integer, non-finite or absurd teacher dims in PARE metadata before anything is allocated from
    them; ``model_dim``: the width the file's tensors show, if known. Errors name the file and the field."""
    teacher = obj.get("teacher") if isinstance(obj, Mapping) else None
    if not isinstance(teacher, Mapping):
        return  # from_json reports the malformed metadata
    field = f"{source}: PARE metadata field 'teacher.{{}}'"
    for name, high in _TEACHER_BOUNDS.items():
        if name in teacher:
            strict_int(teacher[name], field.format(name), 1, high, PareFormatError)
    if "ffn_dim" in teacher:
        dim = teacher.get("dim", 1)
        strict_int(teacher["ffn_dim"], field.format("ffn_dim"), 1, MAX_FFN_PER_DIM * dim, PareFormatError)
    if "head_dim" in teacher:
        strict_int(teacher["head_dim"], field.format("head_dim"), 1, _TEACHER_BOUNDS["dim"], PareFormatError)
    if model_dim is not None and "dim" in teacher and teacher["dim"] != model_dim:
        raise PareFormatError(f"{field.format('dim')} is {teacher['dim']}, but the file's tensor 'head.modulation' "
                              f"is {model_dim} wide")


def _index_list(value: object, source: str, where: str) -> tuple[int, ...]:
    """Kept indices as stored: integers only (0.5 or true are refused, not rounded)."""
    if not isinstance(value, list) or not all(isinstance(j, int) and not isinstance(j, bool) for j in value):
        raise PareFormatError(f"{source}: PARE metadata field '{where}' must be a list of integer indices, got "
                              f"{quote(value)}")
    return tuple(value)


def _check_indices(idx: tuple[int, ...], total: int, what: str) -> None:
    if not idx:
        raise PareFormatError(f"{what}: keeps nothing; at least one must be kept (skip whole blocks with a router)")
    for j in idx:
        if not 0 <= j < total:
            raise PareFormatError(f"{what}: index {j} is out of range [0, {total - 1}]")
    if any(b <= a for a, b in zip(idx, idx[1:])):
        raise PareFormatError(f"{what}: indices must be sorted and unique, got {list(idx)[:12]}...")


def _infer_plain_meta(shapes: Mapping[str, tuple[int, ...]], path: str) -> PrunedWanMeta:
    """Read a plain (unpruned) Wan file as a teacher, the way ComfyUI detects it."""
    if "head.modulation" not in shapes or "patch_embedding.weight" not in shapes:
        sample = ", ".join(list(shapes)[:3]) or "no tensors"
        raise PareFormatError(
            f"{path}: not a Wan diffusion model (no 'head.modulation' / 'patch_embedding.weight'; "
            f"first keys: {sample})"
        )
    if not shapes["head.modulation"]:
        raise PareFormatError(f"{path}: tensor 'head.modulation' is a scalar; a Wan model's is [1, 2, dim]")
    dim = shapes["head.modulation"][-1]
    ffn_shape = shapes.get("blocks.0.ffn.0.weight")
    if ffn_shape is not None and tuple(ffn_shape[1:]) != (dim,):  # checked before widths are built from its shape
        raise PareFormatError(f"{path}: tensor 'blocks.0.ffn.0.weight' has shape {list(ffn_shape)}, expected "
                              f"[ffn_dim, {dim}] (dim from 'head.modulation')")
    layers = 0
    while f"blocks.{layers}.modulation" in shapes:
        layers += 1
    if layers == 0 or "blocks.0.ffn.0.weight" not in shapes:
        raise PareFormatError(f"{path}: Wan file has no transformer blocks ('blocks.0.*' missing)")
    if dim % DEFAULT_HEAD_DIM:
        raise PareFormatError(
            f"{path}: dim {dim} is not a multiple of {DEFAULT_HEAD_DIM} and the file has no PARE metadata, "
            "so its head count is unknown; write it with `python -m comfyui_pare prune` to record the dims"
        )
    try:
        fam = require_supported(detect_family(shapes), path)
    except UnsupportedFamily as e:
        raise PareFormatError(str(e)) from None
    vace = _vace_dims(shapes, path) if fam.name == "wan2.1-vace" else {}
    try:
        dims = WanDims(
            dim=dim,
            num_heads=dim // DEFAULT_HEAD_DIM,
            ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
            num_layers=layers,
            text_dim=shapes.get("text_embedding.0.weight", (0, 4096))[1],
            in_dim=shapes["patch_embedding.weight"][1],
            out_dim=shapes.get("head.head.weight", (16 * 4,))[0] // fam.patch_volume,
            variant=fam.cross_attn,
            family=fam.name,
            **vace,
        )
    except ValueError as e:
        raise PareFormatError(f"{path}: {e}") from None
    return PrunedWanMeta.teacher(dims)


def _vace_dims(shapes: Mapping[str, tuple[int, ...]], path: str) -> dict[str, int]:
    """vace_layers / vace_in_dim of a plain VACE file, as ComfyUI's detection counts them."""
    embed = shapes["vace_patch_embedding.weight"]
    if len(embed) != 5:
        raise PareFormatError(f"{path}: tensor 'vace_patch_embedding.weight' has shape {list(embed)}, expected "
                              "[dim, vace_in_dim, 1, 2, 2]")
    layers = 0
    while f"vace_blocks.{layers}.after_proj.weight" in shapes:
        layers += 1
    if layers == 0:
        raise PareFormatError(f"{path}: VACE file has 'vace_patch_embedding' but no 'vace_blocks.0.*'")
    return {"vace_layers": layers, "vace_in_dim": embed[1]}


def meta_from_header(metadata: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]], path: str) -> PrunedWanMeta:
    """The PARE metadata of a file's header, or (a plain Wan file) the teacher its shapes describe."""
    if METADATA_KEY not in metadata:
        return _infer_plain_meta(shapes, path)
    try:
        obj = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise PareFormatError(f"{path}: PARE metadata is not valid JSON ({e})") from e
    modulation = shapes.get("head.modulation")
    check_header_numbers(obj, path, modulation[-1] if modulation else None)
    return PrunedWanMeta.from_json(obj, source=path)


def check_tensors(
    meta: PrunedWanMeta, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str], path: str,
    stored_name=lambda key: key, has_metadata: bool = False,
) -> None:
    """Every expected tensor present with its shape and a float dtype, and nothing else.

    ``shapes`` / ``dtypes`` use original keys without prefix; ``stored_name`` gives the name a key has in the file,
    so errors name what the user can find there.
    """
    expected = meta.expected_shapes()
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise PareFormatError(
            f"{path}: {len(missing)} tensor(s) missing for a {meta.dims.spec.title} with {meta.num_blocks} "
            f"blocks, e.g. '{stored_name(missing[0])}' (expected shape {list(expected[missing[0]])})"
        )
    extra = [k for k in shapes if k not in expected]
    if extra:
        raise PareFormatError(
            f"{path}: {len(extra)} unexpected tensor(s) for a {meta.dims.spec.title} with "
            f"{meta.num_blocks} blocks, e.g. '{stored_name(extra[0])}'"
        )
    for key, want in expected.items():
        if shapes[key] != want:
            raise shape_error(path, stored_name(key), want, shapes[key],
                              "shape disagrees with the PARE metadata" if has_metadata else "")
        if dtypes[key] not in FLOAT_DTYPES:
            raise PareFormatError(
                f"{path}: tensor '{stored_name(key)}' has dtype {dtypes[key]}; Wan weights are floating point")


def save_checkpoint(path: str | os.PathLike, sd: Mapping[str, torch.Tensor], meta: PrunedWanMeta) -> None:
    """Check shapes against the metadata, then write atomically."""
    expected = meta.expected_shapes()
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    if missing or extra:
        raise PareFormatError(f"{path}: state dict does not match its metadata (missing {missing[:3]}, extra {extra[:3]})")
    for key, want in expected.items():
        if tuple(sd[key].shape) != want:
            raise shape_error(str(path), key, want, tuple(sd[key].shape))
    save_atomic(path, sd, meta.to_header())


FP8_MATMUL_MULTIPLE = 16  # torch._scaled_mm (fp8 matmuls) needs both matrix dims to be multiples of 16


def unaligned_widths(meta: PrunedWanMeta, multiple: int = FP8_MATMUL_MULTIPLE) -> list[str]:
    """The per-block widths (FFN, self-attention) that are not multiples of ``multiple``, e.g. ['block 3 ffn 1001']."""
    out = []
    for i, b in enumerate(meta.blocks):
        if b.ffn_dim % multiple:
            out.append(f"block {i} ffn {b.ffn_dim}")
        if (b.num_heads * meta.dims.head_dim) % multiple:
            out.append(f"block {i} self-attention {b.num_heads * meta.dims.head_dim}")
    return out


def describe(meta: PrunedWanMeta) -> dict:
    """A JSON-friendly summary: teacher dims, per-block widths and the overall kept fractions."""
    dims = meta.dims
    heads = [b.num_heads for b in meta.blocks]
    ffn = [b.ffn_dim for b in meta.blocks]
    return {
        "format_version": meta.to_json()["format_version"],
        "variant": dims.variant,
        "family": dims.family,
        "title": dims.spec.title,
        "teacher": {k: v for k, v in dims.to_dict().items() if k != "variant"},
        "pruned": meta.is_pruned,
        "fingerprint": meta.fingerprint(),
        "num_blocks": meta.num_blocks,
        "kept_blocks": list(meta.teacher_blocks),
        # Over the teacher's blocks: a removed block keeps none of its heads or neurons.
        "kept_heads_fraction": sum(heads) / (dims.num_heads * dims.num_layers),
        "kept_ffn_fraction": sum(ffn) / (dims.ffn_dim * dims.num_layers),
        "blocks": [
            {"index": i, "teacher_block": t, "heads": b.num_heads, "ffn": b.ffn_dim, "kept_heads": list(b.heads)}
            for i, (t, b) in enumerate(zip(meta.teacher_blocks, meta.blocks))
        ],
    }
