"""Loaded by the SLURM launcher test (PYTHONPATH): submitit runs the jobs in-process ("debug"
cluster) instead of calling sbatch, and records the SLURM parameters it was asked for."""

import json
import os

import submitit

_AutoExecutor = submitit.AutoExecutor
RECORD = os.environ["DIFFLAB_SLURM_RECORD"]


class RecordingExecutor(_AutoExecutor):
    def __init__(self, folder, cluster=None, **kwargs):
        self._record = {"cluster": cluster, "folder": str(folder), "init": {k: str(v) for k, v in kwargs.items()}}
        super().__init__(folder, cluster="debug", **kwargs)

    def update_parameters(self, **kwargs):
        self._record["params"] = {k: (v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else str(v)) for k, v in kwargs.items()}
        with open(RECORD, "w") as f:
            json.dump(self._record, f)
        super().update_parameters(**{k: v for k, v in kwargs.items() if not k.startswith("slurm_")})


submitit.AutoExecutor = RecordingExecutor
