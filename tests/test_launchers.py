"""The SLURM sweep launcher: it cannot run here, so submitit runs its jobs in-process ("debug"
cluster, see slurm_shim/sitecustomize.py) while the SLURM parameters it would submit are recorded."""

import json

from omegaconf import OmegaConf

from difflab.config import PROJECT_ROOT

from support import compose_cfg, run_script


def test_slurm_launcher_composes_with_one_task_per_device(tmp_path):
    cfg = compose_cfg(["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], tmp_path)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        full = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
                       return_hydra_config=True)
    launcher = full.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 4 == launcher.gpus_per_node == cfg.trainer.devices
    assert launcher.nodes == 2 == cfg.trainer.num_nodes


def test_slurm_sweep_submits_each_job_with_its_config(tmp_path):
    record = tmp_path / "slurm.json"
    result = run_script(
        "train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=90",
        "schedule=linear,cosine", "model=unet_tiny", "debug=fast", "~callbacks.sample_grid", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        env={"PYTHONPATH": str(PROJECT_ROOT / "tests" / "slurm_shim"), "DIFFLAB_SLURM_RECORD": str(record)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    submitted = json.loads(record.read_text())
    assert submitted["cluster"] == "slurm"
    params = submitted["params"]
    assert params["slurm_partition"] == "gpu" and params["timeout_min"] == 90
    assert submitted["init"]["slurm_max_num_timeout"] == "3"  # requeued on timeout, then resumed by ckpt_path=auto
    assert params["tasks_per_node"] == 1 == params["gpus_per_node"] and params["nodes"] == 1
    assert submitted["folder"].startswith(str(tmp_path / "sweep" / ".submitit"))
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith("."))
    schedules = [OmegaConf.load(job / ".hydra" / "config.yaml").schedule._target_ for job in jobs]
    assert schedules == ["difflab.schedules.LinearSchedule", "difflab.schedules.CosineSchedule"]
    assert all((job / "checkpoints" / "last.ckpt").is_file() for job in jobs)
