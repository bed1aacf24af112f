"""At most one host read per model call: the pack's code during ComfyUI sampling, routed (router, both modes) and
static schedule, counted by tests/host_reads.py (tensor methods that synchronise on CUDA, instrumented on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.comfy
RUN_MASK_READ = "nodes/routing.py"  # the one read of a deciding call: its run mask (RoutingRun._decide)


@pytest.fixture(scope="module")
def reads(tmp_path_factory):
    out = tmp_path_factory.mktemp("reads") / "reads.json"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "host_reads.py"), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_unrouted_model_reads_nothing(reads):
    plain = reads["plain"]
    assert plain["calls"] == 4 and plain["reads_per_call"] == [0] * 4 and not plain["outside"]


@pytest.mark.parametrize("candidate", ["router_budget", "router_threshold", "static"])
def test_one_read_per_routed_model_call(reads, candidate):
    r = reads[candidate]
    assert r["calls"] == 4
    assert r["reads_per_call"] == [1] * 4, r["sites_in_calls"]
    assert len(r["sites_in_calls"]) == 1 and r["sites_in_calls"][0].startswith(RUN_MASK_READ), r["sites_in_calls"]
    # Once per sampling run, outside the model calls: the sampler's sigmas and the report's call sigmas.
    assert len(r["outside"]) <= 2, r["outside"]
    # Possible host-to-device copies only make the run's constants, in its first call (then cached on the device).
    assert set(r["copies_by_call"]) <= {"0"}, r["copies_by_call"]


@pytest.mark.parametrize("candidate", ["router_budget", "router_threshold", "static"])
def test_report_unchanged_by_the_probe(reads, candidate):
    r = reads[candidate]
    assert len(r["records"]) == 4 and r["records"] == r["records_unprobed"]
    ran = [row for _, _, rows in r["records"] for row in rows]
    assert any(not all(row) for row in ran), "the routing must skip something for this test to mean anything"
