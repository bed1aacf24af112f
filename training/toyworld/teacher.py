"""Train the toy Wan2.1 T2V teacher and the toy text encoder jointly, with flow matching on cached latents.

Rectified flow as Wan trains it: x_t = (1 - s) x0 + s noise, the model predicts v = noise - x0 at timestep
s * 1000, with s drawn from Wan's shifted schedule (uniform u, s = shift u / (1 + (shift - 1) u)). The prompt is
dropped (all-zero conditioning: the toy encoder's empty prompt) for ``cfg_dropout`` of the samples so that CFG
works at sampling time. Latents are normalised exactly as ComfyUI's Wan21 latent format does (process_in).

The loss is object-weighted: cells an object covers in this or an adjacent latent frame count ``object_weight`` + 1
times. With the plain loss the teacher learned colour in minutes but no motion in 3000-4600 steps (an object is ~5%
of the frame, so its path is a sliver of the gradient); weighted 10x, the held-out direction rate left chance at
~2500 steps, was 92% at 3000 and 100% from 3250 on (training/README.md, "Toy world").
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from comfyui_pare.pruned import PrunedWanMeta, save_checkpoint
from comfyui_pare.toy_text import ToyTextEncoder
from comfyui_pare.wan import WanDims

from ..model import WanTransformer
from ..salient import salient_weights
from ..sampling import process_in, time_snr_shift
from ..tiny import random_wan_state_dict
from . import videos
from .evaluate import evaluate
from .latents import read_latents
from .state import load_state, save_state

logger = logging.getLogger(__name__)

TOY_DIMS = WanDims(dim=128, num_heads=4, ffn_dim=384, num_layers=8, text_dim=64, in_dim=16, out_dim=16)
TEXT_LEN = 16
SHIFT = 3.0  # the flow shift used in training and in every toy sampling (ModelSamplingSD3 shift)


def vocabulary() -> list[str]:
    words = ["a", "moving", "and", *videos.COLOURS, *videos.SHAPES, *videos.DIRECTIONS]
    return list(dict.fromkeys(words))


@dataclass
class TeacherConfig:
    steps: int = 8000
    batch: int = 16
    lr: float = 5e-4
    text_lr: float = 2e-3
    warmup: int = 100
    cfg_dropout: float = 0.1
    save_every: int = 100
    probe_every: int = 250  # steps between motion probes (0: none); needs the toy VAE
    object_weight: float = 9.0  # extra loss weight on cells an object covers in this or an adjacent frame
    seed: int = 0


def object_weights(x0: torch.Tensor, extra: float) -> torch.Tensor:
    """Per-cell loss weights [B, 1, T, H, W]: 1 + ``extra`` where an object is, was or will be one latent frame
    away (``training.salient``: the empty scene is the clip's median, 0 in every designed feature). Why: an object
    covers ~5% of the frame, so the plain loss is mostly the background's noise, and where the object goes next
    (the motion) is a sliver of the gradient."""
    return salient_weights(x0, extra)


def build_teacher(seed: int = 0) -> tuple[WanTransformer, ToyTextEncoder]:
    model = WanTransformer.from_state_dict(random_wan_state_dict(TOY_DIMS, seed=seed), PrunedWanMeta.teacher(TOY_DIMS))
    torch.manual_seed(seed)
    text = ToyTextEncoder(vocabulary(), TOY_DIMS.text_dim, TEXT_LEN)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train(), text.train()


def probe_motion(model: WanTransformer, text: ToyTextEncoder, vae: torch.nn.Module, step: int, log: Path) -> dict:
    """The judge's rates on the held-out prompts (one seed each), appended to ``log`` as a JSON line: the
    learning curve of colour and direction that the README quotes."""

    was = model.training, text.training
    model.eval(), text.eval()
    device = next(model.parameters()).device
    rep, _, _ = evaluate(model.cpu(), text.cpu(), vae, "heldout", SHIFT)
    model.train(was[0]).to(device), text.train(was[1]).to(device)
    row = {"step": step, **vars(rep)}
    with open(log, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    logger.info("teacher step %d probe (held-out): colour %.2f direction %.2f trajectory error %.2f px", step,
                rep.colour_rate, rep.direction_rate, rep.trajectory_error_px)
    return row


def train_teacher(cfg: TeacherConfig, latents_path: Path, work: Path, device: str = "cpu",
                  probe_vae: torch.nn.Module | None = None) -> tuple[WanTransformer, ToyTextEncoder]:
    """Train (or resume) the teacher; with ``probe_vae``, every ``probe_every`` steps ``probe_motion`` logs the
    held-out colour/direction rates to ``work/probe.jsonl``."""
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "teacher_state.safetensors"
    model, text = build_teacher(cfg.seed)
    opt = torch.optim.AdamW([{"params": list(model.parameters()), "lr": cfg.lr, "weight_decay": 0.01},
                             {"params": list(text.parameters()), "lr": cfg.text_lr, "weight_decay": 0.0}])
    step = 0
    if state_path.exists():
        step, _ = load_state(state_path, {"model": model, "text": text}, opt)
    model.to(device)
    text.to(device)
    z, prompts = read_latents(latents_path)
    x0_all = process_in(z.float()).to(device)
    ids_all = [text.tokenize(p) for p in prompts]
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + step)
    t0, ema = time.time(), None
    while step < cfg.steps:
        frac = min(1.0, (step + 1) / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = cfg.lr * frac, cfg.text_lr * frac
        idx = torch.randint(len(x0_all), (cfg.batch,), generator=gen)
        x0 = x0_all[idx]
        drop = torch.rand(cfg.batch, generator=gen) < cfg.cfg_dropout
        ids = [[] if d else ids_all[i] for i, d in zip(idx.tolist(), drop.tolist())]
        context = text.embed_ids(ids).to(device)
        u = torch.rand(cfg.batch, generator=gen)
        s = time_snr_shift(SHIFT, u).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        sb = s.view(-1, 1, 1, 1, 1)
        xt = (1 - sb) * x0 + sb * noise
        v = model(xt, s * 1000.0, context)
        err = (v.float() - (noise - x0)).pow(2)
        loss = (err * object_weights(x0, cfg.object_weight)).mean() if cfg.object_weight else err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *text.parameters()], 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 20 == 0:
            logger.info("teacher step %d/%d loss %.4f (%.2f s/step)", step, cfg.steps, ema, (time.time() - t0) / 20)
            t0 = time.time()
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_state(state_path, {"model": model, "text": text}, opt, step)
        if probe_vae is not None and cfg.probe_every and (step % cfg.probe_every == 0 or step == cfg.steps):
            with torch.no_grad():
                probe_motion(model, text, probe_vae, step, work / "probe.jsonl")
    return model.eval(), text.eval()


def save_teacher(model: WanTransformer, text: ToyTextEncoder, out: Path) -> tuple[Path, Path]:
    """The two files the nodes load: a plain Wan2.1 checkpoint and the toy text encoder."""
    teacher_path, text_path = out / "pare_toy_teacher.safetensors", out / "pare_toy_text.safetensors"
    sd = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(teacher_path, sd, PrunedWanMeta.teacher(TOY_DIMS))
    text.save(text_path)
    return teacher_path, text_path
