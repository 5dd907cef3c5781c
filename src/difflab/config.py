"""Hydra glue: resolvers used by conf/, the project root, and building objects from a composed config."""

from __future__ import annotations

import itertools
import os
import re
import secrets
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# overrides that do not make a configuration: where things go, how they are logged, what the report compares against
NOT_A_SETTING = re.compile(r"^(seed|ckpt_path|logger|hydra\..*|hydra/.*|paths\..*|report\..*|trainer\.devices|trainer\.accelerator|"
                           r"trainer\.enable_progress_bar|metrics\.(classifier_ckpt|classifiers_dir|cache_dir)|data\.(root|path|labels_path|verify_checksums))$")


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """key -> value of Hydra overrides as typed ("+a.b=1" -> {"a.b": "1"}); deletions (~key) left out."""
    return dict(o.lstrip("+").split("=", 1) for o in overrides if "=" in o and not o.startswith("~"))


def configuration_label(cfg: Any) -> str | None:
    """This job's configuration as its sweep's report names it: the values of the keys its -m sweep varies
    ("schedule=cosine,timesteps=512"), seed, the run config's report.replicates and NOT_A_SETTING left out; a single
    run: its settings overrides ("defaults" if none); None outside a Hydra run. Runs with one label are seeds of one
    configuration."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    replicates = list((cfg.get("report") or {}).get("replicates") or ["seed"])
    given = parse_overrides(hc.overrides.task)
    settings = {k: v for k, v in given.items() if not NOT_A_SETTING.match(k) and k not in replicates}
    if hc.mode == RunMode.MULTIRUN:
        try:  # the sweep's own command line says which keys it varies
            parsed = OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if "=" in a and not a.startswith("-")])
            swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
            settings = {k: v for k, v in settings.items() if k in swept}
        except OverrideParseException:  # an argument Hydra reads differently: every setting then names the configuration
            pass
    return ",".join(f"{k}={v}" for k, v in settings.items()) or "defaults"

def _run_name() -> str:
    """The command-line overrides of this job ("schedule=cosine,timesteps=512"), or "default"."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "default"
    return HydraConfig.get().job.override_dirname or "default"


def job_folder_name(overrides: str) -> str:
    """A sweep job's folder name from its overrides, in characters a command line takes unquoted, so that a path into
    it can be given as an override (ckpt=<sweep>/1_schedule-cosine_seed-1/...): schedule=cosine,seed=1 ->
    schedule-cosine_seed-1. The exact overrides stay in the job's .hydra/overrides.yaml."""
    return re.sub(r"[^\w.+-]+", "_", overrides.replace("=", "-")).strip("_") or "default"


def _sweep_group() -> str | None:
    """For a -m sweep: one name shared by all its jobs (task + sweep folder); None for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return f"{hc.job.name}-{Path(hc.sweep.dir).name}"


# 4 hex digits from a random start, then counting up: the runs of one process (a sweep's jobs) never share a name, and
# two processes that start in the same second share one with probability 1/65536
_SUFFIXES = itertools.count(secrets.randbelow(65536))


def _run_id(task: str = "") -> str:
    """A run (or sweep) folder's name that no other run shares.

    Default: <date>_<time>_<4 random hex digits>. Where every process of a run computes it for itself, the
    launcher's job identity instead, so that they agree and a requeued job finds its folder again:
    SLURM training jobs and multi-task SLURM steps -> slurm-<job id>[_<array task>][.<step>];
    torchrun -> <date>_<time>_torchrun-<run id>.
    """
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    env = os.environ
    job = env.get("SLURM_JOB_ID")
    if job and not env.get("SUBMITIT_EXECUTOR") and (task == "train" or int(env.get("SLURM_NTASKS", "1")) > 1):
        if env.get("SLURM_ARRAY_JOB_ID"):
            job = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
        step = env.get("SLURM_STEP_ID")
        return f"slurm-{job}" + (f".{step}" if step else "")
    run = env.get("TORCHELASTIC_RUN_ID")
    if run and run != "none" and int(env.get("WORLD_SIZE", "1")) > 1:
        return f"{stamp}_torchrun-{run}"
    return f"{stamp}_{next(_SUFFIXES) % 65536:04x}"


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls/convolutions in hardware (without them bf16 autocast is slower)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def cuda_has_bf16() -> bool:
    """bf16 in the GPU's tensor cores: compute capability 8.0 or later (A100, RTX 30xx, H100, ...). Not
    torch.cuda.is_bf16_supported(), which also counts the emulated bf16 of a V100 or T4 (slower than fp16 there)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def fast_precision(accelerator: str = "auto") -> str:
    """The default trainer.precision: bf16-mixed where the hardware runs bf16 natively; on other GPUs 16-mixed (with
    Lightning's gradient scaler), on other CPUs 32."""
    import torch

    use_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if use_cuda:
        return "bf16-mixed" if cuda_has_bf16() else "16-mixed"
    return "bf16-mixed" if cpu_has_bf16() else "32"


def use_tf32(enabled: bool) -> None:
    """float32 matmuls on TF32 tensor cores on CUDA (about 8x an A100's float32 rate, 10 mantissa bits; convolutions use
    TF32 by default in PyTorch); nothing changes on a CPU."""
    import torch

    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high" if enabled else "highest")


def hydra_choice(group: str) -> str | None:
    """The option chosen for a config group (data=sprites -> "sprites"), None outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def register_resolvers() -> None:
    os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))
    OmegaConf.register_new_resolver("len", lambda x: len(x), replace=True)
    OmegaConf.register_new_resolver("fast_precision", fast_precision, replace=True)
    OmegaConf.register_new_resolver("difflab_run_name", _run_name, replace=True)
    OmegaConf.register_new_resolver("difflab_sweep_group", _sweep_group, replace=True)
    OmegaConf.register_new_resolver("difflab_job_folder", job_folder_name, replace=True)
    # cached: every read of hydra.run.dir in this process (and every job of a sweep) gets the same folder
    OmegaConf.register_new_resolver("difflab_run_id", _run_id, replace=True, use_cache=True)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Callbacks/loggers: a dict of named configs (entries without _target_ or null are skipped)."""
    from hydra.utils import instantiate

    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def plain(value: Any) -> Any:
    """A config value as plain Python (lists, dicts, resolved), anything else as it is."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
