"""Callbacks: sample grids (and the denoising chain) from the EMA weights, to disk and to the logger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from difflab.generate import generate
from difflab.images import grid, save_gif, save_png
from difflab.samplers.base import Sampler

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast_dtype(trainer: L.Trainer) -> torch.dtype | None:
    return AUTOCAST.get(str(trainer.precision))


def due_this_epoch(trainer: L.Trainer, every_n_epochs: int) -> bool:
    """Every n-th epoch, and the last one (so a run always ends with an evaluation)."""
    last_epoch = trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1
    return (trainer.current_epoch + 1) % every_n_epochs == 0 or last_epoch


def class_contexts(num_classes: int, per_class: int) -> torch.Tensor:
    """One-hot contexts, ``per_class`` per class, class-major: one grid row per class."""
    return torch.eye(num_classes).repeat_interleave(per_class, 0)


class SampleGrid(L.Callback):
    """Every ``every_n_epochs`` validation epochs, sample a fixed-seed grid (one row per class).

    It runs after the first validation batch, while the WeightAveraging callback has the EMA weights
    swapped in, whatever the order of the callbacks.
    """

    def __init__(self, sampler: Sampler, every_n_epochs: int = 5, per_class: int = 8, n_uncond: int = 64,
                 seed: int = 0, guidance: float = 0.0, chain: bool = True, chain_every: int = 1) -> None:
        self.sampler = sampler
        self.every_n_epochs = every_n_epochs
        self.per_class = per_class
        self.n_uncond = n_uncond
        self.seed = seed
        self.guidance = guidance
        self.chain = chain
        self.chain_every = chain_every
        self.last_path: Path | None = None

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if due_this_epoch(trainer, self.every_n_epochs):
            self.render(trainer, pl_module)

    @torch.no_grad()
    def render(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        net, schedule = pl_module.net, pl_module.schedule
        k = getattr(net, "num_classes", 0)
        contexts = class_contexts(k, self.per_class) if k else None
        n, nrow = (len(contexts), self.per_class) if k else (self.n_uncond, 8)
        shape = (net.in_channels, net.image_size, net.image_size)
        out = generate(net, schedule, self.sampler, n, shape, contexts, self.guidance, self.seed,
                       record_every=self.chain_every if self.chain else 0, autocast_dtype=autocast_dtype(trainer))
        tag = f"epoch{trainer.current_epoch:04d}_step{trainer.global_step:07d}"
        folder = Path(trainer.default_root_dir) / "samples"
        image = grid(out.images, nrow)
        self.last_path = save_png(image, folder / f"{tag}.png")
        media = {"samples/grid": [image]}
        if self.chain and out.chain:
            frames = [grid(x, nrow) for x in out.chain]
            save_gif(frames, folder / f"{tag}_chain.gif")
            save_gif([grid(x, nrow) for x in out.x0_chain[1:]], folder / f"{tag}_x0.gif")
            media["samples/chain"] = str(folder / f"{tag}_chain.gif")
        self.log_media(trainer, media, pl_module)
        return self.last_path

    def log_media(self, trainer: L.Trainer, media: dict[str, Any], pl_module: L.LightningModule) -> None:
        names = getattr(pl_module, "class_names", [])
        caption = "rows: " + ", ".join(names) if names else "unconditional"
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.log_image("samples/grid", media["samples/grid"], step=trainer.global_step, caption=[caption])
                if "samples/chain" in media:
                    logger.experiment.log({"samples/chain": wandb.Video(media["samples/chain"], format="gif"),
                                           "trainer/global_step": trainer.global_step})
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples/grid", media["samples/grid"][0], trainer.global_step, dataformats="HWC")
