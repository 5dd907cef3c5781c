"""Speed benchmark: difflab's UNets against the peers a user would pick instead, through the project's own code.

For each model and variant, on the same image size, batch and random data:
  (a) the training step train.py runs: DiffusionModule from difflab.train.build_module(cfg), fitted by a
      lightning.Trainer from cfg.trainer (gradient clipping, precision plugin, EMA callback), each optimizer
      step timed by a callback;
  (b) DDIM-25 (eta 0) sampling through difflab.sampling.generate (a SamplingSpec bound to the model) in precision 32 or bf16.
The peers (bench/peers.py) enter as cfg.model behind an adapter with our net interface, so they run the same
training and sampling code. Reported: parameters, forward FLOPs per image, img/s (median and IQR after
warm-up), GFLOP/s and % of the matmul peak measured in the same run, ours / peer ratios.

    python bench/bench.py                          # all models, fp32 and bf16-mixed
    python bench/bench.py --quick --models ours    # smoke check
    python bench/bench.py --models 16 --rounds 2   # the sprites-size models, two interleaved rounds
    python bench/bench.py --device cuda --precision fp32,bf16 --channels-last

Modules: runner.py (models, variants, the timed training and sampling), flops.py (FLOP counting, matmul
peak), report.py (machine info, tables, files), peers.py (peer networks and their adapter).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _load_runner():
    # bench/ is not a package: load runner.py by path (it loads peers.py and flops.py the same way)
    key = "difflab_bench_runner"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / "runner.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


runner = _load_runner()
peers, flops = runner.peers, runner.flops
report_mod = runner.sibling("report")
DDIM_STEPS = runner.DDIM_STEPS
ModelSpec, RunConfig, Variant, Runner = runner.ModelSpec, runner.RunConfig, runner.Variant, runner.Runner
BASE_VARIANTS, OUR_VARIANTS, all_variants, model_specs = runner.BASE_VARIANTS, runner.OUR_VARIANTS, runner.all_variants, runner.model_specs


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--models", default="all", help="comma list of model keys or groups (all, ours, peers, 16, 32); see --list")
    p.add_argument("--list", action="store_true", help="list the models and variants and exit")
    p.add_argument("--precision", default="auto", help=f"base variants run for every model, a comma list of {sorted(BASE_VARIANTS)} "
                   "(fp32: trainer.precision=32, sampling precision 32; bf16: bf16-mixed, sampling precision bf16) or auto: "
                   "fp32,bf16 where the hardware runs bf16 fast (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32")
    p.add_argument("--channels-last", action="store_true", help="also run our models with module.channels_last=true (each selected precision)")
    p.add_argument("--ours-variants", default="", help=f"extra variants for our models only: {sorted(OUR_VARIANTS)}")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a further train-config override for every model (repeatable), e.g. trainer.gradient_clip_val=null")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default, all cores)")
    p.add_argument("--rounds", type=int, default=1, help="run the whole sweep this many times, interleaved, and pool the timings "
                   "(on a shared machine, drift then hits every model alike)")
    p.add_argument("--train-batch-16", type=int, default=64, help="data.batch_size, 16x16 models (conf/data/sprites.yaml: 64)")
    p.add_argument("--train-batch-32", type=int, default=16, help="data.batch_size, 32x32 models (fewer than cifar10.yaml's 128: CPU)")
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
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance w for the conditional models' sampling")
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
                        args.sample_warmup, args.sample_warmup_steps, args.sample_repeats, args.guidance),
        "32": RunConfig(args.train_batch_32, args.train_warmup_32, args.train_repeats_32, args.sample_n_32,
                        args.sample_warmup, args.sample_warmup_steps, args.sample_repeats_32, args.guidance),
    }


def variants_for(spec: ModelSpec, args: argparse.Namespace) -> dict[str, Variant]:
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    specs = model_specs()
    if args.list:
        for s in specs.values():
            print(f"{s.key:20s} {s.image_size:3d}x{s.image_size:<3d} {s.family:5s} {s.label}  [{' '.join(s.overrides)}]")
        print("variants:")
        for k, v in all_variants().items():
            print(f"  {k:16s} {' '.join(v.overrides) or '(config defaults)'}; sampling precision {v.sample_precision}")
        return {}
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    selected = select_models(args.models, specs)
    configs = run_configs(args)
    t_start = time.perf_counter()
    now = _dt.datetime.now()
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench.py", *argv])

    notes = []
    if args.precision == "auto":
        from difflab.config import cpu_has_bf16

        fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
        args.precision = "fp32,bf16" if fast else "fp32"
        if not fast:
            notes.append("--precision auto: fp32 only, this CPU has no AVX512-BF16/AMX (bf16 convolutions run emulated, "
                         "tens of times slower; train.py's default trainer.precision is 32 here). --precision fp32,bf16 forces both.")
    if importlib.util.find_spec("denoising_diffusion_pytorch") is None:
        dropped = [s.key for s in selected if s.kind == "lucidrains"]
        selected = [s for s in selected if s.kind != "lucidrains"]
        if dropped:
            notes.append(f"skipped {dropped}: denoising-diffusion-pytorch not installed (pip install -r requirements-bench.txt)")

    info = report_mod.machine_info(device)
    log(f"device {device}, {info['cpu_model']}, {info['torch_threads']} threads, torch {info['torch']}")
    n = args.matmul_size or (8192 if device.type == "cuda" else 4096)
    dtypes = (("fp32", torch.float32), ("bf16", torch.bfloat16))
    peaks = {name: flops.matmul_peak(device, dtype, n, args.matmul_repeats) for name, dtype in dtypes}
    for name, pk in peaks.items():
        log(f"matmul {name} {pk['size']}x{pk['size']}: {pk['median']:.3g} GFLOP/s (min {pk['min']:.3g}, max {pk['max']:.3g})")

    rounds = []
    for r in range(max(args.rounds, 1)):
        if args.rounds > 1:
            log(f"round {r + 1}/{args.rounds}")
        rows = []
        for spec in selected:
            rows += runner.run_model(spec, variants_for(spec, args), configs[str(spec.image_size)], device, peaks,
                                     args.skip_train, args.skip_sample, args.override, log=log)
        rounds.append(rows)
    results = runner.merge_rounds(rounds, peaks)
    # the peak again at the end: on a shared machine the spread tells how much the machine moved
    peaks_end = {name: flops.matmul_peak(device, dtype, n, args.matmul_repeats) for name, dtype in dtypes}
    notes.append("matmul peak re-measured at the end: " + ", ".join(f"{k} {v['median']:.3g} GFLOP/s" for k, v in peaks_end.items()))
    if any(s.kind == "course" for s in selected):
        notes.append("course ContextUnet: written from the course's description (its 1x1 shortcut of init_conv is a registered "
                     "module here); the adapter feeds t as t/T (B,1,1,1) and a dropped context as the course's zero context; "
                     "data=sprites_course (5 context features).")
    if any(s.family == "ours" for s in selected):
        notes.append("ours: conf/model/<preset>.yaml as train.py builds it (conditional, one-hot contexts, context dropout "
                     "p_uncond 0.1, the preset's own conditioning and dropout: unet_sprites AdaGN and no dropout, unet_cifar "
                     "the embedding added and dropout 0.1), with train.py's default objective (v-prediction, min-SNR-5 "
                     "weighting); the peers train unconditionally (diffusers, lucidrains) or "
                     "with the course's 5 contexts, under the same DiffusionModule, optimizer, LR schedule, clipping and EMA.")
    ok = [r for r in results if "error" not in r and r.get("train") and r["train"].get("period_img_s")]
    if ok:
        over = sorted(r["train"]["img_s"]["median"] / r["train"]["period_img_s"]["median"] - 1 for r in ok)
        notes.append(f"per-step loop overhead outside on_train_batch_start..end (batch fetch, transfer, [-1, 1] scaling, "
                     f"flips, per-step seeding): {100 * over[len(over) // 2]:.1f}% median over the rows "
                     f"({100 * over[0]:.1f}% to {100 * over[-1]:.1f}%), not in the img/s above (JSON: period_img_s).")
    if device.type == "cpu":
        notes.append("shared CPU machines are noisy: compare medians and ratios from one run.")

    report = {
        "date": now.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command,
        "machine": info,
        "peaks": peaks,
        "peaks_end": peaks_end,
        "rounds": max(args.rounds, 1),
        "guidance": args.guidance,
        "overrides": args.override,
        "config": {k: asdict(v) for k, v in configs.items() if any(str(s.image_size) == k for s in selected)},
        "train_path": "difflab.train.build_module(cfg) + lightning.Trainer(**cfg.trainer) with the EMA callback; StepTimer callback",
        "sample_loop": "difflab.sampling.generate(SamplingSpec(DDIMSampler(steps=25, eta=0), palette=None).bind(model))",
        "results": results,
        "ratios": report_mod.ratios(results),
        "notes": notes,
        "wall_s": time.perf_counter() - t_start,
    }
    report["notes"].append(f"total wall time {report['wall_s']:.0f} s")
    print(report_mod.markdown(report))
    if not args.no_save:
        stem = f"{now.strftime('%Y-%m-%d')}_{device.type}" + (f"_{args.tag}" if args.tag else "")
        js, md = report_mod.save(report, args.out, stem)
        log(f"wrote {js} and {md}")
    return report


if __name__ == "__main__":
    main()
