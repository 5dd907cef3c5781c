"""TimeBudget: with trainer.max_time the run ends at the end of its LR schedule, inside the budget."""

from __future__ import annotations

import pytest

from difflab.budget import TimeBudget
from difflab.checkpoint import load_checkpoint
from difflab.train import train

from support import compose_cfg, read_metrics


class FakeClock:
    """0.1 s per step, a 10 s budget: the real Timer (1 h) never fires, so the test is deterministic."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def time_elapsed(self, stage: str = "train") -> float:
        return 0.1 * self.trainer.global_step

    def time_remaining(self, stage: str = "train") -> float:
        return 10.0 - self.time_elapsed()


def test_the_run_ends_at_the_end_of_its_schedule_inside_the_budget(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(TimeBudget, "timer", staticmethod(lambda trainer: FakeClock(trainer)))
    monkeypatch.setattr(TimeBudget.__init__, "__defaults__", (5, 0.95))  # measure after 5 steps
    cfg = compose_cfg(["model=unet_tiny", "timesteps=50", "data.batch_size=8", "data.limit=64", "trainer.max_epochs=-1",
                       "trainer.max_time=00:01:00:00", "trainer.log_every_n_steps=1", "optim.lr_scheduler.scheduler.warmup_steps=2",
                       "~callbacks.sample_grid", "~callbacks.progress_bar", "trainer.enable_progress_bar=false"], tmp_path)
    train(cfg)
    rows = [r for r in read_metrics(tmp_path) if r.get("lr-AdamW")]
    # step 5: 0.1 s/step, 9.5 s left -> 0.95 * 9.5 / 0.1 = 90 more steps, total 95; re-checked half way each time:
    # step 50: 5 s left -> 47 more, 97; step 73: 2.7 s -> 25 more, 98; step 85: 1.5 s -> 14 more, 99 (< 20 left: the
    # last check): the run ends at step 99 of the 100 the budget holds, the schedule decayed to its end there
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 99
    (state,) = [v for k, v in ckpt["callbacks"].items() if "TimeBudget" in k]
    assert state == {"total_steps": 99, "recheck_at": None}
    lr_end = float(rows[-1]["lr-AdamW"])
    assert lr_end == pytest.approx(cfg.optim.optimizer.lr * cfg.optim.lr_scheduler.scheduler.min_lr_ratio, rel=0.05)
