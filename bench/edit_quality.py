"""How well the edits work on held-out real sprites: inpainting (RePaint, plain replacement, the model tuned for
inpainting and the few-step consistency model, against fresh samples),
variations and class transfer against strength, interpolation smoothness. One process, one machine.

python bench/edit_quality.py [--ckpt pretrained] [--inpaint-ckpt pretrained_inpaint] [--fast-ckpt pretrained_fast] [--limit N] [--seeds 0,1,2] --out docs/results/edits

Inpainting: every held-out sprite with its top, bottom, left and right half to fill, its own label; scored with the
project's metrics (classifier features, FD against the training images) next to as many fresh samples with the same
labels (equal n and label mix); as a control, the inpainting model on training-split sprites with the held-out label mix
(sources the classifier was trained on). Variations: every held-out sprite at strengths 0.2 ... 1.0 with its own label, and with
another label (class transfer; the targets cycle over the other classes); mean |pixel change| from the source and the
classifier's class-balanced accuracy for the asked label. Interpolation: frame-to-frame mean |pixel change| over pairs of samples at
the default 16 frames. Writes <out>.md (the tables) and <out>_ladder.png (a few sources at each strength).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

from difflab import masks
from difflab.editing import Inpaint, Interpolate, Vary
from difflab.images import grid, save_png
from difflab.metrics.intervals import t_interval
from difflab.metrics.suite import MetricsConfig, MetricsContext
from difflab.model import load_model
from difflab.sampling import SamplingSpec, generate
from report import cpu_name  # noqa: E402  (bench/report.py: python bench/edit_quality.py puts bench/ on the path)

REGIONS = masks.REGIONS[:4]  # the halves
SOLVER = {"_target_": "difflab.samplers.DPMSolverPP2MSampler", "steps": 15}  # the default sampling: DPM-Solver++ 15, guidance 2
FEW_STEP = {"_target_": "difflab.samplers.ConsistencySampler", "steps": 2}  # a consistency model's default: 2 calls, guidance distilled in
# row: (the model, --ckpt, --inpaint-ckpt or --fast-ckpt; the inpainting method, None for fresh samples)
INPAINTING = {"fresh samples": ("plain", None), "inpainted, replace": ("plain", "replace"), "inpainted, repaint": ("plain", "repaint"),
              "inpainted, inpainting model": ("inpainting", "replace"),  # one pass: it sees the known pixels
              "fresh samples, few-step model": ("fast", None), "inpainted, few-step model": ("fast", "replace")}
STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)
NEAR_COPY = 10  # mean |pixel change| (0-255) inside the filled half below which a fill counts as a near copy of its source


def score(context: MetricsContext, images: torch.Tensor, labels: torch.Tensor) -> dict:
    m = context.new_metrics(sync=False)
    for start in range(0, len(images), 512):
        part = slice(start, start + 512)
        m.update(images[part], labels[part], torch.arange(len(images))[part])
    return m.compute()


def per_class(scores: dict, names: list[str]) -> str:
    return " / ".join(f"{scores.get(f'cond_acc/{c}', float('nan')):.2f}" for c in names)


def hits(context: MetricsContext, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image, whether the classifier assigns it the asked class."""
    return context.classifier.features_and_logits(images)[1].argmax(1) == labels


def accuracy(context: MetricsContext, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Class-balanced: the mean over the asked classes of the share the classifier assigns to the asked class."""
    right = hits(context, images, labels).float()
    return float(torch.stack([right[labels == c].mean() for c in labels.unique()]).mean())


def timed(model, spec, contexts, edit=None):
    start = time.perf_counter()
    out = generate(spec.bind(model), contexts, edit=edit)
    return out, time.perf_counter() - start


def halves_of(images: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image four times, with its top, bottom, left and right half to fill."""
    n = len(images)
    return images.repeat(len(REGIONS), 1, 1, 1), torch.cat([masks.region(r, size).expand(n, 1, size, size) for r in REGIONS])


def change(out: torch.Tensor, sources: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
    """Per image, the mean |pixel change| (0-255) from its source, over the pixels ``where`` (N, 1, H, W) is true (None: all)."""
    diff = (out.float() - sources.float()).abs()
    if where is None:
        return diff.mean((1, 2, 3))
    return (diff * where).sum((1, 2, 3)) / (where.sum((1, 2, 3)) * sources.shape[1])


def control(context: MetricsContext, model, datamodule, held_out_labels: torch.Tensor, seeds: list[int], names: list[str],
            held_out_change: dict[str, float]) -> list[str]:
    """The default inpainting on training-split sources with the held-out label mix, against fresh samples: sources the
    classifier knows (it was trained on them), so what the fill does is not mixed with how it reads unseen sprites."""
    train, onehot = datamodule.train_set.tensors[:2]
    train_labels, g = onehot.argmax(1), torch.Generator().manual_seed(0)
    pick = torch.cat([(train_labels == c).nonzero().flatten()[torch.randperm(int((train_labels == c).sum()), generator=g)]
                      [: int((held_out_labels == c).sum())] for c in range(len(names))])
    sources, fills = halves_of(train[pick], model.image_shape[-1])
    labels = train_labels[pick].repeat(len(REGIONS))
    contexts = torch.eye(len(names))[labels]
    runs: dict[str, list[torch.Tensor]] = {"fresh samples": [], "inpainted, inpainting model": []}
    moved, near = [], []  # mean |pixel change| from the source inside the filled half: a fill that copies its source scores ~0
    for seed in seeds:
        spec = SamplingSpec(SOLVER, seed=seed)
        runs["fresh samples"].append(hits(context, generate(spec.bind(model), contexts).pixels, labels).float())
        out = generate(spec.bind(model), contexts, edit=Inpaint(sources, fills, "replace")).pixels
        runs["inpainted, inpainting model"].append(hits(context, out, labels).float())
        per_image = change(out, sources, fills)
        moved.append(float(per_image.mean()))
        near.append(float((per_image < NEAR_COPY).float().mean()))
    lines = ["", f"Control: the same halves of {len(pick)} training-split sprites with the held-out label mix "
             f"({len(sources)} images, inpainting model, one pass): the classifier recognises "
             f"{float(hits(context, train[pick], train_labels[pick]).float().mean()):.3f} of these sources. Per class, means over seeds:", "",
             "| images | balanced acc | per class (" + " / ".join(names) + ") |", "|---|---|---|"]
    for name, per_seed in runs.items():
        right = torch.stack(per_seed).mean(0)
        acc = [float(right[labels == c].mean()) for c in range(len(names))]
        lines.append(f"| {name} | {np.nanmean(acc):.3f} | " + " / ".join(f"{a:.2f}" for a in acc) + " |")
    lines += ["", f"Mean |pixel change| from the source inside the filled half (0-255): {np.mean(moved):.1f} on these training "
              "sources; on the held-out sources " + ", ".join(f"{k} {v:.1f}" for k, v in held_out_change.items()) +
              " (fresh samples: against the source they stand beside). A fill that copied its training source would score near 0; "
              f"{np.mean(near):.1%} of the training-source fills change it by less than {NEAR_COPY} on average."]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="pretrained")
    p.add_argument("--inpaint-ckpt", default="pretrained_inpaint", help="a model tuned for inpainting (experiment=sprites_inpaint)")
    p.add_argument("--fast-ckpt", default="pretrained_fast", help="a few-step consistency model (experiment=sprites_consistency)")
    p.add_argument("--limit", type=int, default=None, help="the first N held-out sprites only (a quick run)")
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2],
                   help="sampling seeds of the inpainting comparison, e.g. 0,1,2 (variations and interpolation: the first)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    models = {"plain": load_model(args.ckpt), "inpainting": load_model(args.inpaint_ckpt), "fast": load_model(args.fast_ckpt)}

    def spec_for(which: str, seed: int) -> SamplingSpec:
        if which == "fast":
            return SamplingSpec(FEW_STEP, guidance=models["fast"].objective.distilled_guidance, seed=seed)
        return SamplingSpec(SOLVER, seed=seed)

    model = models["plain"]
    datamodule = instantiate(model.config["data"])
    datamodule.setup("fit")
    images, onehot = datamodule.val_set.tensors[:2]
    images, labels = images[: args.limit], onehot[: args.limit].argmax(1)
    n, k, size, names = len(images), model.num_classes, model.image_shape[-1], model.class_names
    context = MetricsContext(MetricsConfig(), datamodule, model.data or datamodule.identity(), conditional=True)
    spec = spec_for("plain", args.seeds[0])
    lines = [f"# Edits of held-out sprites ({args.ckpt}; inpainting model {args.inpaint_ckpt}; {n} held-out sprites, DPM-Solver++(2M) 15 steps, guidance 2; "
             f"few-step model {args.fast_ckpt}, consistency sampling 2 steps; palette sprite:16; {cpu_name()}, {torch.get_num_threads()} threads)", ""]

    # inpainting: 4 halves of every held-out sprite, against fresh samples with the same labels, at each sampling seed
    sources, fills = halves_of(images, size)
    all_labels = labels.repeat(len(REGIONS))
    contexts = torch.eye(k)[all_labels]
    # half of every inpainted image is the real source: where the classifier misses the source itself, the result
    # inherits it, so the accuracy is also split by whether the classifier recognises the (whole) real source
    recognised = hits(context, images, labels).repeat(len(REGIONS))
    rows: dict[str, list[dict]] = {name: [] for name in INPAINTING}
    for seed in args.seeds:
        for name, (which, method) in INPAINTING.items():
            out, seconds = timed(models[which], spec_for(which, seed), contexts, method and Inpaint(sources, fills, method))
            rows[name].append({**score(context, out.pixels, all_labels), "seconds": seconds,
                               "halves": [accuracy(context, out.pixels[i * n:(i + 1) * n], labels) for i in range(len(REGIONS))],
                               "fill_change": float(change(out.pixels, sources, fills).mean()),
                               "recognised": accuracy(context, out.pixels[recognised], all_labels[recognised]),
                               "missed": float(hits(context, out.pixels[~recognised], all_labels[~recognised]).float().mean())
                               if (~recognised).any() else None})
    seeds = ", ".join(map(str, args.seeds))
    lines += [f"## Inpainting: each half (top, bottom, left, right) of {n} held-out sprites, its own label ({len(sources)} images)", "",
              f"Means over sampling seeds {seeds} (balanced accuracy: each seed's value in parentheses).", "",
              "| images | FD | balanced acc | per class (" + " / ".join(names) + ") | seconds per 64 |", "|---|---|---|---|---|"]
    for name, runs in rows.items():
        mean = {key: float(np.mean([r[key] for r in runs])) for key in runs[0] if key not in ("halves", "missed")}
        each = " / ".join(f"{r['cond_acc']:.3f}" for r in runs)
        lines.append(f"| {name} | {mean['fd']:.2f} | {mean['cond_acc']:.3f} ({each}) | {per_class(mean, names)} | "
                     f"{64 * mean['seconds'] / len(sources):.2f} |")
    lines += ["", "Accuracy per filled half (balanced over classes, mean over seeds):", "",
              "| method | " + " | ".join(REGIONS) + " |", "|---|" + "---|" * len(REGIONS)]
    for name, runs in rows.items():
        if INPAINTING[name][1] is not None:  # fresh samples fill no half
            lines.append(f"| {name} | " + " | ".join(f"{a:.3f}" for a in np.mean([r["halves"] for r in runs], 0)) + " |")
    lines += ["", f"Accuracy by source: the classifier recognises {int(recognised.sum()) // len(REGIONS)} of the {n} real "
              "sources themselves. Balanced accuracy of the results over those sources and plain accuracy over the others "
              "(means over seeds), and the difference from fresh samples over the recognised sources (paired t over seeds):", "",
              "| images | sources recognised | sources missed | recognised, against fresh [95%] |", "|---|---|---|---|"]
    fresh = [r["recognised"] for r in rows["fresh samples"]]
    for name, runs in rows.items():
        ours = [r["recognised"] for r in runs]
        diff = t_interval(np.subtract(ours, fresh)) if name != "fresh samples" else None
        against = "" if diff is None else f"{diff.value:+.3f} [{diff.lo:+.3f}, {diff.hi:+.3f}]"
        missed = f"{np.mean([r['missed'] for r in runs]):.3f}" if (~recognised).any() else ""
        lines.append(f"| {name} | {np.mean(ours):.3f} | {missed} | {against} |")
    lines += control(context, models["inpainting"], datamodule, labels, args.seeds, names,
                     {name: float(np.mean([r["fill_change"] for r in runs])) for name, runs in rows.items()})
    reference = context.reference()
    lines += ["", f"The real held-out sprites themselves (n={reference['n']}): FD {reference['fd']:.2f}, balanced accuracy "
              f"{reference['cond_acc']:.3f}, per class {per_class(reference, names)} (FD grows as n shrinks: compare the rows above "
              "with each other).", ""]

    # variations and class transfer against strength
    others = (labels + 1 + torch.arange(n) % (k - 1)) % k  # another class for each source, cycling over the other classes
    lines += [f"## Variations (own label) and class transfer (another label) against strength, {n} held-out sprites", "",
              "| strength | network calls | change from source, own label | accuracy, own label | change, other label | accuracy, other label |",
              "|---|---|---|---|---|---|"]
    ladder = []
    for strength in STRENGTHS:
        same = generate(spec.bind(model), torch.eye(k)[labels], edit=Vary(images, strength)).pixels
        moved = generate(spec.bind(model), torch.eye(k)[others], edit=Vary(images, strength)).pixels
        calls = 2 * (15 - Vary(images, strength).start(15))
        lines.append(f"| {strength:.1f} | {calls} | {change(same, images).mean():.1f} | {accuracy(context, same, labels):.3f} | "
                     f"{change(moved, images).mean():.1f} | "
                     f"{accuracy(context, moved, others):.3f} |")
        ladder.append((same[:6], moved[:6]))
    show = torch.stack([torch.cat([images[:6][i:i + 1], *(s[i:i + 1] for s, _ in ladder), *(m[i:i + 1] for _, m in ladder)])
                        for i in range(min(6, n))]).flatten(0, 1)
    save_png(grid(show, 1 + 2 * len(STRENGTHS)), args.out.with_name(args.out.name + "_ladder.png"))
    fast, few = models["fast"], spec_for("fast", args.seeds[0])
    same = generate(few.bind(fast), torch.eye(k)[labels], edit=Vary(images, 0.5)).pixels
    moved = generate(few.bind(fast), torch.eye(k)[others], edit=Vary(images, 0.5)).pixels
    lines += ["", f"The few-step model ({args.fast_ckpt}, 2 steps): a strength is rounded to whole steps of its sampler: every strength "
              f"below 0.75 redoes its last step (one network call), 0.75 and above both. At 0.5: change from source {change(same, images).mean():.1f}, "
              f"accuracy {accuracy(context, same, labels):.3f} (own label); change {change(moved, images).mean():.1f}, "
              f"accuracy {accuracy(context, moved, others):.3f} (other label)."]
    lines += ["", f"{args.out.name}_ladder.png: per row a source, then its own label at strengths {', '.join(map(str, STRENGTHS))}, "
              "then the other label at the same strengths.", ""]

    # interpolation smoothness: 24 pairs of seeds, 16 frames, same label (and the label moving for half of them)
    frames, changes = 16, []
    w = torch.linspace(0, 1, frames, dtype=torch.float64)
    for pair in range(24):
        a, b = pair % k, (pair % k if pair < 12 else (pair + 3) % k)
        ctx = ((1 - w)[:, None] * torch.eye(k)[a].double() + w[:, None] * torch.eye(k)[b].double()).float()
        out = generate(spec.bind(model), ctx, edit=Interpolate([(pair, 0), (100 + pair, 0)], w))
        changes.append(change(out.pixels[1:], out.pixels[:-1]))
    c = torch.stack(changes)
    ratio = c.max(1).values / c.mean(1)
    lines += [f"## Interpolation: 24 pairs of samples (12 with one label, 12 with the label moving too), {frames} frames", "",
              f"Frame-to-frame mean |pixel change| (0-255): mean {c.mean():.1f}, median {c.median():.1f}, largest {c.max():.1f}. "
              f"Largest change over the pair's mean change: median {ratio.median():.2f}, largest {ratio.max():.2f}.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
