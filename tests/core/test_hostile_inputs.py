"""Hostile and careless inputs to every parser and loader of the core, under a memory and a time cap.

Each input (the cases of issue 24 and their neighbours) runs in a child process whose address space is capped at
what it maps after its imports plus HEADROOM (tests/hostile_child.py), within a time limit. Every one must end in
the pack's own error type (comfyui_pare.errors.PareError) with a short message that names the input (file,
inline source or entry) and the field, never in a MemoryError, a hang or a bare ValueError. The CLI verbs get the
same treatment as programs: one line on stderr, exit code 2.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfyui_pare.pruned import PrunedWanMeta, save_checkpoint
from comfyui_pare.router import BlockRouter, RouterSpec, save_router
from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.wan import BlockWidth, WanDims

REPO = Path(__file__).resolve().parents[2]
CHILD = "tests.hostile_child"  # run as a module from the repository root
HEADROOM = 1 << 30  # bytes the child may map beyond its imports: far below what any of the hostile inputs asks for
CHILD_SECONDS = 60  # a child still running then is killed (a case that blocks); each case must end in CASE_SECONDS
CASE_SECONDS = 10.0
CLI_SECONDS = 120
MAX_MESSAGE = 600  # an error quotes a bounded prefix of what it refuses
DIMS = WanDims(dim=64, num_heads=2, ffn_dim=64, num_layers=2, text_dim=16)


# -- hostile files ------------------------------------------------------------------------------------------

def _raw_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_raw(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _student(path: Path) -> Path:
    """A small valid PARE student (PARE metadata in the header) to make hostile variants of."""
    meta = PrunedWanMeta(DIMS, tuple(BlockWidth((0,), tuple(range(0, 64, 2))) for _ in range(DIMS.num_layers)))
    save_checkpoint(path, {k: torch.zeros(s) for k, s in meta.expected_shapes().items()}, meta)
    return path


def _with_pare(src: Path, dst: Path, mutate) -> Path:
    """A copy of ``src`` whose 'pare' metadata JSON went through ``mutate`` (tensors unchanged)."""
    header, data = _raw_header(src)
    obj = json.loads(header["__metadata__"]["pare"])
    mutate(obj)
    header["__metadata__"]["pare"] = json.dumps(obj)
    return _write_raw(dst, header, data)


def _set_teacher(field, value):
    def mutate(obj):
        obj["teacher"][field] = value
    return mutate


def _set_block(i, field, value):
    def mutate(obj):
        obj["blocks"][i][field] = value
    return mutate


def _router(path: Path, **overrides) -> Path:
    spec = RouterSpec(num_blocks=2, dim=64, freq_dim=8, text_dim=0, hidden=4)
    router = BlockRouter(spec)
    save_router(path, router)
    if overrides:
        header, data = _raw_header(path)
        obj = json.loads(header["__metadata__"]["pare_router"])
        obj.update(overrides)
        header["__metadata__"]["pare_router"] = json.dumps(obj)  # NaN / Infinity written as JSON allows them
        _write_raw(path, header, data)
    return path


def _router_weights(path: Path, key: str, value: float) -> Path:
    router = BlockRouter(RouterSpec(num_blocks=2, dim=64, freq_dim=8, text_dim=0, hidden=4))
    sd = {k: v.detach().clone() for k, v in router.state_dict().items()}
    sd[key].view(-1)[-1] = value
    save_atomic(path, sd, {"pare_router": json.dumps(router.spec.to_json()), "format": "pt"})
    return path


def _huge_shape(path: Path) -> Path:
    """A plain Wan file whose FFN weight claims 10^11 rows backed by no bytes."""
    src = _student(path.with_name("for_huge.safetensors"))
    header, data = _raw_header(src)
    del header["__metadata__"]
    header["blocks.0.ffn.0.weight"]["shape"] = [10 ** 11, 64]
    return _write_raw(path, header, data)


def _empty_rows(path: Path) -> Path:
    """A plain Wan file whose FFN weight is [10^11, 0]: zero bytes, but a first dim a reader could build from."""
    header = {
        "head.modulation": {"dtype": "F32", "shape": [1, 2, 256], "data_offsets": [0, 2048]},
        "patch_embedding.weight": {"dtype": "F32", "shape": [256, 16, 1, 2, 2], "data_offsets": [2048, 67584]},
        "blocks.0.modulation": {"dtype": "F32", "shape": [1, 6, 256], "data_offsets": [67584, 73728]},
        "blocks.0.ffn.0.weight": {"dtype": "F32", "shape": [10 ** 11, 0], "data_offsets": [73728, 73728]},
    }
    return _write_raw(path, header, bytes(73728))


# -- the cases ----------------------------------------------------------------------------------------------

def _sched(rule: dict | None = None, **top) -> str:
    return json.dumps({**top, "rules": [{"feature": "q", "blocks": "1", "ratio": 0.5, **(rule or {})}]})


def _fifo(tmp: Path, name: str) -> str:
    path = tmp / name
    if not path.exists():
        os.mkfifo(path)
    return str(path)


def _big(tmp: Path, name: str, size: int) -> str:
    path = tmp / name
    path.write_bytes(b" " * size)
    return str(path)


BLANKS = "1" + " " * 100_000 + "x"
# id -> (call, args builder(tmp) -> (args, kwargs), substrings the message must hold)
CASES = {
    # token schedules: ranges checked against the model (or the schedule's num_blocks) before they are expanded
    "ts-range-num-blocks": ("parse_schedule_text", lambda t: ([_sched({"blocks": "0-300000000"}, num_blocks=6),
                                                               "my.json"], {}),
                            ["my.json", "rules[0].blocks", "names block 300000000", "num_blocks is 6"]),
    "ts-range-model": ("parse_schedule_text", lambda t: ([_sched({"blocks": "0-300000000"}), "inline schedule_json"],
                                                         {"model_blocks": 6}),
                       ["inline schedule_json", "rules[0].blocks names block 6", "blocks 0-5"]),
    "ts-range-no-model": ("parse_schedule_text", lambda t: ([_sched({"blocks": "2-300000000"}), "s"], {}),
                          ["s: rules[0].blocks", "blocks 0-1023"]),
    "ts-list-block": ("parse_schedule_text", lambda t: ([_sched({"blocks": [1, 300000000]}), "s"], {"model_blocks": 6}),
                      ["s: rules[0].blocks names block 300000000"]),
    "ts-many-ranges": ("parse_schedule_text", lambda t: ([_sched({"blocks": ",".join(["0-900000"] * 50_000)}), "s"],
                                                         {"model_blocks": 6}),
                       ["s: rules[0].blocks names block 6"]),
    "ts-all-huge-num-blocks": ("parse_schedule_text", lambda t: ([_sched({"blocks": "all"}, num_blocks=300000000),
                                                                  "s"], {"model_blocks": 40}),
                               ["s: made for 300000000 blocks, but the model has 40"]),
    "ts-all-huge-num-blocks-no-model": ("parse_schedule_text",
                                        lambda t: ([_sched({"blocks": "all"}, num_blocks=10 ** 12), "s"], {}),
                                        ["s: field 'num_blocks'", "at most 1024"]),
    "ts-long-digits": ("parse_schedule_text", lambda t: ([_sched({"blocks": "1-" + "9" * 5000}), "s"], {}),
                       ["s: rules[0].blocks", "more than 18 digits"]),
    "ts-json-huge-int": ("parse_schedule_text", lambda t: (['{"num_blocks": ' + "9" * 5000 + ', "rules": []}', "s"], {}),
                         ["s: not a usable JSON document"]),
    "ts-json-deep": ("parse_schedule_text", lambda t: (["[" * 100_000 + "]" * 100_000, "s"], {}),
                     ["s: not a usable JSON document"]),
    "ts-too-long": ("parse_schedule_text", lambda t: (['{"rules": [], "name": "' + "a" * (2 << 20) + '"}', "s"], {}),
                    ["s: ", "at most 1048576"]),
    "ts-blanks": ("parse_schedule_text", lambda t: ([_sched({"blocks": BLANKS}), "s"], {}),
                  ["s: rules[0].blocks has '1 ", "100002 characters", "not a block or a range"]),
    "ts-many-rules": ("parse_schedule_text", lambda t: ([json.dumps({"rules": [{"feature": "q", "blocks": "1",
                                                                                 "ratio": 0.1}] * 5000}), "s"], {}),
                      ["s: field 'rules' has 5000 rules"]),
    "ts-nan-ratio": ("parse_schedule_text", lambda t: ([_sched({"ratio": float("nan")}), "s"], {}),
                     ["s: rules[0].ratio must be finite"]),
    "ts-inf-percent": ("parse_schedule_text", lambda t: ([_sched({"start_percent": float("inf")}), "s"], {}),
                       ["s: rules[0].start_percent must be finite"]),
    "ts-long-feature": ("parse_schedule_text", lambda t: ([_sched({"feature": "q" * 100_000}), "s"], {}),
                        ["s: rules[0].feature must be one of", "100000 characters"]),
    "ts-float-block": ("parse_schedule_text", lambda t: ([_sched({"blocks": [0.5]}), "s"], {}),
                       ["s: rules[0].blocks[0] must be an integer"]),
    # token schedule files: regular files of bounded size only
    "tsf-dev-zero": ("load_schedule", lambda t: (["/dev/zero"], {}), ["/dev/zero", "not a regular file"]),
    "tsf-fifo": ("load_schedule", lambda t: ([_fifo(t, "s.fifo")], {}), ["s.fifo", "not a regular file"]),
    "tsf-dir": ("load_schedule", lambda t: ([str(t / "adir")], {}) if (t / "adir").mkdir(exist_ok=True) is None
                else None, ["adir", "not a regular file"]),
    "tsf-big": ("load_schedule", lambda t: ([_big(t, "big.json", (1 << 20) + 1)], {}), ["big.json", "the limit is"]),
    "tsf-missing": ("load_schedule", lambda t: ([str(t / "missing.json")], {}), ["missing.json", "no such file"]),
    # static block schedules: linear-time matching, bounded numbers, bounded quotes
    "ss-blanks": ("parse_schedule", lambda t: ([BLANKS], {}), ["static schedule is 100002 characters"]),
    "ss-blanks-short": ("parse_schedule", lambda t: (["1" + " " * 90 + "x"], {}), ["not of the form"]),
    "ss-bad-percent": ("parse_schedule", lambda t: (["1-2@0.1.2-0.5"], {}),
                       ["'1-2@0.1.2-0.5'", "start percent '0.1.2' is not a number"]),
    "ss-long-digits": ("parse_schedule", lambda t: (["9" * 5000], {}), ["(5000 characters)", "longer than 100"]),
    "ss-digits": ("parse_schedule", lambda t: (["3-" + "9" * 50], {}), ["more than 18 digits"]),
    "ss-block-range": ("parse_schedule", lambda t: (["0-999999"], {"num_blocks": 6}),
                       ["'0-999999'", "block 999999 does not exist"]),
    "ss-many-entries": ("parse_schedule", lambda t: (["1;" * 6000], {}), ["12000 characters"]),
    "ss-nan": ("parse_schedule", lambda t: (["1@nan-1"], {}), ["'1@nan-1'", "not of the form"]),
    # Wan headers with absurd numbers: refused before anything is built from them
    "wan-ffn-huge": ("inspect_wan", lambda t: ([str(_with_pare(_student(t / "ok.safetensors"), t / "ffn.safetensors",
                                                               _set_teacher("ffn_dim", 10 ** 11)))], {}),
                     ["ffn.safetensors", "'teacher.ffn_dim'", "100000000000"]),
    "wan-ffn-float": ("inspect_wan", lambda t: ([str(_with_pare(_student(t / "ok.safetensors"), t / "ffnf.safetensors",
                                                                _set_teacher("ffn_dim", 5e7)))], {}),
                      ["ffnf.safetensors", "'teacher.ffn_dim' must be an integer"]),
    "wan-layers-huge": ("inspect_wan", lambda t: ([str(_with_pare(_student(t / "ok.safetensors"), t / "l.safetensors",
                                                                  _set_teacher("num_layers", 10 ** 9)))], {}),
                        ["l.safetensors", "'teacher.num_layers'"]),
    "wan-heads-bool": ("inspect_wan", lambda t: ([str(_with_pare(_student(t / "ok.safetensors"), t / "hb.safetensors",
                                                                 _set_teacher("num_heads", True)))], {}),
                       ["hb.safetensors", "'teacher.num_heads' must be an integer"]),
    "wan-dim-mismatch": ("inspect_wan", lambda t: ([str(_with_pare(_student(t / "ok.safetensors"), t / "d.safetensors",
                                                                   _set_teacher("dim", 65536)))], {}),
                         ["d.safetensors", "'teacher.dim' is 65536", "'head.modulation' is 64 wide"]),
    "wan-head-floats": ("inspect_wan", lambda t: ([str(_with_pare(_student(t / "ok.safetensors"), t / "hf.safetensors",
                                                                  _set_block(0, "heads", [0.5, 1.2])))], {}),
                        ["hf.safetensors", "'blocks[0].heads' must be a list of integer indices"]),
    "wan-shape-unbacked": ("inspect_wan", lambda t: ([str(_huge_shape(t / "shape.safetensors"))], {}),
                           ["shape.safetensors", "'blocks.0.ffn.0.weight' declares shape"]),
    "wan-empty-rows": ("inspect_wan", lambda t: ([str(_empty_rows(t / "rows.safetensors"))], {}),
                       ["rows.safetensors", "'blocks.0.ffn.0.weight' has shape [100000000000, 0]"]),
    # routers: NaN / inf weights and metadata refused at load, naming the file and the tensor or field
    "router-nan-bias": ("load_router", lambda t: ([str(_router_weights(t / "rn.safetensors", "bias", float("nan")))],
                                                  {}), ["rn.safetensors", "'bias'", "NaN or infinite"]),
    "router-inf-fc1": ("load_router", lambda t: ([str(_router_weights(t / "ri.safetensors", "fc1.weight",
                                                                      float("inf")))], {}),
                       ["ri.safetensors", "'fc1.weight'", "NaN or infinite"]),
    "router-nan-threshold": ("load_router", lambda t: ([str(_router(t / "rt.safetensors",
                                                                    default_threshold=float("nan")))], {}),
                             ["rt.safetensors", "'default_threshold'"]),
    "router-inf-budget": ("load_router", lambda t: ([str(_router(t / "rb.safetensors", train_budget=float("inf")))],
                                                    {}), ["rb.safetensors", "'train_budget'"]),
    "router-float-blocks": ("load_router", lambda t: ([str(_router(t / "rf.safetensors", num_blocks=2.7))], {}),
                            ["rf.safetensors", "'num_blocks' must be an integer"]),
    "router-huge-hidden": ("load_router", lambda t: ([str(_router(t / "rh.safetensors", hidden=10 ** 12))], {}),
                           ["rh.safetensors", "'hidden' must be in"]),
    # prune plans (CLI input): regular files, bounded JSON
    "plan-fifo": ("load_plan", lambda t: ([_fifo(t, "plan.fifo")], {}), ["plan.fifo", "not a regular file"]),
    "plan-dev-zero": ("load_plan", lambda t: (["/dev/zero"], {}), ["/dev/zero", "not a regular file"]),
    "plan-deep": ("load_plan", lambda t: ([_nested(t / "deep.json")], {}), ["deep.json", "not a usable JSON"]),
}


def _nested(path: Path) -> str:
    path.write_text("[" * 100_000 + "]" * 100_000)
    return str(path)


def _capped(headroom: int):
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (headroom, headroom))
    return limit


def _run_children(cases: list[dict], tmp: Path) -> list[dict]:
    """Reports for every case; a child that hangs (killed at CHILD_SECONDS) or dies is reported for the case it
    was running, and the cases after it run in a fresh child."""
    reports: list[dict] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while len(reports) < len(cases):
        spec = tmp / f"cases{len(reports)}.json"
        spec.write_text(json.dumps(cases[len(reports):]))
        proc = subprocess.Popen([sys.executable, "-m", CHILD, str(spec), str(HEADROOM)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        try:
            out, err = proc.communicate(timeout=CHILD_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        reports += done
        if len(reports) < len(cases):  # the case after the last report hung or killed the child
            reports.append({"error": "hang or crash", "pare": False, "seconds": CHILD_SECONDS,
                            "message": f"child exit {proc.returncode}: {err[-300:]}"})
    return reports


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("hostile")
    cases = []
    for call, build, _ in CASES.values():
        args, kwargs = build(tmp)
        cases.append({"call": call, "args": list(args), "kwargs": kwargs})
    return dict(zip(CASES, _run_children(cases, tmp)))


@pytest.mark.parametrize("case_id", list(CASES))
def test_hostile_input_ends_in_a_clear_pare_error(reports, case_id):
    report = reports[case_id]
    assert report["pare"], f"{case_id}: {report['error']}: {report['message'][:300]}"
    assert report["seconds"] < CASE_SECONDS, f"{case_id} took {report['seconds']:.1f}s"
    message = report["message"]
    assert len(message) < MAX_MESSAGE, f"{case_id}: a {len(message)}-character message: {message[:200]}..."
    for needle in CASES[case_id][2]:
        assert needle in message, (needle, message)


def test_valid_inputs_still_parse():
    """The bounds leave every real input alone: the shipped-style forms parse as before."""
    from comfyui_pare.schedule import SkipRange, parse_schedule
    from comfyui_pare.token_schedule import parse_schedule_text

    assert parse_schedule(" 10-17 @ 0.3 - 1.0 ; 5@.5-0.8,\n20-21 ", 30) == (
        SkipRange(10, 17, 0.3, 1.0), SkipRange(5, 5, 0.5, 0.8), SkipRange(20, 21))
    s = parse_schedule_text(_sched({"blocks": " 0 - 2 , 5,4 "}, num_blocks=6), "s", model_blocks=6)
    assert s.rules[0].blocks == (0, 1, 2, 4, 5)
    assert parse_schedule_text(_sched({"blocks": "all"}, num_blocks=40), "s", model_blocks=40).rules[0].blocks == \
        tuple(range(40))


# -- the CLI ------------------------------------------------------------------------------------------------

CLI_MEMORY = 6 << 30  # address space for the whole CLI process (its imports map ~3.3 GB)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # run from REPO with -m: this checkout's core comes first
    return subprocess.run([sys.executable, "-m", "comfyui_pare", *argv], capture_output=True, text=True,
                          timeout=CLI_SECONDS, env=env, preexec_fn=_capped(CLI_MEMORY), cwd=REPO)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def absurd(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("absurd")
    ok = _student(tmp / "ok.safetensors")
    plan = tmp / "plan.json"
    plan.write_text(json.dumps({"blocks": [{}, {}]}))
    return _with_pare(ok, tmp / "absurd.safetensors", _set_teacher("ffn_dim", 10 ** 11)), plan


def test_cli_inspect_and_prune_refuse_absurd_header_numbers(absurd, tmp_path):
    path, plan = absurd
    for proc in (_cli("inspect", str(path)),
                 _cli("prune", "--teacher", str(path), "--plan", str(plan), "--out", str(tmp_path / "s.safetensors"))):
        line = _one_line_error(proc)
        assert str(path) in line and "'teacher.ffn_dim'" in line and "100000000000" in line, line
    assert not (tmp_path / "s.safetensors").exists()


def test_cli_prune_to_an_existing_directory_is_a_one_line_error(absurd, tmp_path):
    _, plan = absurd
    teacher = _student(tmp_path / "t.safetensors")
    line = _one_line_error(_cli("prune", "--teacher", str(teacher), "--plan", str(plan), "--out", str(tmp_path)))
    assert f"--out {tmp_path} is a directory" in line
