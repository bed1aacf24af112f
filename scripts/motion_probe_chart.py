"""Chart the teacher's held-out direction rate over training from ``docs/toy_motion_probes.json`` (the probes
``training.toyworld.teacher.probe_motion`` logged), with the issue's 80% goal.

Usage: ``python -m scripts.motion_probe_chart [--data docs/toy_motion_probes.json] [--out docs/toy_motion_probes.png]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.plots import line_chart_png

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / "docs" / "toy_motion_probes.json")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "toy_motion_probes.png")
    args = ap.parse_args()
    data = json.loads(args.data.read_text())
    steps = sorted({r["step"] for e in data["experiments"].values() for r in e["probes"]})
    series = {}
    for name, e in data["experiments"].items():
        rate = {r["step"]: r["direction_rate"] for r in e["probes"]}
        series[f"{name}: direction right (held-out)"] = [rate.get(s, float("nan")) for s in steps]
    series["goal (80%)"] = [0.8] * len(steps)
    series["chance (25%)"] = [0.25] * len(steps)
    line_chart_png(args.out, steps, series, title="toy teacher: held-out prompts moving the named way, by step",
                   log_y=False)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
