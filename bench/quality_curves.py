"""Validation-loss curves of two or more training runs against the step (fast defaults vs fp32 eager).

python bench/quality_curves.py logs/results/linear_T1000 logs/results/linear_T1000_fp32 --out docs/quality_bf16_vs_fp32.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from difflab.metrics.plot import line_chart


def curve(run: Path, key: str) -> list[tuple[float, float]]:
    points = []
    # csv/version_N/metrics.csv, one per (re)start of the run; older runs wrote csv/metrics.csv
    files = sorted((run / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    for path in files or [run / "csv" / "metrics.csv"]:
        with open(path) as f:
            points += [(float(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]
    return points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--labels", nargs="*", help="one per run (default: folder names)")
    p.add_argument("--keys", default="val/loss,val/fd", help="metrics to plot, one panel each")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    panels = []
    for key in args.keys.split(","):
        series = {label: curve(run, key) for label, run in zip(labels, args.runs)}
        panels.append((key, series))
        for label, pts in series.items():
            print(f"{key:10s} {label:30s} " + "  ".join(f"{int(x)}:{y:.4f}" for x, y in pts))
    print(line_chart(panels, args.out, xlabel="training step", logx=False))


if __name__ == "__main__":
    main()
