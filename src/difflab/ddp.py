"""Multi-process launch under Hydra.

Lightning starts DDP ranks 1..N-1 by re-running ``sys.argv``; inside a ``-m`` sweep that re-runs the
whole sweep (and into the wrong folder). The command built here re-runs only the current job: its
own overrides, in its own output folder. SLURM and torchrun start the ranks themselves and are
not affected.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def hydra_job_command(local_rank: int) -> tuple[Sequence[str], str]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    hc = HydraConfig.get()
    command = [sys.executable, to_absolute_path(sys.argv[0]), *hc.overrides.task]
    command += [
        f'hydra.run.dir="{hc.runtime.output_dir}"',  # quoted: job folders contain "=" and ","
        f"hydra.job.name={hc.job.name}_rank{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def use_job_command_for_ddp_ranks() -> None:
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

    for module in (fabric_launcher, trainer_launcher):
        module._hydra_subprocess_cmd = hydra_job_command
