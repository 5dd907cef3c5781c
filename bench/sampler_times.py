"""Wall-clock time of each sampler on one checkpoint: median of 3 runs, same n, fresh process each run.

python bench/sampler_times.py --ckpt logs/results/showcase --n 8 --label all --out bench/results/sampler_times.md
It runs `python sample.py ckpt=... sampler=<s> label=<label> n=<n> seed=<i>` three times per sampler and
reads the generation time that sample.py measures (model loading and file writing excluded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = {"DDPM (all T steps)": ["sampler=ddpm"], "DDIM (25 steps)": ["sampler=ddim", "steps=25"],
            "DPM-Solver++(2M) (15 steps)": ["sampler=dpmpp", "steps=15"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=8, help="images per label")
    p.add_argument("--label", default="all")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("extra", nargs="*", help="more sample.py overrides")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in SAMPLERS.items():
            seconds, meta = [], {}
            for i in range(args.repeats):
                out = Path(tmp) / f"{len(rows)}_{i}"
                cmd = [sys.executable, "sample.py", f"ckpt={args.ckpt}", *overrides, f"n={args.n}", f"label={args.label}",
                       f"seed={i}", "gif=false", f"hydra.run.dir={out}", *args.extra]
                subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
                meta = json.loads((out / "meta.json").read_text())
                seconds.append(meta["seconds"])
            rows.append((name, meta["steps"], meta["n"], statistics.median(seconds), min(seconds), max(seconds), meta["dtype"], meta["device"]))
    lines = ["| sampler | network evaluations | images | median s | min-max s | img/s | weights | device |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f}-{r[5]:.2f} | {r[2] / r[3]:.1f} | {r[6]} | {r[7]} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
