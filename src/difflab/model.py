"""A diffusion model as one object: network + noise schedule + objective, with the class names and data of its run.

Built once: by ``load_model`` from a checkpoint (sample.py, evaluate.py, your code), or by ``build_model`` from a
run config (train.py, whose LightningModule trains it and hands it to the training-time callbacks). Samplers see it
only through ``denoiser``: denoise(x_t, level) -> its x_0 and eps, with the context bound, guided, and read from whatever
the network predicts by the objective it was trained with, so a network can never be sampled with another objective.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from torch import Tensor, nn

from difflab.checkpoint import check_compatible, load_checkpoint, net_weights, resolve_checkpoint
from difflab.config import PROJECT_ROOT
from difflab.diffusion import Denoiser, Level
from difflab.errors import ConfigError
from difflab.guidance import Guidance
from difflab.masks import nothing_known
from difflab.objectives import Objective
from difflab.schedules import NoiseSchedule


class DiffusionModel:
    """``net`` and ``schedule`` are modules (``to`` moves both); ``config`` is the resolved run config it was built
    from (model, schedule, objective, data), ``data`` the identity of its training data (name, config choice, file
    hashes), ``source`` the checkpoint it was loaded from."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, objective: Objective, class_names: Sequence[str] = (),
                 config: Mapping[str, Any] | None = None, data: Mapping[str, Any] | None = None, source: Path | None = None) -> None:
        objective.check(schedule)
        self.net, self.schedule, self.objective = net, schedule, objective
        self.class_names = list(class_names)
        self.config = dict(config or {})
        self.data = dict(data) if data else None
        self.source = source
        self._training_images: Tensor | None = None

    def __repr__(self) -> str:
        return f"DiffusionModel({type(self.net).__name__}, {self.schedule.extra_repr()}, {self.objective!r}, classes={self.class_names})"

    @property
    def num_classes(self) -> int:
        """The width K of the context vector; 0 for an unconditional model."""
        return getattr(self.net, "num_classes", 0)

    @property
    def inpainting(self) -> bool:
        """Whether the network takes the known pixels and the mask beside x_t (difflab.masks.known_pixels): a model
        tuned for inpainting (python train.py experiment=sprites_inpaint)."""
        return getattr(self.net, "cond_channels", 0) > 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.net.in_channels, self.net.image_size, self.net.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def to(self, device: torch.device | str) -> DiffusionModel:
        """Network and schedule on ``device`` (in place, as nn.Module.to)."""
        self.net.to(device)
        self.schedule.to(device)
        return self

    def for_inference(self, dtype: torch.dtype) -> DiffusionModel:
        """This model with its network in ``dtype``: itself when nothing changes, else a model around a copy of the
        network (a training network keeps its float32 weights; the schedule keeps its float64 terms)."""
        if self.dtype == dtype:
            return self
        twin = copy.copy(self)
        twin.net = copy.deepcopy(self.net).to(dtype)
        return twin

    def denoiser(self, context: Tensor | None = None, guidance: Guidance | None = None, known: Tensor | None = None) -> Denoiser:
        """denoise(x_t, level) -> Denoised (x_0 and eps) for a batch with contexts (B, K) (None: unconditional), the
        network guided as ``guidance`` says (None: the plain conditional network; a consistency model's guidance is in its
        weights: SamplingSpec.bind gives it none). ``known``: an inpainting model's input beside x_t
        (difflab.masks.known_pixels); None: nothing known, plain sampling."""
        guidance = guidance or Guidance()
        if known is not None and not self.inpainting:
            raise ConfigError(f"{self.source or 'this model'} was not tuned for inpainting and takes no known pixels")
        if self.inpainting and known is None:
            def output(x: Tensor, level: Level) -> Tensor:  # every pixel to draw: the batch's size is known only here
                return guidance.output(self.net, context, nothing_known(x))(x, level)
        else:
            output = guidance.output(self.net, context, known)
        return self.objective.denoiser(output)

    @property
    def pixel_art(self) -> bool:
        """Whether its data set is pixel art (its DataModule says pixel_art = True: the sprites)."""
        target = (self.config.get("data") or {}).get("_target_")
        return bool(target and getattr(get_class(target), "pixel_art", False))

    def training_images(self) -> Tensor:
        """The uint8 training images of its data set (N, C, H, W), loaded on first use."""
        if self._training_images is None:
            datamodule = instantiate(self.config["data"])
            datamodule.setup("fit")
            self._training_images = datamodule.train_set.tensors[0]
        return self._training_images


def build_model(config: Mapping[str, Any], class_names: Sequence[str] | None = None, data: Mapping[str, Any] | None = None,
                source: Path | None = None) -> DiffusionModel:
    """A model with fresh weights from a run config: its model (the network), schedule and objective nodes."""
    if not config.get("objective"):
        raise ConfigError("the run config names no objective: add objective=<eps|x0|v|v_min_snr|edm|flow|...> (conf/objective/)")
    net = instantiate(config["model"])
    schedule = instantiate(config["schedule"])
    objective = instantiate(config["objective"])
    if class_names is None:
        class_names = list((config.get("data") or {}).get("class_names") or [])
    return DiffusionModel(net, schedule, objective, class_names, config, data, source)


def load_model(ckpt: str | Path, ema_length: float | None = None, search_dir: str | Path = PROJECT_ROOT / "logs" / "train") -> DiffusionModel:
    """The model a checkpoint holds: ``ckpt`` is a .ckpt file, a training run folder, "last" (the newest last.ckpt under
    ``search_dir``) or "pretrained" (the shipped sprites model); ``ema_length``: None, the EMA weights it trained with; 0,
    the raw training weights; else the post-hoc EMA of that length (difflab.phema, a run trained with its snapshots)."""
    path = resolve_checkpoint(ckpt, search_dir)
    saved = load_checkpoint(path)
    model = build_model(saved["difflab_config"], saved.get("class_names"), saved.get("difflab_data"), path)
    weights = net_weights(saved, path, ema_length)
    check_compatible(model.net, weights)
    model.net.load_state_dict(weights)
    model.net.eval()
    return model
