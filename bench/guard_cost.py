"""What a host sync per training step costs: the default sprites recipe trained for --steps steps with the non-finite
guard as it runs (read at the logging interval) and with it read after every step (a host sync each), interleaved,
in one process. On a CPU the device is the host, so the two should match; on a GPU the per-step sync stalls the queue.

python bench/guard_cost.py [--steps 60] [--rounds 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]

from difflab.config import register_resolvers  # noqa: E402
from difflab.train import train  # noqa: E402
from report import cpu_name  # noqa: E402  (bench/report.py: python bench/guard_cost.py puts bench/ on the path)


class SyncEveryStep(L.Callback):
    """Reads the guard after every step, as a per-step isfinite check would."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.check_finite()


SECONDS: list[float] = []  # one entry per run, appended by Clock (in the module Hydra imports as guard_cost)


class Clock(L.Callback):
    """Seconds from step 5 (after warm-up) to the end of training."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 5:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        SECONDS.append(time.perf_counter() - self.start)


def run(steps: int, accelerator: str, sync: bool = False, extra: dict | None = None, after=None) -> float:
    """Steps per second after warm-up; ``extra``: more callbacks (name -> node); ``after(run folder)`` before it goes."""
    register_resolvers()
    with tempfile.TemporaryDirectory() as out, initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", [f"trainer.max_steps={steps}", "trainer.max_epochs=-1", f"trainer.accelerator={accelerator}",
                                "final_eval=none", "callbacks=[ema]", "logger=none", "trainer.enable_progress_bar=false",
                                "trainer.check_val_every_n_epoch=1000", "trainer.log_every_n_steps=50",
                                "trainer.enable_checkpointing=false"])
        with open_dict(cfg):
            cfg.paths.output_dir, cfg.paths.log_dir = out, out
            cfg.callbacks.clock = {"_target_": "guard_cost.Clock"}
            if sync:
                cfg.callbacks.sync = {"_target_": "guard_cost.SyncEveryStep"}
            cfg.callbacks.update(extra or {})
        train(cfg)
        if after is not None:
            after(Path(out))
    import guard_cost  # the module Hydra instantiated Clock from (this file runs as __main__)

    return (steps - 5) / guard_cost.SECONDS[-1]


def paired(description: str, measure, **more: int) -> tuple[argparse.Namespace, str, dict[bool, list[float]]]:
    """The CLI both cost benches share (--steps --rounds --device and ``more`` integer options), and steps/s of
    ``measure(args, accelerator, on)`` without and with the thing measured, interleaved over the rounds."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    for name, default in more.items():
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args()
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    speeds: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for on in (False, True):
            speeds[on].append(measure(args, accelerator, on))
    return args, accelerator, speeds


def main() -> None:
    args, accelerator, speeds = paired(__doc__.split("\n\n")[0], lambda a, accelerator, sync: run(a.steps, accelerator, sync))
    lazy, eager = statistics.median(speeds[False]), statistics.median(speeds[True])
    print(f"{cpu_name() if accelerator == 'cpu' else args.device}: {lazy:.2f} steps/s with the guard read at the logging interval, "
          f"{eager:.2f} with a host sync every step: ratio {lazy / eager:.3f} ({args.rounds} rounds of {args.steps} steps, "
          "the default sprites recipe, batch 64)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
