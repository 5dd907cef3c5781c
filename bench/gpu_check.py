"""What CI cannot check, on one GPU machine in one command: make gpu-check (about 5-8 minutes on one GPU).

    python bench/gpu_check.py                 # CUDA: every visible GPU
    python bench/gpu_check.py --cpu           # the same checks on the CPU (small sizes): what the test suite runs

Each check runs the project's entry points as a user does (train.py, sample.py, evaluate.py, edit.py, bench/bench.py, in their
own processes) and writes one report, <out>/gpu_check.md (and .json):
  1. training in every precision the device runs (CUDA: bf16-mixed where native, 16-mixed with a gradient scaler, 32 with
     TF32; CPU: 32, and bf16-mixed where AVX512-BF16/AMX exist): steps per second and a finite final loss;
  2. resume bit-exactness: N steps straight against N/2, stop, resume to N (CUDA: trainer.deterministic=true and the
     CUDA RNG states in the checkpoint): every weight and optimizer state equal;
  3. DDP with every visible GPU (CPU: 2 processes, gloo): the run finishes with world size N;
  4. sample.py on the device against the CPU at the same seed and noise streams (noise=counter), float32, TF32 off:
     every image within the bound
     difflab.tolerance.chain_tol derives from float32's rounding (the same math in other kernels);
  5. evaluate.py on the device (default precision) and on the CPU at the same seed: FD and class-balanced accuracy side by
     side (in bf16 the kernels round differently, so the figures are compared with the seed-to-seed spread, not equality);
  6. bench/bench.py on the device, ours against the peers (needs requirements-bench.txt; skipped with --skip-bench);
  7. edit.py on the device: inpainting with the shipped inpainting model keeps every kept pixel exactly and matches the
     CPU within the bound of 4; variations and interpolation run and write their results;
  8. CIFAR-10: experiment=cifar10 (the DDPM network, bf16-mixed where the device runs it; CPU mode: unet_tiny on 256
     images) for a few hundred steps: images per second after warm-up, the loss going down, and the checkpoint sampling
     with sample.py (needs CIFAR-10 in --cifar-root).
The script exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from difflab.checkpoint import load_checkpoint  # noqa: E402
from difflab.config import cpu_has_bf16, cuda_has_bf16  # noqa: E402
from difflab.editing import Inpaint  # noqa: E402
from difflab.model import load_model  # noqa: E402
from difflab.sampling import SamplingSpec, generate  # noqa: E402
from difflab.tolerance import chain_tol  # noqa: E402


class SignalAt(L.Callback):
    """train.py +callbacks.interrupt._target_=gpu_check.SignalAt: SIGTERM to its own process before the batch after
    ``step`` optimizer steps, as a scheduler's preemption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class ImagesPerSecond(L.Callback):
    """train.py +callbacks.speed._target_=gpu_check.ImagesPerSecond: training images per second from step ``warmup`` to
    the last step (start-up, compilation and the first steps' allocations left out), written to the json file ``out``."""

    def __init__(self, warmup: int, out: str) -> None:
        self.warmup, self.out, self.start = warmup, Path(out), None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            self.start = (time.perf_counter(), trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.start is not None and trainer.is_global_zero:
            seconds, steps = time.perf_counter() - self.start[0], trainer.global_step - self.start[1]
            batch = trainer.datamodule.batch_size * trainer.world_size
            self.out.write_text(
                json.dumps({"images_per_second": steps * batch / seconds, "steps": steps, "batch": batch}))


def logged_losses(run: Path) -> list[float]:
    import csv

    return [float(r["train/loss"]) for m in sorted(run.glob("csv/version_*/metrics.csv")) for r in csv.DictReader(m.open())
            if r.get("train/loss")]


class Check:
    def __init__(self, out: Path) -> None:
        self.out, self.rows, self.failed = out, [], False

    def run(self, name: str, *args: str, env: dict | None = None, timeout: int = 900) -> tuple[subprocess.CompletedProcess, float]:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            (self.out / f"{name}.log").write_text(proc.stdout + proc.stderr)
        return proc, seconds

    def record(self, check: str, ok: bool, detail: str) -> None:
        ok = bool(ok)
        self.rows.append({"check": check, "ok": ok, "detail": detail})
        self.failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} {check}: {detail}", flush=True)


def train_args(run: Path, accelerator: str, small: bool, *extra: str) -> list[str]:
    size = ["model=unet_tiny", "timesteps=100", "data.limit=128", "data.batch_size=16"] if small else ["data.batch_size=64"]
    return ["train.py", *size, f"trainer.accelerator={accelerator}", "trainer.max_epochs=-1", "final_eval=none",
            "callbacks=[ema,model_checkpoint]", "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1",
            "trainer.check_val_every_n_epoch=1000", "trainer.log_every_n_steps=1", "logger=csv", f"hydra.run.dir={run}", *extra]


def same_weights(a: Path, b: Path) -> tuple[bool, str]:
    ca, cb = (load_checkpoint(p / "checkpoints" / "last.ckpt") for p in (a, b))
    if ca["global_step"] != cb["global_step"]:
        return False, f"steps {ca['global_step']} and {cb['global_step']}"
    differ = [k for k in ca["state_dict"] if not torch.equal(ca["state_dict"][k], cb["state_dict"][k])]
    states = zip(ca["optimizer_states"][0]["state"].values(), cb["optimizer_states"][0]["state"].values())
    differ += [f"optimizer {k}" for sa, sb in states for k in ("exp_avg", "exp_avg_sq") if not torch.equal(sa[k], sb[k])]
    return not differ, f"{ca['global_step']} steps, " + (f"{len(differ)} tensors differ (first: {differ[0]})" if differ else "every weight and optimizer state equal")


def chain_bound(plan: Any, make: Any) -> float:
    """chain_tol with the largest network output of these very samples (``make`` makes them again here on the CPU)."""
    model = plan.model
    peak = []
    hook = model.net.register_forward_hook(lambda m, i, o: peak.append(float(o.abs().max())))
    make()
    hook.remove()
    # an output error d becomes an x_0 error of sigma_t d for a v- or x_0-model, sigma_t / alpha_t d for an eps-model
    eps_model = type(model.objective).__name__ == "EpsPrediction"
    gain = max(level.edm_sigma for level in plan.levels[:-1]) if eps_model else 1.0
    return chain_tol(model.net, max(peak), plan.steps, plan.guidance.scale, gain)


def compare(check: Check, name: str, pixels: dict[str, np.ndarray], tol: float) -> None:
    """Two runs' uint8 images within the float32 chain bound ``tol``."""
    if len(pixels) != 2:
        check.record(name, False, "a run failed (see its log)")
        return
    first, second = pixels.values()
    gap = np.abs(first - second).max()
    bound = int(np.floor(127.5 * tol)) + 1  # |round(127.5 a) - round(127.5 b)| <= floor(127.5 |a - b|) + 1
    check.record(name, gap <= bound, f"largest pixel difference {gap} levels, bound {bound} (float32 chain bound {tol:.2e})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run every check on the CPU, at small sizes (no GPU needed)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default logs/gpu_check/<time>)")
    p.add_argument("--steps", type=int, default=0, help="training steps per precision (default 200 on CUDA, 8 on CPU)")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--cifar-root", type=Path, default=ROOT / "data" / "cifar10", help="the folder holding cifar-10-batches-py")
    p.add_argument("--cifar-unverified", action="store_true", help="data.verify_checksums=false: a trusted copy rebuilt from other sources")
    args = p.parse_args()
    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU is visible here; run python bench/gpu_check.py --cpu for the CPU mode")
    out = args.out or ROOT / "logs" / "gpu_check" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out)
    accelerator, device = ("gpu", "cuda") if cuda else ("cpu", "cpu")
    small, steps = not cuda, args.steps or (200 if cuda else 8)
    gpus = torch.cuda.device_count() if cuda else 0
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if cuda else "cpu", "gpus": gpus,
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None}
    print(json.dumps(info), flush=True)

    # 1. every precision the device runs
    precisions = (["bf16-mixed"] if cuda_has_bf16() else []) + ["16-mixed", "32"] if cuda else \
        ["32"] + (["bf16-mixed"] if cpu_has_bf16() else [])
    speed = {}
    for precision in precisions:
        run = out / f"train_{precision}"
        proc, seconds = check.run(f"train_{precision}", *train_args(run, accelerator, small, f"trainer.precision={precision}",
                                                                    f"trainer.max_steps={steps}", "trainer.devices=1"))
        ok = proc.returncode == 0 and (run / "checkpoints" / "last.ckpt").is_file()
        losses = logged_losses(run) if ok else []
        ok = ok and bool(losses) and bool(np.isfinite(losses).all())
        speed[precision] = steps / seconds
        check.record(f"train {precision}", ok, f"{steps} steps in {seconds:.1f} s (process included), last logged loss "
                                              f"{losses[-1] if losses else float('nan'):.4f}")

    # 2. resume bit-exactness
    # a constant learning rate: the first half's schedule must not depend on where it stops
    exact = ["optim=constant", "trainer.precision=32", "trainer.devices=1"] + (["trainer.deterministic=true"] if cuda else [])
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS
    half = 6 if small else 50
    straight, resumed = out / "resume_straight", out / "resume_resumed"
    exact.append(f"trainer.max_steps={2 * half}")
    check.run("resume_straight", *train_args(straight, accelerator, small, *exact), env=env)
    # stopped by SIGTERM half way (the project saves the step and exits 143), then the same command continues it
    interrupt = ["+callbacks.interrupt._target_=gpu_check.SignalAt", f"+callbacks.interrupt.step={half}"]
    check.run("resume_first", *train_args(resumed, accelerator, small, *exact, *interrupt), env={**env, "PYTHONPATH": str(ROOT / "bench")})
    proc, _ = check.run("resume_second", *train_args(resumed, accelerator, small, *exact), env=env)
    ok, detail = same_weights(straight, resumed) if proc.returncode == 0 and (straight / "checkpoints").is_dir() else (False, "a run failed")
    check.record("resume bit-exact", ok, detail)

    # 3. DDP on every visible GPU (CPU: 2 processes)
    world = gpus if cuda else 2
    if world >= 2:
        run = out / "ddp"
        proc, seconds = check.run("ddp", *train_args(run, accelerator, small, "trainer=ddp", f"trainer.devices={world}",
                                                    f"trainer.max_steps={half}"))
        ok = proc.returncode == 0 and load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == half
        check.record(f"ddp x{world}", ok, f"{half} steps in {seconds:.1f} s")
    else:
        check.record("ddp", True, "one GPU visible: skipped")

    # 4. sample.py on the device against the CPU, float32, TF32 off
    n, guidance, sampling_steps = (8, 2.0, 15) if cuda else (2, 2.0, 4)
    # noise=counter on both: the streams CUDA makes by default, which the CPU can make too
    common = ["sample.py", "ckpt=pretrained", f"n={n}", "label=all", "gif=false", "precision=32", "tf32=false", "palette=null", "noise=counter",
              f"steps={sampling_steps}", f"guidance={guidance}"]
    pixels = {}
    # CPU mode: the "device" run takes another batch size, so the comparison still compares other kernel calls
    for key, where, batch in ((device, device, 256 if cuda else 5), ("cpu", "cpu", 256)):
        run = out / f"sample_{key}_{batch}"
        proc, _ = check.run(f"sample_{key}", *common, f"device={where}", f"batch_size={batch}", f"hydra.run.dir={run}")
        if proc.returncode == 0:
            pixels[f"{key}_{batch}"] = np.load(run / "samples.npz")["images"].astype(int)
    spec = SamplingSpec({"_target_": "difflab.samplers.DPMSolverPP2MSampler", "steps": sampling_steps}, guidance=guidance,
                        precision="32", palette=None, noise="counter")
    plan = spec.bind(load_model("pretrained"))
    tol = chain_bound(plan, lambda: generate(plan, torch.eye(plan.model.num_classes).repeat_interleave(n, 0)))
    compare(check, f"sample.py {device} vs cpu", pixels, tol)

    # 7. edit.py on the device: inpainting with the shipped inpainting model keeps every kept pixel and matches
    # the CPU within the same kind of bound; variations and interpolation run and write their results
    edit_common = ["edit.py", "image=data:7", "n=4", "gif=false", "precision=32", "tf32=false", "palette=null", "noise=counter",
                   f"steps={sampling_steps}", f"guidance={guidance}"]
    edited = {}
    for key, where, batch in ((device, device, 256 if cuda else 3), ("cpu", "cpu", 256)):
        run = out / f"edit_inpaint_{key}_{batch}"
        proc, _ = check.run(f"edit_inpaint_{key}", *edit_common, "edit=inpaint", "mask=top", f"device={where}",
                            f"batch_size={batch}", f"hydra.run.dir={run}")
        if proc.returncode == 0:
            edited[f"{key}_{batch}"] = dict(np.load(run / "samples.npz"))
    if edited:
        first = next(iter(edited.values()))
        kept = ~first["fill"]
        check.record(f"edit.py inpaint on {device}", all((e["images"][:, kept] == e["source"][kept]).all() for e in edited.values()),
                     f"{int(kept.sum())} kept pixels of {len(first['images'])} results each, equal to the source's in every run")
        inpainting = spec.bind(load_model("pretrained_inpaint"))
        source = torch.from_numpy(first["source"]).permute(2, 0, 1)[None].expand(len(first["images"]), -1, -1, -1)
        fill = torch.from_numpy(first["fill"])[None, None].expand(len(first["images"]), -1, -1, -1)
        the_edit = Inpaint(source, fill).for_model(True, inpainting.steps)
        tol = chain_bound(inpainting, lambda: generate(inpainting, torch.from_numpy(first["labels"]), edit=the_edit))
    compare(check, f"edit.py inpaint {device} vs cpu", {k: e["images"].astype(int) for k, e in edited.items()}, tol if edited else 0.0)
    for name, args_ in (("vary", ["edit=vary", "strength=0.4", "label=weapon"]),
                        ("interpolate", ["edit=interpolate", "seeds=[3,8]", "label=[hero,side-facing]", "frames=4"])):
        run = out / f"edit_{name}_{device}"
        proc, seconds = check.run(f"edit_{name}", *edit_common, *args_, f"device={device}", f"hydra.run.dir={run}")
        made = len(np.load(run / "samples.npz")["images"]) if proc.returncode == 0 else 0
        check.record(f"edit.py {name} on {device}", made == 4, f"{made} images in {seconds:.1f} s (process included)")

    # 5. evaluate.py on the device and the CPU, default precision
    n_eval = 1000 if cuda else 32
    figures = {}
    for where in dict.fromkeys([accelerator, "cpu"]):
        run = out / f"evaluate_{where}"
        proc, seconds = check.run(f"evaluate_{where}", "evaluate.py", "ckpt=pretrained", f"n={n_eval}", "reference=false",
                                  f"trainer.accelerator={where}", "trainer.devices=1", f"hydra.run.dir={run}")
        if proc.returncode == 0:
            row = json.loads((run / "result.json").read_text())["row"]
            figures[where] = (row["fd"], row["cond_acc"], row["precision"], seconds)
    ok = len(figures) == len(dict.fromkeys([accelerator, "cpu"]))
    check.record("evaluate.py " + " vs ".join(figures), ok, "; ".join(
        f"{w}: FD {fd:.3f}, balanced acc {acc:.3f} ({dtype}, {s:.0f} s)" for w, (fd, acc, dtype, s) in figures.items())
        + (" (three sampling seeds of one model span about 0.4 in FD at n=1000)" if cuda else ""))

    # 6. speed against the peers
    if args.skip_bench:
        check.record("bench.py", True, "skipped (--skip-bench)")
    else:
        bench = ["bench/bench.py", "--device", device, "--out", str(out / "bench")] + ([] if cuda else ["--quick", "--models", "ours"])
        proc, seconds = check.run("bench", *bench, timeout=1800)
        check.record("bench.py", proc.returncode == 0, f"{seconds:.0f} s; tables in {out / 'bench'}")

    # 8. CIFAR-10: the GPU recipe's network for a few hundred steps (CPU mode: unet_tiny on 256 images)
    cifar_steps, warm, lr_warmup = (300, 50, 100) if cuda else (60, 10, 10)
    run, speed_file = out / "cifar10", out / "cifar10_images_per_second.json"
    size = [] if cuda else ["model=unet_tiny", "data.limit=256", "data.batch_size=16"]
    precision = "bf16-mixed" if (cuda_has_bf16() if cuda else cpu_has_bf16()) else "32"
    # the recipe warms its LR up over 5000 steps; 100 here (10 on the CPU), so that these few steps show the loss falling
    proc, seconds = check.run("cifar10", "train.py", "experiment=cifar10", *size, f"data.root={args.cifar_root}",
                              f"data.verify_checksums={str(not args.cifar_unverified).lower()}", f"trainer.accelerator={accelerator}",
                              "trainer.devices=1", f"trainer.precision={precision}", f"trainer.max_steps={cifar_steps}",
                              f"optim.lr_scheduler.scheduler.warmup_steps={lr_warmup}", "final_eval=none", "callbacks=[ema,model_checkpoint]",
                              "+callbacks.speed._target_=gpu_check.ImagesPerSecond", f"+callbacks.speed.warmup={warm}",
                              f"+callbacks.speed.out={speed_file}",
                              "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
                              "logger=csv", f"hydra.run.dir={run}", env={"PYTHONPATH": str(ROOT / "bench")}, timeout=1800)
    losses = logged_losses(run) if proc.returncode == 0 else []
    k = max(len(losses) // 5, 1)
    first, last = (float(np.mean(losses[:k])), float(np.mean(losses[-k:]))) if losses else (float("nan"), float("nan"))
    images_s = json.loads(speed_file.read_text())["images_per_second"] if speed_file.is_file() else float("nan")
    check.record(f"cifar10 train {precision}", proc.returncode == 0 and last < first,
                 f"{cifar_steps} steps, {images_s:.1f} images/s after step {warm}; mean loss of the first and last fifth of the "
                 f"steps {first:.4f} -> {last:.4f}" if proc.returncode == 0 else f"train.py failed (see {out / 'cifar10.log'})")
    made = out / "cifar10_sample"
    proc, seconds = check.run("cifar10_sample", "sample.py", f"ckpt={run}", "n=2", "label=all", "gif=false", "steps=10",
                              f"device={device}", f"hydra.run.dir={made}")
    images = np.load(made / "samples.npz")["images"] if proc.returncode == 0 else np.zeros((0,))
    check.record("cifar10 sample.py", images.shape == (20, 32, 32, 3), f"{len(images)} images of {images.shape[1:]} in "
                 f"{seconds:.1f} s (process included)")

    speeds = ", ".join(f"{p} {s:.1f} steps/s" for p, s in speed.items())
    lines = [f"# GPU check: {info['device']}" + (f" x{gpus} (compute capability {info['capability']})" if cuda else " (CPU mode)"),
             "", f"torch {info['torch']}; training speed with process start-up: {speeds}", "", "| check | result | detail |",
             "|---|---|---|"] + [f"| {r['check']} | {'ok' if r['ok'] else 'FAIL'} | {r['detail']} |" for r in check.rows]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"info": info, "speed": speed, "checks": check.rows}, indent=2))
    print(f"\nreport: {out / 'gpu_check.md'}")
    sys.exit(1 if check.failed else 0)


if __name__ == "__main__":
    main()
