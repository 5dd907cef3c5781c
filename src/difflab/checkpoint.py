"""Finding, loading and checking checkpoints, with errors that say what to do."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.config import PROJECT_ROOT
from difflab.errors import CheckpointError  # noqa: F401  (re-exported: callers import it from here)
from difflab.phema import check_ema_length, rebuild

# the shipped models (data/pretrained/MODEL_CARD.md): ckpt=pretrained, init_from=pretrained; ckpt=pretrained_fast (its
# consistency-tuned twin, 1 to 4 network calls per sprite); ckpt=pretrained_inpaint (its twin tuned for inpainting)
PRETRAINED = PROJECT_ROOT / "data" / "pretrained" / "sprites.ckpt"
PRETRAINED_FAST = PROJECT_ROOT / "data" / "pretrained" / "sprites_fast.ckpt"
PRETRAINED_INPAINT = PROJECT_ROOT / "data" / "pretrained" / "sprites_inpaint.ckpt"


def resolve_checkpoint(spec: str | Path, search_dir: str | Path) -> Path:
    """A .ckpt file, a run folder (its checkpoints/last.ckpt), "last": the newest last.ckpt under search_dir, or
    "pretrained" / "pretrained_fast" / "pretrained_inpaint": the shipped sprites models."""
    shipped = {"pretrained": PRETRAINED, "pretrained_fast": PRETRAINED_FAST, "pretrained_inpaint": PRETRAINED_INPAINT}.get(str(spec))
    if shipped is not None:
        if not shipped.is_file():
            raise CheckpointError(f"the shipped {spec} model is missing: {shipped} (restore it with `git checkout data/pretrained`)")
        return shipped
    if str(spec) == "last":
        found = sorted(Path(search_dir).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise CheckpointError(f"ckpt_path=last: no checkpoints/last.ckpt under {Path(search_dir).resolve()}; train first or pass a path")
        return found[-1]
    path = Path(spec)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"no checkpoints/last.ckpt in run folder {path.resolve()}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path.resolve()}")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True (no code runs from the file); clear errors for foreign files."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        detail = str(err).split(". ")[0][:120]  # torch's weights_only message runs for paragraphs
        raise CheckpointError(f"{path} is not a readable checkpoint of this project ({type(err).__name__}: {detail}); "
                              "pass a .ckpt written by train.py") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "difflab_config" not in ckpt:
        raise CheckpointError(f"{path} is not a difflab checkpoint (no state_dict/difflab_config): was it written by train.py?")
    ckpt["difflab_config"] = upgraded(relocated(ckpt["difflab_config"], PROJECT_ROOT))
    return ckpt


def relocated(config: dict[str, Any], root: Path) -> dict[str, Any]:
    """The saved run config with every path under the training run's project root (paths.root_dir) moved under
    ``root``: a checkpoint written in another clone or on another machine (the shipped one) finds its data here."""
    old = str((config.get("paths") or {}).get("root_dir") or "")
    if not old or old == str(root):
        return config

    def move(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, str) and (value == old or value.startswith(old + "/")):
            return str(root) + value[len(old):]
        return value

    return move(config)


# objectives saved by earlier versions: one class with string switches (prediction, weighting) and its EDM subclass
_LEGACY_PREDICTIONS = {"eps": "EpsPrediction", "x0": "X0Prediction", "v": "VPrediction"}


def upgraded(config: dict[str, Any]) -> dict[str, Any]:
    """The saved run config in today's terms: an objective node of an earlier version becomes its class here (eps-prediction
    where none was saved), so every checkpoint this project wrote samples with the objective it was trained with."""
    old = config.get("objective") or {"_target_": "difflab.objectives.Objective"}
    target = old.get("_target_")
    if target == "difflab.objectives.Objective":
        weighting = ({"_target_": "difflab.objectives.MinSNR", "gamma": old.get("snr_gamma", 5.0)} if old.get("weighting") == "min_snr"
                     else {"_target_": "difflab.objectives.Uniform"})
        new = {"_target_": f"difflab.objectives.{_LEGACY_PREDICTIONS[old.get('prediction', 'eps')]}", "weighting": weighting}
    elif target == "difflab.objectives.EDM":
        new = {**old, "_target_": "difflab.objectives.EDMPreconditioning"}
    else:
        return config
    return {**config, "objective": new}


def export_weights(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16, ema_length: float | None = None) -> Path:
    """A checkpoint for shipping: the EMA weights of the network in ``dtype`` (half the float32 size; the samplers
    run a bf16 copy on bf16 hardware anyway), the run config, classes and data identity; no optimizer state, raw
    weights or callback states (it samples and fine-tunes, init_from=, but does not resume). Written atomically."""
    ckpt = load_checkpoint(src)
    weights = net_weights(ckpt, Path(src), ema_length)
    slim = {
        "state_dict": {f"net.{k}": v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()},
        **{k: ckpt.get(k) for k in ("difflab_config", "class_names", "difflab_data", "epoch", "global_step")},
        "difflab_export": {"source": Path(src).name, "dtype": str(dtype).removeprefix("torch."), "ema_length": ema_length},
    }
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    torch.save(slim, tmp)
    os.replace(tmp, dst)
    return dst


def net_weights(ckpt: dict[str, Any], path: Path, ema_length: float | None = None) -> dict[str, torch.Tensor]:
    """The network's weights for ``ema_length``: None, the EMA the run trained with; 0, the raw training weights; else
    the post-hoc EMA of that length rebuilt from the snapshots beside the checkpoint (<run>/phema, difflab.phema)."""
    ema_length = check_ema_length(ema_length)
    if not ema_length:
        return net_state_dict(ckpt, ema=ema_length is None)
    rebuilt = rebuild(Path(path).resolve().parent.parent, int(ckpt.get("global_step", -1)), ema_length)
    return {**net_state_dict(ckpt, ema=True), **rebuilt}  # parameters rebuilt, buffers as saved


def net_state_dict(ckpt: dict[str, Any], ema: bool = True) -> dict[str, torch.Tensor]:
    """The network's weights: EMA ones (WeightAveraging stores them under state_dict) or the raw ones."""
    source = ckpt["state_dict"] if ema or "current_model_state" not in ckpt else ckpt["current_model_state"]
    return {k[len("net."):]: v for k, v in source.items() if k.startswith("net.")}


def with_cond_inputs(net: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain model's weights for a network that also takes cond_channels images beside x_t (an inpainting model tuned
    from it): the input convolution's new channels start at zero, so the tuning starts from the plain model's outputs.
    Other weights are returned as they are."""
    cond = getattr(net, "cond_channels", 0)
    weight = state_dict.get("conv_in.weight")
    if not cond or weight is None or weight.shape[1] != net.in_channels:
        return state_dict
    zeros = weight.new_zeros(weight.shape[0], cond, *weight.shape[2:])
    return {**state_dict, "conv_in.weight": torch.cat([weight, zeros], dim=1)}


def check_compatible(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Raise a CheckpointError naming the missing/unexpected keys and shape differences."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state_dict)) if own[k].shape != state_dict[k].shape]
    if not (missing or unexpected or shapes):
        return
    parts = [f"{title} ({len(items)}): " + "; ".join(items[:6]) + (" ..." if len(items) > 6 else "")
             for title, items in (("missing in checkpoint", missing), ("not in model", unexpected), ("shape differs", shapes)) if items]
    raise CheckpointError(f"the {what} does not fit the model built from this config: {' | '.join(parts)}. "
                          "Use the same model=... / data=... (class count) as the run that wrote it")
