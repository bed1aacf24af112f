"""VDMini (static block removal + ICMD losses) vs PARE (width pruning + learned router) vs a static skip schedule vs
the teacher, on the toy world, at equal per-step block compute. One script, from the shipped toy weights:

    python -m scripts.compare_depth_vs_router --work /tmp/vdmini_cmp [--budgets 0.6,0.45] [--quick]

For each compute budget b (student block MACs per step / teacher's, counted at the toy world's 80 video and 16 text
tokens with ``comfyui_pare.compute``):

* **VDMini**: ``prune --depth static --depth-target b`` (VDMini's shallow-first order; whole blocks, so the compute
  is the nearest block count at or under b), then stage 1 with the
  content and motion-consistency losses (``distill.content_weight``, ``motion_weight``, ``velocity_motion_weight``).
* **PARE**: the width-pruned student (``--width`` of heads and FFN) after stage 1, then ``route`` with the router
  budget b / c_w (c_w: the width student's compute fraction), so a routed step costs b of the teacher's. Measured
  twice: at the router's own threshold (compute varies by step, as trained) and in the node's budget mode (the
  same compute at every step).
* **static schedule**: the same stage-1 student trained by ``route`` with ``fixed_schedule = "auto"`` (the best
  contiguous skip from the calibration stats at the same budget), the baseline a router must beat.
* **teacher**.

Every student gets the same number of training steps: VDMini's stage 1 runs as many steps as PARE's stage 1 and
stage 2 together. Measured on the held-out prompts (every held-out colour x
shape x direction, one seed each, the toy world's sampler: Euler, ``evaluate.STEPS`` steps, CFG ``evaluate.CFG``):
latent PSNR against the teacher's latent for the same prompt and seed, trajectory error (pixels, the object's
centroid path in the decoded video against the generator's ground truth), executed compute (from the routers'
actual decisions), file size (student + router) and sampling wall time per video on this machine
(``torch.set_num_threads(--threads)``, after one warm-up video, the variants interleaved over ``--repeats`` rounds
and the median kept). The verbs run in subprocesses with their own resumable checkpoints; rerunning resumes.

Writes ``<work>/comparison.json`` and ``<work>/comparison.md`` (the table that goes in training/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from comfyui_pare.compute import model_block_macs
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.wan_reader import read_meta
from training.toyworld.evaluate import LATENT_SHAPE

REPO = Path(__file__).resolve().parents[1]

logger = logging.getLogger("compare_depth_vs_router")
WEIGHTS = REPO / "training" / "toyworld" / "weights"
# The toy world's video tokens (its latent grid after the 1x2x2 patch) and text length.
TOKENS = LATENT_SHAPE[1] * (LATENT_SHAPE[2] // 2) * (LATENT_SHAPE[3] // 2)
TEXT_TOKENS = 16
ICMD = {"content_weight": 0.5, "motion_weight": 0.5, "velocity_motion_weight": 0.5}
# The toy teacher has 8 blocks: with the first and last pinned, the first half (blocks 1-3) cannot reach 0.45x, so
# VDMini's shallow candidates are the first three quarters (blocks 1-5).
SHALLOW_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Settings:
    budgets: tuple[float, ...] = (0.6, 0.45)
    width: float = 0.75  # PARE's kept fraction of heads and FFN neurons
    samples: int = 128
    uncond_samples: int = 32  # empty-prompt samples: the CFG branch (pare_stages.write_samples)
    distill_steps: int = 300
    route_steps: int = 300
    eval_seeds: int = 1  # seeds per held-out prompt
    repeats: int = 3  # timing rounds
    threads: int = 1
    device: str = "cpu"


def block_fraction(meta: PrunedWanMeta, run_mask: torch.Tensor | None = None) -> float:
    """Executed block MACs per step / the teacher's, averaged over the rows of ``run_mask`` [calls, N] (None: all)."""
    costs = torch.tensor([float(m.total) for m in model_block_macs(meta, TOKENS, TEXT_TOKENS)], dtype=torch.float64)
    teacher = sum(float(m.total) for m in model_block_macs(PrunedWanMeta.teacher(meta.dims), TOKENS, TEXT_TOKENS))
    if run_mask is None:
        return float(costs.sum()) / teacher
    return float((run_mask.double() * costs).sum(1).mean()) / teacher


# ---------------------------------------------------------------------------------------------- building the variants


def build_variants(work: Path, s: Settings, weights: Path) -> dict[str, dict]:
    """Run (or resume) every verb; returns {variant name: {"student": path, "router": path | None, "budget": b}}."""
    from training.toyworld.latents import cache_latents
    from training.toyworld.pare_stages import PareSettings, distill_config, route_config, verb, write_samples
    from training.toyworld.teacher import SHIFT

    teacher, text = weights / "pare_toy_teacher.safetensors", weights / "pare_toy_text.safetensors"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "verbs.log"
    latents = work / "latents.safetensors"
    if not latents.exists():
        cache_latents(s.samples + s.uncond_samples, latents)
    samples = write_samples(work, latents, text, s.samples, s.uncond_samples)
    ps = PareSettings(samples=s.samples, uncond_samples=s.uncond_samples, heads=s.width, ffn=s.width,
                      distill_steps=s.distill_steps, route_steps=s.route_steps)
    stats = work / "stats.safetensors"
    if not stats.exists():
        verb(["calibrate", "--teacher", str(teacher), "--samples", str(samples), "--out", str(stats),
              "--shift", str(SHIFT), "--device", s.device], log, s.threads)

    def distill(name: str, student: Path, steps: int, extra: dict | None = None) -> Path:
        run = work / f"distill_{name}"
        if not (run / "student.safetensors").exists():
            cfg = work / f"distill_{name}.toml"
            body = distill_config(teacher, student, samples, run, steps, ps, s.device, SHIFT)
            if extra:
                body += "[distill]\n" + "".join(f"{k} = {v!r}\n" for k, v in extra.items())
            cfg.write_text(body)
            verb(["distill", "--config", str(cfg), "--resume", "latest"], log, s.threads)
        return run / "student.safetensors"

    def route(name: str, student: Path, budget: float, fixed: str = "") -> dict:
        run, out_student, out_router = work / f"route_{name}", work / f"{name}.safetensors", work / f"{name}_router.safetensors"
        if not out_router.exists():
            cfg = work / f"route_{name}.toml"
            body = route_config(teacher, student, samples, stats, run, dataclasses.replace(ps, budget=budget),
                                s.device, SHIFT)
            cfg.write_text(body + (f'fixed_schedule = "{fixed}"\n' if fixed else ""))
            verb(["route", "--config", str(cfg), "--resume", "latest"], log, s.threads)
            verb(["export", "--run", str(run), "--student-out", str(out_student), "--router-out", str(out_router)],
                 log, s.threads)
        return {"student": out_student, "router": out_router}

    width_init = work / "pruned_width.safetensors"
    if not width_init.exists():
        verb(["prune", "--teacher", str(teacher), "--stats", str(stats), "--heads", str(s.width), "--ffn",
              str(s.width), "--ffn-multiple", "32", "--out", str(width_init)], log, s.threads)
    width_student = distill("width", width_init, s.distill_steps)
    c_w = block_fraction(read_meta(width_student)[0])
    variants: dict[str, dict] = {"teacher": {"student": teacher, "router": None, "budget": 1.0}}
    for b in s.budgets:
        tag = f"{b:.2f}".replace(".", "p")
        depth_init = work / f"pruned_depth_{tag}.safetensors"
        if not depth_init.exists():
            verb(["prune", "--teacher", str(teacher), "--stats", str(stats), "--depth", "static", "--depth-target",
                  str(b), "--shallow-fraction", str(SHALLOW_FRACTION), "--depth-tokens", str(TOKENS),
                  "--depth-text-tokens", str(TEXT_TOKENS), "--out", str(depth_init)], log, s.threads)
        variants[f"VDMini static removal + ICMD @ {b}"] = {
            "student": distill(f"depth_{tag}", depth_init, s.distill_steps + s.route_steps, ICMD), "router": None,
            "budget": b}
        router_budget = min(1.0, b / c_w)
        pare = route(f"pare_{tag}", width_student, router_budget)
        variants[f"PARE width + learned router (its threshold) @ {b}"] = {**pare, "budget": b}
        variants[f"PARE width + learned router (budget mode) @ {b}"] = {**pare, "budget": b,
                                                                      "route_budget": router_budget}
        variants[f"width + static schedule @ {b}"] = {**route(f"static_{tag}", width_student, router_budget, "auto"),
                                                      "budget": b}
    return variants


# ---------------------------------------------------------------------------------------------- measuring them


class Variant:
    """A velocity model for the sampler (the student alone, or routed like PAREApplyRouter), with the run masks of
    every call. A learned router runs at its stored default threshold (what ``PAREApplyRouter`` does when the knob is
    left at its default), or, given ``route_budget``, in the node's ``budget`` mode (each call runs the top-scoring
    blocks that fit that share of the student's block compute, rounded down to whole blocks); a fixed schedule runs
    at its threshold."""

    def __init__(self, student: Path, router: Path | None, route_budget: float | None = None) -> None:
        from comfyui_pare.router import RoutingPolicy, load_router
        from training.model import WanTransformer
        from training.routed import RoutedVelocity

        self.model = WanTransformer.from_checkpoint(student)
        self.meta = self.model.meta
        self.routed = None
        if router is not None:
            r = load_router(router)
            policy = (RoutingPolicy(budget=route_budget, pin_first=1, pin_last=1) if route_budget is not None
                      else RoutingPolicy(threshold=r.spec.default_threshold))
            self.routed = RoutedVelocity(self.model, r, policy)
        self.masks: list[torch.Tensor] = []

    def __call__(self, x, timestep, context, clip_fea=None):
        if self.routed is not None:
            out = self.routed(x, timestep, context, clip_fea)
            self.masks.append(self.routed.masks[-1])
            return out
        self.masks.append(torch.ones(x.shape[0], self.model.num_blocks, dtype=torch.bool))
        with torch.no_grad():
            return self.model(x, timestep, context, clip_fea)


def measure(variants: dict[str, dict], s: Settings, weights: Path) -> list[dict]:
    from comfyui_pare.safetensors_io import load_tensors
    from comfyui_pare.toy_text import ToyTextEncoder
    from training.toyworld import evaluate, videos
    from training.toyworld.comfy_vae import load_vae
    from training.toyworld.teacher import SHIFT

    torch.set_num_threads(s.threads)
    text = ToyTextEncoder.load(weights / "pare_toy_text.safetensors")
    vae = load_vae(load_tensors(weights / "pare_toy_vae.safetensors")[0])
    clips = [c for c in videos.single_clips("heldout") for _ in range(s.eval_seeds)]
    prompts, seeds = [c.prompt for c in clips], list(range(len(clips)))
    models = {name: Variant(v["student"], v["router"], v.get("route_budget")) for name, v in variants.items()}
    latents, times = {}, {name: [] for name in models}
    for name, m in models.items():  # warm-up, and the latents every metric is computed on
        evaluate.sample(m, text, prompts[:1], seeds[:1], SHIFT)
        m.masks.clear()
        latents[name] = evaluate.sample(m, text, prompts, seeds, SHIFT)
    for _ in range(s.repeats):  # timing: one video at a time (as a user samples), variants interleaved
        for name, m in models.items():
            t0 = time.perf_counter()
            evaluate.sample(m, text, prompts[:1], seeds[:1], SHIFT)
            times[name].append(time.perf_counter() - t0)
    rows = []
    ref = latents["teacher"]
    for name, v in variants.items():
        m = models[name]
        frames = evaluate.decode(vae, latents[name])
        traj = [evaluate.judge(frames[i], c.objects[0]).trajectory_error_px for i, c in enumerate(clips)]
        psnr = [evaluate.latent_psnr(latents[name][i], ref[i]) for i in range(len(clips))] if name != "teacher" else []
        size = Path(v["student"]).stat().st_size + (Path(v["router"]).stat().st_size if v["router"] else 0)
        rows.append({
            "variant": name, "budget": v["budget"],
            "compute_fraction": block_fraction(m.meta, torch.cat(m.masks[:]).bool() if m.masks else None),
            "blocks": m.meta.num_blocks,
            "latent_psnr_db": statistics.mean(psnr) if psnr else None,
            "trajectory_error_px": statistics.mean(traj),
            "file_mb": size / 2**20,
            "sampling_s_per_video": statistics.median(times[name]),
            "videos": len(clips),
        })
    return rows


def markdown(rows: list[dict], s: Settings) -> str:
    head = ("| variant | block compute / teacher (measured) | blocks | latent PSNR vs teacher (dB) | trajectory error "
            "(px) | file (MB) | sampling time per video (s) |\n|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['variant']} | {r['compute_fraction']:.3f} | {r['blocks']} | "
        f"{'—' if r['latent_psnr_db'] is None else format(r['latent_psnr_db'], '.2f')} | "
        f"{r['trajectory_error_px']:.2f} | {r['file_mb']:.2f} | {r['sampling_s_per_video']:.3f} |\n" for r in rows)
    note = (f"\n{rows[0]['videos']} held-out videos per row; PARE and static: {s.distill_steps} stage-1 + "
            f"{s.route_steps} stage-2 steps, VDMini: {s.distill_steps + s.route_steps} stage-1 steps with the ICMD "
            f"losses; PARE width {s.width}; timing: median of {s.repeats} single-video runs, {s.threads} CPU "
            "thread(s).\n")
    return head + body + note


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="working folder (resumable; reruns reuse what exists)")
    p.add_argument("--weights", type=Path, default=WEIGHTS,
                   help="folder with pare_toy_teacher / pare_toy_text / pare_toy_vae .safetensors (default: the shipped "
                        "training/toyworld/weights)")
    p.add_argument("--budgets", default="0.6,0.45", help="comma-separated block-compute fractions of the teacher")
    p.add_argument("--width", type=float, default=0.75, help="PARE's kept fraction of heads and FFN neurons")
    p.add_argument("--steps", type=int, default=300, help="training steps of every stage-1 and stage-2 run")
    p.add_argument("--samples", type=int, default=128, help="training/calibration clips")
    p.add_argument("--uncond-samples", type=int, default=32,
                   help="extra distillation samples with the empty prompt (the CFG branch the sampler also runs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the verbs and the timing")
    p.add_argument("--repeats", type=int, default=3, help="timing rounds")
    p.add_argument("--quick", action="store_true", help="a plumbing check: 16 samples, 10 steps, 1 timing round")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    s = Settings(budgets=tuple(float(b) for b in args.budgets.split(",")), width=args.width, samples=args.samples,
                 uncond_samples=args.uncond_samples, distill_steps=args.steps, route_steps=args.steps,
                 repeats=args.repeats, threads=args.threads)
    if args.quick:
        s = dataclasses.replace(s, samples=16, uncond_samples=4, distill_steps=10, route_steps=10, repeats=1)
    variants = build_variants(args.work, s, args.weights)
    rows = measure(variants, s, args.weights)
    table = markdown(rows, s)
    (args.work / "comparison.json").write_text(json.dumps({"settings": dataclasses.asdict(s), "rows": rows}, indent=1))
    (args.work / "comparison.md").write_text(table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
