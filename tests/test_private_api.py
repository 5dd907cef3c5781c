"""The two private Lightning attributes the project still relies on (no public API does their job), each used in one
place: these tests fail loudly when a Lightning upgrade moves or changes them."""

from __future__ import annotations

import inspect


def test_lightning_still_asks_hydra_subprocess_cmd_for_the_ddp_rank_command():
    """difflab.ddp replaces it so that DDP ranks inside a -m sweep re-run only their own job."""
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

    from difflab.ddp import hydra_job_command

    for module in (fabric_launcher, trainer_launcher):
        original = module._hydra_subprocess_cmd
        assert list(inspect.signature(original).parameters) == list(inspect.signature(hydra_job_command).parameters) == ["local_rank"]
        assert "_hydra_subprocess_cmd(" in inspect.getsource(module)  # called by name at launch time, so replacing it works


def test_lightning_still_lists_its_precisions_where_validate_reads_them():
    """difflab.validate.precisions checks trainer.precision before Lightning builds anything."""
    from difflab.validate import precisions

    assert {"32", "32-true", "16-mixed", "bf16-mixed", "bf16-true", "64"} <= set(precisions())
