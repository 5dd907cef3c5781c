"""The LightningModule that tunes a trained diffusion model into a consistency model (objectives/consistency.py).

python train.py experiment=sprites_consistency init_from=<checkpoint | run dir | pretrained>: the network starts from
the EMA weights of ``init_from``, and a frozen copy of those weights is the teacher whose guided DDIM steps make the
pairs. The teacher is read from that checkpoint at construction, also when a cut run resumes, so checkpoints hold the
student alone (the same keys as any model's: sample.py, evaluate.py and the export read them as they are).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from difflab.errors import ConfigError
from difflab.model import DiffusionModel, load_model
from difflab.module import DiffusionModule
from difflab.objectives import Consistency


class ConsistencyTuning(DiffusionModule):
    def __init__(self, model: DiffusionModel, optimizer: Callable[..., torch.optim.Optimizer], teacher: str | None,
                 lr_scheduler: dict[str, Any] | None = None, search_dir: str = "logs", channels_last: bool = False,
                 compile: bool = False) -> None:
        if not isinstance(model.objective, Consistency):
            raise ConfigError(f"module=consistency tunes a consistency model: add objective=consistency (got {model.objective!r})")
        if not teacher:
            raise ConfigError("consistency tuning starts from a trained model: add init_from=<checkpoint | run dir | pretrained>")
        # no context dropout: the student learns the guided samples of each class, the null context is not used
        super().__init__(model, optimizer, lr_scheduler, p_uncond=0.0, channels_last=channels_last, compile=compile)
        taught_by = load_model(teacher, search_dir=Path(search_dir))
        taught = (taught_by.config.get("objective") or {}).get("_target_")
        own = model.config["objective"]["prediction"]["_target_"]
        if taught != own:
            raise ConfigError(f"init_from {taught_by.source} predicts with {taught}, the consistency model would read its "
                              f"output as {own}: set objective.prediction._target_={taught}")
        schedule, taught_schedule = model.config.get("schedule"), taught_by.config.get("schedule")
        if schedule != taught_schedule:
            name = str((taught_schedule or {}).get("_target_", "?")).rsplit(".", 1)[-1]
            raise ConfigError(f"init_from {taught_by.source} was trained on the schedule {taught_schedule}, this run has {schedule}: "
                              f"tune on the teacher's schedule (schedule=... and timesteps=... as in that run; it is a {name})")
        # a plain attribute, not a submodule: never trained, averaged or saved (it moves with the module in on_fit_start)
        self.__dict__["teacher"] = taught_by.net.requires_grad_(False)
        # the slow copy of the network that makes the targets (target_ema > 0): a child, so checkpoints keep it and a
        # resumed run continues with it (loaders read net.* only)
        self.target_net = copy.deepcopy(model.net).requires_grad_(False) if model.objective.target_ema > 0 else None

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    def on_train_start(self) -> None:
        # here the step count is restored (at on_fit_start a resumed run still reads 0)
        if self.target_net is not None and self.global_step == 0:
            self.target_net.load_state_dict(self.net.state_dict())  # the weights init_from loaded (a resume restores its own)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.target_net is not None:
            mu = self.model.objective.target_ema
            with torch.no_grad():
                # theta^- <- mu theta^- + (1 - mu) theta
                for slow, fast in zip(self.target_net.parameters(), self.net.parameters()):
                    slow.lerp_(fast, 1 - mu)

    def step_loss(self, x0: Tensor, context: Tensor) -> Tensor:
        objective: Consistency = self.model.objective
        t = objective.sample_t(self.schedule, x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        net = self._compiled_forward or self.net
        loss = objective.pair_loss(net, self.teacher, self.schedule, x0, t, noise, self.global_step,
                                   context if self.conditional else None, self.target_net)
        self.log("train/stage", float(min(self.global_step // objective.stage_steps, objective.max_stage)), batch_size=1)
        return loss
