"""``python -m training toyworld rebuild --out DIR``: rebuild the whole toy world, resumably.

Stages run in order; each writes its outputs under DIR and then a stamp (``DIR/stamps/<stage>.json`` with its
wall time), so a rerun after a kill skips finished stages and the trainers resume from their last saved state.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from comfyui_pare.safetensors_io import load_tensors, save_atomic
from comfyui_pare.toy_text import ToyTextEncoder

from ..model import WanTransformer
from . import teacher  # the module: a stage looks train_teacher up when it runs (tests replace it)
from .comfy_vae import load_vae
from .evaluate import evaluate
from .latents import cache_latents
from .pare_stages import run_pipeline
from .ship import ship
from .teacher import SHIFT, TeacherConfig, save_teacher
from .train_vae import VAEConfig, psnr, render_pool, to_signed, train_vae

logger = logging.getLogger(__name__)


@dataclass
class RebuildConfig:
    out: Path
    device: str = "cpu"
    threads: int = 1
    stages: list[str] = field(default_factory=list)  # empty: all
    teacher_steps: int | None = None  # None: TeacherConfig's default (the shipped teacher's 8000)
    teacher_batch: int | None = None
    teacher_object_weight: float | None = None


def _stamp(cfg: RebuildConfig, stage: str) -> Path:
    return cfg.out / "stamps" / f"{stage}.json"


def _vae_quality(vae: torch.nn.Module) -> float:
    with torch.no_grad():
        x = to_signed(render_pool(16, "seen"))
        return psnr(vae.decode(vae.encode(x)).clamp(-1, 1), x)


def _load_vae(path: Path) -> torch.nn.Module:
    return load_vae(load_tensors(path)[0])


def _save_vae(vae: torch.nn.Module, path: Path, quality: float) -> None:
    sd = {k: v.detach().float().contiguous().cpu() for k, v in vae.state_dict().items()}
    save_atomic(path, sd, {"pare_toy": "vae", "psnr_db": f"{quality:.2f}"})


def stage_latents(cfg: RebuildConfig) -> dict:
    cache_latents(NUM_LATENTS, cfg.out / "latents.safetensors")
    return {"clips": NUM_LATENTS}


def stage_vae(cfg: RebuildConfig) -> dict:
    """Independent of the teacher (the latent space is fixed by design): run it beside with --stages vae."""

    vae = train_vae(VAEConfig(), cfg.out / "vae" / "vae_state.safetensors")
    quality = _vae_quality(vae)
    _save_vae(vae, cfg.out / "pare_toy_vae.safetensors", quality)
    logger.info("vae: reconstruction PSNR %.2f dB on 16 whole held-out-seed clips", quality)
    return {"psnr_db": round(quality, 2)}


def stage_teacher(cfg: RebuildConfig) -> dict:
    teacher_cfg = TeacherConfig()
    if cfg.teacher_steps is not None:
        teacher_cfg.steps = cfg.teacher_steps
    if cfg.teacher_batch is not None:
        teacher_cfg.batch = cfg.teacher_batch
    if cfg.teacher_object_weight is not None:
        teacher_cfg.object_weight = cfg.teacher_object_weight
    vae_path = cfg.out / "pare_toy_vae.safetensors"  # present when the vae stage ran first or beside: then probe
    probe = _load_vae(vae_path) if vae_path.exists() else None
    model, text = teacher.train_teacher(teacher_cfg, cfg.out / "latents.safetensors", cfg.out / "teacher", cfg.device,
                                        probe)
    save_teacher(model.cpu(), text.cpu(), cfg.out)
    return {}


def stage_evaluate(cfg: RebuildConfig) -> dict:
    model = WanTransformer.from_checkpoint(cfg.out / "pare_toy_teacher.safetensors")
    text = ToyTextEncoder.load(cfg.out / "pare_toy_text.safetensors")
    vae = _load_vae(cfg.out / "pare_toy_vae.safetensors")
    info = {}
    for split in ("seen", "heldout"):
        rep, _, _ = evaluate(model, text, vae, split, SHIFT)
        info[split] = vars(rep)
        logger.info("teacher on %s prompts: %s", split, rep)
    return info


def stage_pare(cfg: RebuildConfig) -> dict:
    return run_pipeline(cfg.out, cfg.device, SHIFT)


def stage_ship(cfg: RebuildConfig) -> dict:
    """Copy the files the nodes and tests load into DIR/weights (the repo ships training/toyworld/weights):
    full precision for the teacher, student, router, VAE and text encoder; float16 for the two stage-1 ablation
    students (only compared with each other), to stay under the 30 MB the repo allows."""

    return ship(cfg.out, cfg.out / "weights")


NUM_LATENTS = 2048


STAGES: dict[str, Callable[[RebuildConfig], dict]] = {
    "latents": stage_latents, "teacher": stage_teacher, "vae": stage_vae, "evaluate": stage_evaluate,
    "pare": stage_pare, "ship": stage_ship,
}


def rebuild(cfg: RebuildConfig) -> dict[str, dict]:
    torch.set_num_threads(cfg.threads)
    cfg.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name, fn in STAGES.items():
        if cfg.stages and name not in cfg.stages:
            continue
        stamp = _stamp(cfg, name)
        if stamp.exists():
            results[name] = json.loads(stamp.read_text())
            logger.info("stage %s: done before (%s), skipped", name, results[name])
            continue
        logger.info("stage %s: starting", name)
        t0 = time.time()
        info = fn(cfg)
        info["seconds"] = round(time.time() - t0, 1)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(stamp)
        results[name] = info
        logger.info("stage %s: done in %.0f s", name, info["seconds"])
    return results
