"""TimeBudget: with trainer.max_time the run ends at the end of its LR schedule, inside the budget."""

from __future__ import annotations

import pytest

from difflab.budget import TimeBudget
from difflab.checkpoint import load_checkpoint
from difflab.train import train

from support import compose_cfg, read_metrics


class FakeClock:
    """0.1 s per step, a 10 s budget: the real Timer (1 h) never fires, so the test is deterministic. From step
    ``since`` on, ``per_step`` seconds a step (a resumed run on a slower machine)."""

    def __init__(self, trainer, per_step: float = 0.1, since: int = 0, budget: float = 10.0) -> None:
        self.trainer, self.per_step, self.since, self.budget = trainer, per_step, since, budget

    def time_elapsed(self, stage: str = "train") -> float:
        step = self.trainer.global_step
        return 0.1 * min(step, self.since) + self.per_step * max(step - self.since, 0)

    def time_remaining(self, stage: str = "train") -> float:
        return self.budget - self.time_elapsed()


BUDGETED = ["model=unet_tiny", "timesteps=50", "data.batch_size=8", "data.limit=64", "trainer.max_epochs=-1",
            "trainer.max_time=00:01:00:00", "trainer.log_every_n_steps=1", "optim.lr_scheduler.scheduler.warmup_steps=2",
            "callbacks.sample_grid.every_n_epochs=1000", "callbacks.sample_grid.per_class=1", "callbacks.sample_grid.chain=false",
            "callbacks.sample_grid.sampling.steps=2", "~callbacks.progress_bar", "trainer.enable_progress_bar=false"]


def test_the_run_ends_at_the_end_of_its_schedule_inside_the_budget(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(TimeBudget, "timer", staticmethod(lambda trainer: FakeClock(trainer)))
    monkeypatch.setattr(TimeBudget.__init__, "__defaults__", (5, 0.95))  # measure after 5 steps
    cfg = compose_cfg(BUDGETED, tmp_path)
    train(cfg)
    rows = [r for r in read_metrics(tmp_path) if r.get("lr-AdamW")]
    # 8 steps per epoch (64 images, batch 8). step 5: 0.1 s/step, 9.5 s left -> 0.95 * 9.5 / 0.1 = 90 more steps, 95,
    # down to the epoch end 88; re-checked half way each time: step 46: 5.4 s left -> 51 more, 97 -> 96; step 71:
    # 2.9 s -> 27 more, 98 -> 96; step 83: 1.7 s -> 16 more, 99 -> 96 (< 20 left: the last check): the run ends at the
    # end of epoch 11, step 96 of the 100 the budget holds, the schedule decayed to its end there, and validates there
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 96
    (state,) = [v for k, v in ckpt["callbacks"].items() if "TimeBudget" in k]
    assert state == {"total_steps": 96, "recheck_at": None}
    assert max(int(r["step"]) for r in read_metrics(tmp_path) if r.get("val/loss")) == 95  # the last step's validation
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["epoch0011_step0000096.png"]  # and its grid
    lr_end = float(rows[-1]["lr-AdamW"])
    assert lr_end == pytest.approx(cfg.optim.optimizer.lr * cfg.optim.lr_scheduler.scheduler.min_lr_ratio, rel=0.05)


def test_a_resumed_run_fits_the_rest_of_its_schedule_to_its_own_speed(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(TimeBudget.__init__, "__defaults__", (5, 0.95))
    monkeypatch.setattr(TimeBudget, "timer", staticmethod(lambda trainer: FakeClock(trainer)))
    train(compose_cfg([*BUDGETED, "+callbacks.stop._target_=support.StopAfterEpoch", "+callbacks.stop.epoch=4"], tmp_path))

    def state():
        return next(v for k, v in load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["callbacks"].items() if "TimeBudget" in k)

    assert state() == {"total_steps": 88, "recheck_at": 46}  # fitted at step 5 (as above), stopped at step 40
    # resumed at half the speed: 0.2 s/step from step 40 (4 s spent); at step 45, 5 s left -> 0.95 * 5 / 0.2 = 23 more
    # steps, 68, down to the epoch end 64 (under 20 steps left: no re-check). Kept at 88, the run would overrun by 3.6 s
    monkeypatch.setattr(TimeBudget, "timer", staticmethod(lambda trainer: FakeClock(trainer, per_step=0.2, since=40)))
    train(compose_cfg(BUDGETED, tmp_path))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 64
    assert state() == {"total_steps": 64, "recheck_at": None}


def test_a_finished_run_resumed_with_a_larger_budget_goes_on(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(TimeBudget.__init__, "__defaults__", (5, 0.95))
    monkeypatch.setattr(TimeBudget, "timer", staticmethod(lambda trainer: FakeClock(trainer)))
    train(compose_cfg(BUDGETED, tmp_path))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 96  # as in the first test
    # (the fake clock holds the budget; another trainer.max_time only makes it another config, not skipped as done)
    longer = [*BUDGETED, "trainer.max_time=00:02:00:00"]
    # still 10 s: 0.4 s left, 4 steps at 0.1 s/step, fewer than a measurement: nothing more to do
    train(compose_cfg(longer, tmp_path))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 96
    # a 20 s budget: 10.4 s left, room for 104 steps; measured at step 101: 9.9 s left -> 0.95 * 9.9 / 0.1 = 94 more,
    # 195, down to the epoch end 192; re-checked at 146: 5.4 s left -> 51 more, 197 -> 192; 169: 3.1 s -> 29, 198 ->
    # 192; 180: 2.0 s -> 19, 199 -> 192 (under 20 left): the run ends at step 192
    monkeypatch.setattr(TimeBudget, "timer", staticmethod(lambda trainer: FakeClock(trainer, budget=20.0)))
    train(compose_cfg([*BUDGETED, "trainer.max_time=00:03:00:00"], tmp_path))
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 192
    assert next(v for k, v in ckpt["callbacks"].items() if "TimeBudget" in k) == {"total_steps": 192, "recheck_at": None}
