"""How a training run ends: its final quality scored as evaluate.py scores the run's checkpoint, the loggers, and a
re-run sweep that skips finished jobs, resumes the cut one and reports on all of them."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re

import numpy as np
import pytest

from support import compose_cfg, read_metrics, run_script

TINY = ["model=unet_tiny", "debug=fast", "timesteps=50", "~callbacks.progress_bar", "trainer.enable_progress_bar=false"]


def test_a_run_ends_with_the_final_quality_evaluate_py_gives_its_checkpoint(tmp_path):
    from difflab.evaluate import evaluate
    from difflab.train import train

    metrics = train(compose_cfg([*TINY, "final_eval=default", "final_eval.n=24", "final_eval.sampling.steps=3"], tmp_path / "run"))
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["training"]["train_steps"] == 4 and final["training"]["images_seen"] == 64 and final["training"]["train_seconds"] > 0
    row = final["row"]
    assert row["n"] == 24 and row["steps"] == 3 and row["feature"] == "classifier" and metrics["final/fd"] == row["fd"]
    with np.load(tmp_path / "run" / "scores.npz") as z:
        assert z["features"].shape == (24, 128) and z["labels"].shape == (24,) and z["real_sigma"].shape == (128, 128)
    logged = [r for r in read_metrics(tmp_path / "run") if r.get("final/fd")]
    assert len(logged) == 1 and float(logged[0]["final/fd"]) == pytest.approx(row["fd"]) and "final/sampler" not in logged[0]
    assert any(r.get("trainer/seconds") and r.get("val/loss") for r in read_metrics(tmp_path / "run"))  # the clock, per validation

    ev = evaluate(compose_cfg([f"ckpt={tmp_path / 'run'}", "n=24", "steps=3", "reference=false", "trainer.accelerator=cpu",
                               "trainer.enable_progress_bar=false"], tmp_path / "eval", "evaluate"))
    for key in ("fd", "kid", "cond_acc", "colors_median", "memorized", "scorer"):
        assert row[key] == ev[key], key  # the same code, the same numbers, scored by the same networks


def test_the_same_command_skips_a_finished_run_and_continues_one_with_more_epochs(tmp_path, caplog):
    from difflab.train import train

    caplog.set_level(logging.INFO, logger="difflab")
    train(compose_cfg(TINY, tmp_path))
    ckpt = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    metrics = train(compose_cfg(TINY, tmp_path))
    assert "finished this config already" in caplog.text and (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == ckpt
    assert metrics["val/loss"] == json.loads((tmp_path / "final.json").read_text())["training"]["val_loss"]
    train(compose_cfg([*TINY, "trainer.max_epochs=2"], tmp_path))  # another config in the folder: it trains on
    assert json.loads((tmp_path / "final.json").read_text())["training"]["train_steps"] == 8


def test_a_rerun_sweep_skips_finished_jobs_resumes_the_cut_one_and_reports_on_all(tmp_path):
    sweep = tmp_path / "sweep"
    command = ["-m", *TINY, "schedule=linear,cosine", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    first = run_script("train.py", *command, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4 and all((j / "final.json").is_file() for j in jobs)
    # job folders in characters a command line takes unquoted: a path into one is a plain override (ckpt=...)
    assert all(re.fullmatch(r"\d_[\w.+-]+", j.name) for j in jobs) and {"schedule-cosine", "seed-1"} <= set(jobs[3].name.split("_"))
    report = (sweep / "report.md").read_text()
    assert "| schedule=linear (baseline) | 2 |" in report and "| schedule=cosine |" in report and "paired t over 2 seeds" in report
    assert (sweep / "curves.png").is_file() and (sweep / "grids.png").is_file()

    # job 3 was cut after its last checkpoint: no final.json yet
    (jobs[3] / "final.json").unlink()
    kept = hashlib.sha256((jobs[0] / "checkpoints" / "last.ckpt").read_bytes()).hexdigest()
    again = run_script("train.py", *command, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert log.count("finished this config already") == 3 and "resuming from" in log
    assert hashlib.sha256((jobs[0] / "checkpoints" / "last.ckpt").read_bytes()).hexdigest() == kept
    assert (jobs[3] / "final.json").is_file() and "| schedule=cosine | 2 |" in (sweep / "report.md").read_text()
    with open(next((jobs[3] / "csv").glob("version_0/metrics.csv"))) as f:
        assert any(r["val/loss"] for r in csv.DictReader(f))
