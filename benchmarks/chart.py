"""The bench's PNG: one panel per suite present (analytic compute, measured step time, the budget curve)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from comfyui_pare.report import BACKGROUND, EXECUTED, PARTIAL, SKIPPED, TEXT

PANEL_W, PANEL_H, PAD = 560, 300, 40
GRID = (70, 70, 80)
BAR_COLORS = {"teacher": (120, 160, 230), "pruned": EXECUTED, "pruned_routed": PARTIAL, "teacher_routed": (200, 120, 200)}
CURVE = (230, 90, 80)


def _axes(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, y_max: float, y_label: str, font) -> None:
    x0, y0, x1, y1 = box
    draw.text((x0, y0 - 32), title, fill=TEXT, font=font)
    if y_label:
        draw.text((x0 - 36, y0 - 14), y_label, fill=TEXT, font=font)
    for k in range(5):
        y = y1 - (y1 - y0) * k / 4
        draw.line((x0, y, x1, y), fill=GRID)
        draw.text((x0 - 36, y - 6), f"{y_max * k / 4:.2g}", fill=TEXT, font=font)
    draw.line((x0, y0, x0, y1), fill=TEXT)
    draw.line((x0, y1, x1, y1), fill=TEXT)


def _analytic(draw, box, result: dict, font) -> None:
    _axes(draw, box, "Analytic compute per step (x teacher)", 1.0, "", font)
    x0, y0, x1, y1 = box
    rows = result["rows"]
    group_w = (x1 - x0) / max(1, len(rows))
    for g, row in enumerate(rows):
        names = list(row["configs"])
        bar_w = group_w * 0.8 / len(names)
        for k, name in enumerate(names):
            v = row["configs"][name]["teacher_equivalent"]
            bx = x0 + g * group_w + group_w * 0.1 + k * bar_w
            draw.rectangle((bx, y1 - (y1 - y0) * v, bx + bar_w - 2, y1), fill=BAR_COLORS.get(name, SKIPPED))
        draw.text((x0 + g * group_w + 8, y1 + 4), f"{row['model']} {row['resolution']}", fill=TEXT, font=font)
    for k, (name, color) in enumerate(BAR_COLORS.items()):  # legend in one row under the title
        lx = x0 + 110 * k
        draw.rectangle((lx, y0 - 14, lx + 8, y0 - 6), fill=color)
        draw.text((lx + 12, y0 - 17), name, fill=TEXT, font=font)


def _measured(draw, box, result: dict, font) -> None:
    cands = result["candidates"]
    y_max = max(c["step_seconds"]["max"] for c in cands.values()) * 1.1
    _axes(draw, box, f"Step time through KSampler, s (min-median-max; tick: teacher / analytic) - {result['tokens']} "
          "tokens", y_max, "", font)
    x0, y0, x1, y1 = box
    teacher = cands[result["baseline"]]["step_seconds"]["median"]
    w = (x1 - x0) / len(cands)

    def y(v: float) -> float:
        return y1 - (y1 - y0) * v / y_max

    for k, (name, c) in enumerate(cands.items()):
        s = c["step_seconds"]
        bx = x0 + k * w + w * 0.15
        color = PARTIAL if "_b" in name else EXECUTED if name.startswith("pruned") else BAR_COLORS["teacher"]
        draw.rectangle((bx, y(s["median"]), bx + w * 0.7, y1), fill=color)
        mid = bx + w * 0.35
        draw.line((mid, y(s["min"]), mid, y(s["max"])), fill=TEXT, width=2)
        expect = y(teacher / c["analytic_speedup"])
        draw.line((bx - 3, expect, bx + w * 0.7 + 3, expect), fill=CURVE, width=2)
        draw.text((bx - 4, y1 + 4 + 12 * (k % 2)), name, fill=TEXT, font=font)


def _curve(draw, box, result: dict, font) -> None:
    _axes(draw, box, "Student under PARE Apply Router: time vs executed compute (line: analytic)", 1.0, "", font)
    x0, y0, x1, y1 = box
    pts, ideal = [], []
    for c in result["budget_curve"]:
        x = x0 + (x1 - x0) * c["executed_fraction"]
        pts.append((x, y1 - (y1 - y0) * c["time_vs_pruned"]["median"]))
        ideal.append((x, y1 - (y1 - y0) * c["analytic_vs_pruned"]))
        draw.text((x - 10, y1 + 4), f"{c['executed_fraction']:.0%}", fill=TEXT, font=font)
    if len(ideal) > 1:
        draw.line(sorted(ideal), fill=CURVE, width=2)
    for x, y in pts:
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=EXECUTED)


def chart(result: dict) -> Image.Image:
    panels = []
    suites = result["suites"]
    if "compute" in suites:
        panels.append((_analytic, suites["compute"]))
    if "measured" in suites:
        panels += [(_measured, suites["measured"]), (_curve, suites["measured"])]
    font = ImageFont.load_default()
    img = Image.new("RGB", (PANEL_W, max(1, len(panels)) * PANEL_H), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for k, (fn, data) in enumerate(panels):
        top = k * PANEL_H
        fn(draw, (PAD + 20, top + PAD + 10, PANEL_W - PAD // 2, top + PANEL_H - PAD), data, font)
    if not panels:
        draw.text((PAD, PAD), "no chartable suite in this run", fill=TEXT, font=font)
    return img
