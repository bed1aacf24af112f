"""The toy world's text encoder: a learned embedding of prompt words, shaped like umT5's output.

Wan2.1 is conditioned by umT5-XXL states [L, 4096], zero beyond the prompt's tokens. The toy encoder keeps that
convention at a small width: a prompt of n known words becomes ``word_embedding[ids] + position_embedding[:n]``
in its first n rows and zeros in the remaining ``max_len - n`` rows, so the empty prompt (the CFG uncond the
teacher was trained with) is all zeros. Words are lower-cased and split on anything that is not a letter.

File format (safetensors): ``word_embedding`` [V, D], ``position_embedding`` [max_len, D]; metadata
``pare_toy_text`` = "1" and ``vocab`` = JSON list of the V words in row order.
"""

from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from .errors import PareFormatError
from .safetensors_io import load_tensors, save_atomic

FORMAT_KEY, FORMAT_VERSION = "pare_toy_text", "1"
WORD_RE = re.compile(r"[a-z]+")


class ToyTextEncoder(nn.Module):
    def __init__(self, vocab: list[str], dim: int, max_len: int) -> None:
        super().__init__()
        if len(set(vocab)) != len(vocab) or not all(WORD_RE.fullmatch(w) for w in vocab):
            raise ValueError(f"vocab must be distinct lower-case words, got {vocab}")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(vocab)}
        self.max_len = max_len
        self.word_embedding = nn.Parameter(torch.randn(len(vocab), dim) * 0.5)
        self.position_embedding = nn.Parameter(torch.randn(max_len, dim) * 0.1)

    @property
    def dim(self) -> int:
        return self.word_embedding.shape[1]

    def tokenize(self, prompt: str) -> list[int]:
        words = WORD_RE.findall(prompt.lower())
        unknown = sorted({w for w in words if w not in self.index})
        if unknown:
            raise ValueError(f"toy text encoder: unknown word(s) {unknown} in prompt {prompt!r}; "
                             f"it knows only: {' '.join(self.vocab)}")
        if len(words) > self.max_len:
            raise ValueError(f"toy text encoder: prompt {prompt!r} has {len(words)} words, at most {self.max_len}")
        return [self.index[w] for w in words]

    def embed_ids(self, ids: list[list[int]]) -> torch.Tensor:
        """Token id lists -> [B, max_len, dim], zero rows after each prompt's words (differentiable)."""
        out = self.word_embedding.new_zeros(len(ids), self.max_len, self.dim)
        rows = [self.word_embedding[torch.tensor(seq, dtype=torch.long)] + self.position_embedding[:len(seq)]
                if seq else None for seq in ids]
        for b, r in enumerate(rows):
            if r is not None:
                out = out.index_put((torch.tensor([b]), torch.arange(r.shape[0])), r)
        return out

    def forward(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> conditioning [B, max_len, dim] (float32)."""
        return self.embed_ids([self.tokenize(p) for p in prompts])

    def save(self, path: str | os.PathLike) -> None:
        tensors = {"word_embedding": self.word_embedding.detach().float().contiguous(),
                   "position_embedding": self.position_embedding.detach().float().contiguous()}
        save_atomic(path, tensors, {FORMAT_KEY: FORMAT_VERSION, "vocab": json.dumps(self.vocab)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ToyTextEncoder":
        tensors, meta = load_tensors(path)
        if meta.get(FORMAT_KEY) != FORMAT_VERSION:
            raise PareFormatError(f"{path}: not a PARE toy text encoder (metadata '{FORMAT_KEY}' is "
                                  f"{meta.get(FORMAT_KEY)!r}, expected {FORMAT_VERSION!r})")
        try:
            vocab = json.loads(meta["vocab"])
        except (KeyError, json.JSONDecodeError) as e:
            raise PareFormatError(f"{path}: metadata 'vocab' missing or not JSON ({e})") from e
        for key in ("word_embedding", "position_embedding"):
            if key not in tensors or tensors[key].ndim != 2:
                raise PareFormatError(f"{path}: tensor '{key}' missing or not 2-D")
        words, pos = tensors["word_embedding"], tensors["position_embedding"]
        if words.shape[0] != len(vocab) or pos.shape[1] != words.shape[1]:
            raise PareFormatError(f"{path}: word_embedding {list(words.shape)} does not match {len(vocab)} vocab "
                                  f"words / position_embedding {list(pos.shape)}")
        enc = cls(vocab, words.shape[1], pos.shape[0])
        with torch.no_grad():
            enc.word_embedding.copy_(words.float())
            enc.position_embedding.copy_(pos.float())
        return enc.eval()
