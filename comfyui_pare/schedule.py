"""Static block schedules: the routing baseline without a learned router.

Text form, one or more entries separated by commas or semicolons::

    10-17@0.3-1.0      skip blocks 10..17 (both ends included) from 30% to 100% of the schedule
    5@0.5-0.8          skip block 5 between 50% and 80%
    20-21              skip blocks 20 and 21 for the whole schedule

Schedule positions are ComfyUI's start/end percent (0 = start of sampling, highest noise); the caller turns
them into sigmas with the model's own ``percent_to_sigma`` so a range means the same noise levels at any
step count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import PareError
from .untrusted import quote

# Matched against a stripped entry: every whitespace run sits between two literals (never two runs side by side),
# so a long blank costs linear time; numbers are checked for length before int()/float() see them.
_ENTRY = re.compile(r"([0-9]+)(?:\s*-\s*([0-9]+))?(?:\s*@\s*([0-9.]+)\s*-\s*([0-9.]+))?")
_PERCENT = re.compile(r"[0-9]*\.?[0-9]*")
MAX_TEXT = 10_000  # characters; a schedule for a 40-block model is a few dozen
MAX_ENTRY = 100  # characters per entry
_MAX_DIGITS = 18  # block numbers; Python refuses int() of very long ones with a bare ValueError
_MAX_PERCENT_CHARS = 20
_FORM = "'A-B@start-end' (e.g. '10-17@0.3-1.0')"


@dataclass(frozen=True)
class SkipRange:
    first_block: int
    last_block: int
    start_percent: float = 0.0
    end_percent: float = 1.0

    @property
    def blocks(self) -> range:
        return range(self.first_block, self.last_block + 1)


def parse_schedule(text: str, num_blocks: int | None = None) -> tuple[SkipRange, ...]:
    """Parse the text form; errors name the entry at fault (a bounded prefix of it) and what is wrong with it."""
    if len(text) > MAX_TEXT:
        raise PareError(f"the static schedule is {len(text)} characters long; at most {MAX_TEXT} are read")
    entries = [e.strip() for e in re.split(r"[;,\n]", text) if e.strip()]
    if not entries:
        raise PareError("the static schedule is empty; write e.g. '10-17@0.3-1.0' (blocks 10 to 17 from 30% to 100%)")
    return tuple(_parse_entry(entry, num_blocks) for entry in entries)


def _parse_entry(entry: str, num_blocks: int | None) -> SkipRange:
    shown = quote(entry)
    if len(entry) > MAX_ENTRY:
        raise PareError(f"schedule entry {shown} is longer than {MAX_ENTRY} characters; write it as {_FORM}")
    m = _ENTRY.fullmatch(entry)
    if not m:
        raise PareError(f"schedule entry {shown} is not of the form {_FORM}")
    first, last, start_text, end_text = m.groups()
    if any(len(g) > _MAX_DIGITS for g in (first, last) if g is not None):
        raise PareError(f"schedule entry {shown}: a block number has more than {_MAX_DIGITS} digits")
    a, b = int(first), int(last if last is not None else first)
    start = _percent(start_text, entry, "start") if start_text is not None else 0.0
    end = _percent(end_text, entry, "end") if end_text is not None else 1.0
    if b < a:
        raise PareError(f"schedule entry {shown}: block range {a}-{b} is reversed")
    if not (0.0 <= start <= end <= 1.0):
        raise PareError(f"schedule entry {shown}: percents must satisfy 0 <= start <= end <= 1")
    if num_blocks is not None and b >= num_blocks:
        raise PareError(f"schedule entry {shown}: block {b} does not exist (the model has blocks 0-{num_blocks - 1})")
    return SkipRange(a, b, start, end)


def _percent(text: str, entry: str, which: str) -> float:
    if len(text) > _MAX_PERCENT_CHARS or not _PERCENT.fullmatch(text) or text == ".":
        raise PareError(f"schedule entry {quote(entry)}: the {which} percent {quote(text)} is not a number like 0.3")
    return float(text)
