"""Lightning's EMA callback, with one change: the raw weights stay in the module when training ends."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging


class EMA(EMAWeightAveraging):
    """Lightning copies the average over the raw weights in ``on_train_end``; ModelCheckpoint's end-of-training save
    (it runs later) would then store the average as the raw weights too, and a run resumed from that checkpoint would
    continue from the average instead of where it stopped. Everything downstream reads the EMA weights from the
    checkpoint (``state_dict``), so the copy buys nothing here."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass
