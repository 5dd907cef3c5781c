"""Runs a researcher leaves alone for hours: exact resume (end of epoch and mid-epoch), signals that save and
exit 143 / 130, a requeue that continues by itself, a non-finite guard that keeps finite checkpoints."""

from __future__ import annotations

import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from difflab.checkpoint import load_checkpoint
from difflab.cli import Stopped
from difflab.data.datamodule import EpochSampler
from difflab.errors import NonFiniteLossError
from difflab.phema import snapshots
from difflab.train import train

from support import Crash, compose_cfg, read_metrics

# dropout, EMA, context dropout (p_uncond 0.1), flips and a sample grid every epoch are all on
RESUMABLE = ["model=unet_tiny", "model.dropout=0.1", "data.limit=48", "data.batch_size=8", "trainer.max_epochs=3",
             "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1", "callbacks.sample_grid.every_n_epochs=1",
             "callbacks.sample_grid.per_class=1", "callbacks.sample_grid.sampling.steps=2", "~callbacks.progress_bar",
             "trainer.enable_progress_bar=false", "timesteps=100", "trainer.precision=32",
             "callbacks.model_checkpoint.every_n_train_steps=3", "+callbacks.draws._target_=support.RecordDraws",
             "+callbacks.posthoc_ema._target_=difflab.phema.PostHocEMA", "+callbacks.posthoc_ema.every_n_steps=4"]


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical: EMA and raw weights, post-hoc EMA profiles and snapshots, optimizer state, step, every logged loss, the
    draws of Python/NumPy."""
    ca, cb = load_checkpoint(a / "checkpoints" / "last.ckpt"), load_checkpoint(b / "checkpoints" / "last.ckpt")
    assert ca["global_step"] == cb["global_step"] == 18
    for key in ("state_dict", "current_model_state"):
        assert ca[key].keys() == cb[key].keys()
        for name in ca[key]:
            assert torch.equal(ca[key][name], cb[key][name]), (key, name)
    for sa, sb in zip(ca["optimizer_states"][0]["state"].values(), cb["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))

    pa, pb = ca["callbacks"]["PostHocEMA"], cb["callbacks"]["PostHocEMA"]
    assert pa["step"] == pb["step"] == 18 and pa["images"] == pb["images"]
    assert all(torch.equal(x[k], y[k]) for x, y in zip(pa["profiles"], pb["profiles"]) for k in x)
    sa, sb = snapshots(a), snapshots(b)
    assert [s.step for s in sa] == [s.step for s in sb] == [4, 8, 12, 16, 18]
    for x, y in zip(sa, sb):
        xa, xb = torch.load(x.path, weights_only=True), torch.load(y.path, weights_only=True)
        assert all(torch.equal(p[k], q[k]) for p, q in zip(xa["profiles"], xb["profiles"]) for k in p)

    def losses(run: Path) -> dict:
        return {(r["step"], k): v for r in read_metrics(run) for k, v in r.items() if v and k.startswith(("train/loss", "val/loss"))}

    la, lb = losses(a), losses(b)
    assert la == lb and len([k for k in la if k[1] == "train/loss"]) == 18

    def draws(run: Path) -> dict[str, str]:  # step -> the Python and NumPy draws at its start (a re-run step: the last)
        return dict(line.split(" ", 1) for line in (run / "draws.txt").read_text().splitlines())

    assert draws(a) == draws(b) and len(draws(a)) == 18


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight")
    train(compose_cfg(RESUMABLE, run))
    return run


def test_resume_at_an_epoch_end_is_bit_identical(straight, tmp_path):
    train(compose_cfg([*RESUMABLE, "+callbacks.stop._target_=support.StopAfterEpoch", "+callbacks.stop.epoch=0"], tmp_path))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 6
    train(compose_cfg(RESUMABLE, tmp_path))  # ckpt_path=auto: this folder's last.ckpt
    assert_same_run(straight, tmp_path)


def test_resume_mid_epoch_is_bit_identical(straight, tmp_path):
    # killed right after the step-9 checkpoint, half-way through the second epoch
    with pytest.raises(Crash):
        train(compose_cfg([*RESUMABLE, "+callbacks.stop._target_=support.CrashAtStep", "+callbacks.stop.step=9"], tmp_path))
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 9 and ckpt["SpritesDataModule"]["batches"] == 3  # 3 of the epoch's 6 batches done
    train(compose_cfg(RESUMABLE, tmp_path))
    assert_same_run(straight, tmp_path)


def test_mid_epoch_resume_sees_every_batch_once():
    """The epoch's order is a function of (seed, epoch); a resume after k batches yields exactly the rest."""
    n, batch = 50, 4
    full = list(EpochSampler(n, seed=7, epoch=3))
    assert sorted(full) == list(range(n)) and full != list(EpochSampler(n, seed=7, epoch=4))
    resumed = list(EpochSampler(n, seed=7, epoch=3, batch_size=batch, resume=(3, 5)))
    assert resumed == full[5 * batch :]
    assert list(EpochSampler(n, seed=7, epoch=4, batch_size=batch, resume=(3, 5))) == list(EpochSampler(n, seed=7, epoch=4))
    # two DDP ranks take interleaved halves of the same order, padded to equal length
    ranks = [list(EpochSampler(n, seed=7, num_replicas=2, rank=r, epoch=3)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 25 and sorted(ranks[0] + ranks[1]) == list(range(n))


def test_each_rank_draws_its_own_step_noise():
    from difflab.rng import step_seed

    seeds = {step_seed(42, rank, step) for rank in range(4) for step in range(100)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)


# signals: a real signal to a real process ------------------------------------------------------------------

LONG = ["model=unet_tiny", "data.limit=80", "data.batch_size=8", "trainer.max_epochs=6", "trainer.limit_val_batches=2",
        "callbacks.sample_grid.every_n_epochs=100", "timesteps=100", "trainer.precision=32", "~callbacks.progress_bar",
        "trainer.enable_progress_bar=false"]


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    from difflab.config import PROJECT_ROOT

    return subprocess.Popen([sys.executable, "train.py", *LONG, *extra, f"hydra.run.dir={run_dir}"], cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def signal_after_first_checkpoint(proc: subprocess.Popen, run_dir: Path, signum: int) -> tuple[int, str]:
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.fixture(scope="module")
def straight_process(tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("straight_process")
    proc = start(run)
    assert proc.wait(timeout=600) == 0, proc.communicate()[1][-3000:]
    return load_checkpoint(run / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_the_current_step_and_the_run_continues_by_itself(tmp_path, straight_process, signum, code):
    run = tmp_path / "run"
    rc, err = signal_after_first_checkpoint(start(run), run, signum)
    assert rc == code, err[-3000:]
    name = signal.Signals(signum).name
    line = [x for x in err.splitlines() if x.startswith(f"stopped by {name}")]
    assert len(line) == 1 and f"hydra.run.dir={run}" in line[0] and "Traceback" not in err
    assert f"Resume: python train.py {shlex.join(LONG)} hydra.run.dir={run} " in line[0]  # the command that started it
    step = load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]
    assert f"at step {step} " in line[0] and step >= 10  # sent after the first epoch's checkpoint (step 10)
    # the same command again (ckpt_path=auto is the default) continues from that step to the end
    again = start(run)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "resuming from" in err + out
    final = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert final["global_step"] == straight_process["global_step"] == 60
    for key in ("state_dict", "current_model_state"):  # bit-identical to the run that was never interrupted
        assert all(torch.equal(final[key][k], straight_process[key][k]) for k in final[key])


class SendSignal(L.Callback):
    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_a_signal_mid_epoch_saves_the_step_in_progress(tmp_path):
    cfg = compose_cfg([*LONG, "trainer.max_epochs=3", "+callbacks.sig._target_=test_reliability.SendSignal",
                       "+callbacks.sig.step=13", f"+callbacks.sig.signum={int(signal.SIGTERM)}"], tmp_path)
    with pytest.raises(Stopped, match="stopped by SIGTERM at step 14 ") as stop:
        train(cfg)
    assert stop.value.exit_code == 143
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 14  # the batch in progress finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers are given back


def test_under_submitit_its_requeue_signal_saves_then_hands_over(tmp_path, monkeypatch):
    """submitit sends USR2 before a timeout; it requeues the job from its own handler. We save first."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        cfg = compose_cfg([*LONG, "trainer.max_epochs=3", "+callbacks.sig._target_=test_reliability.SendSignal",
                           "+callbacks.sig.step=13", f"+callbacks.sig.signum={int(signal.SIGUSR2)}"], tmp_path)
        with pytest.raises(Stopped) as stop:
            train(cfg)
        assert calls == [signal.SIGUSR2] and stop.value.exit_code == 128 + signal.SIGUSR2
        assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 14
    finally:
        signal.signal(signal.SIGUSR2, previous)


# non-finite guard ---------------------------------------------------------------------------------------


def all_finite(ckpt: dict) -> bool:
    tensors = [*ckpt["state_dict"].values(), *ckpt["current_model_state"].values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def test_a_nan_step_stops_the_run_and_checkpoints_stay_finite(tmp_path):
    cfg = compose_cfg([*LONG, "trainer.max_epochs=3", "+callbacks.poison._target_=support.PoisonBatchAt", "+callbacks.poison.step=13"],
                      tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"train/loss is nan at step 13 \(epoch 1\).*optim.optimizer.lr.*gradient_clip_val.*precision=32"):
        train(cfg)
    ckpts = list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) == 2  # last.ckpt and the best one, both from before the nan step
    for path in ckpts:
        ckpt = load_checkpoint(path)
        assert ckpt["global_step"] == 10 and all_finite(ckpt)


def test_divergence_exits_3_naming_the_step_and_fixes(tmp_path):
    from support import run_script

    result = run_script("train.py", "model=unet_tiny", "debug=fast", "optim.optimizer.lr=1e6", "trainer.gradient_clip_val=null",
                        "trainer.precision=32", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 3, result.stderr[-3000:]
    errors = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert re.search(r"is (nan|inf) at step \d+ .*lr, now 1e\+06.*gradient_clip_val=1.0, now None", errors[0]), errors[0]
    for path in (tmp_path / "checkpoints").glob("*.ckpt"):
        assert all_finite(load_checkpoint(path))


def test_inf_gradients_under_a_grad_scaler_are_left_to_the_scaler():
    """16-mixed skips steps with inf gradients by design (the scaler lowers its scale): not a divergence.
    Without a scaler the same gradients stop the run."""
    from functools import partial
    from types import SimpleNamespace

    from difflab.model import DiffusionModel
    from difflab.module import DiffusionModule
    from difflab.nn.unet import UNet
    from difflab.objectives import EpsPrediction
    from difflab.schedules import LinearSchedule

    net = UNet(image_size=8, base_channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(), norm_groups=4)
    module = DiffusionModule(DiffusionModel(net, LinearSchedule(10), EpsPrediction()), optimizer=partial(torch.optim.SGD, lr=0.1))
    for p in module.parameters():
        p.grad = torch.full_like(p, math.inf)
    clipped = []
    plugin = SimpleNamespace(scaler=object(), clip_gradients=lambda *a, **k: clipped.append(k))
    module._trainer = SimpleNamespace(precision_plugin=plugin, optimizers=[], global_step=5, current_epoch=0,
                                      gradient_clip_val=1.0, gradient_clip_algorithm="norm", precision="16-mixed")
    module.log = lambda *a, **k: None
    module.configure_gradient_clipping(None, 1.0, "norm")
    assert len(clipped) == 1  # the scaler decides
    module.check_finite()
    plugin.scaler = None
    module.configure_gradient_clipping(None, 1.0, "norm")  # noted on the device, no host sync here
    module._trainer.global_step = 7
    with pytest.raises(NonFiniteLossError, match="the gradient norm is inf at step 5 .*stopped at step 7"):
        module.check_finite()  # at the next logging interval, epoch end or checkpoint


# data ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row,problem", [([math.nan, 1, 0], "not finite"), ([0, -1, 1], "negative"), ([0, 0, 0], "all zero")])
def test_bad_label_rows_are_rejected_naming_file_and_row(tmp_path, row, problem):
    from difflab.data.sprites import SpritesDataModule
    from difflab.errors import DataError

    labels = np.eye(3, dtype=np.float32)[np.arange(20) % 3]
    labels[17] = row
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((20, 16, 16, 3), np.uint8), labels=labels)
    dm = SpritesDataModule(path=str(path), class_names=["a", "b", "c"], val_size=0.2)
    with pytest.raises(DataError, match=rf"{path}: label row 17 is {problem}"):
        dm.setup("fit")


def test_python_and_numpy_states_travel_in_checkpoints(straight):
    ckpt = load_checkpoint(straight / "checkpoints" / "last.ckpt")
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("RandomStates")]
    assert len(state["ranks"]) == 1 and set(state["ranks"][0]) == {"python", "numpy", "torch", "cuda"}
    random.seed(0)  # restoring puts back exactly what was saved
    from difflab.rng import collect_states, restore_states

    restore_states(state["ranks"][0])
    assert torch.equal(collect_states()["torch"], state["ranks"][0]["torch"])

