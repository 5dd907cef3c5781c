"""Every config group option and experiment composes, resolves and builds its objects."""

import re
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from difflab.config import PROJECT_ROOT, _run_id, instantiate_group, job_folder_name
from difflab.nn.unet import UNet
from difflab.schedules import CosineSchedule, LinearSchedule
from difflab.train import build_module

from support import compose_cfg

CONF = PROJECT_ROOT / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_defaults_compose_to_sprites_unet_linear(tmp_path):
    cfg = compose_cfg([], tmp_path)
    assert cfg.data._target_.endswith("SpritesDataModule")
    assert cfg.model.num_classes == 6 and cfg.model.image_size == 16
    schedule = instantiate(cfg.schedule)
    assert isinstance(schedule, LinearSchedule) and schedule.timesteps == 1000


def test_schedule_group_and_top_level_timesteps(tmp_path):
    cfg = compose_cfg(["schedule=cosine", "timesteps=512"], tmp_path)
    schedule = instantiate(cfg.schedule)
    assert isinstance(schedule, CosineSchedule)
    assert schedule.timesteps == 512 and schedule.betas.shape == (512,)


@pytest.mark.parametrize("group", ["data", "model", "schedule", "optim", "trainer", "callbacks", "logger", "debug", "experiment", "module"])
def test_every_option_of_every_group_composes_and_resolves(tmp_path, group):
    for option in options(group):
        cfg = compose_cfg([f"{group}={option}"], tmp_path)
        resolved = {k: cfg[k] for k in cfg if k != "hydra"}
        assert resolved, option
        # interpolations resolve (model sizes from data, a T-step schedule's T from the top level)
        assert cfg.model.image_size == cfg.data.image_size
        assert cfg.schedule.get("timesteps", cfg.timesteps) == cfg.timesteps


@pytest.mark.parametrize("option", options("model"))
def test_model_presets_build(tmp_path, option):
    cfg = compose_cfg([f"model={option}"], tmp_path)
    net = instantiate(cfg.model)
    assert isinstance(net, UNet)
    if option != "unet_cifar":  # 35.7M params: built above, not run here
        x = torch.randn(2, 3, 16, 16)
        assert net(x, torch.tensor([0, 999]), torch.eye(6)[:2]).shape == x.shape


def test_cifar_preset_is_the_ddpm_network(tmp_path):
    cfg = compose_cfg(["data=cifar10", "model=unet_cifar", "model.num_classes=0"], tmp_path)
    net = instantiate(cfg.model)
    assert sum(p.numel() for p in net.parameters()) == 35_746_307


@pytest.mark.parametrize("option", options("optim"))
def test_optim_options_build_optimizer_and_scheduler(tmp_path, option):
    cfg = compose_cfg([f"optim={option}", "model=unet_tiny"], tmp_path)
    module = build_module(cfg)
    opt = module.optimizer_factory(params=module.parameters())
    assert isinstance(opt, torch.optim.AdamW)
    sched_cfg = dict(module.lr_scheduler_cfg)
    factory = sched_cfg.pop("scheduler")
    kwargs = {"total_steps": 100} if option != "plateau" else {}
    factory(optimizer=opt, **kwargs)
    assert sched_cfg["interval"] in ("step", "epoch")


def test_callbacks_and_loggers_instantiate(tmp_path):
    cfg = compose_cfg(["logger=csv"], tmp_path)
    names = {type(c).__name__ for c in instantiate_group(cfg.callbacks)}
    assert {"EMA", "ModelCheckpoint", "LearningRateMonitor", "SampleGrid", "RichProgressBar"} <= names
    ema = instantiate(cfg.callbacks.ema)
    assert ema._use_buffers is False  # the schedule buffers are never averaged
    assert [type(lg).__name__ for lg in instantiate_group(cfg.logger)] == ["CSVLogger"]


@pytest.mark.parametrize("override", ["schedule=quadratic", "model=resnet", "data=mnist"])
def test_unknown_group_option_lists_the_choices(tmp_path, override):
    group, bad = override.split("=")
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg([override], tmp_path)
    msg = str(err.value)
    assert bad in msg and "Available options" in msg
    for option in options(group):
        assert option in msg


def test_ddp_trainer_preset_targets_multi_gpu(tmp_path):
    cfg = compose_cfg(["trainer=ddp", "trainer.devices=4", "trainer.precision=bf16-mixed", "data=cifar10"], tmp_path)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 4 and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.num_nodes == 1


def test_run_folders_started_in_the_same_second_differ(monkeypatch):
    for key in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(key, raising=False)
    names = {_run_id("train") for _ in range(50)}
    assert len(names) == 50  # the same second, 50 different folders (4 random hex digits after the time stamp)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{4}", n) for n in names)
    hydra_cfg = (CONF / "hydra" / "default.yaml").read_text()
    assert hydra_cfg.count("${difflab_run_id:${task_name}}") == 2 and "${hydra.job.num}" in hydra_cfg


@pytest.mark.parametrize("overrides, folder", [("schedule=cosine,seed=1", "schedule-cosine_seed-1"), ("", "default"),
                                               ("model.widths=[32,64],lr=1e-3", "model.widths-_32_64_lr-1e-3"),
                                               ("data.root=/a b/c,+x=1", "data.root-_a_b_c_+x-1")])
def test_sweep_job_folders_can_be_given_back_as_an_override(overrides, folder):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert job_folder_name(overrides) == folder
    path = f"logs/train/multiruns/2026-12-06_10-00-00_abcd/3_{folder}/checkpoints/last.ckpt"
    assert OverridesParser.create().parse_overrides([f"ckpt={path}"])[0].value() == path  # no quoting needed
    assert "${difflab_job_folder:${hydra.job.override_dirname}}" in (CONF / "hydra" / "default.yaml").read_text()


def test_slurm_training_jobs_keep_their_folder_across_requeues(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert _run_id("train") == _run_id("train") == "slurm-4242"  # every task and every requeue of the job
    assert _run_id("sample").endswith(tuple("0123456789abcdef")) and not _run_id("sample").startswith("slurm")
    monkeypatch.setenv("SLURM_NTASKS", "4")  # a multi-task step: its ranks must agree on one folder
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert _run_id("evaluate") == "slurm-4242.0"


def test_data_paths_point_inside_the_repo(tmp_path):
    cfg = compose_cfg([], tmp_path)
    assert Path(cfg.data.path) == PROJECT_ROOT / "data" / "sprites" / "pixel_sprites_16x16.npz"
    assert Path(cfg.data.path).is_file()


def test_cifar10_brings_the_ddpm_network_and_optimizer_unless_overridden(tmp_path):
    cfg = compose_cfg(["data=cifar10"], tmp_path)
    assert cfg.model.base_channels == 128 and cfg.model.image_size == 32 and cfg.model.num_classes == 10
    assert cfg.optim.optimizer.lr == 2e-4 and cfg.optim.lr_scheduler.scheduler.warmup_steps == 5000
    cfg = compose_cfg(["data=cifar10", "model=unet_tiny", "optim=cosine"], tmp_path)
    assert cfg.model.base_channels == 16 and cfg.optim.optimizer.lr == 1e-3


def test_sampling_defaults_agree_between_sample_evaluate_and_the_callbacks(tmp_path):
    """One sampling request by default (conf/sampling/default.yaml): sample.py, evaluate.py and the training-time grids and
    quality scores sample alike unless told otherwise (the numbers in docs/ are made with it)."""
    from difflab.sampling import SamplingSpec

    sample, evaluate = (compose_cfg([], tmp_path, config_name=name) for name in ("sample", "evaluate"))
    train = compose_cfg(["callbacks=[default,sample_quality]"], tmp_path)
    nodes = (sample, evaluate, train.callbacks.sample_grid.sampling, train.callbacks.sample_quality.sampling)
    found = [{k: c[k] for k in SamplingSpec.keys() if k != "batch_size"} for c in nodes]
    assert all(f == found[0] for f in found), found
    assert [c.batch_size for c in nodes] == [256, 256, 256, 128]  # 128: the callback's 256 samples in two chunks (two DDP ranks)
    # sampler=auto: DPM-Solver++ 15 for a diffusion model, consistency sampling in 2 steps for a consistency model
    assert found[0]["sampler"]["diffusion"]["_target_"] == "difflab.samplers.DPMSolverPP2MSampler" and found[0]["guidance"] == 2.0
    assert found[0]["sampler"]["diffusion"]["steps"] == 15 and found[0]["sampler"]["consistency"]["steps"] == 2


def test_a_sampling_value_may_interpolate_the_entry_points_config(tmp_path):
    from difflab.sampling import SamplingSpec

    spec = SamplingSpec.from_config(compose_cfg(["n=5", "batch_size=${n}", "sampler=ddim", "steps=7"], tmp_path, config_name="sample"))
    assert spec.batch_size == 5 and spec.sampler.steps == 7 and spec.sampler.name == "ddim"
