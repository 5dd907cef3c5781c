"""Post-hoc EMA against closed forms: the tracked profile's weights, the inner products, the least-squares rebuild of a
length that was never tracked, and the snapshots of a real run (resume: tests/test_reliability.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.errors import CheckpointError, ConfigError
from difflab.phema import MAX_LENGTH, beta, coefficients, exp_to_std, inner, rebuild, snapshots, std_to_exp


def tracked(trajectory: np.ndarray, std: float, every: int) -> dict[int, np.ndarray]:
    """The callback's recursion, ema <- ema + (1 - beta_t)(w_t - ema), in float64; snapshots every ``every`` steps."""
    ema, out = np.zeros_like(trajectory[0]), {}
    for t, w in enumerate(trajectory, start=1):
        ema = ema + (1 - beta(std, t)) * (w - ema)
        if t % every == 0 or t == len(trajectory):
            out[t] = ema.copy()
    return out


def exact(trajectory: np.ndarray, std: float) -> np.ndarray:
    """The power-function EMA in closed form: step k's weight is the profile's mass on [k-1, k],
    (k^(g+1) - (k-1)^(g+1)) / t^(g+1) (the recursion's product of betas telescopes to it)."""
    g, t = float(std_to_exp(std)), len(trajectory)
    k = np.arange(1, t + 1, dtype=np.float64)
    weights = (k ** (g + 1) - (k - 1) ** (g + 1)) / t ** (g + 1)
    return weights @ trajectory


def test_exponent_and_length_are_inverse_and_the_inner_product_matches_its_integral():
    for std in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert exp_to_std(std_to_exp(std)) == pytest.approx(std, rel=1e-12)
    assert MAX_LENGTH == pytest.approx(math.sqrt(1 / 12))  # exponent 0: the uniform average, std 1/sqrt(12) of its span
    # <p_a, p_b> = integral of (ga+1) tau^ga / ta^(ga+1) * (gb+1) tau^gb / tb^(gb+1) over [0, min(ta, tb)]
    for (ta, sa, tb, sb) in ((100.0, 0.05, 100.0, 0.05), (60.0, 0.1, 100.0, 0.05), (100.0, 0.2, 30.0, 0.03)):
        ga, gb = float(std_to_exp(sa)), float(std_to_exp(sb))
        tau = np.linspace(0, min(ta, tb), 400_001)
        f = (ga + 1) * tau**ga / ta ** (ga + 1) * (gb + 1) * tau**gb / tb ** (gb + 1)
        integral = float(np.sum((f[1:] + f[:-1]) / 2 * np.diff(tau)))
        assert float(inner(ta, sa, tb, sb)) == pytest.approx(integral, rel=1e-6)


def test_the_recursion_is_the_power_function_average():
    rng = np.random.default_rng(0)
    trajectory = np.cumsum(rng.normal(size=(300, 5)), axis=0)
    for std in (0.05, 0.1):
        got = tracked(trajectory, std, every=1000)[300]
        assert np.allclose(got, exact(trajectory, std), rtol=0, atol=1e-9 * np.abs(trajectory).max())


def test_a_tracked_length_rebuilds_as_itself():
    steps, stds = [s for s in range(20, 201, 20) for _ in (0, 1)], [0.05, 0.1] * 10
    x, residual = coefficients(steps, stds, 200, 0.1)
    assert residual < 1e-6 and x[-1] == pytest.approx(1, abs=1e-6) and np.abs(x[:-1]).max() < 1e-6


def test_a_length_never_tracked_is_rebuilt_within_the_bound_of_its_solve():
    # a random walk of weights, snapshots of the 0.05 and 0.10 profiles every 25 of 1,000 steps; the 0.07 EMA rebuilt
    rng = np.random.default_rng(1)
    trajectory = np.cumsum(rng.normal(size=(1000, 64)), axis=0)
    every, stds = 25, (0.05, 0.10)
    snaps = {std: tracked(trajectory, std, every) for std in stds}
    steps = sorted(snaps[stds[0]])
    for target in (0.03, 0.07, 0.15):
        x, residual = coefficients([t for t in steps for _ in stds], [s for _ in steps for s in stds], 1000, target)
        got = sum(x[2 * i + j] * snaps[std][t] for i, t in enumerate(steps) for j, std in enumerate(stds))
        want = exact(trajectory, target)
        # the tracked profiles are the continuous ones integrated over each step, so the error is the residual profile r
        # integrated against the (piecewise constant) trajectory: |sum_k r_k (w_k - c)| <= ||r||_1 max|w - c|
        # <= sqrt(T) ||r||_2 max|w - c|, with ||r||_2 = residual * ||p||_2 from the solve (c: any constant, as sum r_k = 0)
        centre = (trajectory.max(0) + trajectory.min(0)) / 2
        bound = math.sqrt(1000) * residual * math.sqrt(float(inner(1000, target, 1000, target))) * np.abs(trajectory - centre).max(0)
        assert np.all(np.abs(got - want) <= bound + 1e-9 * np.abs(trajectory).max())
        assert residual < 0.02  # the bound is tight enough to mean something: the rebuilt EMA is the 0.07 one...
        assert np.abs(got - want).max() < 0.1 * np.abs(want - exact(trajectory, 0.05)).max()  # ...not a tracked neighbour


@pytest.fixture(scope="module")
def phema_run(tmp_path_factory):
    """A tiny run of 20 steps with the default callbacks and post-hoc EMA snapshots every 3 steps (and a random
    classifier to score it with)."""
    from difflab.metrics.classifier import SmallCNN, save_classifier
    from difflab.train import train

    from support import compose_cfg

    run = tmp_path_factory.mktemp("phema")
    train(compose_cfg(["model=unet_tiny", "data.limit=32", "data.batch_size=8", "trainer.max_epochs=5", "trainer.precision=32",
                       "trainer.limit_val_batches=1", "callbacks=posthoc_ema", "callbacks.posthoc_ema.every_n_steps=3",
                       "callbacks.sample_grid.every_n_epochs=100", "timesteps=20", "logger=none", "~callbacks.progress_bar",
                       "trainer.enable_progress_bar=false"], run))
    torch.manual_seed(0)
    names = ["hero", "non-hero", "food", "magic-item", "weapon", "side-facing"]
    save_classifier(run / "clf.ckpt", SmallCNN(6, channels=(8, 16)), names, 16, {}, {"val_accuracy": 0.0})
    return run


def test_posthoc_snapshots_of_a_run_rebuild_its_tracked_weights_and_refuse_what_they_cannot(phema_run):
    found = snapshots(phema_run)
    assert [s.step for s in found] == [3, 6, 9, 12, 15, 18, 20] and found[-1].end and not found[0].end
    last = torch.load(found[-1].path, weights_only=True)
    assert last["images"] == 20 * 8 and last["stds"] == [0.05, 0.1]
    ckpt = torch.load(phema_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 20
    rebuilt = rebuild(phema_run, 20, 0.1)
    steps = [s.step for s in found for _ in (0, 1)]
    x, _ = coefficients(steps, [0.05, 0.1] * len(found), 20, 0.1)
    # sum_i x_i s_i - s_last = sum_i (x - e_last)_i s_i: at most ||x - e_last||_1 max|s_i|, then the float32 rounding
    off = np.abs(x - np.eye(len(x))[-1]).sum()
    saved = [p for s in found for p in torch.load(s.path, weights_only=True)["profiles"]]
    for name, value in last["profiles"][1].items():
        scale = max(float(p[name].abs().max()) for p in saved)
        assert torch.allclose(rebuilt[name], value, rtol=2**-24, atol=off * scale), name
    with pytest.raises(ConfigError, match=r"ema.length=0.01: 7 snapshots rebuild it only to .*lengths .* to .* are within reach"):
        rebuild(phema_run, 20, 0.01)
    with pytest.raises(ConfigError, match=r"ema.length=0.5: .* in \(0, 0.289\]"):
        rebuild(phema_run, 20, 0.5)
    with pytest.raises(CheckpointError, match="no snapshot at step 19"):
        rebuild(phema_run, 19, 0.1)
    with pytest.raises(CheckpointError, match="no post-hoc EMA snapshots.*callbacks=posthoc_ema"):
        rebuild(phema_run / "elsewhere", 20, 0.1)


def test_every_entry_point_takes_ema_length(phema_run, tmp_path):
    from difflab.checkpoint import load_checkpoint, net_state_dict
    from difflab.edit import edit
    from difflab.evaluate import evaluate
    from difflab.export import main as export
    from difflab.model import load_model
    from difflab.sample import sample

    from support import compose_cfg

    saved = load_checkpoint(phema_run / "checkpoints" / "last.ckpt")
    weights = {length: load_model(phema_run, ema_length=length).net.state_dict() for length in (None, 0, 0.1)}
    assert all(torch.equal(weights[None][k], v) for k, v in net_state_dict(saved, ema=True).items())  # the trained EMA
    assert all(torch.equal(weights[0][k], v) for k, v in net_state_dict(saved, ema=False).items())  # the raw weights
    rebuilt = rebuild(phema_run, 20, 0.1)
    assert all(torch.equal(weights[0.1][k], v) for k, v in rebuilt.items())
    assert not torch.equal(weights[0.1]["conv_out.weight"], weights[None]["conv_out.weight"])

    scoring = [f"metrics.classifier_ckpt={phema_run / 'clf.ckpt'}", f"metrics.cache_dir={tmp_path / 'cache'}", "metrics.kid_subsets=5",
               "trainer.enable_progress_bar=false", "n=16", "batch_size=8", "steps=2", "reference=false"]
    row = evaluate(compose_cfg([f"ckpt={phema_run}", "ema.length=0.1", *scoring], tmp_path / "e", "evaluate"))
    assert row["ema_length"] == 0.1 and math.isfinite(row["fd"])
    made = sample(compose_cfg([f"ckpt={phema_run}", "ema.length=0.05", "n=2", "steps=2", "gif=false"], tmp_path / "s", "sample"))
    assert json.loads(made["meta"].read_text())["ema_length"] == 0.05
    edited = edit(compose_cfg([f"ckpt={phema_run}", "ema.length=0.05", "edit=vary", "image=data:0", "n=2", "steps=2"], tmp_path / "v",
                              "edit"))
    assert all(Path(p).is_file() for p in edited.values())
    out = export([str(phema_run), str(tmp_path / "w.ckpt"), "--ema-length", "0.1"])
    shipped = torch.load(out, weights_only=False)
    assert shipped["difflab_export"]["ema_length"] == 0.1
    assert all(torch.equal(shipped["state_dict"][f"net.{k}"], v.half()) for k, v in rebuilt.items())
    with pytest.raises(ConfigError, match=r"ema=False: the weights are chosen with ema.length=\.\.\."):
        evaluate(compose_cfg([f"ckpt={phema_run}", "ema=false", *scoring], tmp_path / "bad", "evaluate"))


def test_an_ema_length_sweep_ends_in_a_report_with_the_plot(phema_run, tmp_path):
    from support import run_script

    proc = run_script("evaluate.py", "-m", f"ckpt={phema_run}", "ema.length=null,0.05,0.1", "n=16", "batch_size=8", "steps=2",
                      "reference=false", f"metrics.classifier_ckpt={phema_run / 'clf.ckpt'}", f"metrics.cache_dir={tmp_path / 'cache'}",
                      "metrics.kid_subsets=5", "trainer.enable_progress_bar=false", 'report.baseline="ema.length=null"',
                      f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "sweep" / "report.md").read_text()
    assert "| ema.length=0.1 | 1 |" in text and "## Against the baseline: ema.length=null" in text
    assert "sampling noise only" in text and (tmp_path / "sweep" / "settings.png").stat().st_size > 1000
    bad = run_script("evaluate.py", f"ckpt={phema_run}", "ema.length=0.01", "n=16", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and bad.stderr.count("error: ") == 1 and "Traceback" not in bad.stderr
    assert "ema.length=0.01: 7 snapshots rebuild it only to" in bad.stderr
