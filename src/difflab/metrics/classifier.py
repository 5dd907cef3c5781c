"""The data set's own classifier: a small CNN whose penultimate layer is the feature space for FD/KID
and whose predictions score class-conditional samples. Saved as a plain dict (loads with weights_only).

Inputs are images scaled to [-1, 1], as the diffusion DataModules deliver them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from difflab.errors import DifflabError
from difflab.images import to_unit_range

FORMAT = "difflab-classifier-v1"
HOW_TO_TRAIN = "python train_classifier.py data={data}"


class ClassifierError(DifflabError, RuntimeError):
    """The metrics' classifier is missing or does not fit the data set."""


class SmallCNN(nn.Module):
    """Stages of two 3x3 conv-BN-ReLU, 2x max-pool between stages, global average pool, linear head.

    About 0.29M parameters with channels (32, 64, 128): trains in a few CPU minutes on 16x16 sprites.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, channels: Sequence[int] = (32, 64, 128), dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, c in enumerate(channels):
            for _ in range(2):
                layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                cin = c
            if i != len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)
        self.num_classes = num_classes
        self.num_features = cin
        self.arch = {"num_classes": num_classes, "in_channels": in_channels, "channels": list(channels), "dropout": dropout}

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, num_features): the penultimate layer."""
        return self.body(x).mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


def random_shift(x: Tensor, max_shift: int) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels, repeating the border (sprites sit on a plain background)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(b, x.shape[1], h, w + 2 * max_shift)
    out = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(b, x.shape[1], h, w)
    return out.gather(3, cols)


class ClassifierModule(L.LightningModule):
    """Cross-entropy on the data set's labels (argmax of the one-hot context), class-weighted against imbalance."""

    def __init__(self, net: SmallCNN, lr: float = 3e-3, weight_decay: float = 5e-4, class_weights: Tensor | None = None,
                 label_smoothing: float = 0.05, max_shift: int = 1) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.weight_decay = weight_decay
        self.label_smoothing = label_smoothing
        self.max_shift = max_shift
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(net.num_classes))
        self.val_acc = MulticlassAccuracy(net.num_classes, average="micro")
        self.val_acc_balanced = MulticlassAccuracy(net.num_classes, average="macro")

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, context = batch[0], batch[1]
        logits = self.net(random_shift(x, self.max_shift))
        loss = F.cross_entropy(logits, context.argmax(1), weight=self.class_weights, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, context = batch[0], batch[1]
        logits, y = self.net(x), context.argmax(1)
        self.val_acc(logits, y)
        self.val_acc_balanced(logits, y)
        self.log("val/acc", self.val_acc, prog_bar=True)
        self.log("val/acc_balanced", self.val_acc_balanced, prog_bar=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=max(total, 1), pct_start=0.15)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def class_weights(counts: Tensor, power: float) -> Tensor:
    # w_c = (N / (K n_c))^power: 0 = plain CE, 1 = every class weighs the same in total
    counts = counts.float().clamp(min=1)
    return (counts.sum() / (len(counts) * counts)) ** power


@torch.no_grad()
def predict_logits(net: nn.Module, images_uint8: Tensor, batch_size: int = 1024) -> Tensor:
    net.eval()
    return torch.cat([net(to_unit_range(images_uint8[i : i + batch_size])) for i in range(0, len(images_uint8), batch_size)])


def save_classifier(path: str | Path, net: SmallCNN, class_names: Sequence[str], image_size: int, data: dict[str, Any],
                    report: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    blob = {"format": FORMAT, "arch": net.arch, "state_dict": state, "class_names": list(class_names),
            "image_size": int(image_size), "data": data, "report": report}
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def load_classifier(path: str | Path) -> tuple[SmallCNN, dict[str, Any]]:
    """-> (net in eval mode, the saved dict without weights: class_names, image_size, data, report)."""
    path = Path(path)
    if not path.is_file():
        raise ClassifierError(f"classifier checkpoint not found: {path.resolve()}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ClassifierError(f"{path} is not a difflab classifier (written by train_classifier.py)")
    net = SmallCNN(**blob["arch"])
    net.load_state_dict(blob["state_dict"])
    info = {k: v for k, v in blob.items() if k != "state_dict"}
    info["path"] = str(path)
    return net.eval(), info


def find_classifier(spec: str | Path, class_names: Sequence[str], image_size: int, folder: str | Path,
                    data_hint: str) -> tuple[SmallCNN, dict[str, Any]]:
    """-> (net, info) of ``spec`` (a path), or for "auto" of the classifier in ``folder`` trained on these class
    names and image size; loaded once and checked against them."""
    how = HOW_TO_TRAIN.format(data=data_hint)
    if str(spec) != "auto":
        path = Path(spec)
        if not path.is_file():
            raise ClassifierError(f"classifier checkpoint not found: {path.resolve()}. Train it with `{how}` "
                                  "(it writes data/classifiers/<data>.ckpt), or point metrics.classifier_ckpt at one.")
        net, info = load_classifier(path)
        check_matches(info, class_names, image_size)
        return net, info
    candidates = sorted(Path(folder).glob("*.ckpt"))
    for path in candidates:
        try:
            net, info = load_classifier(path)
        except (ClassifierError, RuntimeError, KeyError):
            continue
        if list(info["class_names"]) == list(class_names) and info["image_size"] == image_size:
            return net, info
    raise ClassifierError(
        f"no classifier for these classes {list(class_names)} at {image_size}px in {Path(folder).resolve()} "
        f"(found {[p.name for p in candidates] or 'none'}). Train one with `{how}`, or set metrics.classifier_ckpt=<file>."
    )


def check_matches(info: dict[str, Any], class_names: Sequence[str], image_size: int) -> None:
    if list(info["class_names"]) != list(class_names) or info["image_size"] != image_size:
        raise ClassifierError(
            f"classifier {info['path']} was trained on {info['class_names']} at {info['image_size']}px, but these images are "
            f"{list(class_names)} at {image_size}px: train one for this data set (python train_classifier.py data=...)"
        )
