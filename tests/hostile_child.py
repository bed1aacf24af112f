"""Runs hostile inputs through the pack's parsers and loaders in a process with a memory cap (test_hostile_inputs).

Usage: ``python -m tests.hostile_child CASES.json HEADROOM_BYTES`` from the repository root (its packages import
from there, no path edits). After the imports, the address space is capped at what
the process already maps plus ``HEADROOM_BYTES`` (so an input that makes a parser build gigabytes fails here with a
MemoryError instead of taking the machine); then each case ``{"call": name, "args": [...], "kwargs": {...}}`` runs
and one JSON line per case reports the exception type, whether it is a PareError, the message and the seconds.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from comfyui_pare.errors import PareError
from comfyui_pare.pruned import describe
from comfyui_pare.router import load_router
from comfyui_pare.schedule import parse_schedule
from comfyui_pare.surgery import PrunePlan
from comfyui_pare.token_schedule import load_schedule, parse_schedule_text
from comfyui_pare.wan_reader import open_wan


def inspect_wan(path: str) -> dict:
    with open_wan(path) as reader:
        return describe(reader.meta)


CALLS = {
    "parse_schedule_text": parse_schedule_text,
    "load_schedule": load_schedule,
    "parse_schedule": parse_schedule,
    "load_router": load_router,
    "inspect_wan": inspect_wan,
    "load_plan": PrunePlan.load,
}


def _cap_memory(headroom: int) -> None:
    with open("/proc/self/status") as f:
        size_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    cap = size_kb * 1024 + headroom
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    _cap_memory(int(sys.argv[2]))
    for case in cases:
        t0 = time.perf_counter()
        report = {"error": None, "pare": False, "message": ""}
        try:
            CALLS[case["call"]](*case.get("args", []), **case.get("kwargs", {}))
        except BaseException as e:  # noqa: BLE001 - the report says what it was; the test judges it
            report = {"error": type(e).__name__, "pare": isinstance(e, PareError), "message": str(e)[:5000]}
        report["seconds"] = time.perf_counter() - t0
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
