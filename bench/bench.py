"""Speed benchmark: difflab's UNets against the peers a user would pick instead, in one process.

For each model and variant (precision / memory format / compile), on the same image size, batch and
random data:
  (a) one DDPM training step: noise, q_sample, forward, MSE, backward, AdamW step;
  (b) DDIM sampling, 25 steps, eta 0.
Reported per model: parameters, forward FLOPs per image (torch.utils.flop_counter, CPU SDPA attention
added), training and sampling img/s (median, min-max, IQR over timed repeats after warm-up), achieved
GFLOP/s and % of the matmul peak measured in the same run.

    python bench/bench.py                         # everything, fp32 and bf16 autocast (~10 min on 2 CPU cores)
    python bench/bench.py --quick --models ours   # smoke check
    python bench/bench.py --device cuda --precision fp32,bf16 --channels-last

Our models run through our own code: difflab.diffusion.eps_loss with LinearSchedule(1000) for training,
DDIMSampler(steps=25) + difflab.sampling.generate for sampling. Peers: diffusers DDPMScheduler.add_noise
for training and diffusers DDIMScheduler (same linear betas, trailing spacing, eta 0) for sampling.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
RESULTS = Path(__file__).resolve().parent / "results"
T_TRAIN = 1000
DDIM_STEPS = 25
LR = 2e-4  # conf/optim: AdamW, lr 2e-4, weight_decay 0


def _load_peers():
    # bench/ is not a package: load peers.py by path, whatever the caller's sys.path
    spec = importlib.util.spec_from_file_location("difflab_bench_peers", Path(__file__).with_name("peers.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


peers = _load_peers()


# ---------------------------------------------------------------------------------------------------
# Variants: name -> settings. Base variants run for every model; OUR_VARIANTS only for difflab models.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    autocast: str | None = None  # None (fp32) or "bf16" / "fp16": torch.autocast around forward + loss
    channels_last: bool = False  # model and inputs in channels_last
    compile: bool = False  # torch.compile the network (compile time is spent in the warm-up steps)
    compile_mode: str | None = None  # torch.compile(mode=...)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # our models: keys set on conf/model/<preset>.yaml
    sample_weights: str | None = None  # "bf16": sample from a bf16 copy of the weights (no autocast), as sample.py does
    fused_adamw: bool = False  # torch.optim.AdamW(fused=True)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.autocast]


# selected with --precision
BASE_VARIANTS: dict[str, Settings] = {
    "fp32": Settings(),
    "bf16": Settings(autocast="bf16"),
}

# our models only; --channels-last adds the "-cl" variant of each selected precision, --ours-variants
# names any of these. "fast" is what the project does by default on hardware with fast bf16:
# train.py's bf16-mixed training step, sample.py's bf16 weights for sampling.
OUR_VARIANTS: dict[str, Settings] = {
    "fast": Settings(autocast="bf16", sample_weights="bf16"),
    # the other switches, one at a time on top of bf16 (module.channels_last, module.compile, optim...fused)
    "bf16-compile": Settings(autocast="bf16", compile=True),
    "bf16-fused": Settings(autocast="bf16", fused_adamw=True),
    "fp32-cl": Settings(channels_last=True),
    "bf16-cl": Settings(autocast="bf16", channels_last=True),
    # the peers' layouts train without dropout; ours keep the papers' 0.1 (a random mask per activation)
    "bf16-nodropout": Settings(autocast="bf16", model_overrides={"dropout": 0.0}),
}


def all_variants() -> dict[str, Settings]:
    return {**BASE_VARIANTS, **OUR_VARIANTS}


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------


def num_classes_of(data: str) -> int:
    from omegaconf import OmegaConf

    return len(OmegaConf.load(CONF / "data" / f"{data}.yaml").class_names)


def build_ours(preset: str, image_size: int, num_classes: int, **overrides: Any) -> nn.Module:
    """conf/model/<preset>.yaml with its interpolations (image_size, num_classes) filled in, via Hydra.

    ``overrides``: further keys of the yaml to set (a variant's ``model_overrides``).
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / "model" / f"{preset}.yaml")
    cfg.image_size = image_size
    cfg.num_classes = num_classes
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return instantiate(cfg)


@dataclass
class ModelSpec:
    key: str
    label: str
    family: str  # "ours" | "peer"
    kind: str  # "difflab" | "diffusers" | "lucidrains" | "course": how to call it
    image_size: int
    num_classes: int  # one-hot context size; 0 = unconditional
    build: Callable[..., nn.Module] = field(repr=False)  # ours: build(**model_overrides); peers: build()
    note: str = ""


def model_specs() -> dict[str, ModelSpec]:
    n_sprites, n_cifar = num_classes_of("sprites"), num_classes_of("cifar10")
    specs = [
        ModelSpec("ours_sprites", "difflab unet_sprites", "ours", "difflab", 16, n_sprites,
                  lambda **kw: build_ours("unet_sprites", 16, n_sprites, **kw), f"conditional, {n_sprites} classes"),
        ModelSpec("diffusers_sprites", "diffusers UNet2DModel (64,128,256), 1 layer/block, attn 8x8", "peer", "diffusers", 16, 0,
                  lambda: peers.diffusers_sprites(16)),
        ModelSpec("lucidrains_sprites", "lucidrains Unet dim64 (1,2,4)", "peer", "lucidrains", 16, 0,
                  lambda: peers.lucidrains_unet(64, (1, 2, 4))),
        ModelSpec("course", "course ContextUnet (n_feat 64)", "peer", "course", 16, 5,
                  lambda: peers.course_context_unet(16), "conditional, 5 context features"),
        ModelSpec("ours_cifar", "difflab unet_cifar", "ours", "difflab", 32, n_cifar,
                  lambda **kw: build_ours("unet_cifar", 32, n_cifar, **kw), f"conditional, {n_cifar} classes"),
        ModelSpec("diffusers_cifar", "diffusers UNet2DModel, DDPM-CIFAR10 layout", "peer", "diffusers", 32, 0,
                  lambda: peers.diffusers_ddpm_cifar10(32)),
        ModelSpec("lucidrains_cifar", "lucidrains Unet dim128 (1,2,2,2)", "peer", "lucidrains", 32, 0,
                  lambda: peers.lucidrains_unet(128, (1, 2, 2, 2))),
    ]
    return {s.key: s for s in specs}


def select_models(arg: str, specs: dict[str, ModelSpec]) -> list[ModelSpec]:
    groups = {
        "all": list(specs),
        "ours": [k for k, s in specs.items() if s.family == "ours"],
        "peers": [k for k, s in specs.items() if s.family == "peer"],
        "16": [k for k, s in specs.items() if s.image_size == 16],
        "32": [k for k, s in specs.items() if s.image_size == 32],
    }
    keys: list[str] = []
    for name in (a.strip() for a in arg.split(",") if a.strip()):
        if name in groups:
            keys += groups[name]
        elif name in specs:
            keys.append(name)
        else:
            raise SystemExit(f"unknown model {name!r}; choose from {sorted(specs)} or groups {sorted(groups)}")
    return [specs[k] for k in dict.fromkeys(keys)]


def forward_fn(spec: ModelSpec, net: Callable[..., Any]) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """A uniform eps_theta(x_t, t_int (B,), one-hot context or None) for any of the models."""
    if spec.kind == "difflab":
        return lambda x, t, ctx: net(x, t, ctx)
    if spec.kind == "diffusers":
        return lambda x, t, ctx: net(x, t).sample
    if spec.kind == "lucidrains":
        return lambda x, t, ctx: net(x, t)
    if spec.kind == "course":
        # the course feeds t / T as a float (B, 1, 1, 1)
        return lambda x, t, ctx: net(x, (t.float() / T_TRAIN).view(-1, 1, 1, 1), ctx)
    raise ValueError(spec.kind)


# ---------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------

_ATEN = torch.ops.aten
# the counter has formulas for the CUDA SDPA kernels (flash / efficient / cudnn), not for the CPU one
CPU_SDPA_OPS = [_ATEN._scaled_dot_product_flash_attention_for_cpu]


def _sdpa_formula(q, k, v, *args, out_shape=None, **kwargs) -> int:
    # QK^T and AV: 2 * B*heads*L*S*d + 2 * B*heads*L*S*d_v (= 4 B heads L^2 d for self-attention)
    return sdpa_flop_count(q, k, v)


def count_forward_flops(spec: ModelSpec, net: nn.Module, device: torch.device, batch: int = 2) -> tuple[float, float]:
    """(forward FLOPs per image, of which CPU SDPA attention FLOPs added by hand per image), fp32, eval mode."""
    x, ctx = make_inputs(spec, batch, device, seed=123)
    t = torch.randint(0, T_TRAIN, (batch,), device=device)
    call = forward_fn(spec, net)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping={op: _sdpa_formula for op in CPU_SDPA_OPS}) as counter:
            call(x, t, ctx)
    finally:
        net.train(was_training)
    total = counter.get_total_flops()
    added = sum(v for op, v in counter.get_flop_counts().get("Global", {}).items() if op in CPU_SDPA_OPS)
    return total / batch, added / batch


# ---------------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    if len(v) >= 2:
        q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
    else:
        q1 = q3 = v[0]
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q1, "q3": q3, "n": len(v)}


def make_inputs(spec: ModelSpec, batch: int, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor | None]:
    """Random images in [-1, 1] (the same for every model of a resolution) and random one-hot contexts."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((batch, 3, spec.image_size, spec.image_size), generator=g) * 2 - 1
    ctx = None
    if spec.num_classes:
        labels = torch.randint(0, spec.num_classes, (batch,), generator=g)
        ctx = F.one_hot(labels, spec.num_classes).float()
        ctx = ctx.to(device)
    return x0.to(device), ctx


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn((n, n), generator=g).to(device=device, dtype=dtype)
    b = torch.randn((n, n), generator=g).to(device=device, dtype=dtype)
    a @ b  # warm-up
    sync(device)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return {**summarize(rates), "size": n}


# ---------------------------------------------------------------------------------------------------
# One model, one variant
# ---------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    train_batch: int
    train_warmup: int
    train_repeats: int
    sample_n: int
    sample_warmup: int
    sample_warmup_steps: int
    sample_repeats: int


class Runner:
    """Holds a fresh model, its optimizer and the schedule/scheduler for one variant."""

    def __init__(self, spec: ModelSpec, settings: Settings, device: torch.device) -> None:
        self.spec, self.settings, self.device = spec, settings, device
        torch.manual_seed(0)
        net = (spec.build(**settings.model_overrides) if spec.family == "ours" else spec.build()).to(device)
        if settings.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.params = sum(p.numel() for p in net.parameters())
        self.model = torch.compile(net, mode=settings.compile_mode) if settings.compile else net
        self.opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.0, fused=settings.fused_adamw or None)
        self.call = forward_fn(spec, self.model)
        if spec.kind == "difflab":
            from difflab.schedules import LinearSchedule

            self.schedule = LinearSchedule(T_TRAIN).to(device)
        else:
            from diffusers import DDIMScheduler, DDPMScheduler

            kw = dict(num_train_timesteps=T_TRAIN, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
            self.ddpm = DDPMScheduler(**kw)
            self.ddim = DDIMScheduler(**kw, clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing")

    def autocast(self):
        dtype = self.settings.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    def prepare(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.settings.channels_last else x

    # (a) training step -----------------------------------------------------------------------------
    def train_step(self, x0: Tensor, ctx: Tensor | None) -> Tensor:
        b = x0.shape[0]
        t = torch.randint(0, T_TRAIN, (b,), device=self.device)
        noise = torch.randn_like(x0)
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            if self.spec.kind == "difflab":
                from difflab.diffusion import eps_loss

                kwargs = {}
                if ctx is not None:
                    # context dropout as in DiffusionModule (p_uncond 0.1)
                    kwargs = {"context": ctx, "context_keep": torch.rand(b, device=self.device) >= 0.1}
                loss = eps_loss(self.model, self.schedule, x0, t, noise, **kwargs).mean()
            else:
                x_t = self.ddpm.add_noise(x0, noise, t)
                loss = F.mse_loss(self.call(x_t, t, ctx).float(), noise)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def time_training(self, rc: RunConfig) -> dict[str, Any]:
        self.net.train()
        x0, ctx = make_inputs(self.spec, rc.train_batch, self.device, seed=0)
        x0 = self.prepare(x0)
        losses = []
        for _ in range(rc.train_warmup):
            losses.append(self.train_step(x0, ctx))
        sync(self.device)
        step_s = []
        for _ in range(rc.train_repeats):
            t0 = time.perf_counter()
            losses.append(self.train_step(x0, ctx))
            sync(self.device)
            step_s.append(time.perf_counter() - t0)
        last_loss = float(losses[-1])
        return {
            "batch": rc.train_batch,
            "warmup": rc.train_warmup,
            "repeats": rc.train_repeats,
            "step_s": step_s,
            "img_s": summarize([rc.train_batch / s for s in step_s]),
            "last_loss": last_loss,
            "loss_finite": bool(torch.isfinite(torch.tensor(last_loss))),
        }

    # (b) DDIM sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, steps: int, ctx: Tensor | None, seed: int = 0) -> Tensor:
        shape = (3, self.spec.image_size, self.spec.image_size)
        if self.spec.kind == "difflab":
            from difflab.samplers import DDIMSampler
            from difflab.sampling import generate

            net = self.sample_net if self.settings.sample_weights == "bf16" else self.model
            out = generate(net, self.schedule, DDIMSampler(steps=steps, eta=0.0), n, ctx, seed=seed, batch_size=n, shape=shape,
                           precision="bf16" if self.settings.sample_weights == "bf16" else "32")
            return out.images
        self.ddim.set_timesteps(steps)
        x = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(self.device)
        x = self.prepare(x)
        for t in self.ddim.timesteps:
            t_batch = torch.full((n,), int(t), device=self.device, dtype=torch.long)
            with self.autocast():
                eps = self.call(x, t_batch, ctx).float()
            x = self.ddim.step(eps, t, x, eta=0.0).prev_sample
        return x

    def time_sampling(self, rc: RunConfig) -> dict[str, Any]:
        self.net.eval()
        if self.settings.sample_weights == "bf16":
            self.sample_net = copy.deepcopy(self.net).to(torch.bfloat16)
        _, ctx = make_inputs(self.spec, rc.sample_n, self.device, seed=1)
        for _ in range(rc.sample_warmup):
            # warm-up: the same loop and batch, fewer steps
            self.sample(rc.sample_n, rc.sample_warmup_steps, ctx)
        sync(self.device)
        run_s = []
        for i in range(rc.sample_repeats):
            t0 = time.perf_counter()
            images = self.sample(rc.sample_n, DDIM_STEPS, ctx, seed=i)
            sync(self.device)
            run_s.append(time.perf_counter() - t0)
        self.net.train()
        return {
            "n": rc.sample_n,
            "steps": DDIM_STEPS,
            "warmup_runs": rc.sample_warmup,
            "warmup_steps": rc.sample_warmup_steps,
            "repeats": rc.sample_repeats,
            "run_s": run_s,
            "img_s": summarize([rc.sample_n / s for s in run_s]),
            "loop": "difflab DDIMSampler + generate" if self.spec.kind == "difflab" else "diffusers DDIMScheduler",
            "images_finite": bool(torch.isfinite(images).all()),
        }


# ---------------------------------------------------------------------------------------------------
# Machine info and reporting
# ---------------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu_model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model is None:
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cpu_model = cpu_model or platform.processor() or "unknown"
    info: dict[str, Any] = {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_features": sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8"}),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "hostname": platform.node(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    for pkg in ("diffusers", "denoising_diffusion_pytorch"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg.replace("_", "-"))
        except Exception:  # noqa: BLE001 - not installed
            info[pkg] = None
    return info


def _fmt_rate(s: dict[str, float] | None) -> str:
    if not s:
        return "-"
    return f"{s['median']:.3g} [{s['min']:.3g}-{s['max']:.3g}]"


def markdown(report: dict[str, Any]) -> str:
    m, peaks = report["machine"], report["peaks"]
    lines = [
        f"# difflab speed benchmark, {report['date']}",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} cores ({', '.join(m['cpu_features']) or 'no AVX-512 info'}), "
        f"torch {m['torch']} with {m['torch_threads']} threads, device {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else ""),
        "- matmul peak (" + ", ".join(f"{k} {v['size']}x{v['size']}: median {v['median']:.0f} GFLOP/s [{v['min']:.0f}-{v['max']:.0f}]" for k, v in peaks.items()) + ")",
        f"- training: noise, q_sample, forward, MSE, backward, AdamW step; sprites-size (16x16) batch {report['config']['16']['train_batch']}, "
        f"CIFAR-size (32x32) batch {report['config']['32']['train_batch']}; {report['config']['16']['train_warmup']}/{report['config']['32']['train_warmup']} "
        f"warm-up and {report['config']['16']['train_repeats']}/{report['config']['32']['train_repeats']} timed steps (16/32).",
        f"- sampling: DDIM-{DDIM_STEPS}, eta 0, {report['config']['16']['sample_n']} images (16x16) / {report['config']['32']['sample_n']} images (32x32) in one batch; "
        f"{report['config']['16']['sample_repeats']}/{report['config']['32']['sample_repeats']} timed runs after a {report['config']['16']['sample_warmup_steps']}-step warm-up run. "
        "Ours: DDIMSampler + generate; peers: diffusers DDIMScheduler (linear betas, trailing spacing).",
        "- img/s: median [min-max] over the timed repeats. GFLOP/s: training 3 x forward FLOPs x img/s, sampling forward FLOPs x 25 x img/s. "
        "%peak against the matmul peak of the variant's precision (fp32 rows: fp32 peak, bf16 rows: bf16 peak).",
        "- forward FLOPs: torch.utils.flop_counter (conv, matmul, attention), batch 2, fp32, eval; the counter skips CPU "
        "scaled_dot_product_attention kernel, so its QK^T and AV FLOPs (4 B heads L^2 d per call) are added by hand (column 'attn+', "
        "GFLOP/img, included in fwd). attn+ is 0 where the counter already sees the attention as matmuls: lucidrains' einsum "
        "attention, and difflab's SelfAttention, whose strided q/k/v (last-dim stride != 1) send CPU SDPA to its math (bmm) fallback.",
        "",
        "| model | res | variant | params (M) | fwd GFLOP/img | attn+ | train batch | train img/s | train GFLOP/s | train %peak "
        "| sample n | DDIM-25 img/s | sample GFLOP/s | sample %peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['res']} | {r['variant']} | - | - | - | - | error: {r['error']} | | | | | | |")
            continue
        cells = [r["label"], r["res"], r["variant"], f"{r['params'] / 1e6:.2f}", f"{r['fwd_flops'] / 1e9:.3f}",
                 f"{r['attn_flops_added'] / 1e9:.3f}" if r["attn_flops_added"] else "0"]
        for key, size in (("train", "batch"), ("sample", "n")):
            part = r.get(key)
            cells += [part[size], _fmt_rate(part["img_s"]), f"{part['gflops_s']:.0f}", f"{part['pct_peak']:.0f}%"] if part else ["-"] * 4
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if report.get("notes"):
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--models", default="all", help="comma list of model keys or groups (all, ours, peers, 16, 32); see --list")
    p.add_argument("--list", action="store_true", help="list the models and variants and exit")
    p.add_argument("--precision", default="fp32,bf16", help=f"base variants run for every model: {sorted(BASE_VARIANTS)}")
    p.add_argument("--channels-last", action="store_true", help="also run our models in channels_last (each selected precision)")
    p.add_argument("--ours-variants", default="fast", help=f"extra variants for our models only: {sorted(OUR_VARIANTS)}")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default, all cores)")
    p.add_argument("--train-batch-16", type=int, default=64)
    p.add_argument("--train-batch-32", type=int, default=16)
    p.add_argument("--sample-n-16", type=int, default=64, help="images per DDIM run, 16x16 models")
    p.add_argument("--sample-n-32", type=int, default=8, help="images per DDIM run, 32x32 models (fewer: they are slow on CPU)")
    p.add_argument("--train-warmup", type=int, default=2)
    p.add_argument("--train-repeats", type=int, default=5)
    p.add_argument("--train-warmup-32", type=int, default=1)
    p.add_argument("--train-repeats-32", type=int, default=3)
    p.add_argument("--sample-warmup", type=int, default=1, help="warm-up runs (each --sample-warmup-steps DDIM steps)")
    p.add_argument("--sample-warmup-steps", type=int, default=2)
    p.add_argument("--sample-repeats", type=int, default=3)
    p.add_argument("--sample-repeats-32", type=int, default=2)
    p.add_argument("--matmul-size", type=int, default=0, help="0: 4096 on CPU, 8192 on CUDA")
    p.add_argument("--matmul-repeats", type=int, default=3)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-sample", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke check: 1 warm-up and 2 timed repeats everywhere")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.train_warmup = args.train_warmup_32 = args.sample_warmup = 1
        args.train_repeats = args.train_repeats_32 = args.sample_repeats = args.sample_repeats_32 = 2
        args.matmul_repeats = 2
        args.tag = args.tag or "quick"
    return args


def run_configs(args: argparse.Namespace) -> dict[str, RunConfig]:
    return {
        "16": RunConfig(args.train_batch_16, args.train_warmup, args.train_repeats, args.sample_n_16,
                        args.sample_warmup, args.sample_warmup_steps, args.sample_repeats),
        "32": RunConfig(args.train_batch_32, args.train_warmup_32, args.train_repeats_32, args.sample_n_32,
                        args.sample_warmup, args.sample_warmup_steps, args.sample_repeats_32),
    }


def variants_for(spec: ModelSpec, args: argparse.Namespace) -> dict[str, Settings]:
    names = [v.strip() for v in args.precision.split(",") if v.strip()]
    unknown = [n for n in names if n not in BASE_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown precision {unknown}; choose from {sorted(BASE_VARIANTS)}")
    out = {n: BASE_VARIANTS[n] for n in names}
    if spec.family == "ours":
        extra = [f"{n}-cl" for n in names] if args.channels_last else []
        extra += [v.strip() for v in args.ours_variants.split(",") if v.strip()]
        for n in extra:
            if n not in OUR_VARIANTS:
                raise SystemExit(f"unknown variant {n!r} for our models; choose from {sorted(OUR_VARIANTS)}")
            out[n] = OUR_VARIANTS[n]
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_model(spec: ModelSpec, variants: dict[str, Settings], rc: RunConfig, device: torch.device,
                peaks: dict[str, dict[str, float]], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    fwd_flops = attn_added = None
    for vname, settings in variants.items():
        row: dict[str, Any] = {"model": spec.key, "label": spec.label, "family": spec.family, "res": spec.image_size,
                               "variant": vname, "settings": asdict(settings), "note": spec.note}
        t_start = time.perf_counter()
        try:
            runner = Runner(spec, settings, device)
            if fwd_flops is None:
                fwd_flops, attn_added = count_forward_flops(spec, runner.net, device)
            row.update(params=runner.params, fwd_flops=fwd_flops, attn_flops_added=attn_added)
            parts = []
            if not args.skip_train:
                row["train"] = tr = runner.time_training(rc)
                tr["gflops_s"] = 3 * fwd_flops * tr["img_s"]["median"] / 1e9  # forward + backward ~ 3 forwards
                parts.append(tr)
            if not args.skip_sample:
                row["sample"] = sa = runner.time_sampling(rc)
                sa["gflops_s"] = fwd_flops * DDIM_STEPS * sa["img_s"]["median"] / 1e9
                parts.append(sa)
            for part in parts:
                # % of the peak of the variant's precision; both kept in the JSON
                part["pct_peak_fp32"] = 100 * part["gflops_s"] / peaks["fp32"]["median"]
                part["pct_peak_bf16"] = 100 * part["gflops_s"] / peaks["bf16"]["median"]
                part["pct_peak"] = part["pct_peak_bf16" if settings.autocast == "bf16" else "pct_peak_fp32"]
            del runner
            gc.collect()
        except Exception as e:  # noqa: BLE001 - one broken model must not lose the whole run
            row["error"] = f"{type(e).__name__}: {e}"
        row["wall_s"] = time.perf_counter() - t_start
        tr, sa = row.get("train"), row.get("sample")
        log(f"  {spec.key:20s} {vname:8s} " + (f"ERROR {row['error']}" if "error" in row else
            f"train {_fmt_rate(tr and tr['img_s'])} img/s, DDIM-25 {_fmt_rate(sa and sa['img_s'])} img/s") + f"  ({row['wall_s']:.0f} s)")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    specs = model_specs()
    if args.list:
        for s in specs.values():
            print(f"{s.key:20s} {s.image_size:3d}x{s.image_size:<3d} {s.family:5s} {s.label}")
        print("variants:", ", ".join(f"{k}={v}" for k, v in all_variants().items()))
        return {}
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    selected = select_models(args.models, specs)
    configs = run_configs(args)
    t_start = time.perf_counter()
    now = _dt.datetime.now()
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench.py", *argv])

    notes = []
    if importlib.util.find_spec("denoising_diffusion_pytorch") is None:
        dropped = [s.key for s in selected if s.kind == "lucidrains"]
        selected = [s for s in selected if s.kind != "lucidrains"]
        if dropped:
            notes.append(f"skipped {dropped}: denoising-diffusion-pytorch not installed (pip install -r requirements-bench.txt)")

    info = machine_info(device)
    log(f"device {device}, {info['cpu_model']}, {info['torch_threads']} threads, torch {info['torch']}")
    n = args.matmul_size or (8192 if device.type == "cuda" else 4096)
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peaks[name] = measure_matmul_peak(device, dtype, n, args.matmul_repeats)
        log(f"matmul {name} {n}x{n}: {peaks[name]['median']:.0f} GFLOP/s (min {peaks[name]['min']:.0f}, max {peaks[name]['max']:.0f})")

    results = []
    for spec in selected:
        rows = bench_model(spec, variants_for(spec, args), configs[str(spec.image_size)], device, peaks, args)
        results += rows
    # the peak again at the end: on a shared machine the spread tells how much the machine moved
    peaks_end = {name: measure_matmul_peak(device, dtype, n, args.matmul_repeats)
                 for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    notes.append("matmul peak re-measured at the end: " + ", ".join(f"{k} {v['median']:.0f} GFLOP/s" for k, v in peaks_end.items()))
    if any(s.kind == "course" for s in selected):
        notes.append("course ContextUnet: written from the course's description; its 1x1 shortcut of init_conv is a registered "
                     "module here (the course creates a fresh one in every forward), t is fed as t/T (B,1,1,1), contexts one-hot (B,5).")
    if any(s.kind == "difflab" for s in selected):
        notes.append("ours: conf/model/*.yaml via hydra.utils.instantiate, one-hot contexts with context dropout 0.1 in training, "
                     "dropout as in the yaml (0.1); autocast via generate(autocast_dtype=...) in sampling (attention stays fp32 on CPU).")
    if device.type == "cpu":
        notes.append("shared CPU machines are noisy: compare medians and ratios from one run.")

    report = {
        "date": now.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command,
        "machine": info,
        "peaks": peaks,
        "peaks_end": peaks_end,
        "config": {k: asdict(v) for k, v in configs.items()},
        "sample_loops": {"ours": "difflab.samplers.DDIMSampler(steps=25, eta=0, trailing) + difflab.sampling.generate",
                         "peers": "diffusers DDIMScheduler(linear 1e-4..0.02, 1000, trailing, clip_sample, eta=0)"},
        "results": results,
        "notes": notes,
        "wall_s": time.perf_counter() - t_start,
    }
    report["notes"].append(f"total wall time {report['wall_s']:.0f} s")
    md = markdown(report)
    print(md)
    if not args.no_save:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{now.strftime('%Y-%m-%d')}_{device.type}" + (f"_{args.tag}" if args.tag else "")
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
        (out / f"{stem}.md").write_text(md)
        log(f"wrote {out / stem}.json and .md")
    return report


if __name__ == "__main__":
    main()
