"""Every bad input a user can type gets one line naming the key, the value and a fix, exit code 2, no traceback,
and changes no existing checkpoint: a table across train.py, sample.py, evaluate.py and train_classifier.py.

The table runs each entry point in this process, exactly as its ``__main__`` runs (Hydra included), to keep
the suite fast; a few cases also run as real processes, as a user starts them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from difflab.config import PROJECT_ROOT
from difflab.train import train

from conftest import SPRITES
from support import check_one_line, compose_cfg, run_in_process, run_script

TINY = ["model=unet_tiny", "debug=fast", "timesteps=100", "~callbacks.sample_grid", "~callbacks.progress_bar"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A trained run folder and broken data files."""
    root = tmp_path_factory.mktemp("bad_input")
    run = root / "run"
    train(compose_cfg(TINY, run))
    with np.load(SPRITES) as z:
        images, labels, names = z["images"][:60], z["labels"][:60].copy(), z["class_names"]
    out = {"run": run, "ckpt": run / "checkpoints" / "last.ckpt", "notckpt": root / "notes.ckpt"}
    out["notckpt"].write_text("not a checkpoint")
    np.savez(root / "float.npz", images=images.astype(np.float32) / 255, labels=labels, class_names=names)
    out["float"] = root / "float.npz"
    out["truncated"] = root / "truncated.npz"
    out["truncated"].write_bytes(SPRITES.read_bytes()[:100_000])
    for name, row in (("nan", [np.nan, 1, 0, 0, 0, 0]), ("zero", [0] * 6), ("negative", [0, 0, -1, 0, 1, 0])):
        bad = labels.copy()
        bad[7] = row
        np.savez(root / f"{name}.npz", images=images, labels=bad, class_names=names)
        out[name] = root / f"{name}.npz"
    return out


def protected(files: dict[str, Path]) -> dict[Path, str]:
    paths = [*files["run"].glob("checkpoints/*.ckpt"), PROJECT_ROOT / "data" / "classifiers" / "sprites.ckpt", SPRITES]
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


# (script, arguments, what the one line must contain); {name} is replaced by files[name]
CASES = [
    # train.py
    ("train.py", ["data.batch_size=0"], "data.batch_size=0: must be an integer >= 1"),
    ("train.py", ["data.batch_size=abc"], "data.batch_size='abc': must be an integer >= 1"),
    ("train.py", ["data.val_size=1.0"], "data.val_size=1.0: give a fraction in (0, 1)"),
    ("train.py", ["data.val_size=5000"], "data.val_size=5000 leaves no train or no validation images out of 3819"),
    ("train.py", ["data.limit=0"], "data.limit=0: must be an integer >= 1"),
    ("train.py", ["data.num_workers=-1"], "data.num_workers=-1: must be an integer >= 0"),
    ("train.py", ["data.path=/nowhere/sprites.npz"], "sprite images not found at /nowhere/sprites.npz"),
    ("train.py", ["data.path={float}"], "sprite images must be uint8 (N, H, W, 3), got float32"),
    ("train.py", ["data.path={truncated}"], "is not a readable .npy/.npz (BadZipFile"),
    ("train.py", ["data.path={nan}"], "label row 7 is not finite"),
    ("train.py", ["data.path={zero}"], "label row 7 is all zero: every image needs a class"),
    ("train.py", ["data.path={negative}"], "label row 7 is negative"),
    ("train.py", ["data.classes=[dragon]"], "unknown class ['dragon'] in data.classes"),
    ("train.py", ["timesteps=1"], "timesteps must be an integer >= 2, got 1"),
    ("train.py", ["schedule.beta_end=1.5"], "every beta must lie in (0, 1)"),
    ("train.py", ["trainer.precision=bf17"], "trainer.precision=bf17: not a precision Lightning knows"),
    ("train.py", ["trainer.accelerator=gpu"], "trainer.accelerator=gpu: no CUDA GPU is visible here"),
    ("train.py", ["trainer.accelerator=quantum"], "trainer.accelerator=quantum: use one of auto, cpu"),
    ("train.py", ["trainer.devices=0"], "trainer.devices=0: give a count >= 1"),
    ("train.py", ["trainer.max_epochs=-5"], "trainer.max_epochs=-5: must be an integer >= -1"),
    ("train.py", ["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1: must be a finite number >= 0"),
    ("train.py", ["optim.optimizer.lr=-1"], "optim.optimizer.lr=-1: must be a finite number > 0"),
    ("train.py", ["optim.optimizer.lr=nan"], "optim.optimizer.lr=nan: must be a finite number > 0"),
    ("train.py", ["seed=-1"], "seed=-1: must be an integer >= 0"),
    ("train.py", ["sampler@callbacks.sample_grid.sampling.sampler=ddim", "callbacks.sample_grid.sampling.sampler.eta=2"],
     "sampler.eta=2: must be a finite number in [0, 1]"),
    ("train.py", ["ckpt_path=/nowhere/last.ckpt"], "checkpoint not found: /nowhere/last.ckpt"),
    ("train.py", ["ckpt_path={notckpt}"], "is not a readable checkpoint of this project"),
    ("train.py", ["ckpt_path={run}", "model.base_channels=32"], "does not fit the model built from this config"),
    ("train.py", ["init_from=/nowhere/last.ckpt"], "checkpoint not found: /nowhere/last.ckpt"),
    ("train.py", ["ckpt_path=null", "hydra.run.dir={run}"], "already holds"),
    # sample.py
    ("sample.py", ["ckpt={ckpt}", "n=0"], "n=0: must be an integer >= 1"),
    ("sample.py", ["ckpt={ckpt}", "n=-3"], "n=-3: must be an integer >= 1"),
    ("sample.py", ["ckpt={ckpt}", "batch_size=0"], "batch_size=0: must be an integer >= 1"),
    ("sample.py", ["ckpt={ckpt}", "steps=0"], "steps=0: must be an integer >= 1"),
    ("sample.py", ["ckpt={ckpt}", "steps=5000"], "steps must be in [1, T-1=99], got 5000"),
    ("sample.py", ["ckpt={ckpt}", "sampler=ddim", "steps=5000"], "steps must be in [1, T=100], got 5000"),
    ("sample.py", ["ckpt={ckpt}", "sampler=dpmpp", "steps=-4"], "steps=-4: must be an integer >= 1"),
    ("sample.py", ["ckpt={ckpt}", "guidance=nan"], "guidance=nan: must be a finite number"),
    ("sample.py", ["ckpt={ckpt}", "guidance=inf"], "guidance=inf: must be a finite number"),
    ("sample.py", ["ckpt={ckpt}", "guidance_interval=[5,1]"], "guidance_interval=[5, 1]: give [sigma_lo, sigma_hi] with 0 <= lo < hi"),
    ("evaluate.py", ["ckpt={ckpt}", "guidance_rescale=2"], "guidance_rescale=2: must be a finite number in [0, 1]"),
    ("sample.py", ["ckpt={ckpt}", "palette=gold"], "palette=gold: choose one of sprite, data"),
    ("sample.py", ["ckpt={ckpt}", "sampler=ddim", "sampler.eta=-1"], "sampler.eta=-1: must be a finite number in [0, 1]"),
    ("sample.py", ["ckpt={ckpt}", "sampler=ddim", "sampler.spacing=uniform"], "sampler.spacing=uniform: choose one of"),
    ("sample.py", ["ckpt={ckpt}", "frames=0"], "frames=0: must be an integer >= 1 (or gif=false)"),
    ("sample.py", ["ckpt={ckpt}", "seed=-2"], "seed=-2: must be an integer >= 0"),
    ("sample.py", ["ckpt={ckpt}", "label=dragon"], "unknown label 'dragon'; this model knows: 0=hero"),
    ("sample.py", ["ckpt={ckpt}", "label=9"], "unknown label 9"),
    ("sample.py", ["ckpt={ckpt}", "context=[1,0]"], "context has 2 entries, this model has 6 classes"),
    ("sample.py", ["ckpt={ckpt}", "context={{hero:nan}}"], "context entry hero=nan: weights must be finite numbers >= 0"),
    ("sample.py", ["ckpt={ckpt}", "label=hero", "context={{hero:1}}"], "give either label= or context=, not both"),
    ("sample.py", ["ckpt={ckpt}", "precision=fp8"], "precision=fp8: choose one of auto, 32, bf16"),
    ("evaluate.py", ["ckpt={ckpt}", "precision=fp16"], "precision=fp16: choose one of auto, 32, bf16"),
    ("sample.py", ["ckpt={ckpt}", "device=cuda"], "device=cuda: no CUDA GPU is visible here"),
    ("sample.py", ["ckpt={ckpt}", "device=abacus"], "device=abacus: not a device name"),
    ("sample.py", ["ckpt=/nowhere/last.ckpt"], "checkpoint not found: /nowhere/last.ckpt"),
    ("sample.py", ["ckpt={notckpt}"], "is not a readable checkpoint of this project"),
    # evaluate.py
    ("evaluate.py", ["ckpt={ckpt}", "n=1"], "n=1: must be an integer >= 2"),
    ("evaluate.py", ["ckpt={ckpt}", "guidance=inf"], "guidance=inf: must be a finite number"),
    ("evaluate.py", ["ckpt={ckpt}", "steps=0"], "steps=0: must be an integer >= 1"),
    ("evaluate.py", ["ckpt={ckpt}", "batch_size=0"], "batch_size=0: must be an integer >= 1"),
    ("evaluate.py", ["ckpt={ckpt}", "trainer.precision=bf17"], "trainer.precision=bf17"),
    ("evaluate.py", ["ckpt=/nowhere/last.ckpt"], "checkpoint not found: /nowhere/last.ckpt"),
    ("evaluate.py", ["ckpt={ckpt}", "n=8", "metrics.classifier_ckpt=/nowhere/c.ckpt"], "classifier checkpoint not found: /nowhere/c.ckpt"),
    # train_classifier.py
    ("train_classifier.py", ["data.batch_size=0"], "data.batch_size=0: must be an integer >= 1"),
    ("train_classifier.py", ["data.val_size=2.5"], "data.val_size=2.5: give a fraction in (0, 1)"),
    ("train_classifier.py", ["lr=0"], "lr=0: must be a finite number >= 1e-12"),
    ("train_classifier.py", ["trainer.precision=bf17"], "trainer.precision=bf17"),
    ("train_classifier.py", ["trainer.max_epochs=-1"], "trainer.max_epochs=-1: must be an integer >= 1"),
    ("train_classifier.py", ["data.path={nan}"], "label row 7 is not finite"),
]


def fill(args: list[str], files: dict[str, Path]) -> list[str]:
    return [a.format(**files) for a in args]


def test_the_table_has_at_least_30_inputs_across_all_entry_points():
    assert len(CASES) >= 30
    assert {script for script, _, _ in CASES} == {"train.py", "sample.py", "evaluate.py", "train_classifier.py"}


@pytest.mark.parametrize("script,args,expected", CASES, ids=[f"{s}:{' '.join(a)}" for s, a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_clobbers_nothing(files, tmp_path, capsys, monkeypatch, script, args, expected):
    before = protected(files)
    argv = fill(args, files)
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        argv.append(f"hydra.run.dir={tmp_path / 'out'}")
    if script == "train_classifier.py":
        argv.append(f"output={tmp_path / 'classifier.ckpt'}")
    code, out, err = run_in_process(script, argv, capsys, monkeypatch)
    check_one_line(code, out, err, fill([expected], files)[0])
    assert protected(files) == before


@pytest.mark.parametrize("script,args,expected", [
    ("sample.py", ["ckpt={ckpt}", "n=0"], "n=0: must be an integer >= 1"),
    ("train.py", ["data.batch_size=0"], "data.batch_size=0: must be an integer >= 1"),
    ("evaluate.py", ["ckpt={ckpt}", "guidance=nan"], "guidance=nan: must be a finite number"),
    ("train_classifier.py", ["lr=0"], "lr=0: must be a finite number"),
])
def test_a_real_process_prints_one_line_and_exits_2(files, tmp_path, script, args, expected):
    result = run_script(script, *fill(args, files), f"hydra.run.dir={tmp_path}")
    check_one_line(result.returncode, result.stdout, result.stderr, fill([expected], files)[0])


def test_hydra_full_error_shows_the_trace(files, tmp_path):
    result = run_script("sample.py", f"ckpt={files['ckpt']}", "n=0", f"hydra.run.dir={tmp_path}", env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr and "n=0: must be an integer >= 1" in result.stderr


# a bad value of the sampling request: one message, from the spec itself, whichever entry point builds it
SPEC_CASES = [
    ("guidance", "nan", "guidance=nan: must be a finite number"),
    ("guidance_rescale", "2", "guidance_rescale=2: must be a finite number in [0, 1]"),
    ("guidance_interval", "[5,1]", "guidance_interval=[5, 1]: give [sigma_lo, sigma_hi] with 0 <= lo < hi"),
    ("precision", "fp8", "precision=fp8: choose one of auto, 32, bf16"),
    ("palette", "gold", "palette=gold: choose one of sprite, data"),
    ("palette_colors", "1", "palette_colors=1: must be an integer >= 2"),
    ("batch_size", "0", "batch_size=0: must be an integer >= 1"),
    ("steps", "0", "steps=0: must be an integer >= 1"),
    ("noise", "philox", "noise=philox: choose one of auto, generator, counter"),
]


@pytest.mark.parametrize("key,value,expected", SPEC_CASES, ids=[f"{k}={v}" for k, v, _ in SPEC_CASES])
def test_a_bad_sampling_value_gives_the_same_line_from_every_entry_point(files, tmp_path, capsys, monkeypatch, key, value, expected):
    from difflab.errors import ConfigError
    from difflab.sampling import SamplingSpec

    runs = {
        "sample.py": [f"ckpt={files['ckpt']}", f"{key}={value}"],
        "evaluate.py": [f"ckpt={files['ckpt']}", f"{key}={value}"],
        "train.py": [*TINY[:3], f"callbacks.sample_grid.sampling.{key}={value}"],
    }
    before = protected(files)
    for script, args in runs.items():
        code, out, err = run_in_process(script, [*args, f"hydra.run.dir={tmp_path / script}"], capsys, monkeypatch)
        check_one_line(code, out, err, expected)
    assert protected(files) == before
    # and the spec built in code says the same, as a ConfigError
    typed = compose_cfg([f"{key}={value}"], tmp_path, "sample")[key]
    with pytest.raises(ConfigError) as raised:
        SamplingSpec({"_target_": "difflab.samplers.DDIMSampler"}, **{key: typed})
    assert expected in str(raised.value)
