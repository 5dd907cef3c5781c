"""Top operators of one model's training step under torch.profiler (where the time of a bench row goes).

python bench/profile_step.py --model ours_cifar --variant bf16
python bench/profile_step.py --model diffusers_cifar --variant bf16 --batch 16
Model keys and variants are bench.py's (`python bench/bench.py --list`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ours_cifar")
    p.add_argument("--variant", default="bf16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="profiled steps after 2 warm-up steps")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = p.parse_args()
    spec = bench.model_specs()[args.model]
    settings = bench.all_variants()[args.variant]
    device = torch.device("cpu")
    runner = bench.Runner(spec, settings, device)
    x0, ctx = bench.make_inputs(spec, args.batch, device, seed=0)
    x0 = runner.prepare(x0)
    for _ in range(2):
        runner.train_step(x0, ctx)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            runner.train_step(x0, ctx)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48)
    header = f"{spec.label}, variant {args.variant}, batch {args.batch}, {args.steps} training steps\n"
    print(header + table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(header + table)


if __name__ == "__main__":
    main()
