"""Hostile prompts posted to a real ComfyUI server under a memory cap: each ends within seconds in an error that
names the input or the file, /system_stats keeps answering while they run, and the next valid prompt gives the
same latent as before them (issue 24's six cases: a huge token-schedule range, schedule files outside the model
folder / FIFOs / devices, a regex-freezing static schedule, absurd header numbers, strength NaN, a NaN router)."""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TEST_NODES, comfy_install, run_latent
from graphs import out, pare_loader, sample_graph

from comfyui_pare.router import BlockRouter, RouterSpec
from comfyui_pare.safetensors_io import save_atomic
from comfyui_pare.wan_reader import load_checkpoint
from scripts import tiny_assets
from scripts.comfy_harness import ComfyServer, PromptError

pytestmark = [pytest.mark.comfy, pytest.mark.every_comfyui]
N = tiny_assets.TINY_T2V.num_layers
HEADROOM = 4 << 30  # the server may map this much beyond what it maps when the test starts
ANSWER_SECONDS = 5.0  # /system_stats must answer within this while hostile prompts run
PROMPT_SECONDS = 30.0  # a hostile prompt must have failed by then (on a loaded 2-core machine; ~0.1 s when idle)
OK_SCHEDULE = {"num_blocks": N, "seed": 3, "rules": [{"feature": "q", "blocks": "1-4", "ratio": 0.5},
                                                     {"feature": "kv", "blocks": "2", "ratio": 0.3}]}


def token_reduction(schedule_json: str, strength: float = 1.0):
    def patch(g, model):
        return g.add("PARETokenReduction", model=out(model), schedule="custom", strength=strength,
                     matching_cache_steps=1, start_percent=0.0, end_percent=1.0, schedule_json=schedule_json)
    return patch


def static_schedule(text: str):
    def patch(g, model):
        return g.add("PAREStaticSchedule", model=out(model), schedule=text)
    return patch


def router(name: str):
    def patch(g, model):
        r = g.add("PARELoadRouter", router_name=name)
        return g.add("PAREApplyRouter", model=out(model), router=out(r), mode="threshold", budget=1.0, threshold=0.5)
    return patch


def valid_graph():
    """The valid prompt: a schedule file by name, a static schedule and token reduction together."""
    def patch(g, model):
        return token_reduction("hs_ok.json")(g, static_schedule("2-3@0.5-1.0")(g, model))
    return sample_graph(pare_loader(tiny_assets.TEACHER_T2V), steps=2, seed=17, patch_model=patch)


def hostile_files(base: Path, assets_dir: Path) -> None:
    folder = base / "models" / "pare_token_schedules"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hs_ok.json").write_text(json.dumps(OK_SCHEDULE))
    (base / "input" / "hs_outside.json").write_text(json.dumps(OK_SCHEDULE))  # valid, but outside the folder
    for name, target in (("hs_zero.json", "/dev/zero"), ("hs_outside_link.json", "/etc/passwd")):
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(target)
    if not (folder / "hs_fifo.json").exists():
        os.mkfifo(folder / "hs_fifo.json")
    spec = RouterSpec(num_blocks=N, dim=tiny_assets.TINY_T2V.dim, freq_dim=8, text_dim=0, hidden=4)
    sd = {k: v.detach().clone() for k, v in BlockRouter.constant(spec, [5.0] * N).state_dict().items()}
    sd["bias"][2] = float("nan")
    save_atomic(base / "models" / "pare_routers" / "hs_nan.safetensors", sd,
                {"pare_router": json.dumps(spec.to_json()), "format": "pt"})
    save_atomic(base / "models" / "loras" / "hs_lora.safetensors", {"x": torch.zeros(1)}, {})  # never read
    sd, meta = load_checkpoint(assets_dir / tiny_assets.TEACHER_T2V)
    header = meta.to_header()
    obj = json.loads(header["pare"])
    obj["teacher"]["ffn_dim"] = 10 ** 11
    obj["blocks"][0]["ffn"] = obj["blocks"][0]["ffn"][:-1]  # a pruned block, so the metadata is what is read
    sd["blocks.0.ffn.0.weight"] = sd["blocks.0.ffn.0.weight"][:-1]
    sd["blocks.0.ffn.0.bias"] = sd["blocks.0.ffn.0.bias"][:-1]
    sd["blocks.0.ffn.2.weight"] = sd["blocks.0.ffn.2.weight"][:, :-1]
    save_atomic(base / "models" / "diffusion_models" / "hs_absurd.safetensors", sd, {**header, "pare": json.dumps(obj)})


T2V = pare_loader(tiny_assets.TEACHER_T2V)
# (graph, substrings the error must hold)
CASES = {
    "range": (sample_graph(T2V, steps=1, patch_model=token_reduction(
        '{"num_blocks":6,"rules":[{"feature":"q","blocks":"0-300000000","ratio":0.5}]}')),
        ["inline schedule_json", "rules[0].blocks names block 300000000"]),
    "absolute": (sample_graph(T2V, steps=1, patch_model=token_reduction("/etc/passwd")),
                 ["'/etc/passwd'", "cannot be read", "not a path"]),
    "dotdot": (sample_graph(T2V, steps=1, patch_model=token_reduction("../../input/hs_outside.json")),
               ["'../../input/hs_outside.json'", "cannot be read", "not a path"]),
    "dev-zero": (sample_graph(T2V, steps=1, patch_model=token_reduction("hs_zero.json")),
                 ["'hs_zero.json'", "cannot be read"]),
    "fifo": (sample_graph(T2V, steps=1, patch_model=token_reduction("hs_fifo.json")),
             ["'hs_fifo.json'", "cannot be read"]),
    "link-outside": (sample_graph(T2V, steps=1, patch_model=token_reduction("hs_outside_link.json")),
                     ["hs_outside_link.json", "not valid JSON"]),
    "blanks": (sample_graph(T2V, steps=1, patch_model=static_schedule("1" + " " * 100_000 + "x")),
               ["static schedule is 100002 characters"]),
    "percent": (sample_graph(T2V, steps=1, patch_model=static_schedule("1-2@0.1.2-0.5")),
                ["'1-2@0.1.2-0.5'", "start percent '0.1.2' is not a number"]),
    "strength-nan": (sample_graph(T2V, steps=1, patch_model=token_reduction("hs_ok.json", strength=float("nan"))),
                     ["PARE Token Reduction", "strength must be a finite number", "nan"]),
    "router-nan": (sample_graph(T2V, steps=1, patch_model=router("hs_nan.safetensors")),
                   ["hs_nan.safetensors", "'bias'", "NaN or infinite"]),
    "lora-nan": (sample_graph(T2V, steps=1, model_patches=[("PARELoraLoader", {
        "lora_name": "hs_lora.safetensors", "strength_model": float("nan")})]),
        ["PARE LoRA Loader", "strength_model must be a finite number"]),
    "header": (sample_graph(pare_loader("hs_absurd.safetensors"), steps=1),
               ["hs_absurd.safetensors", "'teacher.ffn_dim'", "100000000000"]),
}


class StatsPoller(threading.Thread):
    """Asks /system_stats every 50 ms and records every answer's latency and every failure."""

    def __init__(self, server) -> None:
        super().__init__(daemon=True)
        self.server, self.stop, self.latencies, self.failures = server, threading.Event(), [], []

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                assert "system" in self.server.get("/system_stats", timeout=ANSWER_SECONDS)
                self.latencies.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - recorded and asserted on by the test
                self.failures.append(repr(e))
            time.sleep(0.05)


def _capped(pid: int):
    """Cap the server's address space (soft limit) for the test, restored afterwards: it is the session's server."""
    with open(f"/proc/{pid}/status") as f:
        size = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    before = resource.prlimit(pid, resource.RLIMIT_AS)
    resource.prlimit(pid, resource.RLIMIT_AS, (size + HEADROOM, before[1]))
    return before


def _on_a_fresh_server(comfyui_version: str, assets_dir: Path, base: Path) -> torch.Tensor:
    """The valid prompt's latent from a server that never saw a hostile prompt."""
    with ComfyServer(base_dir=base, comfy_dir=comfy_install(comfyui_version).comfy_dir,
                     extra_custom_nodes=(TEST_NODES,)) as server:
        tiny_assets.install_assets(base)
        hostile_files(base, assets_dir)
        return run_latent(server, *valid_graph())


def test_hostile_prompts_fail_fast_server_answers_and_next_prompt_is_unchanged(comfy, assets_dir, comfyui_version,
                                                                                tmp_path):
    hostile_files(comfy.base, assets_dir)
    comfy.free()
    fresh = run_latent(comfy, *valid_graph())
    before = _capped(comfy.proc.pid)
    poller = StatsPoller(comfy)
    poller.start()
    try:
        for case_id, (graph, needles) in CASES.items():
            t0 = time.perf_counter()
            with pytest.raises(PromptError) as err:
                comfy.run(graph[0].to_json(), timeout=PROMPT_SECONDS)
            message = str(err.value)
            assert time.perf_counter() - t0 < PROMPT_SECONDS, case_id
            assert len(message) < 2000, (case_id, message[:300])
            for needle in needles:
                assert needle in message, (case_id, needle, message)
        comfy.free()
        after = run_latent(comfy, *valid_graph())
    finally:
        poller.stop.set()
        poller.join()
        resource.prlimit(comfy.proc.pid, resource.RLIMIT_AS, before)
    assert not poller.failures, poller.failures[:3]
    assert poller.latencies and max(poller.latencies) < ANSWER_SECONDS
    assert torch.equal(fresh, after)
    assert torch.equal(after, _on_a_fresh_server(comfyui_version, assets_dir, tmp_path / "fresh"))
    assert "PARE token reduction (hs_ok.json" in comfy.log_text()  # the valid schedule file really ran
