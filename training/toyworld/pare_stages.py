"""The PARE pipeline on the toy teacher, through the toolkit's own verbs (``python -m training calibrate | prune |
distill | route | export``), plus the toy-only ablation: the same width targets pruned with spatial/temporal-aware
scores (the default, ``--protect normalize``) and with magnitude-only scores (``--protect none``), both distilled
the same way, compared on the trajectory error of their decoded videos.

Every verb is resumable itself (checkpoints, ``--resume latest``); these stage functions only write the inputs
(calibration samples, TOML configs) and call the verbs in a subprocess.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from comfyui_pare.calibration import write_sample
from comfyui_pare.toy_text import ToyTextEncoder

from .latents import read_latents

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PareSettings:
    samples: int = 128
    uncond_samples: int = 32  # more samples with the empty prompt (the CFG branch; write_samples)
    heads: float = 0.5  # kept fraction of the teacher's heads ...
    ffn: float = 0.5  # ... and FFN neurons: block compute 0.595x the teacher's
    budget: float = 0.82  # router budget (share of the student's block compute): ~0.49x the teacher's
    distill_steps: int = 1000
    route_steps: int = 1500
    hard_gate_steps: int = 1000  # then the student alone, under the frozen router's decisions (route.frozen_router)
    batch: int = 8
    learning_rate: float = 3e-4
    salient_weight: float = 9.0  # the teacher's object weighting, in stages 1 and 2 too (flow.salient_weight)
    on_collapse: str = "fail"  # route.on_collapse: "warn" only for plumbing runs of a few steps


SETTINGS = PareSettings()


def verb(args: list[str], log: Path, threads: int = 1) -> None:
    """``python -m training <args>`` in a subprocess (its log in ``log``); raises naming the log on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"$ python -m training {' '.join(args)}\n")
        fh.flush()
        rc = subprocess.run([sys.executable, "-m", "training", *args], stdout=fh, stderr=subprocess.STDOUT,
                            env=env, cwd=Path(__file__).resolve().parents[2]).returncode
    if rc != 0:
        raise RuntimeError(f"`python -m training {args[0]}` failed (exit {rc}); see {log}")


def write_samples(out: Path, latents_path: Path, text_path: Path, n: int, uncond: int = 0) -> Path:
    """Calibration/distillation samples: the first ``n`` cached training latents with their prompts' contexts, then
    ``uncond`` more latents with the empty prompt's context. Why the empty prompt: under CFG the sampler's velocity
    is v_uncond + cfg (v_cond - v_uncond), so with the toy's CFG 4 the student's unconditional velocity weighs 3x
    against it; samples with prompts alone never train it."""

    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    z, prompts = read_latents(latents_path)
    text = ToyTextEncoder.load(text_path)
    with torch.no_grad():
        for i in range(n + uncond):
            path = folder / f"sample_{i:04d}.safetensors"
            prompt = prompts[i] if i < n else ""
            if not path.exists():
                write_sample(path, text([prompt])[0], latent_shape=tuple(z.shape[1:]), seed=i, prompt=prompt,
                             latent=z[i])
    return folder


def _toml(sections: dict[str, dict]) -> str:
    def val(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "\n".join(f"[{name}]\n" + "\n".join(f"{k} = {val(v)}" for k, v in body.items()) + "\n"
                     for name, body in sections.items())


def distill_config(teacher: Path, student: Path, samples: Path, out: Path, steps: int, s: PareSettings,
                   device: str, shift: float) -> str:
    return _toml({
        "model": {"teacher": teacher, "student": student},
        "data": {"samples": samples},
        "train": {"output_dir": out, "steps": steps, "batch_size": s.batch, "learning_rate": s.learning_rate,
                  "warmup_steps": 20, "checkpointing_steps": 50, "checkpoints_total_limit": 2, "device": device,
                  "log_every": 10},
        "flow": {"shift": shift, "salient_weight": s.salient_weight},
    })


def route_config(teacher: Path, student: Path, samples: Path, stats: Path, out: Path, s: PareSettings,
                 device: str, shift: float, frozen_router: Path | None = None) -> str:
    """Stage 2's config; with ``frozen_router``, its hard-gate phase (``s.hard_gate_steps`` steps)."""
    route = {"budget": s.budget, "stats": stats, "on_collapse": s.on_collapse}
    if frozen_router is not None:
        route["frozen_router"] = frozen_router
    return _toml({
        "model": {"teacher": teacher, "student": student},
        "data": {"samples": samples},
        "train": {"output_dir": out, "steps": s.route_steps if frozen_router is None else s.hard_gate_steps,
                  "batch_size": s.batch, "learning_rate": s.learning_rate, "warmup_steps": 20,
                  "checkpointing_steps": 50, "checkpoints_total_limit": 2, "device": device, "log_every": 10},
        "flow": {"shift": shift, "salient_weight": s.salient_weight},
        "route": route,
    })


def run_pipeline(out: Path, device: str, shift: float, s: PareSettings = SETTINGS) -> dict:
    """calibrate -> prune (aware + magnitude-only) -> distill both -> route -> export. Returns the file paths."""
    teacher, text = out / "pare_toy_teacher.safetensors", out / "pare_toy_text.safetensors"
    work = out / "pare"
    log = work / "verbs.log"
    samples = write_samples(work, out / "latents.safetensors", text, s.samples, s.uncond_samples)
    stats = work / "stats.safetensors"
    if not stats.exists():
        verb(["calibrate", "--teacher", str(teacher), "--samples", str(samples), "--out", str(stats),
              "--shift", str(shift), "--device", device], log)
    students = {}
    for name, protect in (("aware", "normalize"), ("magnitude", "none")):
        pruned = work / f"pruned_{name}.safetensors"
        if not pruned.exists():
            verb(["prune", "--teacher", str(teacher), "--stats", str(stats), "--heads", str(s.heads), "--ffn",
                  str(s.ffn), "--protect", protect, "--ffn-multiple", "32", "--out", str(pruned),
                  "--plan-out", str(work / f"plan_{name}.json")], log)
        run_dir = work / f"distill_{name}"
        if not (run_dir / "student.safetensors").exists():
            cfg = work / f"distill_{name}.toml"
            cfg.write_text(distill_config(teacher, pruned, samples, run_dir, s.distill_steps, s, device, shift))
            verb(["distill", "--config", str(cfg), "--resume", "latest"], log)
        students[name] = run_dir / "student.safetensors"
    route_dir = work / "route"
    final_student, router = out / "pare_toy_student.safetensors", out / "pare_toy_router.safetensors"
    if not router.exists():
        cfg = work / "route.toml"
        cfg.write_text(route_config(teacher, students["aware"], samples, stats, route_dir, s, device, shift))
        verb(["route", "--config", str(cfg), "--resume", "latest"], log)
        # The hard-gate phase: stage 2 trained the student under noisy, changing gates; it now trains under the
        # router's own decisions (measured: held-out trajectory error 2.85 -> 1.59 px, teacher 1.70).
        hard_dir = work / "route_hard_gates"
        cfg = work / "route_hard_gates.toml"
        cfg.write_text(route_config(teacher, route_dir / "student.safetensors", samples, stats, hard_dir, s, device,
                                    shift, frozen_router=route_dir / "router.safetensors"))
        verb(["route", "--config", str(cfg), "--resume", "latest"], log)
        verb(["export", "--run", str(hard_dir), "--student-out", str(final_student), "--router-out", str(router)],
             log)
    return {"student": str(final_student), "router": str(router), "magnitude_student": str(students["magnitude"]),
            "aware_student_stage1": str(students["aware"])}
