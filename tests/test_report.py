"""The sweep report on run folders with known answers: pooling seeds, paired and unpaired intervals, the bootstrap of a
single run, verdicts, and the inputs it refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from difflab.metrics.intervals import FrechetToReal
from difflab.report import ReportError, configurations, read_runs, write_report

D, N, CLASSES = 6, 300, 3
RNG = np.random.default_rng(0)
REAL = RNG.normal(size=(2000, D))
REAL_MU, REAL_SIGMA = REAL.mean(0), np.cov(REAL, rowvar=False)


def fake_run(root: Path, job: int, overrides: dict[str, object], seed: int, shift: float, hit_rate: float = 0.9,
             feature: str = "classifier", data: str = "difflab.data.sprites.SpritesDataModule", scorer: str | None = "0123456789ab") -> Path:
    """A finished training run: final.json, .hydra/overrides.yaml and scores.npz whose features are the real distribution
    moved by ``shift`` (FD grows as shift^2 D) and whose classifier hits ``hit_rate`` of every class. The draws depend
    on the seed alone, as a run's do: a setting that changes nothing gives the same figures at the same seed."""
    rng = np.random.default_rng(seed)
    folder = root / f"{job}_{','.join(f'{k}={v}' for k, v in overrides.items())},seed={seed}"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {k}={v}\n" for k, v in {**overrides, "seed": seed}.items()))
    features = rng.normal(size=(N, D)) + shift
    labels = np.arange(N) % CLASSES
    predictions = np.where(rng.random(N) < hit_rate, labels, (labels + 1) % CLASSES)
    np.savez(folder / "scores.npz", features=features, labels=labels, predictions=predictions, real_mu=REAL_MU, real_sigma=REAL_SIGMA)
    acc = float(np.mean([(predictions[labels == c] == c).mean() for c in range(CLASSES)]))
    row = {"sampler": "dpmpp", "steps": 15, "guidance": 2.0, "n": N, "feature": feature, "scorer": scorer,
           "fd": float(FrechetToReal(REAL_MU, REAL_SIGMA)(features)), "kid": shift**2, "cond_acc": acc, "memorized": 0.0}
    training = {"train_steps": 100, "train_seconds": 60.0, "images_seen": 6400, "val_loss": 0.1}
    (folder / "final.json").write_text(json.dumps({"training": training, "row": row, "config": {"seed": seed, "data": {"_target_": data}}}))
    return folder


def sweep(root: Path, shifts: dict[str, float], seeds=(0, 1, 2), hit_rates: dict[str, float] | None = None) -> Path:
    job = 0
    for value, shift in shifts.items():
        for seed in seeds:
            fake_run(root, job, {"schedule": value, "timesteps": 64}, seed, shift, (hit_rates or {}).get(value, 0.9))
            job += 1
    return root


def verdict_line(report: Path, label: str) -> str:
    return next(line for line in report.read_text().splitlines() if line.startswith(f"| {label} |") and "**" in line)


def test_seeds_are_pooled_into_one_row_per_configuration(tmp_path):
    runs = read_runs([sweep(tmp_path, {"linear": 0.0, "cosine": 0.0})])
    configs = configurations(runs)
    assert [c.label for c in configs] == ["schedule=linear", "schedule=cosine"]  # timesteps is the same everywhere: not a column
    assert [sorted(r.seed for r in c.runs) for c in configs] == [[0, 1, 2], [0, 1, 2]]


def test_a_clearly_worse_configuration_is_called_worse_and_a_no_op_within_noise(tmp_path):
    report = write_report([sweep(tmp_path, {"linear": 0.05, "cosine": 0.05, "sigmoid": 1.0}, hit_rates={"sigmoid": 0.5})])
    worse, same = verdict_line(report, "schedule=sigmoid"), verdict_line(report, "schedule=cosine")
    assert worse.count("**worse**") == 3 and "paired t over 3 seeds" in worse  # FD, balanced accuracy, KID
    assert "**within noise**" in same.split("|")[2] and "**within noise**" in same.split("|")[3]
    table = report.read_text()
    assert "| schedule=linear (baseline) | 3 |" in table and "Student's t" in table
    assert (tmp_path / "curves.png").is_file() and "python -m difflab.report" in table


def test_unmatched_seeds_use_welch_and_a_single_run_the_bootstrap(tmp_path):
    a = tmp_path / "a"
    for seed in (0, 1, 2):
        fake_run(a, seed, {"schedule": "linear"}, seed, 0.05)
    for seed in (5, 6):
        fake_run(a, 10 + seed, {"schedule": "cosine"}, seed, 0.05)
    assert "Welch t over 2 and 3 seeds" in verdict_line(write_report([a]), "schedule=cosine")
    b = tmp_path / "b"
    fake_run(b, 0, {"schedule": "linear"}, 0, 0.05)
    fake_run(b, 1, {"schedule": "cosine"}, 0, 1.0)
    line = verdict_line(write_report([b]), "schedule=cosine")
    assert "bootstrap over images (1 seed: sampling noise only)" in line and "**worse**" in line.split("|")[2]
    assert "bootstrap over 300 images" not in line and "[" in (b / "report.md").read_text().split("schedule=cosine |")[1]


def test_a_single_runs_bootstrap_interval_covers_its_own_figure(tmp_path):
    fake_run(tmp_path, 0, {"schedule": "linear"}, 0, 0.3)
    from difflab.report import interval

    (config,) = configurations(read_runs([tmp_path]))
    fd = interval(config, "fd", draws=400)
    assert fd.lo < fd.value < fd.hi and fd.method == "bootstrap over 300 images"
    # FD of 300 draws from the shifted Gaussian: its spread over fresh draws is the bootstrap's target
    fresh = [FrechetToReal(REAL_MU, REAL_SIGMA)(np.random.default_rng(s).normal(size=(N, D)) + 0.3) for s in range(200)]
    assert fd.hi - fd.lo == pytest.approx(np.quantile(fresh, 0.975) - np.quantile(fresh, 0.025), rel=0.5)


def test_an_interval_stays_inside_the_figures_range(tmp_path):
    from difflab.report import interval

    for seed, hit_rate in zip((0, 1, 2), (1.0, 0.97, 0.94)):  # balanced accuracy 1.0 / ~0.97 / ~0.94: t reaches past 1
        fake_run(tmp_path, seed, {"schedule": "linear"}, seed, 0.05, hit_rate)
    (config,) = configurations(read_runs([tmp_path]))
    values = list(config.values("cond_acc").values())
    mean, sd = np.mean(values), np.std(values, ddof=1)
    acc = interval(config, "cond_acc", draws=100)
    assert mean + 4.303 * sd / np.sqrt(3) > 1  # Student's t_{2, 0.975} = 4.303: the raw interval leaves [0, 1]
    assert acc.hi == 1.0 and acc.lo == pytest.approx(mean - 4.303 * sd / np.sqrt(3), rel=1e-3)


def test_a_report_refuses_what_it_cannot_compare(tmp_path):
    with pytest.raises(ReportError, match="no finished runs"):
        write_report([tmp_path])
    fake_run(tmp_path / "f", 0, {"schedule": "linear"}, 0, 0.0)
    fake_run(tmp_path / "f", 1, {"schedule": "cosine"}, 0, 0.0, feature="inception")
    with pytest.raises(ReportError, match="different feature networks"):
        write_report([tmp_path / "f"])
    fake_run(tmp_path / "c", 0, {"schedule": "linear"}, 0, 0.0)
    fake_run(tmp_path / "c", 1, {"schedule": "cosine"}, 0, 0.0, scorer="ba9876543210")  # a retrained classifier
    with pytest.raises(ReportError, match="different weights .scorer 0123456789ab, ba9876543210.*metrics.classifier_ckpt="):
        write_report([tmp_path / "c"])
    fake_run(tmp_path / "c", 2, {"schedule": "sigmoid"}, 0, 0.0, scorer=None)  # a row from before scorers were recorded
    shutil.rmtree(next((tmp_path / "c").glob("1_*")))
    write_report([tmp_path / "c"])  # unknown is not a conflict
    fake_run(tmp_path / "d", 0, {"schedule": "linear"}, 0, 0.0)
    fake_run(tmp_path / "d", 1, {"schedule": "cosine"}, 0, 0.0, data="difflab.data.cifar10.CIFAR10DataModule")
    with pytest.raises(ReportError, match="different data sets"):
        write_report([tmp_path / "d"])
    with pytest.raises(ReportError, match="matches 0 configurations; give one of: schedule=linear; schedule=cosine"):
        write_report([sweep(tmp_path / "s", {"linear": 0.0, "cosine": 0.0}, seeds=(0,))], baseline="schedule=sigmoid")


def test_the_cli_writes_the_report_of_any_run_folders_and_says_bad_input_in_one_line(tmp_path):
    from support import run_script

    root = sweep(tmp_path / "s", {"linear": 0.0, "cosine": 0.5}, seeds=(0, 1))
    folders = sorted(str(p) for p in root.iterdir())  # runs named one by one, as runs from different days would be
    result = run_script("-m", "difflab.report", *folders, "--out", str(tmp_path / "out"), "--baseline", "schedule=cosine")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| schedule=cosine (baseline) | 2 |" in (tmp_path / "out" / "report.md").read_text()
    bad = run_script("-m", "difflab.report", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and bad.stderr.count("error: ") == 1 and "Traceback" not in bad.stderr


def fixed_run(root: Path, job: int, overrides: dict[str, object], seed: int, fd: float, acc: float, steps: int = 100,
              kind: str = "final.json") -> Path:
    """A run whose figures are given (no scores.npz: configurations of 2 or more seeds need none)."""
    folder = root / f"{job}_{','.join(f'{k}={v}' for k, v in overrides.items())},seed={seed}"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {k}={v}\n" for k, v in {**overrides, "seed": seed}.items()))
    row = {"sampler": "dpmpp", "steps": 15, "guidance": 2.0, "n": 1000, "feature": "classifier", "fd": fd, "cond_acc": acc}
    training = {"train_steps": steps, "train_seconds": 300.0, "images_seen": steps * 64, "val_loss": 0.1}
    (folder / kind).write_text(json.dumps({"training": training, "row": row, "config": {"seed": seed}}))
    return folder


def test_holm_turns_a_lone_significant_difference_among_many_questions_into_noise(tmp_path):
    base = [1.0, 1.1, 0.9]
    worse = [b + d for b, d in zip(base, (0.30, 0.20, 0.25))]  # paired: mean 0.25, sd 0.05, t = 8.66, df 2: p = 0.013
    p = 2 * __import__("scipy").stats.t.sf(0.25 / (0.05 / np.sqrt(3)), 2)

    def write(root: Path, others: int) -> Path:
        for seed in range(3):
            fixed_run(root, seed, {"lr": "a"}, seed, base[seed], 0.9)
            fixed_run(root, 10 + seed, {"lr": "b"}, seed, worse[seed], 0.9)
            for k in range(others):  # configurations equal to the baseline: more questions, no answers
                fixed_run(root, 20 + 10 * k + seed, {"lr": f"c{k}"}, seed, base[seed], 0.9)
        return write_report([root])

    alone = verdict_line(write(tmp_path / "two", 0), "lr=b")  # 2 questions (FD, accuracy; accuracy untestable: p 1)
    assert f"p {p:.2g}, Holm {2 * p:.2g} **worse**" in alone
    crowd = write(tmp_path / "many", 2)  # 6 questions: Holm multiplies the smallest p by 6 = 0.078
    line = verdict_line(crowd, "lr=b")
    assert "[+0.126, +0.374]" in line and f"Holm {6 * p:.2g} **within noise**" in line  # the interval alone excludes 0
    text = crowd.read_text()
    assert "6 comparisons (configurations x figures) are corrected together by Holm's method" in text
    # the smallest difference it could detect: t_{2,0.975} 0.05 / sqrt(3) = 0.124 for FD
    assert "| lr=b | ±0.124 | ±0 |" in text
    tables = json.loads((tmp_path / "many" / "report.json").read_text())["tables"]
    assert tables["verdicts"]["columns"][0] == "configuration" and len(tables["verdicts"]["rows"]) == 3


def test_unequal_steps_and_unreadable_or_unfinished_runs_are_said(tmp_path):
    for seed, (a, b) in enumerate(((742, 848), (848, 901), (742, 795))):
        fixed_run(tmp_path, seed, {"schedule": "linear"}, seed, 2.0, 0.9, steps=a)
        fixed_run(tmp_path, 10 + seed, {"schedule": "cosine"}, seed, 2.0, 0.9, steps=b)
    (tmp_path / "3_schedule=linear,seed=3" / ".hydra").mkdir(parents=True)  # a job that never finished
    (tmp_path / "3_schedule=linear,seed=3" / ".hydra" / "overrides.yaml").write_text("- schedule=linear\n- seed=3\n")
    broken = fixed_run(tmp_path, 4, {"schedule": "cosine"}, 4, 2.0, 0.9)
    (broken / "final.json").write_text('{"training": {"train_st')  # cut off mid-write
    text = write_report([tmp_path]).read_text()
    assert "Unequal training: the configurations made different numbers of steps (schedule=linear: 742/848/742; " \
           "schedule=cosine: 848/901/795)" in text
    assert "# Report: 6 training runs" in text and "Left out: 2 run folder(s)" in text
    assert f"`{broken}`: final.json unreadable (" in text
    assert f"`{tmp_path / '3_schedule=linear,seed=3'}`: no final.json or result.json: the job did not finish" in text
    even = tmp_path / "even"
    for seed in range(2):
        fixed_run(even, seed, {"schedule": "linear"}, seed, 2.0, 0.9, steps=800)
        fixed_run(even, 10 + seed, {"schedule": "cosine"}, seed, 2.0, 0.9, steps=805)  # within 2%: not a confound worth a line
    assert "Unequal training" not in write_report([even]).read_text()


def test_evaluations_of_several_training_runs_pair_by_checkpoint_and_plot_against_a_numeric_setting(tmp_path):
    # evaluate.py -m ckpt=r0,r1,r2 ema.length=null,0.05,0.1,0.2 report.replicates=[seed,ckpt]
    fds = {"null": 2.0, "0.05": 1.8, "0.1": 1.5, "0.2": 1.9}
    job = 0
    for length, fd in fds.items():
        for r in range(3):
            fixed_run(tmp_path, job, {"ckpt": f"logs/r{r}", "ema.length": length}, 0, fd + 0.1 * r + 0.01 * job, 0.9,
                      kind="result.json")
            job += 1
    pooled = write_report([tmp_path], baseline="ema.length=null", replicates=["seed", "ckpt"])
    text = pooled.read_text()
    assert "| ema.length=0.1 | 3 |" in text and "Replicates (seed, ckpt) per configuration: 3" in text
    assert "paired t over 3 seeds" not in text and "paired t over 3 replicates" in verdict_line(pooled, "ema.length=0.1")
    assert (tmp_path / "settings.png").is_file() and "![settings](settings.png)" in text
    per_run = write_report([tmp_path], out=tmp_path / "apart", baseline="ema.length=null,ckpt=logs/r0")
    assert "| ckpt=logs/r1,ema.length=0.1 | 1 |" in per_run.read_text()  # without it every checkpoint is a configuration
    with pytest.raises(ReportError, match=r"report.replicates names lr, which no run's command line sets"):
        write_report([tmp_path], replicates=["seed", "lr"])
