"""Top operators of one model's real training step under torch.profiler (where the time of a bench row goes).

python bench/profile_step.py --model ours_cifar --variant bf16
python bench/profile_step.py --model diffusers_cifar --variant bf16 --batch 16
Model keys and variants are bench.py's (`python bench/bench.py --list`). The steps are the ones bench.py times:
DiffusionModule from build_module(cfg), fitted by the configured lightning.Trainer (clipping, precision plugin, EMA).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile


def _load_runner():
    key = "difflab_bench_runner"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name("runner.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


class ProfileSteps(L.Callback):
    """torch.profiler around the optimizer steps after the first ``warmup``."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.prof.__enter__()

    def on_train_end(self, trainer, pl_module) -> None:
        self.prof.__exit__(None, None, None)


def main() -> None:
    runner = _load_runner()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ours_cifar")
    p.add_argument("--variant", default="bf16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="profiled steps after the warm-up steps")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = p.parse_args()
    spec = runner.model_specs()[args.model]
    r = runner.Runner(spec, runner.all_variants()[args.variant], args.device, args.batch)
    cb = ProfileSteps(args.warmup)
    try:
        r.train(args.warmup + args.steps, callbacks=[cb])
    finally:
        r.close()
    table = cb.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48)
    header = (f"{spec.label}, variant {args.variant}, batch {args.batch}, {args.steps} training steps "
              f"(DiffusionModule + lightning.Trainer, after {args.warmup} warm-up steps)\n")
    print(header + table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(header + table)


if __name__ == "__main__":
    main()
