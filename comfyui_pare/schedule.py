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

_ENTRY = re.compile(r"^\s*(\d+)(?:\s*-\s*(\d+))?\s*(?:@\s*([0-9.]+)\s*-\s*([0-9.]+))?\s*$")


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
    """Parse the text form; errors name the entry at fault and what is wrong with it."""
    entries = [e for e in re.split(r"[;,\n]", text) if e.strip()]
    if not entries:
        raise PareError("the static schedule is empty; write e.g. '10-17@0.3-1.0' (blocks 10 to 17 from 30% to 100%)")
    out = []
    for entry in entries:
        m = _ENTRY.match(entry)
        if not m:
            raise PareError(f"schedule entry '{entry.strip()}' is not of the form 'A-B@start-end' (e.g. '10-17@0.3-1.0')")
        a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        start = float(m.group(3)) if m.group(3) is not None else 0.0
        end = float(m.group(4)) if m.group(4) is not None else 1.0
        if b < a:
            raise PareError(f"schedule entry '{entry.strip()}': block range {a}-{b} is reversed")
        if not (0.0 <= start <= end <= 1.0):
            raise PareError(f"schedule entry '{entry.strip()}': percents must satisfy 0 <= start <= end <= 1")
        if num_blocks is not None and b >= num_blocks:
            raise PareError(
                f"schedule entry '{entry.strip()}': block {b} does not exist (the model has blocks 0-{num_blocks - 1})"
            )
        out.append(SkipRange(a, b, start, end))
    return tuple(out)
