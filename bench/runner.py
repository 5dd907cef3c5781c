"""What the benchmark times, all through the project's own code paths.

(a) Training: the train config composed from conf/ with Hydra (as train.py gets it), the LightningModule from
    ``difflab.train.build_module(cfg)``, fitted by a ``lightning.Trainer`` instantiated from ``cfg.trainer``:
    its gradient clipping (gradient_clip_val, through DiffusionModule.configure_gradient_clipping), its
    precision plugin (trainer.precision), the EMA callback from conf/callbacks; logger, checkpointing, progress
    bar and sample grids off. The data are random uint8 images and one-hot labels behind the project's
    ArrayDataModule, so batching, the [-1, 1] scaling, the flips and the per-step seeding are the real ones.
    ``StepTimer`` times each optimizer step, from on_train_batch_start to on_train_batch_end (forward, loss,
    backward, clipping, AdamW step, LR schedule, EMA update), synchronising CUDA.
(b) Sampling: ``difflab.sampling.generate`` on the module's DiffusionModel (its objective's conversion to eps
    included) with a SamplingSpec of ``DDIMSampler(steps=25, eta=0)``, in the inference precision ``32`` or ``bf16``
    (a bf16 copy of the weights, made once before the timed runs) and without the output stage.

A peer network enters through ``cfg.model``: its ``_target_`` is bench/peers.py's ``build_peer``, which wraps it
in ``PeerAdapter`` (difflab's net interface); everything else, optimizer and LR schedule included, is the same
config as ours at that image size. So ours / peer compares networks under identical training and sampling code.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.util
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict

HERE = Path(__file__).resolve().parent
CONF = HERE.parent / "conf"
DDIM_STEPS = 25


def sibling(name: str):
    """bench/<name>.py as the module difflab_bench_<name> (bench/ is not a package; whatever the caller's sys.path)."""
    key = f"difflab_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses and Hydra's _target_ look the module up by name
        spec.loader.exec_module(module)
    return sys.modules[key]


peers = sibling("peers")
flops = sibling("flops")
sync, summarize = flops.sync, flops.summarize


# ---------------------------------------------------------------------------------------------------
# Models and variants: Hydra overrides of the train config
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    key: str
    label: str
    family: str  # "ours" | "peer"
    image_size: int
    overrides: tuple[str, ...]  # train config overrides choosing data (and for ours the model preset)
    peer: str | None = None  # a key of peers.PEERS: cfg.model becomes build_peer(peer)
    note: str = ""

    @property
    def kind(self) -> str:
        return "difflab" if self.peer is None else peers.PEERS[self.peer][0]


def model_specs() -> dict[str, ModelSpec]:
    s16, c32 = ("data=sprites",), ("data=cifar10",)
    specs = [
        ModelSpec("ours_sprites", "difflab unet_sprites", "ours", 16, (*s16, "model=unet_sprites"), note="conditional, 6 classes"),
        ModelSpec("diffusers_sprites", "diffusers UNet2DModel (64,128,256), 1 layer/block, attn 8x8", "peer", 16, s16, "diffusers_sprites"),
        ModelSpec("lucidrains_sprites", "lucidrains Unet dim64 (1,2,4)", "peer", 16, s16, "lucidrains_sprites"),
        # data=sprites_course: the course's 5 context features
        ModelSpec("course", "course ContextUnet (n_feat 64)", "peer", 16, ("data=sprites_course",), "course", "conditional, 5 context features"),
        ModelSpec("ours_cifar", "difflab unet_cifar", "ours", 32, (*c32, "model=unet_cifar"), note="conditional, 10 classes"),
        ModelSpec("diffusers_cifar", "diffusers UNet2DModel, DDPM-CIFAR10 layout", "peer", 32, c32, "diffusers_cifar"),
        ModelSpec("lucidrains_cifar", "lucidrains Unet dim128 (1,2,2,2)", "peer", 32, c32, "lucidrains_cifar"),
    ]
    return {s.key: s for s in specs}


@dataclass(frozen=True)
class Variant:
    overrides: tuple[str, ...] = ()  # train config overrides (trainer.precision=..., module.compile=true, ...)
    sample_precision: str = "32"  # SamplingSpec(precision=...): 32 | bf16 | auto


FP32, BF16 = ("trainer.precision=32",), ("trainer.precision=bf16-mixed",)
# selected with --precision, for every model
BASE_VARIANTS: dict[str, Variant] = {"fp32": Variant(FP32, "32"), "bf16": Variant(BF16, "bf16")}
# our models only (--ours-variants; --channels-last adds "<precision>-cl"): one config switch at a time
OUR_VARIANTS: dict[str, Variant] = {
    "default": Variant((), "auto"),  # the config's own choice: trainer.precision ${fast_precision}, sample precision auto
    "bf16-compile": Variant((*BF16, "module.compile=true"), "bf16"),
    "bf16-fused": Variant((*BF16, "optim.optimizer.fused=true"), "bf16"),
    "fp32-cl": Variant((*FP32, "module.channels_last=true"), "32"),
    "bf16-cl": Variant((*BF16, "module.channels_last=true"), "bf16"),
    # the peers' layouts train without dropout; ours keep the papers' 0.1
    "fp32-nodropout": Variant((*FP32, "model.dropout=0.0"), "32"),
    "bf16-nodropout": Variant((*BF16, "model.dropout=0.0"), "bf16"),
}


def all_variants() -> dict[str, Variant]:
    return {**BASE_VARIANTS, **OUR_VARIANTS}


@dataclass
class RunConfig:
    train_batch: int
    train_warmup: int
    train_repeats: int
    sample_n: int
    sample_warmup: int
    sample_warmup_steps: int
    sample_repeats: int
    guidance: float = 0.0


def compose_train_cfg(spec: ModelSpec, variant: Variant, device: torch.device, output_dir: Path | str,
                      batch: int | None = None, extra: Sequence[str] = ()) -> DictConfig:
    """conf/train.yaml with the model's, the variant's and ``extra`` overrides, as train.py would compose it."""
    from hydra import compose, initialize_config_dir

    from difflab.config import register_resolvers

    register_resolvers()
    device = torch.device(device)
    place = ["trainer.accelerator=gpu", f"trainer.devices=[{device.index or 0}]"] if device.type == "cuda" else ["trainer.accelerator=cpu", "trainer.devices=1"]
    overrides = [*spec.overrides, *variant.overrides, *place, *([f"data.batch_size={batch}"] if batch else []), *extra]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(Path(output_dir) / "logs")
        if spec.peer is not None:
            cfg.model = OmegaConf.create({"_target_": f"{peers.__name__}.build_peer", "name": spec.peer,
                                          "image_size": "${data.image_size}", "timesteps": "${timesteps}"})
    return cfg


# ---------------------------------------------------------------------------------------------------
# Data and the step timer
# ---------------------------------------------------------------------------------------------------


def random_datamodule(cfg: DictConfig, n_train: int) -> L.LightningDataModule:
    """The project's ArrayDataModule over ``n_train`` random uint8 images (+1 held out) with one-hot labels."""
    from difflab.data.datamodule import ArrayDataModule, Arrays

    class RandomImages(ArrayDataModule):
        name = "random"

        def load_arrays(self) -> Arrays:
            rng = np.random.default_rng(0)
            n, k, size = n_train + 1, self.num_classes, self.image_size
            images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
            labels = np.eye(k, dtype=np.float32)[rng.integers(0, k, n)]
            return Arrays(images, labels)

    d = cfg.data
    return RandomImages(class_names=list(d.class_names), batch_size=d.batch_size, val_size=1, hflip=d.get("hflip", True),
                        num_workers=d.get("num_workers", 0), image_size=d.image_size, seed=cfg.get("seed"))


class StepTimer(L.Callback):
    """Seconds of each optimizer step, on_train_batch_start to on_train_batch_end (CUDA synchronised); put it
    last in the callbacks so the EMA update of on_train_batch_end is inside. ``period_s``: between consecutive
    batch ends (adds the batch fetch, transfer, scaling and flip)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.step_s: list[float] = []
        self.period_s: list[float] = []
        self.losses: list[torch.Tensor] = []
        self._start = self._last_end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        end = time.perf_counter()
        self.step_s.append(end - self._start)
        if self._last_end is not None:
            self.period_s.append(end - self._last_end)
        self._last_end = end
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach())


@contextlib.contextmanager
def quiet_lightning():
    """Lightning's start-up lines and its small-run warnings, not the benchmark's."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for msg in (".*smaller than the logging interval.*", ".*does not have many workers.*", ".*treespec.*"):
            warnings.filterwarnings("ignore", message=msg)
        try:
            yield
        finally:
            logger.setLevel(level)


# ---------------------------------------------------------------------------------------------------
# One model, one variant
# ---------------------------------------------------------------------------------------------------


class Runner:
    """The DiffusionModule that train.py would build for (spec, variant), its training and its sampling."""

    def __init__(self, spec: ModelSpec, variant: Variant, device: torch.device | str, batch: int | None = None,
                 extra_overrides: Sequence[str] = ()) -> None:
        from difflab.train import build_module

        self.spec, self.variant, self.device = spec, variant, torch.device(device)
        self._tmp = tempfile.TemporaryDirectory(prefix="difflab_bench_")
        self.cfg = compose_train_cfg(spec, variant, self.device, self._tmp.name, batch, extra_overrides)
        if self.cfg.get("seed") is not None:
            L.seed_everything(self.cfg.seed, workers=True, verbose=False)
        self.module = build_module(self.cfg)
        self.net = self.module.net
        self.params = sum(p.numel() for p in self.net.parameters())

    def close(self) -> None:
        self._tmp.cleanup()

    @property
    def train_precision(self) -> str:
        return str(self.cfg.trainer.precision)

    def forward_flops(self) -> tuple[float, float]:
        # counted on the CPU in fp32 (the CPU SDPA correction applies there); FLOPs do not depend on the device
        net = copy.deepcopy(self.net).cpu().float()
        return flops.forward_flops(net, "cpu", timesteps=self.cfg.timesteps)

    # (a) training -----------------------------------------------------------------------------------
    def train(self, steps: int, callbacks: Iterable[L.Callback] = ()) -> StepTimer:
        """``steps`` optimizer steps through trainer.fit; returns the timer of all of them (warm-up included)."""
        from hydra.utils import instantiate

        from difflab.validate import check_trainer_config

        cfg = self.cfg
        check_trainer_config(cfg.trainer)
        ema = [instantiate(cfg.callbacks.ema)] if cfg.get("callbacks") and cfg.callbacks.get("ema") else []
        timer = StepTimer(self.device)
        with quiet_lightning():
            trainer: L.Trainer = instantiate(
                cfg.trainer, callbacks=[*ema, *callbacks, timer], logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, max_steps=steps, limit_val_batches=0,
                num_sanity_val_steps=0,
            )
            trainer.fit(self.module, datamodule=random_datamodule(cfg, steps * cfg.data.batch_size))
        if trainer.global_step != steps:
            raise RuntimeError(f"the trainer ran {trainer.global_step} optimizer steps, expected {steps}")
        self.trainer = trainer
        return timer

    def time_training(self, rc: RunConfig) -> dict[str, Any]:
        timer = self.train(rc.train_warmup + rc.train_repeats)
        step_s = timer.step_s[rc.train_warmup:]
        period_s = timer.period_s[max(rc.train_warmup - 1, 0):]
        batch = int(self.cfg.data.batch_size)
        last_loss = float(timer.losses[-1])
        return {
            "batch": batch,
            "warmup": rc.train_warmup,
            "repeats": rc.train_repeats,
            "precision": self.train_precision,
            "gradient_clip_val": self.cfg.trainer.get("gradient_clip_val"),
            "ema": bool(self.cfg.get("callbacks") and self.cfg.callbacks.get("ema")),
            "step_s": step_s,
            "period_s": period_s,
            "img_s": summarize([batch / s for s in step_s]),
            "period_img_s": summarize([batch / s for s in period_s]) if period_s else None,
            "warmup_step_s": timer.step_s[: rc.train_warmup],
            "last_loss": last_loss,
            "loss_finite": bool(np.isfinite(last_loss)),
        }

    # (b) sampling -----------------------------------------------------------------------------------
    def sampling_spec(self, steps: int, precision: str | None = None, seed: int = 0, guidance: float = 0.0, batch_size: int = 256):
        """What a user asks sample.py for, with DDIM(steps, eta 0) and without the output stage (the same PIL step for
        every network: it would dilute the ratios)."""
        from difflab.sampling import SamplingSpec

        sampler = {"_target_": "difflab.samplers.DDIMSampler", "steps": steps, "eta": 0.0}
        return SamplingSpec(sampler, guidance=guidance, precision=precision or self.variant.sample_precision, palette=None, seed=seed,
                            batch_size=batch_size)

    def sample(self, n: int, steps: int, precision: str | None = None, seed: int = 0, guidance: float = 0.0, model=None):
        """difflab.sampling.generate on the module's DiffusionModel (its objective included) for n images in one batch
        (random one-hot contexts for a conditional network)."""
        from difflab.sampling import generate

        self.module.to(self.device)
        model = model if model is not None else self.module.model
        k = model.num_classes
        g = torch.Generator().manual_seed(1)
        contexts = F.one_hot(torch.randint(0, k, (n,), generator=g), k).float() if k else None
        return generate(self.sampling_spec(steps, precision, seed, guidance, batch_size=n).bind(model), contexts, n)

    def time_sampling(self, rc: RunConfig) -> dict[str, Any]:
        precision = self.variant.sample_precision
        self.module.to(self.device)
        # generate would copy the weights to bf16 at every call; sample.py makes the copy once, so does this
        dtype = self.sampling_spec(DDIM_STEPS, precision).dtype(self.device)
        model = self.module.model.for_inference(dtype)
        for _ in range(rc.sample_warmup):
            self.sample(rc.sample_n, rc.sample_warmup_steps, precision, guidance=rc.guidance, model=model)
        run_s = []
        for i in range(rc.sample_repeats):
            sync(self.device)
            t0 = time.perf_counter()
            out = self.sample(rc.sample_n, DDIM_STEPS, precision, seed=i, guidance=rc.guidance, model=model)
            sync(self.device)
            run_s.append(time.perf_counter() - t0)
        return {
            "n": rc.sample_n,
            "steps": DDIM_STEPS,
            "precision": precision,
            "dtype": str(dtype).replace("torch.", ""),
            "guidance": rc.guidance,
            "warmup_runs": rc.sample_warmup,
            "warmup_steps": rc.sample_warmup_steps,
            "repeats": rc.sample_repeats,
            "run_s": run_s,
            "img_s": summarize([rc.sample_n / s for s in run_s]),
            "loop": "difflab.sampling.generate(SamplingSpec(DDIMSampler(steps=25, eta=0), palette=None).bind(model))",
            "objective": repr(self.module.model.objective),
            "images_finite": bool(torch.isfinite(out.images).all()),
        }


def peak_key(precision: str) -> str:
    """Which matmul peak a precision or dtype is compared with: bf16 for the bf16 policies and dtypes ("bf16-mixed",
    "bf16", "bfloat16"), fp32 otherwise."""
    p = str(precision)
    return "bf16" if "bf16" in p or "bfloat16" in p or "16-mixed" in p else "fp32"


def run_model(spec: ModelSpec, variants: dict[str, Variant], rc: RunConfig, device: torch.device,
              peaks: dict[str, dict[str, float]], skip_train: bool = False, skip_sample: bool = False,
              extra_overrides: Sequence[str] = (), log=print) -> list[dict[str, Any]]:
    """One result row per variant; an error in one variant is recorded in its row, the others still run."""
    rows = []
    fwd = None
    for vname, variant in variants.items():
        row: dict[str, Any] = {"model": spec.key, "label": spec.label, "family": spec.family, "res": spec.image_size,
                               "variant": vname, "overrides": [*spec.overrides, *variant.overrides, *extra_overrides],
                               "peer": spec.peer, "note": spec.note}
        t_start = time.perf_counter()
        runner = None
        try:
            runner = Runner(spec, variant, device, rc.train_batch, extra_overrides)
            row["model_target"] = runner.cfg.model._target_
            if fwd is None:
                fwd = runner.forward_flops()
            row.update(params=runner.params, fwd_flops=fwd[0], attn_flops_added=fwd[1])
            if not skip_train:
                row["train"] = runner.time_training(rc)
            if not skip_sample:
                row["sample"] = runner.time_sampling(rc)
            add_rates(row, peaks)
        except Exception as e:  # noqa: BLE001 - one broken model must not lose the whole run
            row["error"] = f"{type(e).__name__}: {e}"
        finally:
            if runner is not None:
                runner.close()
            del runner
            gc.collect()
        row["wall_s"] = time.perf_counter() - t_start
        log(row_line(row))
        rows.append(row)
    return rows


def add_rates(row: dict[str, Any], peaks: dict[str, dict[str, float]]) -> None:
    """GFLOP/s and % of the matmul peak of the row's precision, from the median img/s."""
    for key in ("train", "sample"):
        part = row.get(key)
        if not part:
            continue
        if key == "train":
            part["gflops_s"] = 3 * row["fwd_flops"] * part["img_s"]["median"] / 1e9  # forward + backward ~ 3 forwards
            part["peak"] = peak_key(part["precision"])
        else:
            evals = part["steps"] * (2 if part.get("guidance") else 1)  # guidance: conditional + unconditional batch
            part["gflops_s"] = row["fwd_flops"] * evals * part["img_s"]["median"] / 1e9
            part["peak"] = peak_key(part["dtype"])
        part["pct_peak_fp32"] = 100 * part["gflops_s"] / peaks["fp32"]["median"]
        part["pct_peak_bf16"] = 100 * part["gflops_s"] / peaks["bf16"]["median"]
        part["pct_peak"] = part[f"pct_peak_{part['peak']}"]


def merge_rounds(rounds: list[list[dict[str, Any]]], peaks: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The rows of several interleaved rounds of the same sweep as one row per (model, variant): the timed steps
    and runs of all rounds pooled, medians and IQRs over the pool."""
    if len(rounds) == 1:
        return rounds[0]
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for rows in rounds:
        for row in rows:
            key = (row["model"], row["variant"])
            if key not in merged or "error" in merged[key]:
                merged[key] = copy.deepcopy(row)
                merged[key]["rounds"] = 1
                continue
            if "error" in row:
                continue
            m = merged[key]
            m["rounds"] += 1
            m["wall_s"] += row["wall_s"]
            for part, times in (("train", "step_s"), ("sample", "run_s")):
                if m.get(part) and row.get(part):
                    m[part][times] += row[part][times]
                    m[part]["repeats"] += row[part]["repeats"]
            if m.get("train") and row.get("train"):
                m["train"]["period_s"] += row["train"]["period_s"]
    for m in merged.values():
        if "error" in m:
            continue
        if m.get("train"):
            tr = m["train"]
            tr["img_s"] = summarize([tr["batch"] / s for s in tr["step_s"]])
            tr["period_img_s"] = summarize([tr["batch"] / s for s in tr["period_s"]]) if tr["period_s"] else None
        if m.get("sample"):
            m["sample"]["img_s"] = summarize([m["sample"]["n"] / s for s in m["sample"]["run_s"]])
        add_rates(m, peaks)
    return list(merged.values())


def _rate(s: dict[str, float] | None) -> str:
    return f"{s['median']:.3g} (IQR {s['q1']:.3g}-{s['q3']:.3g})" if s else "-"


def row_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"  {row['model']:20s} {row['variant']:14s} ERROR {row['error']}  ({row['wall_s']:.0f} s)"
    tr, sa = row.get("train"), row.get("sample")
    return (f"  {row['model']:20s} {row['variant']:14s} train {_rate(tr and tr['img_s'])} img/s, "
            f"DDIM-25 {_rate(sa and sa['img_s'])} img/s  ({row['wall_s']:.0f} s)")

