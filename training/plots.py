"""Small PNG charts for training outputs, drawn with Pillow (no plotting library in the environment).

``line_chart_png``: loss curves. ``category_grid_png``: one coloured cell per (row, column) from a small set
of categories (head types per block). ``heatmap_png``: one cell per value, dark to bright (block contribution
per timestep). Each writes atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
AXIS = (60, 60, 60)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _save(img: Image.Image, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        img.save(tmp, format="PNG")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def line_chart_png(path: str | os.PathLike, x: Sequence[float], series: dict[str, Sequence[float]],
                   title: str = "", size: tuple[int, int] = (640, 360), log_y: bool = True) -> None:
    """Curves over a shared x axis (log y when every value is positive), with a legend and min/max labels."""
    w, h = size
    left, right, top, bottom = 70, 20, 30, 30
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    values = np.array([v for s in series.values() for v in s], dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(x) == 0 or values.size == 0:
        _save(img, path)
        return
    log_y = log_y and bool((values > 0).all())
    tf = np.log10 if log_y else (lambda a: a)
    lo, hi = float(tf(values).min()), float(tf(values).max())
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = float(min(x)), float(max(x))
    x1 = x1 if x1 > x0 else x0 + 1.0

    def px(xv: float, yv: float) -> tuple[float, float]:
        return (left + (xv - x0) / (x1 - x0) * (w - left - right),
                top + (1 - (float(tf(np.float64(yv))) - lo) / (hi - lo)) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline=AXIS)
    for i, (name, ys) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = [px(a, b) for a, b in zip(x, ys) if np.isfinite(b) and (not log_y or b > 0)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        draw.text((left + 8, top + 6 + 12 * i), name, fill=color, font=font)
    fmt = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
    draw.text((4, top), fmt(hi), fill=AXIS, font=font)
    draw.text((4, h - bottom - 10), fmt(lo), fill=AXIS, font=font)
    draw.text((left, h - bottom + 6), f"{x0:g}", fill=AXIS, font=font)
    draw.text((w - right - 40, h - bottom + 6), f"{x1:g}", fill=AXIS, font=font)
    if title:
        draw.text((left, 8), title + (" (log scale)" if log_y else ""), fill=AXIS, font=font)
    _save(img, path)


def _grid(cells: np.ndarray, colors: np.ndarray, row_label: str, col_label: str, title: str,
          legend: list[tuple[str, tuple[int, int, int]]], cell: int) -> Image.Image:
    rows, cols = cells.shape
    left, top = 40, 34
    w, h = left + cols * cell + 10, top + rows * cell + 24 + 14 * len(legend)
    img = Image.new("RGB", (max(w, 260), h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for r in range(rows):
        for c in range(cols):
            x, y = left + c * cell, top + r * cell
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=tuple(int(v) for v in colors[r, c]))
        if rows <= 64 and (r % max(1, rows // 16) == 0):
            draw.text((4, top + r * cell), str(r), fill=AXIS, font=font)
    draw.text((left, 4), title, fill=AXIS, font=font)
    draw.text((left, 18), f"rows: {row_label}, columns: {col_label}", fill=AXIS, font=font)
    for i, (name, color) in enumerate(legend):
        y = top + rows * cell + 8 + 14 * i
        draw.rectangle([left, y, left + 10, y + 10], fill=color)
        draw.text((left + 16, y), name, fill=AXIS, font=font)
    return img


def category_grid_png(path: str | os.PathLike, cells: np.ndarray, names: Sequence[str], title: str,
                      row_label: str, col_label: str, cell: int = 14) -> None:
    """``cells`` [rows, cols] of category indices into ``names``; one colour per category."""
    cells = np.asarray(cells, dtype=np.int64)
    palette = np.array(PALETTE[:len(names)], dtype=np.uint8)
    legend = [(n, PALETTE[i]) for i, n in enumerate(names)]
    _save(_grid(cells, palette[cells], row_label, col_label, title, legend, cell), path)


def heatmap_png(path: str | os.PathLike, values: np.ndarray, title: str, row_label: str, col_label: str,
                cell: int = 14) -> None:
    """``values`` [rows, cols] as a dark-blue (low) to yellow (high) heat map, with the range in the legend."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    t = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    low, high = np.array([20, 30, 90.0]), np.array([250, 220, 40.0])
    colors = (low + t[..., None] * (high - low)).astype(np.uint8)
    legend = [(f"low {lo:.3g}", tuple(int(v) for v in low)), (f"high {hi:.3g}", tuple(int(v) for v in high))]
    _save(_grid(values, colors, row_label, col_label, title, legend, cell), path)


def xy_panels_png(path: str | os.PathLike,
                  panels: Sequence[tuple[str, dict[str, tuple[Sequence[float], Sequence[float]]]]],
                  size: tuple[int, int] = (520, 360)) -> None:
    """Panels side by side, each (title naming the y axis, {series: (xs, ys)}): points joined in x order, a legend in
    each panel, linear axes with min/max ticks. For quality-against-compute curves."""
    w, h = size
    left, right, top, bottom = 60, 16, 30, 36
    img = Image.new("RGB", (w * len(panels), h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for p, (title, series) in enumerate(panels):
        ox = p * w
        pts_all = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if np.isfinite(x) and np.isfinite(y)]
        if not pts_all:
            continue
        x0, x1 = min(a for a, _ in pts_all), max(a for a, _ in pts_all)
        y0, y1 = min(b for _, b in pts_all), max(b for _, b in pts_all)
        x1, y1 = (x1 if x1 > x0 else x0 + 1.0), (y1 if y1 > y0 else y0 + 1.0)
        pad = 0.05 * (y1 - y0)
        y0, y1 = y0 - pad, y1 + pad

        def px(xv: float, yv: float, ox=ox, x0=x0, x1=x1, y0=y0, y1=y1) -> tuple[float, float]:
            return (ox + left + (xv - x0) / (x1 - x0) * (w - left - right),
                    top + (1 - (yv - y0) / (y1 - y0)) * (h - top - bottom))

        draw.rectangle([ox + left, top, ox + w - right, h - bottom], outline=AXIS)
        for i, (name, (xs, ys)) in enumerate(series.items()):
            color = PALETTE[i % len(PALETTE)]
            pts = sorted((a, b) for a, b in zip(xs, ys) if np.isfinite(a) and np.isfinite(b))
            pix = [px(a, b) for a, b in pts]
            if len(pix) > 1:
                draw.line(pix, fill=color, width=2)
            for cx, cy in pix:
                draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
            draw.text((ox + left + 6, top + 4 + 11 * i), name, fill=color, font=font)
        draw.text((ox + 4, top), f"{y1:.3g}", fill=AXIS, font=font)
        draw.text((ox + 4, h - bottom - 10), f"{y0:.3g}", fill=AXIS, font=font)
        draw.text((ox + left, h - bottom + 4), f"{x0:.3g}", fill=AXIS, font=font)
        draw.text((ox + w - right - 30, h - bottom + 4), f"{x1:.3g}", fill=AXIS, font=font)
        draw.text((ox + left + 60, h - bottom + 18), "block compute / teacher (measured)", fill=AXIS, font=font)
        draw.text((ox + left, 8), title, fill=AXIS, font=font)
    _save(img, path)
