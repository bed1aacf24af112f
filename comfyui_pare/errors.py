"""Exceptions with messages that name the file, the key and what was expected."""

from __future__ import annotations


class PareError(ValueError):
    """Base class: a bad input file or argument. The message says what is wrong and where."""


class PareFileError(PareError):
    """A file that cannot be read as a safetensors file (missing, truncated, pickle, not safetensors)."""


class PareFormatError(PareError):
    """A readable safetensors file whose contents disagree with what it claims or what is expected."""


def shape_error(path: str, key: str, expected: tuple, found: tuple, why: str = "") -> PareFormatError:
    extra = f" ({why})" if why else ""
    return PareFormatError(
        f"{path}: tensor '{key}' has shape {list(found)}, expected {list(expected)}{extra}"
    )
