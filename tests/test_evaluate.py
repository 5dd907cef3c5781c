"""evaluate.py end to end on a tiny untrained checkpoint: its files and table, a sweep, DDP = one process,
the training-time callback, and the Optuna search wiring."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from difflab.metrics.classifier import ClassifierError, SmallCNN, save_classifier
from difflab.train import build_module

from support import compose_cfg, run_script

CLASSES = ["hero", "non-hero", "food", "magic-item", "weapon", "side-facing"]
METRIC_KEYS = ("fd", "kid", "kid_std", "cond_acc", "cond_acc_weighted", "colors_median", "top16_share", "memorized", "nn_dist_q01",
               "nn_dist_q05", "nn_dist_q50")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """An untrained unet_tiny checkpoint over T=20 steps (ddpm stays quick) and a random classifier."""
    out = tmp_path_factory.mktemp("tiny")
    cfg = compose_cfg(["model=unet_tiny", "logger=none", "timesteps=20"], out)
    module = build_module(cfg)
    ckpt = out / "tiny.ckpt"
    identity = {**instantiate(cfg.data).identity(), "choice": "sprites"}  # what train.py saves
    torch.save({"state_dict": module.state_dict(), "difflab_config": module.model.config, "class_names": module.model.class_names,
                "difflab_data": identity}, ckpt)
    torch.manual_seed(0)
    clf = save_classifier(out / "clf.ckpt", SmallCNN(6, channels=(8, 16)), CLASSES, 16, {}, {"val_accuracy": 0.0})
    return {"ckpt": ckpt, "classifier": clf, "cache": out / "cache"}


def args(tiny: dict[str, Path], n: int = 24) -> list[str]:
    return [f"ckpt={tiny['ckpt']}", f"n={n}", "batch_size=8", f"metrics.classifier_ckpt={tiny['classifier']}",
            f"metrics.cache_dir={tiny['cache']}", "metrics.kid_subsets=5", "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false"]


def test_evaluate_writes_its_row_and_reference(tiny, tmp_path, capsys):
    from difflab.evaluate import evaluate

    cfg = compose_cfg([*args(tiny), "steps=2"], tmp_path, config_name="evaluate")
    row = evaluate(cfg)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["row"]["steps"] == 2 and result["row"]["n"] == 24
    assert (result["row"]["schedule"], result["row"]["timesteps"]) == ("linear", 20)  # from the checkpoint's run
    for key in METRIC_KEYS:
        assert isinstance(result["row"][key], float), key
    assert {f"cond_acc/{c}" for c in CLASSES} <= set(result["row"])
    assert result["reference"]["n"] == 382 and "memorized" in result["reference"]
    assert result["config"]["sampler"]["diffusion"]["steps"] == 15  # the full config as given (sampler=auto: dpmpp for this model); the effective steps are in the row
    with open(tmp_path / "results.csv") as f:
        (csv_row,) = list(csv.DictReader(f))
    assert float(csv_row["fd"]) == pytest.approx(row["fd"]) and csv_row["config/metrics.feature"] == "classifier"
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "nearest_train.npz").is_file()
    with np.load(tmp_path / "samples.npz") as f:
        assert f["images"].shape == (24, 16, 16, 3) and f["index"].tolist() == list(range(24)) and f["labels"].shape == (24, 6)
    table = capsys.readouterr().out
    assert "fd" in table and "real val" in table and "cond_acc/food" in table


def test_sweep_table_names_the_checkpoint_when_a_sweep_compares_runs(tmp_path):
    from difflab.metrics.summary import write_summary

    def job(i: int, ckpt: str, schedule: str, fd: float) -> None:
        row = {"sampler": "ddim", "steps": 25, "guidance": 0.0, "n": 100, "fd": fd, "kid": fd / 100, "ckpt": ckpt,
               "schedule": schedule, "timesteps": 1000, "run_key": str(i)}
        (tmp_path / f"{i}_job").mkdir(exist_ok=True)
        (tmp_path / f"{i}_job" / "result.json").write_text(json.dumps({"row": row, "output_dir": str(tmp_path / f"{i}_job")}))

    job(0, "runs/a/last.ckpt", "linear", 12.5)
    job(1, "runs/b/last.ckpt", "cosine", 11.0)
    lines = write_summary(tmp_path)["markdown"].read_text().splitlines()
    assert lines[0].startswith("| ckpt | schedule | sampler |")  # timesteps are equal: no column
    assert lines[2].startswith("| runs/a/last.ckpt | linear | ddim |") and "| 11 |" in lines[3]
    (tmp_path / "1_job" / "result.json").unlink()
    job(1, "runs/a/last.ckpt", "linear", 12.5)
    assert write_summary(tmp_path)["markdown"].read_text().startswith("| sampler |")  # one run: no run columns


def test_missing_classifier_names_the_command_that_trains_it(tiny, tmp_path):
    from difflab.evaluate import evaluate

    cfg = compose_cfg([*args(tiny), "steps=2"], tmp_path, config_name="evaluate")
    with open_dict(cfg):
        cfg.metrics.classifier_ckpt = "auto"
        cfg.metrics.classifiers_dir = str(tmp_path / "none")
    with pytest.raises(ClassifierError, match=r"python train_classifier.py data=sprites"):
        evaluate(cfg)


@pytest.mark.slow
def test_evaluate_cli_prints_and_writes_its_table(tiny, tmp_path):
    proc = run_script("evaluate.py", *args(tiny, n=16), "sampler=dpmpp", "steps=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dpmpp (3 steps)" in proc.stdout and "real val" in proc.stdout
    assert json.loads((tmp_path / "result.json").read_text())["row"]["sampler"] == "dpmpp"


@pytest.mark.slow
def test_sweep_writes_a_table_and_plot_and_reuses_equal_jobs(tiny, tmp_path):
    # ddpm ignores steps=: its second job reuses the first one's result
    proc = run_script("evaluate.py", "-m", *args(tiny, n=16), "sampler=ddpm,ddim", "steps=2,4", "reference=false",
                      f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ddpm", "20"), ("ddpm", "20"), ("ddim", "2"), ("ddim", "4")]
    assert rows[1]["reused_from"] and rows[1]["fd"] == rows[0]["fd"] and not rows[0]["reused_from"]
    assert (tmp_path / "quality_vs_steps.png").stat().st_size > 1000
    assert "| ddim | 4 |" in (tmp_path / "results.md").read_text()
    assert "sweep results" in proc.stdout


@pytest.mark.slow
def test_two_process_ddp_gives_the_single_process_values(tiny, tmp_path):
    common = [*args(tiny, n=40), "steps=2", "reference=false"]
    one = run_script("evaluate.py", *common, f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_script("evaluate.py", *common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                     f"hydra.run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads((tmp_path / "one" / "result.json").read_text())["row"]
    r2 = json.loads((tmp_path / "two" / "result.json").read_text())["row"]
    assert r1["world_size"] == 1 and r2["world_size"] == 2
    for key in [*METRIC_KEYS, *(f"cond_acc/{c}" for c in CLASSES)]:
        assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-7), key
    # the same chunks, made on other ranks: the same images, byte for byte
    assert (tmp_path / "one" / "samples.npz").read_bytes() == (tmp_path / "two" / "samples.npz").read_bytes()


def test_training_logs_sample_quality_equal_to_evaluate_py(tiny, tmp_path):
    """The callback samples and scores as evaluate.py does (output stage included): on the same EMA weights, n, seed and
    sampling settings, val/fd and the rest equal evaluate.py's figures for the checkpoint the run ends with."""
    from difflab.evaluate import evaluate
    from difflab.train import train

    scoring = [f"metrics.classifier_ckpt={tiny['classifier']}", f"metrics.cache_dir={tiny['cache']}", "metrics.kid_subsets=5"]
    cfg = compose_cfg(["debug=fast", "model=unet_tiny", "callbacks=[ema,model_checkpoint,sample_quality]", "timesteps=20",
                       "callbacks.sample_quality.n=16", "callbacks.sample_quality.sampling.batch_size=8",
                       "callbacks.sample_quality.sampling.steps=2", *(f"callbacks.sample_quality.{a}" for a in scoring),
                       "callbacks.model_checkpoint.monitor=val/fd", "trainer.enable_progress_bar=false", "optimized_metric=val/fd"],
                      tmp_path / "run")
    metrics = train(cfg)
    assert {"val/fd", "val/kid", "val/cond_acc", "val/cond_acc_weighted", "val/colors_median", "val/memorized"} <= set(metrics)
    assert {f"val/cond_acc/{c}" for c in CLASSES} & set(metrics)  # per class, always
    assert list((tmp_path / "run" / "checkpoints").glob("epoch*.ckpt"))  # ModelCheckpoint(monitor=val/fd) saved one
    assert metrics["val/colors_median"] <= 16  # the output stage (palette=auto: sprite) is on, as in evaluate.py

    row = evaluate(compose_cfg([f"ckpt={tmp_path / 'run'}", "n=16", "batch_size=8", "steps=2", "reference=false", *scoring,
                                "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"], tmp_path / "eval", "evaluate"))
    for key in ("fd", "kid", "cond_acc", "cond_acc_weighted", "colors_median", "top16_share", "memorized"):
        assert metrics[f"val/{key}"] == pytest.approx(row[key], rel=1e-6, abs=1e-7), key  # logged as float32


@pytest.mark.slow
def test_optuna_search_runs_two_trials_minimising_the_final_fd(tmp_path):
    proc = run_script(
        "train.py", "hparams_search=sprites_optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
        "debug=fast", "model=unet_tiny", "trainer.max_epochs=1", "~callbacks.sample_grid", "~callbacks.progress_bar",
        f"hydra.sweep.dir={tmp_path}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = (tmp_path / "optimization_results.yaml").read_text()
    assert "best_value" in best and "optim.optimizer.lr" in best
    assert "2 training runs in 2 configurations" in (tmp_path / "report.md").read_text()


def test_evaluate_warns_when_the_data_files_changed_since_training(tiny, tmp_path, caplog):
    from difflab.evaluate import evaluate

    ckpt = torch.load(tiny["ckpt"], weights_only=False)
    (name,) = ckpt["difflab_data"]["files"]
    ckpt["difflab_data"]["files"][name] = "0" * 64  # as if the model had been trained on other bytes
    torch.save(ckpt, tmp_path / "changed.ckpt")
    cfg = compose_cfg([*args(tiny, n=8), f"ckpt={tmp_path / 'changed.ckpt'}", "steps=2", "reference=false"], tmp_path,
                      config_name="evaluate")
    evaluate(cfg)
    assert f"{name} changed since this model was trained" in caplog.text
