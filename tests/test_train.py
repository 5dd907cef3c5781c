"""Training end to end: the CLI as users type it, sweeps, W&B offline, resume, DDP, bf16, bad input."""

import hashlib
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from difflab.checkpoint import CheckpointError, load_checkpoint
from difflab.phema import snapshots
from difflab.train import train

from support import compose_cfg, read_metrics, run_script, wandb_config_and_metrics

TINY = ["model=unet_tiny", "debug=fast"]


def ok(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


def test_cli_cosine_512_exactly_as_written(tmp_path):
    out = ok(run_script("train.py", "schedule=cosine", "timesteps=512", "debug=fast", f"hydra.run.dir={tmp_path}"))
    cfg = OmegaConf.load(tmp_path / ".hydra" / "config.yaml")
    assert cfg.schedule._target_ == "difflab.schedules.CosineSchedule" and cfg.timesteps == 512
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and ckpt["difflab_config"]["schedule"]["timesteps"] == 512
    # the data set's identity: its config choice and the sha256 of its file, saved at training time
    data_file = Path(cfg.data.path)
    assert ckpt["difflab_data"]["choice"] == "sprites" and ckpt["difflab_data"]["name"] == "pixel_sprites_16x16"
    assert ckpt["difflab_data"]["files"] == {data_file.name: hashlib.sha256(data_file.read_bytes()).hexdigest()}
    assert any(row.get("train/loss") for row in read_metrics(tmp_path))
    assert list((tmp_path / "samples").glob("*.png")) and list((tmp_path / "samples").glob("*_chain.gif"))
    assert f"Run folder: {tmp_path}" in out and "last.ckpt" in out


def test_logger_none_trains_with_the_default_callbacks(tmp_path):
    """logger=none as the README lists it: the LR monitor (which needs a logger) is left out instead of stopping the run."""
    train(compose_cfg([*TINY, "logger=none", "~callbacks.progress_bar", "trainer.enable_progress_bar=false"], tmp_path))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4 and not (tmp_path / "csv").exists()


def test_sweep_runs_each_job_in_its_own_dir_and_groups_wandb_runs(tmp_path):
    env = {"HOME": str(tmp_path / "home"), "WANDB_API_KEY": "", "WANDB_MODE": ""}
    env = {k: v for k, v in env.items() if v}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    result = run_script("train.py", "-m", "schedule=linear,cosine", "timesteps=64", *TINY, "logger=wandb",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}", env={**clean, **env, "WANDB_SILENT": "true"})
    ok(result)
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    # the sweep's report went to the same W&B group, as a run of its own
    (report_run,) = (tmp_path / "sweep" / "wandb").glob("offline-run-*")
    record = next(report_run.glob("run-*.wandb")).read_bytes()
    assert b"train-sweep" in record and b"report" in record and list((report_run / "files" / "media").rglob("*.png"))
    tables = {p.name.split("_")[0] for p in (report_run / "files" / "media").rglob("*.table.json")}
    assert {"results", "verdicts", "detectable"} <= tables  # the report's tables, as wandb.Tables
    schedules = []
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        schedules.append(OmegaConf.load(job / ".hydra" / "config.yaml").schedule._target_.rsplit(".", 1)[1])
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, "each job writes its own offline W&B run"
        record = next(runs[0].glob("run-*.wandb")).read_bytes()
        assert b"train-sweep" in record  # the group shared by the sweep's jobs
        assert f"schedule={schedules[-1].replace('Schedule', '').lower()}".encode() in record  # run name from overrides
        assert list((runs[0] / "files" / "media").rglob("*.png")), "the sample grid went to W&B"
        assert b"final/fd" in record  # the final quality, in the run's summary
        # the report's name of its configuration (seeds of one share it: the dashboard groups by it); figures' directions
        config, metrics = wandb_config_and_metrics(next(runs[0].glob("run-*.wandb")))
        assert config["configuration"] == f'"schedule={schedules[-1].replace("Schedule", "").lower()}"'
        assert metrics["final/fd"] == "min" and metrics["final/cond_acc"] == "max" and metrics["val/fd"] == "min"
    assert schedules == ["LinearSchedule", "CosineSchedule"]


def test_tensorboard_logger_gets_scalars_grids_and_the_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_cfg([*TINY, "logger=tensorboard", "timesteps=64", "trainer.log_every_n_steps=1", "~callbacks.progress_bar",
                       "trainer.enable_progress_bar=false", "callbacks.sample_grid.every_n_epochs=1",
                       "callbacks.sample_grid.sampling.steps=2", "callbacks.sample_grid.per_class=1", "final_eval=default",
                       "final_eval.n=8", "final_eval.sampling.steps=2"], tmp_path)
    train(cfg)
    (folder,) = (tmp_path / "tensorboard").glob("version_*")
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "val/loss"} <= set(tags["scalars"])
    (grid,) = events.Images("samples/grid")
    assert (grid.height, grid.width) == (6 * 64 + 7 * 4, 64 + 2 * 4)  # one 4x-upscaled sprite per class row, 4 px padding
    assert "samples/grid/caption/text_summary" in tags["tensors"]
    hparams = OmegaConf.load(folder / "hparams.yaml")
    assert hparams.timesteps == 64 and hparams.model._target_ == "difflab.nn.unet.UNet"
    # the final quality beside the hyperparameters (TensorBoard's HParams view), in the events written at the end
    last = EventAccumulator(str(sorted(folder.glob("events.out.tfevents.*"))[-1]), size_guidance={"scalars": 0}).Reload()
    assert "final/fd" in last.Tags()["scalars"] and "_hparams_/session_start_info" in last.PluginTagToContent("hparams")


def test_tiny_model_learns_real_sprites(tmp_path):
    # eps-prediction: an untrained net's loss is the noise's variance, ~1, whatever the data (the default v + min-SNR
    # loss starts lower, at a level that depends on the data's scale)
    cfg = compose_cfg(["objective=eps", "model=unet_tiny", "data.limit=64", "data.batch_size=16", "trainer.max_epochs=75",
                       "trainer.limit_val_batches=4", "trainer.check_val_every_n_epoch=75", "callbacks.ema.decay=0.9",
                       "optim.optimizer.lr=2e-3", "logger=csv", "~callbacks.sample_grid", "~callbacks.progress_bar",
                       "~callbacks.model_checkpoint", "trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false",
                       "timesteps=200"], tmp_path)
    metrics = train(cfg)
    rows = [float(r["train/loss"]) for r in read_metrics(tmp_path) if r.get("train/loss")]
    assert len(rows) >= 25  # 300 steps logged every 10
    first, last = sum(rows[:3]) / 3, sum(rows[-5:]) / 5
    assert first > 0.8 and last < 0.5 * first, (first, last)
    assert metrics["val/loss"] < 0.5


def test_resume_continues_step_count_and_lr_schedule(tmp_path):
    common = ["model=unet_tiny", "data.limit=40", "data.batch_size=8", "trainer.max_epochs=3", "trainer.limit_val_batches=1",
              "trainer.log_every_n_steps=1", "optim.lr_scheduler.scheduler.warmup_steps=4", "~callbacks.sample_grid",
              "~callbacks.progress_bar", "trainer.enable_progress_bar=false"]
    full = compose_cfg(common, tmp_path / "full")
    train(full)
    interrupted = compose_cfg([*common, "+callbacks.stop._target_=support.StopAfterEpoch", "+callbacks.stop.epoch=1"], tmp_path / "a")
    train(interrupted)
    assert load_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt")["global_step"] == 10
    resumed = compose_cfg([*common, f"ckpt_path={tmp_path / 'a'}"], tmp_path / "b")
    train(resumed)
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")["global_step"] == 15

    def lrs(run):
        return {int(r["step"]): float(r["lr-AdamW"]) for r in read_metrics(run) if r.get("lr-AdamW")}

    reference, after = lrs(tmp_path / "full"), lrs(tmp_path / "b")
    assert sorted(after) == list(range(10, 15))
    assert all(abs(after[s] - reference[s]) < 1e-12 for s in after), (after, reference)
    assert len(set(reference.values())) > 5  # warmup + cosine: the lr really changes along the run

    # resumed into its own folder: the interrupted part's logs stay (Lightning would delete metrics.csv)
    in_place = compose_cfg([*common, f"ckpt_path={tmp_path / 'a'}"], tmp_path / "a")
    train(in_place)
    steps = {int(r["step"]) for r in read_metrics(tmp_path / "a") if r.get("lr-AdamW")}
    assert steps == set(range(15)), sorted(steps)


def test_ckpt_path_last_finds_the_newest_run(tmp_path):
    base = ["model=unet_tiny", "debug=fast", "~callbacks.sample_grid"]
    cfg = compose_cfg(base, tmp_path / "logs" / "train" / "runs" / "r1")
    train(cfg)
    cfg2 = compose_cfg([*base, "ckpt_path=last", "trainer.max_epochs=2"], tmp_path / "r2")
    cfg2.paths.log_dir = str(tmp_path / "logs")
    train(cfg2)
    assert load_checkpoint(tmp_path / "r2" / "checkpoints" / "last.ckpt")["global_step"] == 8


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    cfg = compose_cfg([*TINY, "~callbacks.sample_grid"], tmp_path)
    train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")  # a crash in the middle of writing
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    cfg2 = compose_cfg([*TINY, "~callbacks.sample_grid", "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path)
    with pytest.raises(OSError, match="disk full"):
        train(cfg2)
    assert last.read_bytes() == before  # the previous checkpoint is intact
    assert load_checkpoint(last)["global_step"] == 4


def test_bf16_mixed_on_cpu_trains(tmp_path):
    cfg = compose_cfg([*TINY, "trainer.precision=bf16-mixed", "trainer.accelerator=cpu"], tmp_path)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and metrics["val/loss"] < 1.5
    assert list((tmp_path / "samples").glob("*.png"))


@pytest.mark.slow
def test_ddp_two_cpu_processes_inside_a_sweep(tmp_path):
    """Each job of a -m sweep starts its own 2 ranks, in its own folder (not the whole sweep again); post-hoc EMA
    snapshots are written once, counting both ranks' images."""
    out = ok(run_script("train.py", "-m", "schedule=linear,cosine", *TINY, "trainer=ddp", "trainer.accelerator=cpu",
                        "trainer.devices=2", "callbacks=posthoc_ema", "callbacks.posthoc_ema.every_n_steps=2",
                        f"hydra.sweep.dir={tmp_path}", timeout=600))
    assert out.count("GLOBAL_RANK: 1, MEMBER: 2/2") == 2 and out.count("Launching 2 jobs locally") == 1
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(jobs) == 2
    for job in jobs:
        ckpt = load_checkpoint(job / "checkpoints" / "last.ckpt")
        # 2 ranks x 4 batches of 16: each rank takes half of every epoch's batches
        assert ckpt["global_step"] == 4 and ckpt["difflab_config"]["trainer"]["devices"] == 2
        assert (job / "train_rank1.log").is_file()
        snaps = snapshots(job)
        assert [s.step for s in snaps] == [2, 4]
        last = torch.load(snaps[-1].path, weights_only=True)
        assert last["images"] == 4 * 16 * 2  # 4 steps of 16 images on each of 2 ranks
        state = ckpt["callbacks"]["PostHocEMA"]["profiles"]  # the checkpoint (rank 0's, saved collectively) and the file agree
        assert all(torch.equal(state[i][k], last["profiles"][i][k]) for i in (0, 1) for k in state[i])


# bad input -----------------------------------------------------------------------------------------------


def test_timesteps_below_two_is_a_clear_error(tmp_path):
    result = run_script("train.py", "timesteps=1", *TINY, f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "timesteps must be an integer >= 2, got 1" in result.stderr


def test_betas_outside_unit_interval_is_a_clear_error(tmp_path):
    cfg = compose_cfg([*TINY, "schedule.beta_end=1.5"], tmp_path)
    with pytest.raises(Exception, match=r"every beta must lie in \(0, 1\).*beta_end"):
        train(cfg)


def test_missing_data_names_the_path(tmp_path):
    result = run_script("train.py", *TINY, f"data.path={tmp_path}/missing.npz", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert f"{tmp_path}/missing.npz" in result.stderr and "pixel_sprites_16x16.npz" in result.stderr


def test_checkpoint_that_does_not_fit_names_keys_and_shapes(tmp_path):
    train(compose_cfg([*TINY, "~callbacks.sample_grid"], tmp_path / "tiny"))
    cfg = compose_cfg(["debug=fast", "model=unet_tiny", "model.base_channels=32", f"ckpt_path={tmp_path / 'tiny'}"], tmp_path / "big")
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    msg = str(err.value)
    assert "does not fit" in msg and "shape differs" in msg and "conv_in.bias: checkpoint (16,) vs model (32,)" in msg
    cfg = compose_cfg(["debug=fast", "model=unet_tiny", "model.num_res_blocks=2", f"ckpt_path={tmp_path / 'tiny'}"], tmp_path / "deep")
    with pytest.raises(CheckpointError, match="missing in checkpoint"):
        train(cfg)


def test_unknown_schedule_on_the_cli_lists_options(tmp_path):
    result = run_script("train.py", "schedule=sigmoid", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "Could not find 'schedule/sigmoid'" in result.stderr and "cosine" in result.stderr and "linear" in result.stderr


def test_missing_checkpoint_path_is_a_clear_error(tmp_path):
    cfg = compose_cfg([*TINY, f"ckpt_path={tmp_path}/nope.ckpt"], tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        train(cfg)


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    bad = Path(tmp_path) / "weights.ckpt"
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError, match="not a difflab checkpoint"):
        load_checkpoint(bad)
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(bad)


def test_the_data_is_hashed_after_prepare_data(tmp_path, monkeypatch):
    """CIFAR-10 downloads in prepare_data: the identity saved in checkpoints must hash the files it leaves, not what was
    there before."""
    from difflab.data.datamodule import ArrayDataModule
    from difflab.data.sprites import SpritesDataModule

    order = []
    monkeypatch.setattr(SpritesDataModule, "prepare_data", lambda self: order.append("prepare_data"), raising=False)
    identity = ArrayDataModule.identity
    monkeypatch.setattr(ArrayDataModule, "identity", lambda self: order.append("identity") or identity(self))
    train(compose_cfg(TINY, tmp_path))
    assert order[:2] == ["prepare_data", "identity"]
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["difflab_data"]
    assert hashlib.sha256((Path(compose_cfg(TINY, tmp_path).data.path)).read_bytes()).hexdigest() in saved["files"].values()


def test_a_multi_process_run_is_told_its_global_batch():
    from difflab.train import global_batch_note

    assert global_batch_note(1, 128, 2e-4) is None
    note = global_batch_note(4, 128, 2e-4)
    assert "4 processes x data.batch_size=128 = 512 images per step" in note
    assert "data.batch_size=32" in note and "optim.optimizer.lr=0.0008" in note
    assert "scale the learning rate" not in global_batch_note(2, 64, None)  # an optimizer on its own default learning rate
