"""``python -m training calibrate-router``: give an existing router file its budget calibration.

PARE Apply Router's ``budget`` mode spends a share of the block compute over the whole sampling run. This verb
finds, for each budget, the one threshold on the router's probabilities that spends it on average over a whole
schedule, keeping the router's own preferences between steps and inputs
(``comfyui_pare.router_budget``). Inputs: the student the router drives (its patch embedding makes the tokens the
router reads), the router file and calibration samples (``PARE Save Calibration Sample``; each needs its clean
latent). Each sample is noised with its own noise at every sigma of the sampler's schedule (``--steps``,
``--shift``), which is where a sampling run's latents are on average, and the router's probabilities are taken
there. Half the samples calibrate the thresholds; the other half checks them: a budget is *validated* when the
held-out half spends within ``--tolerance`` of it. The result is written into the router file's header (key
``pare_router_budget``; tensors unchanged), in place or to ``--out``.

``export`` (and ``route`` at its end) run the same calibration on their held-out inputs.
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

import torch

from comfyui_pare.errors import PareError, PareFormatError
from comfyui_pare.router import RoutingPolicy, check_router_fits, load_router
from comfyui_pare.router_budget import BudgetCalibration, write_budget_calibration

from .data import collate, noised, with_condition
from .gates import compute_fraction, normalized_costs
from .route_eval import calibrate_threshold, static_baseline, student_contribution, velocity_error
from .routed import RoutedVelocity, block_costs, pin_mask
from .sample_index import SampleIndex
from .sampling import flow_sigmas
from .stage_common import tokens_of
from .teacher import load_model

logger = logging.getLogger(__name__)

HELP = "calibrate a router file's budget mode: one threshold per budget over a whole schedule (stored in the file)"
DEFAULT_BUDGETS = tuple(round(0.3 + 0.05 * k, 2) for k in range(15))  # 0.30, 0.35, ..., 1.00
TOLERANCE = 0.03
QUALITY_NOTE = "; and velocity error no worse than the best static contiguous skip of the same compute (if one exists)"


def spent(logits: torch.Tensor, costs: torch.Tensor, pinned: torch.Tensor, threshold: float) -> float:
    """Executed share of the block compute over ``logits`` [M, N] at ``threshold`` (pinned blocks always run),
    exactly as ``comfyui_pare.router.decide`` decides with that threshold."""
    run = (torch.sigmoid(logits.double()) > threshold) | pinned.cpu()[None]
    c = costs.double().cpu() / costs.double().sum()
    return min(1.0, max(0.0, float((run.double() * c).sum(dim=1).mean())))  # no 1.0000000000000002


def calibrate_family(logits: torch.Tensor, costs: torch.Tensor, pinned: torch.Tensor,
                     budgets: Sequence[float]) -> tuple[list[float], list[float]]:
    """(thresholds, spent) for ascending ``budgets`` over ``logits`` [M, N].

    Each threshold is ``route_eval.calibrate_threshold``'s (the one whose decisions spend closest to the budget);
    the family is then made non-increasing in the budget, so turning the budget up never skips a block that a
    lower budget ran.
    """

    if list(budgets) != sorted(budgets) or len(set(budgets)) != len(budgets):
        raise ValueError(f"budgets must be strictly ascending, got {list(budgets)}")
    costs = costs.double().cpu() / costs.double().sum()  # calibrate_threshold counts in shares of the total
    thresholds: list[float] = []
    for b in budgets:
        t = calibrate_threshold(logits, costs, pinned, b)
        thresholds.append(min(t, thresholds[-1]) if thresholds else t)
    return thresholds, [spent(logits, costs, pinned, t) for t in thresholds]


def budget_calibration(calib_logits: torch.Tensor, held_out_logits: torch.Tensor, costs: torch.Tensor,
                       pinned: torch.Tensor, budgets: Sequence[float], pin_first: int, pin_last: int,
                       fingerprint: str, note: str, tolerance: float = TOLERANCE) -> BudgetCalibration:
    """The family calibrated on ``calib_logits`` and validated on ``held_out_logits`` (spend within ``tolerance``)."""
    thresholds, calib_spent = calibrate_family(calib_logits, costs, pinned, budgets)
    held = [spent(held_out_logits, costs, pinned, t) for t in thresholds]
    validated = [b for b, s in zip(budgets, held) if abs(s - b) <= tolerance]
    return BudgetCalibration(
        budgets=tuple(float(b) for b in budgets), thresholds=tuple(thresholds), spent=tuple(calib_spent),
        held_out_spent=tuple(held), validated_budgets=tuple(float(b) for b in validated), pin_first=pin_first,
        pin_last=pin_last, model_fingerprint=fingerprint, inputs=int(calib_logits.shape[0]),
        note=f"{note}; validated: held-out spend within {tolerance:g} of the budget")


@torch.no_grad()
def schedule_batches(student, samples, steps: int, shift: float, seed: int) -> list:
    """One batch (x_t, timestep, context, clip) per sample: the sample noised (one noise each, from ``seed``) at every
    sigma of the ``steps``-step schedule."""

    sigmas = flow_sigmas(steps, shift)[:-1].float()
    gen = torch.Generator().manual_seed(seed)
    device = next(student.parameters()).device
    out = []
    for item in samples:
        x0, _, ctx, clip = collate([item])
        noise = torch.randn(x0.shape, generator=gen)
        x0s = x0.expand(steps, *x0.shape[1:])
        x = with_condition(noised(x0s, noise.expand(steps, *x0.shape[1:]), sigmas), x0s, student.dims)
        out.append((x.to(device), (sigmas * 1000).to(device), ctx.expand(steps, -1, -1).to(device),
                     None if clip is None else clip.expand(steps, -1, -1).to(device)))
    return out


@torch.no_grad()
def schedule_logits(student, router, batches: list) -> torch.Tensor:
    """Router logits [inputs, N] on ``batches``, read through the student's patch embedding as the node feeds it."""
    return torch.cat([router(t, student.patch_embed(x).float(), ctx if router.spec.text_dim else None).cpu()
                      for x, t, ctx, _ in batches])


def parse_budgets(text: str) -> tuple[float, ...]:
    """'0.3,0.5,1' or 'start:stop:step' (stop included)."""
    try:
        if ":" in text:
            a, b, s = (float(v) for v in text.split(":"))
            n = int(round((b - a) / s))
            values = [round(a + s * k, 6) for k in range(n + 1)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise PareError(f"--budgets: {text!r} is not a comma-separated list or start:stop:step ({e})") from e
    if not values or any(not 0.0 < v <= 1.0 for v in values) or values != sorted(set(values)):
        raise PareError(f"--budgets: need ascending values in (0, 1], got {values}")
    return tuple(values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", required=True, help="the student the router drives (pruned-format .safetensors)")
    p.add_argument("--router", required=True, help="the router file (.safetensors) to calibrate")
    p.add_argument("--samples", required=True, help="folder of calibration samples with clean latents "
                   "(held out from training if you can); half calibrate, half validate")
    p.add_argument("--out", default=None, help="write the calibrated router here (default: in place)")
    p.add_argument("--budgets", default="0.3:1.0:0.05", help="budgets to calibrate: a list or start:stop:step "
                   "(default 0.3:1.0:0.05)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps of the schedule to calibrate over")
    p.add_argument("--shift", type=float, default=5.0, help="flow shift of the schedule (ModelSamplingSD3)")
    p.add_argument("--pin-first", type=int, default=1, help="PARE Apply Router's pin_first (blocks that always run)")
    p.add_argument("--pin-last", type=int, default=1, help="PARE Apply Router's pin_last")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="validated: held-out spend within this")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--teacher", default=None, help="also validate quality: at each budget the router's velocity error "
                   "against this teacher must be no worse than the best static contiguous skip of the same compute "
                   "(needs --stats)")
    p.add_argument("--stats", default=None, help="`calibrate`'s stats of the teacher (picks the static skips)")
    p.add_argument("--max-error-ratio", type=float, default=None, help="with --teacher: a validated budget's velocity "
                   "error is also at most this multiple of the router's error at its trained threshold (the "
                   "operating point its student was trained at)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")


def calibrate_router_file(student_path: str, router_path: str, samples_dir: str, out: str | None,
                          budgets: Sequence[float], steps: int, shift: float, pin_first: int, pin_last: int,
                          tolerance: float = TOLERANCE, seed: int = 0, device: str = "cpu",
                          teacher_path: str | None = None, stats: str | None = None,
                          max_error_ratio: float | None = None) -> BudgetCalibration:
    """Calibrate ``router_path`` against ``student_path`` on the samples in ``samples_dir``; write and return it."""


    if steps < 1:
        raise PareFormatError(f"--steps must be at least 1, got {steps}")
    student = load_model(student_path, dtype=torch.float32, device=device).eval()
    router = load_router(router_path).to(device)
    meta = student.meta
    check_router_fits(router.spec, meta.num_blocks, meta.dims.dim, meta.fingerprint(), source=str(router_path))
    samples = SampleIndex(samples_dir, meta.dims)  # read lazily, as the stages read them
    if len(samples) < 2:
        raise PareFormatError(f"{samples_dir}: calibrate-router needs at least 2 samples (half calibrate, half "
                              f"validate), found {len(samples)}")
    tokens, text_tokens = tokens_of(samples)
    costs = normalized_costs(block_costs(meta, tokens, text_tokens), meta.num_blocks)
    pinned = pin_mask(meta.num_blocks, pin_first, pin_last)
    if (teacher_path is None) != (stats is None):
        raise PareFormatError("calibrate-router: --teacher and --stats go together (quality validation needs both)")
    batches = schedule_batches(student, samples, steps, shift, seed)
    calib, held = schedule_logits(student, router, batches[0::2]), schedule_logits(student, router, batches[1::2])
    note = (f"calibrate-router: {len(samples[0::2])} samples x {steps} steps (shift {shift:g}) calibrate, "
            f"{len(samples[1::2])} x {steps} validate; {tokens} video / {text_tokens} text tokens")
    cal = budget_calibration(calib, held, costs, pinned, budgets, pin_first, pin_last, meta.fingerprint(), note,
                             tolerance)
    if teacher_path is not None:
        import dataclasses


        teacher = load_model(teacher_path, dtype=torch.float32, device=device).eval()
        rows = quality_check(cal, teacher, student, router, pinned, costs, batches[1::2],
                             student_contribution(stats, meta))
        good = {r["budget"] for r in rows if r["ok"]}
        note = QUALITY_NOTE
        if max_error_ratio is not None:
            trained = RoutedVelocity(student, router, RoutingPolicy(threshold=router.spec.default_threshold,
                                                                    pin_first=pin_first, pin_last=pin_last))
            cap = max_error_ratio * velocity_error(teacher, trained, batches[1::2])
            good &= {r["budget"] for r in rows if r["velocity_error"] <= cap}
            note += (f"; and velocity error at most {max_error_ratio:g}x the trained threshold's "
                     f"({cap / max_error_ratio:.4g})")
            logger.info("velocity error cap %.4g (%g x the trained threshold's)", cap, max_error_ratio)
        for r in rows:
            logger.info("budget %.2f: velocity error %.4g at compute %.3f; static %s %s", r["budget"],
                        r["velocity_error"], r["executed_fraction"], r["static_schedule"], r["static_velocity_error"])
        cal = dataclasses.replace(cal, validated_budgets=tuple(b for b in cal.validated_budgets if b in good),
                                  note=cal.note + note)
    elif max_error_ratio is not None:
        raise PareFormatError("calibrate-router: --max-error-ratio needs --teacher and --stats")
    write_budget_calibration(router_path, cal, out)
    return cal


def log_table(cal: BudgetCalibration) -> None:
    logger.info("budget  threshold  spent(calib)  spent(held out)  validated")
    for b, t, s, h in zip(cal.budgets, cal.thresholds, cal.spent, cal.held_out_spent or cal.spent):
        logger.info("%6.2f  %9.4f  %12.3f  %15.3f  %s", b, t, s, h, "yes" if cal.is_validated(b) else "no")
    logger.info("validated budgets: %s", cal.describe_validated())


def run(args: argparse.Namespace) -> int:
    cal = calibrate_router_file(args.student, args.router, args.samples, args.out, parse_budgets(args.budgets),
                                args.steps, args.shift, args.pin_first, args.pin_last, args.tolerance, args.seed,
                                args.device, args.teacher, args.stats, args.max_error_ratio)
    log_table(cal)
    logger.info("wrote the budget calibration into %s", args.out or args.router)
    return 0


# ---------------------------------------------------------------------------------------------- at export


@torch.no_grad()
def quality_check(cal: BudgetCalibration, teacher, student, router, pinned: torch.Tensor, costs: torch.Tensor,
                  batches: list, contribution: torch.Tensor | None) -> list[dict]:
    """Per calibrated budget, on ``batches`` of (x_t, timestep, context, clip): the router's velocity error against
    the teacher at the budget's threshold, its measured compute, and the best static contiguous skip of that compute
    (``route_eval.static_baseline``) with its error. ``ok``: no worse than the static skip (or no static twin)."""


    rows = []
    pins = dict(pin_first=cal.pin_first, pin_last=cal.pin_last)
    for b, t in zip(cal.budgets, cal.thresholds):
        routed = RoutedVelocity(student, router, RoutingPolicy(threshold=t, **pins))
        err = velocity_error(teacher, routed, batches)
        frac = float(compute_fraction(torch.cat(routed.masks).float(), costs.cpu()))
        static = None if contribution is None else static_baseline(contribution, costs.cpu(), pinned.cpu(), frac)
        static_err = None
        if static is not None:
            run = static.mask(student.num_blocks)
            static_err = velocity_error(teacher, lambda x, ts, ctx, clip, run=run: student(
                x, ts, ctx, clip, block_mask=run.expand(x.shape[0], -1).to(x.device)), batches)
        rows.append({"budget": b, "threshold": t, "executed_fraction": frac, "velocity_error": err,
                     "static_schedule": None if static is None else static.schedule,
                     "static_fraction": None if static is None else static.fraction, "static_velocity_error": static_err,
                     "ok": static_err is None or err <= static_err})
    return rows


def export_calibration(cfg, stage, gated, calib_logits: torch.Tensor, held_out: list, router_out, measure_quality: bool
                       ) -> dict:
    """What ``route``/``export`` add to the router file: the budget family calibrated on ``calib_logits`` (their
    held-out inputs), validated on the other held-out inputs ``held_out`` by spend and, with ``measure_quality`` and
    ``route.stats``, by velocity error against the static skip of the same compute. Returns the report's part."""
    import dataclasses



    rc, student, router, pinned = cfg.route, gated.student, gated.router, gated.pinned
    costs = stage.costs.cpu()
    held_logits = torch.cat([gated.logits(t, student.patch_embed(x).float(), ctx).cpu() for x, t, ctx, _ in held_out])
    note = (f"export: {calib_logits.shape[0]} held-out noised inputs calibrate, {held_logits.shape[0]} others "
            "validate (training sigma density)")
    cal = budget_calibration(calib_logits, held_logits, costs, pinned, DEFAULT_BUDGETS, rc.pin_first, rc.pin_last,
                             student.meta.fingerprint(), note)
    part: dict = {"budgets": list(cal.budgets), "thresholds": list(cal.thresholds),
                  "held_out_spent": list(cal.held_out_spent)}
    if measure_quality:
        contribution = None if rc.stats is None else student_contribution(rc.stats, student.meta)
        rows = quality_check(cal, stage.teacher, student, router, pinned, costs, held_out, contribution)
        good = {r["budget"] for r in rows if r["ok"]}
        cal = dataclasses.replace(cal, validated_budgets=tuple(b for b in cal.validated_budgets if b in good),
                                  note=cal.note + QUALITY_NOTE)
        part["quality"] = rows
    write_budget_calibration(router_out, cal)
    part["validated"] = cal.describe_validated()
    logger.info("router budget calibration: validated budgets %s", part["validated"])
    return part
