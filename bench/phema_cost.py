"""What post-hoc EMA snapshots cost: the default sprites recipe trained for --steps steps with the fixed-decay EMA alone
and with post-hoc EMA tracking as well (two profiles, a snapshot every --every steps), interleaved, in one process;
steps per second as a ratio, and the disk one snapshot takes.

python bench/phema_cost.py [--steps 60] [--every 10] [--rounds 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from guard_cost import paired, run  # bench/ (python bench/phema_cost.py puts it on the path)
from report import cpu_name

SNAPSHOT_BYTES: list[int] = []


def snapshot_size(folder: Path) -> None:
    SNAPSHOT_BYTES.append(max(p.stat().st_size for p in (folder / "phema").glob("step_*.pt")))


def measure(args: argparse.Namespace, accelerator: str, posthoc: bool) -> float:
    extra = {"posthoc_ema": {"_target_": "difflab.phema.PostHocEMA", "every_n_steps": args.every}} if posthoc else None
    return run(args.steps, accelerator, extra=extra, after=snapshot_size if posthoc else None)


def main() -> None:
    args, accelerator, speeds = paired(__doc__.split("\n\n")[0], measure, every=10)
    plain, tracked = statistics.median(speeds[False]), statistics.median(speeds[True])

    print(f"{cpu_name() if accelerator == 'cpu' else args.device}: {plain:.3f} steps/s with the fixed-decay EMA, {tracked:.3f} with "
          f"post-hoc EMA tracking too (a snapshot every {args.every} steps): ratio {plain / tracked:.3f}; one snapshot "
          f"{max(SNAPSHOT_BYTES) / 1e6:.1f} MB ({args.rounds} rounds of {args.steps} steps, the default sprites recipe, batch 64)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
