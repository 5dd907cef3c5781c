"""Sample quality against sampling time: the rows of evaluate.py sweeps, each timed again for 64 sprites in one process.

python bench/quality_vs_time.py <evaluate sweep dir> [<another> ...] --out docs/results/quality_vs_time

Each row of the sweeps' result.json files (its checkpoint and sampling request) is timed here in turn: 64 sprites,
8 per class cycling over the classes, median of --repeats runs after one warm-up, the output stage included, the same
threads for every row, so the seconds compare within one run on one machine. Writes <out>.md (a table: sampler, steps,
network calls, FD, balanced and per-class accuracy, colours, seconds per 64 sprites, speed-up over --baseline) and
<out>.png (FD against seconds per 64 sprites, log x; one line per sampler and checkpoint).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from difflab.metrics.summary import collect  # noqa: E402
from difflab.model import load_model  # noqa: E402
from difflab.sampling import SamplingSpec, generate  # noqa: E402
from report import cpu_name  # noqa: E402  (bench/report.py: python bench/quality_vs_time.py puts bench/ on the path)

SAMPLERS = {"ddim": "DDIM", "dpmpp": "DPM-Solver++(2M)", "heun": "Heun (EDM)", "unipc": "UniPC (bh2)", "consistency": "consistency",
            "ddpm": "DDPM", "euler": "Euler"}


def seconds_per_64(row: dict, models: dict, repeats: int) -> tuple[float, int]:
    """Median seconds for 64 sprites with this row's request; the network calls one sprite costs."""
    if row["ckpt"] not in models:  # each checkpoint loaded once for all its rows
        models[row["ckpt"]] = load_model(row["ckpt"])
    model = models[row["ckpt"]]
    sampler = {"_target_": f"difflab.samplers.{_CLASSES[row['sampler']]}", "steps": row["steps_requested"] or row["steps"]}
    if row["sampler"] == "ddpm":
        sampler.pop("steps")
    spec = SamplingSpec(sampler, guidance=row["guidance"], precision="auto", palette="sprite" if row.get("palette") else None,
                        palette_colors=int(str(row.get("palette") or "sprite:16").split(":")[1]), seed=0, batch_size=64)
    plan = spec.bind(model)
    contexts = torch.eye(model.num_classes)[torch.arange(64) % model.num_classes]
    calls = []
    hook = plan.model.net.register_forward_hook(lambda m, a, o: calls.append(1))
    generate(plan, contexts[:1])  # warm-up, and the count of network calls for one sprite
    hook.remove()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(plan, contexts)
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(calls) * (2 if row["guidance"] and row["sampler"] != "consistency" else 1)


_CLASSES = {"ddim": "DDIMSampler", "dpmpp": "DPMSolverPP2MSampler", "heun": "HeunSampler", "unipc": "UniPCSampler",
            "consistency": "ConsistencySampler", "ddpm": "DDPMSampler", "euler": "EulerSampler"}


def pool_seeds(rows: list[dict]) -> list[dict]:
    """One row per (checkpoint, sampler, steps, guidance, output stage): the figures averaged over its sampling seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["ckpt"], r["sampler"], r["steps"], r["guidance"], r.get("palette")), []).append(r)
    pooled = []
    for same in groups.values():
        row = dict(same[0])
        for k, v in row.items():
            if isinstance(v, float) and all(isinstance(o.get(k), float) for o in same):
                row[k] = sum(o[k] for o in same) / len(same)
        row["seeds"] = len(same)
        pooled.append(row)
    return pooled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline", default="dpmpp:15", help="sampler:steps the speed-up is measured against")
    args = p.parse_args()
    rows = pool_seeds([r for sweep in args.sweeps for r in collect(sweep)])
    if not rows:
        raise SystemExit(f"no result.json under {', '.join(map(str, args.sweeps))}: run the evaluate.py -m sweeps first")
    models: dict = {}
    for r in rows:
        r["s64"], r["calls"] = seconds_per_64(r, models, args.repeats)
        print(f"{r['sampler']} {r['steps']}: {r['s64']:.2f} s per 64 sprites, {r['calls']} calls per sprite, FD {r['fd']:.3f}", flush=True)
    base = next((r["s64"] for r in rows if f"{r['sampler']}:{r['steps']}" == args.baseline), None)
    classes = [k.removeprefix("acc/") for k in rows[0] if k.startswith("acc/")]
    head = ["model", "sampler", "steps", "network calls", "seeds", "FD", "balanced acc", *classes, "colours", "s per 64 sprites", "speed-up"]
    lines = [f"Timed on {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; quality: n = {rows[0]['n']} "
             f"per row and seed (the mean over the seeds), guidance {rows[0]['guidance']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [Path(r["ckpt"]).stem, SAMPLERS.get(r["sampler"], r["sampler"]), str(r["steps"]), str(r["calls"]), str(r["seeds"]),
                 f"{r['fd']:.2f}",
                 f"**{r['cond_acc']:.3f}**", *[f"{r[f'acc/{c}']:.2f}" for c in classes], f"{r['colors_median']:.0f}",
                 f"{r['s64']:.2f}", f"{base / r['s64']:.1f}x" if base else ""]
        lines.append("| " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key in dict.fromkeys((r["ckpt"], r["sampler"]) for r in rows):
        pts = sorted((r["s64"], r["fd"], r["steps"]) for r in rows if (r["ckpt"], r["sampler"]) == key)
        line, = ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", label=f"{SAMPLERS.get(key[1], key[1])} ({Path(key[0]).stem})")
        for x, y, steps in pts:
            ax.annotate(str(steps), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("seconds per 64 sprites (log)")
    ax.set_ylabel("FD (classifier features; lower is better)")
    ax.set_title(f"quality against sampling time, {cpu_name()}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
