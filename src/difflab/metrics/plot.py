"""Line charts with matplotlib: quality against sampling steps (one line per sampler), or against training steps."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

Series = dict[str, list[tuple[float, float]]]


def line_chart(panels: Sequence[tuple[str, Series]], path: str | Path, xlabel: str = "sampling steps", logx: bool = True) -> Path:
    """Panels side by side, each (title, {series label: [(x, y), ...]}), saved as a PNG; NaN points are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for label, points in series.items():
            xy = sorted((x, y) for x, y in points if y == y)
            if xy:
                ax.plot(*zip(*xy), marker="o", markersize=3, label=label)
        ax.set(title=title, xlabel=xlabel, xscale="log" if logx else "linear")
        if logx:  # the x values themselves as ticks (steps 5, 10, 25, ...), not powers of ten
            ax.set_xticks(sorted({x for points in series.values() for x, _ in points}))
            ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
