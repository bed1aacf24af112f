"""The budget curve on the toy world: quality against measured compute for the teacher, the shipped PARE student +
router (budget mode with its calibrated thresholds, the old per-step budget rule, its trained threshold) and static
schedules on the same student (the best found by a greedy search, and calibrate's training-free suggestions).

    python -m scripts.budget_curve --work /tmp/budget_curve [--calibrate-router] [--out docs]

Nothing is trained. Measured on held-out prompts (the 12 held-out colour x shape x direction clips) at seeds no test
or training run uses (``EVAL_SEEDS``), 20 Euler steps, CFG 4, shift 3 (the toy sampler), one torch thread:

* compute: executed block MACs per step over the student's (the node's ``budget`` unit) and over the teacher's,
  counted with ``comfyui_pare.compute`` at 80 video / 16 text tokens from the decisions actually made (cond and
  uncond rows);
* latent PSNR against the teacher's latent for the same prompt and seed; trajectory error of the decoded object
  against the generator's ground truth; direction right (share of videos).

The static search (greedy, ``search_static``) picks schedules on other prompts (seen colour/shape pairs, noise seed
``SEARCH_SEED``) by the CFG velocity error against the teacher on noised clips at every step sigma (a proxy: cheap
enough for this CPU); cells are (quarter of the schedule, unpinned block).
``--calibrate-router`` first writes the shipped router's budget calibration (``python -m training calibrate-router``
on 48 training-split clips that the student never trained on, 24 calibrate / 24 validate; validated by spend, by
velocity error against the best static contiguous skip and at most 2x the trained threshold's error, with the
teacher's ``calibrate`` stats on the same clips, 8 timesteps) into the shipped file.

Writes ``<out>/toy_budget_curve.json``, ``<out>/toy_budget_curve.png`` (PSNR and trajectory error against compute)
and ``<out>/toy_router_heatmaps.png`` (the router's decisions for two prompts side by side, budget mode 0.6), and
prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from comfyui_pare.compute import model_block_macs
from comfyui_pare.pruned import PrunedWanMeta
from comfyui_pare.router import RoutingPolicy, load_router
from comfyui_pare.router_budget import read_budget_calibration
from comfyui_pare.schedule import parse_schedule

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("budget_curve")
WEIGHTS = REPO / "training" / "toyworld" / "weights"
TOKENS, TEXT_TOKENS = 80, 16
EVAL_SEEDS = (7101, 7202, 7303)  # held-out seeds: no test, training run or search uses them
SEARCH_SEED = 8101
BUDGETS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
CALIBRATION_CLIPS = (1000, 48)  # training-split clips beyond the 160 the student and router trained on
# Quarters of the schedule, with boundaries between the 20 steps (positions i / 20), so no step sits on one.
PHASES = ((0.0, 0.225), (0.225, 0.475), (0.475, 0.725), (0.725, 1.0))
PIN = (1, 1)


class Recorder:
    """A sampler velocity model that runs the student under some decision rule and keeps every call's mask."""

    def __init__(self, student, decide) -> None:
        self.student, self.decide_fn, self.masks = student, decide, []

    @torch.no_grad()
    def __call__(self, x, timestep, context, clip_fea=None):
        mask = self.decide_fn(x, timestep, context)
        self.masks.append(mask.cpu())
        return self.student(x, timestep, context, clip_fea, block_mask=mask)


def routed(student, router, policy: RoutingPolicy) -> Recorder:
    from training.routed import RoutedVelocity

    rv = RoutedVelocity(student, router, policy)
    return Recorder(student, rv.decisions)


def scheduled(student, schedule: str, sigmas: torch.Tensor, shift: float) -> Recorder:
    from training.schedule_suggest import step_masks

    n = student.num_blocks
    masks = step_masks(parse_schedule(schedule, n), n, sigmas.tolist(), shift) if schedule else \
        torch.ones(len(sigmas), n, dtype=torch.bool)
    ts = sigmas.double() * 1000

    def decide(x, timestep, context):
        i = int((ts - float(timestep.reshape(-1)[0])).abs().argmin())
        return masks[i].expand(x.shape[0], -1)

    return Recorder(student, decide)


def fractions(masks: list[torch.Tensor], costs: torch.Tensor) -> float:
    m = torch.cat(masks).double()
    return float((m * costs).sum(1).mean())


def calibrate_router(work: Path) -> None:
    """Write the shipped router's budget calibration (into the shipped file)."""
    from comfyui_pare.calibration import write_sample
    from comfyui_pare.toy_text import ToyTextEncoder
    from training.calibrate_router import calibrate_router_file, log_table
    from training.toyworld import videos
    from training.toyworld.latent_space import frame_features, latent_frame_indices, to_vae_space
    from training.toyworld.teacher import SHIFT

    folder = work / "calibration_samples"
    folder.mkdir(parents=True, exist_ok=True)
    text = ToyTextEncoder.load(WEIGHTS / "pare_toy_text.safetensors")
    keep = latent_frame_indices(videos.FRAMES)
    first, n = CALIBRATION_CLIPS
    for i in range(first, first + n):
        clip = videos.clip_at(i, "train")
        z = to_vae_space(frame_features(videos.render(clip, keep)[None], keep))[0]
        with torch.no_grad():
            write_sample(folder / f"sample_{i:05d}.safetensors", text([clip.prompt])[0], latent_shape=tuple(z.shape),
                         seed=i, prompt=clip.prompt, latent=z)
    stats = work / "stats.safetensors"  # the teacher's calibration on the same clips: static skips, suggestions
    if not stats.exists():
        from training.__main__ import main as training_main

        assert training_main(["calibrate", "--teacher", str(WEIGHTS / "pare_toy_teacher.safetensors"), "--samples",
                              str(folder), "--out", str(stats), "--shift", str(SHIFT), "--timesteps", "8",
                              "--query-rows", "32", "--device", "cpu"]) == 0
    cal = calibrate_router_file(str(WEIGHTS / "pare_toy_student.safetensors"), str(WEIGHTS / "pare_toy_router.safetensors"),
                                str(folder), None, tuple(round(0.3 + 0.05 * k, 2) for k in range(15)), 20, SHIFT,
                                *PIN, teacher_path=str(WEIGHTS / "pare_toy_teacher.safetensors"), stats=str(stats),
                                max_error_ratio=2.0)
    log_table(cal)


@torch.no_grad()
def search_static(student, teacher, text, costs: torch.Tensor, sigmas: torch.Tensor, budgets) -> dict:
    """Greedy static search on a proxy: the CFG velocity error (``evaluate.CFG``) against the teacher on the search
    clips noised at every step sigma. Cells are (phase, unpinned block); skipping a cell changes only its phase's
    error, so each candidate is one forward over that phase's inputs. Each round skips the cell with the smallest
    rise in the step-weighted error per unit of compute saved; the last state at or under each budget is its
    schedule."""
    from training.sampling import process_in
    from training.schedule_suggest import format_schedule
    from training.toyworld import evaluate, videos
    from training.toyworld.latent_space import frame_features, latent_frame_indices, to_vae_space

    n = student.num_blocks
    keep = latent_frame_indices(videos.FRAMES)
    clips = videos.single_clips("seen")[::6]
    x0 = process_in(torch.cat([to_vae_space(frame_features(videos.render(c, keep)[None], keep)) for c in clips]))
    gen = torch.Generator().manual_seed(SEARCH_SEED)
    noise = torch.randn(x0.shape, generator=gen)
    cond, uncond = text([c.prompt for c in clips]), text([""] * len(clips))
    positions = [i / len(sigmas) for i in range(len(sigmas))]
    phase_of = [next(k for k, (a, e) in enumerate(PHASES) if a <= p < e) for p in positions]
    inputs = []  # per phase: (x, t, ctx) with cond rows then uncond rows
    for k in range(len(PHASES)):
        steps = [i for i in range(len(sigmas)) if phase_of[i] == k]
        sig = sigmas[steps].repeat_interleave(len(clips))
        x = (1 - sig)[:, None, None, None, None] * x0.repeat(len(steps), 1, 1, 1, 1) + \
            sig[:, None, None, None, None] * noise.repeat(len(steps), 1, 1, 1, 1)
        m = len(x)
        inputs.append((torch.cat([x, x]), torch.cat([sig, sig]) * 1000,
                       torch.cat([cond.repeat(len(steps), 1, 1), uncond.repeat(len(steps), 1, 1)]), m))

    def cfg(model, x, t, ctx, m, mask=None):
        v = model(x, t, ctx, None) if mask is None else model(x, t, ctx, None, block_mask=mask.expand(len(x), -1))
        return v[m:] + evaluate.CFG * (v[:m] - v[m:])

    refs = [cfg(teacher, x, t, ctx, m) for x, t, ctx, m in inputs]
    weight = [sum(1 for p in phase_of if p == k) / len(phase_of) for k in range(len(PHASES))]

    def error(k: int, run: torch.Tensor) -> float:
        x, t, ctx, m = inputs[k]
        return float((cfg(student, x, t, ctx, m, run) - refs[k]).square().sum() / refs[k].square().sum())

    run = torch.ones(len(PHASES), n, dtype=torch.bool)
    errs = [error(k, run[k]) for k in range(len(PHASES))]
    frac, path = 1.0, []
    while frac > min(budgets) - 1e-9:
        best = None
        for k in range(len(PHASES)):
            for b in range(PIN[0], n - PIN[1]):
                if not run[k, b]:
                    continue
                cand = run[k].clone()
                cand[b] = False
                e = error(k, cand)
                rise = weight[k] * (e - errs[k]) / (weight[k] * float(costs[b]))
                if best is None or rise < best[0]:
                    best = (rise, k, b, e)
        if best is None:
            break
        _, k, b, e = best
        run[k, b], errs[k] = False, e
        frac = float(sum(weight[j] * float((run[j].double() * costs).sum()) for j in range(len(PHASES))))
        sched = format_schedule(~run, PHASES)
        path.append({"schedule": sched, "fraction": frac, "proxy_error": sum(w * v for w, v in zip(weight, errs))})
        log.info("static search: %s -> nominal compute %.3f, proxy error %.4g", sched, frac, path[-1]["proxy_error"])
    chosen = {}
    for b in budgets:
        fits = [p for p in path if p["fraction"] <= b + 1e-9]
        if b < 1.0 and fits:
            chosen[b] = max(fits, key=lambda p: p["fraction"])  # the last state at or under the budget
    return {"chosen": chosen, "path": path}


def heatmaps(student, router, cal, text, shift, out: Path) -> None:
    """Budget mode 0.6: the router's decisions for two prompts (one held-out object; two objects) side by side."""
    from PIL import Image, ImageDraw

    from comfyui_pare.report import StepRecord, heatmap
    from training.toyworld import evaluate

    prompts = ["a green circle moving right", "a red triangle moving up and a blue square moving left"]
    images = []
    for prompt in prompts:
        rec = routed(student, router, RoutingPolicy(threshold=cal.threshold_for(0.6), pin_first=PIN[0],
                                                     pin_last=PIN[1]))
        evaluate.sample(rec, text, [prompt], [EVAL_SEEDS[0]], shift)
        sig = evaluate.flow_sigmas(evaluate.STEPS, shift)[:-1].tolist()
        steps = [StepRecord(sigma=s, branches=(0, 1), ran=m.float().numpy()) for s, m in zip(sig, rec.masks)]
        img = Image.fromarray(heatmap(steps, student.num_blocks))
        canvas = Image.new("RGB", (img.width, img.height + 16), (12, 12, 16))
        canvas.paste(img, (0, 16))
        ImageDraw.Draw(canvas).text((2, 2), f"'{prompt}' (seed {EVAL_SEEDS[0]}): "
                                            f"{fractions(rec.masks, student_costs(student)):.3f}", fill=(220, 220, 220))
        images.append(canvas)
    w = sum(i.width for i in images) + 8
    both = Image.new("RGB", (w, max(i.height for i in images)), (255, 255, 255))
    x = 0
    for i in images:
        both.paste(i, (x, 0))
        x += i.width + 8
    both.save(out / "toy_router_heatmaps.png")


def student_costs(student) -> torch.Tensor:
    c = torch.tensor([float(m.total) for m in model_block_macs(student.meta, TOKENS, TEXT_TOKENS)], dtype=torch.float64)
    return c / c.sum()


def chart(rows: list[dict], path: Path) -> None:
    from training.plots import xy_panels_png

    families: dict[str, list[dict]] = {}
    for r in rows:  # the teacher is the title's reference; "every block" is budget mode's 1.0 point
        if r["family"] not in ("teacher", "student, every block"):
            families.setdefault(r["family"], []).append(r)
    teacher = next(r for r in rows if r["family"] == "teacher")
    panels = []
    for metric, name in (("trajectory_error_px", f"trajectory error (px; teacher {teacher['trajectory_error_px']:.2f})"),
                         ("latent_psnr_db", "latent PSNR vs teacher (dB)")):
        series = {f: ([r["compute_teacher"] for r in rs], [r[metric] for r in rs]) for f, rs in families.items()
                  if all(r[metric] is not None for r in rs)}
        panels.append((name, series))
    xy_panels_png(path, panels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, default=REPO / "docs")
    p.add_argument("--calibrate-router", action="store_true", help="write the shipped router's budget calibration")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.calibrate_router:
        calibrate_router(args.work)

    from comfyui_pare.safetensors_io import load_tensors
    from comfyui_pare.toy_text import ToyTextEncoder
    from training.model import WanTransformer
    from training.schedule_suggest import suggest
    from training.toyworld import evaluate, videos
    from training.toyworld.comfy_vae import load_vae
    from training.toyworld.teacher import SHIFT

    t_start = time.time()
    text = ToyTextEncoder.load(WEIGHTS / "pare_toy_text.safetensors")
    vae = load_vae(load_tensors(WEIGHTS / "pare_toy_vae.safetensors")[0])
    teacher = WanTransformer.from_checkpoint(WEIGHTS / "pare_toy_teacher.safetensors").eval()
    student = WanTransformer.from_checkpoint(WEIGHTS / "pare_toy_student.safetensors").eval()
    router = load_router(WEIGHTS / "pare_toy_router.safetensors")
    cal = read_budget_calibration(WEIGHTS / "pare_toy_router.safetensors")
    if cal is None:
        raise SystemExit("the shipped router has no budget calibration: run with --calibrate-router")
    costs = student_costs(student)
    teacher_macs = sum(float(m.total) for m in model_block_macs(PrunedWanMeta.teacher(student.dims), TOKENS, TEXT_TOKENS))
    student_share = sum(float(m.total) for m in model_block_macs(student.meta, TOKENS, TEXT_TOKENS)) / teacher_macs
    sigmas = evaluate.flow_sigmas(evaluate.STEPS, SHIFT)[:-1]

    clips = [c for s in EVAL_SEEDS for c in videos.single_clips("heldout")]
    seeds = [s for s in EVAL_SEEDS for _ in videos.single_clips("heldout")]
    prompts = [c.prompt for c in clips]

    def sample_eval(model):
        return evaluate.sample(model, text, prompts, seeds, SHIFT)

    ref = sample_eval(teacher)
    cache = args.work / "rows.json"
    done = {r["name"]: r for r in json.loads(cache.read_text())} if cache.exists() else {}
    rows: list[dict] = []

    def measure(name: str, family: str, budget: float | None, model, is_teacher: bool = False, **extra) -> None:
        if name in done:
            rows.append(done[name])
            return
        lat = ref if is_teacher else sample_eval(model)
        frames = evaluate.decode(vae, lat)
        verdicts = [evaluate.judge(frames[i], c.objects[0]) for i, c in enumerate(clips)]
        frac = 1.0 if is_teacher else fractions(model.masks, costs)
        row = {"name": name, "family": family, "budget": budget,
               "compute_student": None if is_teacher else frac,
               "compute_teacher": 1.0 if is_teacher else frac * student_share,
               "latent_psnr_db": None if is_teacher else statistics.mean(
                   evaluate.latent_psnr(lat[i], ref[i]) for i in range(len(clips))),
               "trajectory_error_px": statistics.mean(v.trajectory_error_px for v in verdicts),
               "direction_right": sum(v.direction_right for v in verdicts) / len(verdicts),
               "wrong_direction": [f"{clips[i].prompt} @ {seeds[i]}" for i, v in enumerate(verdicts)
                                   if not v.direction_right], **extra}
        rows.append(row)
        done[name] = row
        cache.write_text(json.dumps(list(done.values()), indent=1))
        log.info("%s: compute %.3f (teacher %.3f), %.2f dB, %.2f px, direction %.0f%%", name,
                 row["compute_student"] or 1.0, row["compute_teacher"], row["latent_psnr_db"] or float("nan"),
                 row["trajectory_error_px"], 100 * row["direction_right"])

    pins = dict(pin_first=PIN[0], pin_last=PIN[1])
    measure("teacher", "teacher", None, teacher, is_teacher=True)
    measure("router, trained threshold", "router, trained threshold", None,
            routed(student, router, RoutingPolicy(threshold=router.spec.default_threshold, **pins)))
    for b in BUDGETS:
        measure(f"router, budget mode (calibrated) {b:g}", "router, budget mode (calibrated)", b,
                routed(student, router, RoutingPolicy(threshold=cal.threshold_for(b), **pins) if b < 1 else
                       RoutingPolicy(budget=1.0, **pins)), threshold=cal.threshold_for(b))
    for b in BUDGETS[:-1]:
        measure(f"router, per-step budget rule {b:g}", "router, per-step budget rule (before)", b,
                routed(student, router, RoutingPolicy(budget=b, **pins)))
    stats = args.work / "stats.safetensors"
    if stats.exists():  # calibrate's training-free suggestions (item 4), from the teacher's contributions
        st = load_tensors(stats, ["block_contribution", "timesteps"])[0]
        contribution, ts = st["block_contribution"], st["timesteps"]
        for b in BUDGETS[:-1]:
            s = suggest(contribution, (ts / 1000).tolist(), SHIFT, b, costs.tolist())
            measure(f"static, calibrate's suggestion {b:g}", "static, calibrate's suggestion (training-free)", b,
                    scheduled(student, s.schedule, sigmas, SHIFT), schedule=s.schedule)
    search_file = args.work / "static_search.json"
    if search_file.exists():
        search = json.loads(search_file.read_text())
        search["chosen"] = {float(k): v for k, v in search["chosen"].items()}
    else:
        search = search_static(student, teacher, text, costs, sigmas, BUDGETS)
        search_file.write_text(json.dumps(search, indent=1))
    for b, choice in sorted(search["chosen"].items()):
        measure(f"static, searched {b:g}", "static, searched (greedy on a proxy, untrained)", b,
                scheduled(student, choice["schedule"], sigmas, SHIFT), schedule=choice["schedule"])
    measure("student, every block", "student, every block", 1.0, scheduled(student, "", sigmas, SHIFT))

    args.out.mkdir(parents=True, exist_ok=True)
    heatmaps(student, router, cal, text, SHIFT, args.out)
    chart(rows, args.out / "toy_budget_curve.png")
    settings = {"eval_seeds": EVAL_SEEDS, "prompts": len(set(prompts)), "videos": len(prompts), "steps": evaluate.STEPS,
                "cfg": evaluate.CFG, "shift": SHIFT, "student_share_of_teacher": student_share,
                "search": {"prompts": "every 6th seen single-object clip", "seed": SEARCH_SEED, "phases": PHASES,
                           "proxy": "CFG velocity error vs the teacher on the clips noised at every step sigma"},
                "wall_s": time.time() - t_start}
    (args.out / "toy_budget_curve.json").write_text(json.dumps({"settings": settings, "rows": rows,
                                                                 "static_search_path": search["path"]}, indent=1))
    print(markdown(rows))
    return 0


def markdown(rows: list[dict]) -> str:
    head = ("| variant | budget | compute / student | compute / teacher | latent PSNR (dB) | trajectory error (px) | "
            "direction right | schedule |\n|---|---|---|---|---|---|---|---|\n")

    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    return head + "".join(
        f"| {r['family']} | {f(r['budget'], 'g')} | {f(r['compute_student'], '.3f')} | {r['compute_teacher']:.3f} | "
        f"{f(r['latent_psnr_db'], '.2f')} | {r['trajectory_error_px']:.2f} | {100 * r['direction_right']:.0f}% | "
        f"{r.get('schedule', '')} |\n" for r in rows)


if __name__ == "__main__":
    sys.exit(main())
