"""A dependency-free line chart (Pillow only): quality against sampling steps, one line per sampler."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127)]
Series = dict[str, list[tuple[float, float]]]


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0**e * m for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)
                if lo <= 10.0**e * m <= hi]
    step = 10 ** math.floor(math.log10((hi - lo) / 4 or 1))
    step *= 5 if (hi - lo) / step > 20 else 2 if (hi - lo) / step > 8 else 1
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def panel(series: Series, title: str, xlabel: str, size: tuple[int, int] = (420, 320), logx: bool = True) -> Image.Image:
    w, h = size
    left, right, top, bottom = 60, 12, 26, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    points = [p for pts in series.values() for p in pts if p[1] == p[1]]
    d.text((left, 6), title, fill="black")
    if not points:
        d.text((left, h // 2), "no data", fill="gray")
        return img
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    if logx and x0 > 0:
        x0, x1 = x0 / 1.3, x1 * 1.3
    else:
        logx = False
        x0, x1 = x0 - 0.5, x1 + 0.5
    pad = (max(ys) - min(ys)) * 0.08 or abs(max(ys)) * 0.1 or 1.0
    y0, y1 = min(ys) - pad, max(ys) + pad

    def px(x: float, y: float) -> tuple[float, float]:
        fx = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) if logx else (x - x0) / (x1 - x0)
        return left + fx * (w - left - right), top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in _ticks(x0, x1, logx):
        x, _ = px(t, y0)
        d.line([x, h - bottom, x, h - bottom + 4], fill="black")
        d.text((x - 8, h - bottom + 6), f"{t:g}", fill="black")
    for t in _ticks(y0, y1, False):
        _, y = px(x0, t)
        d.line([left - 4, y, left, y], fill="black")
        d.line([left, y, w - right, y], fill=(235, 235, 235))
        d.text((2, y - 6), f"{t:.4g}", fill="black")
    d.text(((w - len(xlabel) * 6) // 2, h - 14), xlabel, fill="black")
    for i, (label, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        xy = [px(x, y) for x, y in sorted(pts) if y == y]
        if len(xy) > 1:
            d.line(xy, fill=color, width=2)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        d.text((left + 6, top + 4 + 12 * i), label, fill=color)
    return img


def line_chart(panels: Sequence[tuple[str, Series]], path: str | Path, xlabel: str = "sampling steps", logx: bool = True) -> Path:
    """Panels side by side, each (title, {series label: [(x, y), ...]}), saved as a PNG."""
    images = [panel(series, title, xlabel, logx=logx) for title, series in panels]
    out = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    x = 0
    for img in images:
        out.paste(img, (x, 0))
        x += img.width
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path
