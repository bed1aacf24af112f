"""A folder of many calibration samples, indexed from the file headers and read when a step draws them.

At start only each file's safetensors header is read (its metadata and tensor shapes: a few KB per file), which is
enough to check what must hold for the whole run before step 1: one latent shape, the teacher's text dim, CLIP
features for I2V, and to know the longest context (every batch is padded to it, so a row's input never depends on
which rows share its batch). A sample's tensors are read and prepared (``data.prepare_sample``) when a step first
draws it, and the last ``cache_size`` prepared samples are kept. Samples without a stored latent, which the teacher
must generate (``data.generate_steps``), are prepared at start: generation is a collective under FSDP2, so every
rank does it for every such sample in the same order.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

from comfyui_pare.calibration import METADATA_KEY, list_samples, read_sample
from comfyui_pare.errors import PareFormatError
from comfyui_pare.safetensors_io import read_header
from comfyui_pare.wan import WanDims

from .data import PreparedSample, prepare_sample
from .targets import file_sha256


@dataclass(frozen=True)
class SampleHeader:
    """What the index knows of a sample without reading its tensors."""

    path: Path
    latent_shape: tuple[int, ...]
    context_tokens: int
    text_dim: int
    has_latent: bool
    has_clip: bool


def read_sample_header(path: str | os.PathLike) -> SampleHeader:
    """A sample's header: the shapes and metadata ``read_sample`` validates in full when the tensors are read."""
    entries, metadata = read_header(path)
    try:
        shape = tuple(int(n) for n in json.loads(metadata[METADATA_KEY])["latent_shape"])
        ctx = tuple(int(n) for n in entries["context"]["shape"])
        if len(ctx) != 2 or len(shape) != 4:
            raise ValueError("shape")
    except (ValueError, TypeError, KeyError):
        read_sample(path)  # raises the validator's error, naming the file and the field
        raise PareFormatError(f"{path}: not a valid calibration sample header") from None
    return SampleHeader(Path(path), shape, ctx[0], ctx[1], "latent" in entries, "clip_fea" in entries)


class SampleIndex:
    """The calibration samples of a folder as a sequence of ``PreparedSample``, read lazily (module docstring)."""

    def __init__(self, folder: str | os.PathLike, dims: WanDims, cache_size: int = 64,
                 hash_files: bool = False) -> None:
        """``hash_files``: give each prepared sample its file's SHA-256 (fixed draws and cached targets need it)."""
        self.headers = [read_sample_header(p) for p in list_samples(folder)]
        first = self.headers[0]
        for h in self.headers:
            if h.text_dim != dims.text_dim:
                raise PareFormatError(f"{h.path}: calibration sample field 'context' has text dim {h.text_dim}, "
                                      f"the teacher expects {dims.text_dim}")
            if dims.variant == "i2v" and not h.has_clip:
                raise PareFormatError(f"{h.path}: calibration sample field 'clip_fea' is missing; an I2V teacher "
                                      "needs the CLIP vision features of the start image")
            if h.latent_shape != first.latent_shape:
                raise PareFormatError(f"{h.path}: calibration sample field 'latent_shape' is {list(h.latent_shape)} "
                                      f"but {first.path} has {list(first.latent_shape)}; a training batch needs one "
                                      "shape")
        self.dims, self.cache_size, self.hash_files = dims, cache_size, hash_files
        self.latent_shape = first.latent_shape
        self.context_length = max(h.context_tokens for h in self.headers)
        self._cache: OrderedDict[int, PreparedSample] = OrderedDict()
        self._generated: dict[int, PreparedSample] = {}

    def generate_missing(self, teacher, steps: int, shift: float) -> None:
        """Prepare now every sample without a stored latent (the teacher generates it; an error if ``steps`` is 0)."""
        for i, h in enumerate(self.headers):
            if not h.has_latent:
                self._generated[i] = self._with_hash(prepare_sample(read_sample(h.path), self.dims, teacher, steps,
                                                                    shift))

    def _with_hash(self, sample: PreparedSample) -> PreparedSample:
        return replace(sample, sha256=file_sha256(sample.path)) if self.hash_files else sample

    def __len__(self) -> int:
        return len(self.headers)

    def __getitem__(self, i: int | slice) -> PreparedSample | list[PreparedSample]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if i in self._generated:
            return self._generated[i]
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        sample = self._with_hash(prepare_sample(read_sample(self.headers[i].path), self.dims))
        self._cache[i] = sample
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return sample
