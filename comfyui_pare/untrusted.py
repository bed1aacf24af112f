"""Checks for text, numbers and files that come from strangers (shared workflows, downloaded models).

A node input is text from whoever wrote the workflow, and a model file's header is a download: every parser
bounds its work by the model it applies to or by a fixed cap, never by a number written in the input, and an
error quotes only a short prefix of what it refuses (an echo of a megabyte of text is a denial of service too).
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from typing import Any

from .errors import PareError

MAX_JSON_BYTES = 1 << 20  # a schedule JSON is a few kB; 1 MiB leaves room and bounds what json.loads builds
QUOTE_CHARS = 48  # how much of an offending text an error repeats


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr`` of a value, cut to a bounded prefix: error messages never repeat a whole hostile input."""
    text = value if isinstance(value, str) else _safe_repr(value)
    if len(text) <= limit:
        return repr(text) if isinstance(value, str) else text
    shown = repr(text[:limit]) if isinstance(value, str) else text[:limit]
    return f"{shown}... ({len(text)} characters)"


def load_json(text: str, where: str, max_chars: int = MAX_JSON_BYTES, error: type[PareError] = PareError) -> Any:
    """``json.loads`` of untrusted text, bounded: a length cap before parsing, and the pack's error (naming ``where``)
    for malformed JSON, integers of thousands of digits and arrays nested thousands deep."""
    if len(text) > max_chars:
        raise error(f"{where}: {len(text)} characters of JSON; at most {max_chars} are read")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    except (ValueError, RecursionError) as e:
        raise error(f"{where}: not a usable JSON document ({type(e).__name__}: {quote(str(e))})") from None


def _safe_repr(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 100:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, (list, tuple, dict)) and len(value) > QUOTE_CHARS:
        return f"a {type(value).__name__} of {len(value)} items"
    try:
        return repr(value)
    except (ValueError, RecursionError):  # an int too long to print, a structure nested too deep
        return f"a {type(value).__name__}"


def strict_int(value: Any, where: str, low: int, high: int, error: type[PareError] = PareError) -> int:
    """An integer in [low, high]: floats (even 3.0), booleans and strings are refused, not rounded."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{where} must be an integer, got {quote(value)}")
    if not low <= value <= high:
        raise error(f"{where} must be in [{low}, {high}], got {quote(value)}")
    return value


def finite_number(value: Any, where: str) -> float:
    """A finite int or float (not a boolean): NaN and infinities are refused because comparisons let them through."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PareError(f"{where} must be a number, got {quote(value)}")
    try:
        f = float(value)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise PareError(f"{where} must be a finite number, got {quote(value)}")
    return f


def read_regular_file(path: str | os.PathLike, what: str, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; FIFOs, devices, sockets and directories are refused.

    Opened with O_NONBLOCK (opening a FIFO without a writer would block the caller forever, past any interrupt) and
    checked with fstat on the open descriptor, so the file checked is the file read. ``what`` names the file in
    errors (e.g. "token schedule file 'x.json'").
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        why = "no such file" if e.errno == errno.ENOENT else e.strerror or type(e).__name__
        raise PareError(f"{what}: cannot be read ({why})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PareError(f"{what}: cannot be read (not a regular file)")
        if st.st_size > max_bytes:
            raise PareError(f"{what}: cannot be read ({st.st_size} bytes; the limit is {max_bytes})")
        chunks, total = [], 0
        while True:  # read to the end, never past the cap (the file may grow while it is read)
            chunk = os.read(fd, min(1 << 16, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise PareError(f"{what}: cannot be read (more than {max_bytes} bytes)")
        return b"".join(chunks)
    except OSError as e:
        raise PareError(f"{what}: cannot be read ({e.strerror or type(e).__name__})") from None
    finally:
        os.close(fd)


def read_text_file(path: str | os.PathLike, what: str, max_bytes: int = MAX_JSON_BYTES) -> str:
    """``read_regular_file`` decoded as UTF-8; undecodable bytes are an error naming the file."""
    raw = read_regular_file(path, what, max_bytes)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PareError(f"{what}: cannot be read (not UTF-8 text: {e.reason} at byte {e.start})") from None
