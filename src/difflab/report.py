"""The report of a sweep, or of any run folders: which configuration is better, by how much, and whether that beats the
seed noise.

    python -m difflab.report <sweep dir | run dir ...> [--baseline "schedule=linear"] [--out DIR] [--draws 1000]

A train.py or evaluate.py -m sweep writes it into its sweep folder when it ends (SweepReport, conf/hydra/default.yaml;
report.baseline=... on the sweep's command line). Runs are grouped by the overrides that differ between them, seed
left out: the seeds of a configuration are pooled. Each figure gets a 95% interval: Student's t over seeds, or for a
configuration of one run a bootstrap over its generated images (sampling noise only). Each configuration is compared
with the baseline: the difference with its interval (paired by seed where the seeds match) and one word.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from difflab.config import NOT_A_SETTING, parse_overrides
from difflab.errors import DifflabError
from difflab.metrics.intervals import (
    FrechetToReal,
    Interval,
    balanced_accuracy,
    bootstrap,
    counts,
    holm,
    percentile_interval,
    t_interval,
    welch_interval,
)

log = logging.getLogger(__name__)

# figure -> (title, lower is better); the first three get a verdict
FIGURES = {"fd": ("FD", True), "cond_acc": ("balanced acc", False), "kid": ("KID", True), "memorized": ("memorized", True)}
VERDICT_FIGURES = ("fd", "cond_acc", "kid")
ALPHA = 0.05  # the level of every verdict (its intervals are 95%)
UNEQUAL_STEPS = 0.02  # configurations whose mean step counts differ by more than this share get the line that says so
# the values a figure can take: a t interval over three seeds of accuracies near 1 reaches past 1, and the mean it
# brackets cannot, so a level's interval is cut to the range (KID, an unbiased estimate, can be negative: no bounds)
RANGES = {"fd": (0.0, math.inf), "cond_acc": (0.0, 1.0), "memorized": (0.0, 1.0)}

class ReportError(DifflabError, ValueError):
    """Nothing to report on, or runs that cannot be compared."""


@dataclass
class Run:
    folder: Path
    kind: str  # "train" (final.json) or "evaluate" (result.json)
    summary: dict[str, Any]
    overrides: dict[str, str]  # the settings (seed and NOT_A_SETTING left out)
    given: dict[str, str] = field(default_factory=dict)  # every override of its command line
    replicates: tuple[str, ...] = ("seed",)  # what makes this run one replicate of its configuration (configurations sets it)
    _draws: dict[tuple[str, int], np.ndarray | None] = field(default_factory=dict, repr=False)

    @property
    def row(self) -> dict[str, Any]:
        return self.summary.get("row") or {}

    @property
    def training(self) -> dict[str, Any]:
        return self.summary.get("training") or {}

    @property
    def seed(self) -> int | None:
        return (self.summary.get("config") or {}).get("seed")

    @property
    def unit(self) -> str:
        """What its replicates are called in the report."""
        return "seeds" if self.replicates == ("seed",) else "replicates"

    @property
    def key(self) -> tuple[Any, ...] | str:
        """Its replicate (seed; or e.g. (seed, ckpt)): runs of two configurations with equal keys are paired. A run
        without a seed pairs with nothing (its folder)."""
        parts = [self.seed if k == "seed" else self.given.get(k) for k in self.replicates]
        return str(self.folder) if any(v is None for v in parts) else tuple(parts)

    @property
    def data(self) -> str:
        data = (self.summary.get("config") or {}).get("data") or {}
        return f"{data.get('_target_', 'the checkpoint data')}{data.get('classes') or ''}"

    @cached_property
    def scores(self) -> dict[str, np.ndarray] | None:
        path = self.folder / "scores.npz"
        if not path.is_file():
            return None
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    def draws(self, figure: str, n: int) -> np.ndarray | None:
        """Bootstrap draws of a figure over this run's generated images (resampled within each class), from a stream of
        its own (runs are resampled independently), computed once."""
        key = (figure, n)
        if key not in self._draws:
            self._draws[key] = self._bootstrap(figure, n, zlib.crc32(str(self.folder).encode()))
        return self._draws[key]

    def _bootstrap(self, figure: str, n: int, seed: int) -> np.ndarray | None:
        s = self.scores
        if s is None or n < 2:
            return None
        strata = s["labels"] if "labels" in s else np.zeros(len(s["features"]), dtype=np.int64)
        if figure == "fd":
            fd, features = FrechetToReal(s["real_mu"], s["real_sigma"]), s["features"]
            return bootstrap(lambda i: fd.resampled(features, counts(i, len(features))), strata, n, seed)
        if figure == "cond_acc" and "predictions" in s:
            labels, predictions = s["labels"], s["predictions"]
            return bootstrap(lambda i: balanced_accuracy(labels[i], predictions[i]), strata, n, seed)
        return None

    def curve(self, key: str) -> list[tuple[float, float, float]]:
        """(seconds, images seen, value) at every validation that logged ``key`` (csv logs, all versions of a resumed run)."""
        import csv

        points = []
        for path in sorted(self.folder.glob("csv/version_*/metrics.csv")):
            with path.open() as f:
                by_step: dict[str, dict[str, str]] = {}
                for r in csv.DictReader(f):
                    by_step.setdefault(r.get("step", ""), {}).update({k: v for k, v in r.items() if v not in ("", None)})
            for r in by_step.values():
                if r.get(key) and r.get("trainer/seconds") and r.get("trainer/images_seen"):
                    points.append((float(r["trainer/seconds"]), float(r["trainer/images_seen"]), float(r[key])))
        return sorted(points)


def read_runs(paths: Sequence[str | Path], left_out: list[tuple[Path, str]] | None = None) -> list[Run]:
    """Every finished run under the given folders (a sweep folder, run folders), in the order given, a sweep's in job order.
    ``left_out`` gets (folder, why) for each job folder that is not one: its final.json / result.json unreadable, or none."""
    found: list[Path] = []
    jobs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p}: no such folder; give a sweep folder (logs/train/multiruns/...) or run folders")
        found += sorted((f for f in p.rglob("*.json") if f.name in ("final.json", "result.json") and f.parent.name != "wandb"),
                        key=_job_order)
        jobs += sorted((f.parent.parent for f in p.rglob(".hydra/overrides.yaml")), key=lambda j: _job_order(j / "x"))
    runs = []
    for path in dict.fromkeys(found):
        try:
            summary = json.loads(path.read_text())
            if not isinstance(summary, dict):
                raise ValueError(f"holds a {type(summary).__name__}, not a result")
        except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
            if left_out is not None:
                left_out.append((path.parent, f"{path.name} unreadable ({err})"))
            continue
        overrides_file = path.parent / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
        parsed = parse_overrides(overrides)
        runs.append(Run(path.parent, "train" if path.name == "final.json" else "evaluate", summary,
                        {k: v for k, v in parsed.items() if not NOT_A_SETTING.match(k)}, parsed))
    if left_out is not None:
        have = {p.parent for p in found}
        left_out += [(j, "no final.json or result.json: the job did not finish") for j in dict.fromkeys(jobs) if j not in have]
    if not runs:
        raise ReportError(f"no finished runs (final.json or result.json) under {', '.join(map(str, paths))}: train or evaluate first")
    return runs


def _job_order(path: Path) -> tuple[float, str]:
    # job folders are "<job number>_<overrides>": 2_... before 10_...
    match = re.match(r"\d+", path.parent.name)
    return (int(match.group()) if match else math.inf, str(path))


@dataclass
class Configuration:
    label: str
    runs: list[Run] = field(default_factory=list)

    def values(self, figure: str) -> dict[tuple[Any, ...] | str, float]:
        """By replicate (Run.key: the seed, or e.g. (seed, ckpt); runs with seed=null by their folder: they pair with nothing)."""
        return {r.key: float(r.row[figure]) for r in self.runs if isinstance(r.row.get(figure), (int, float))}

    def mean(self, key: str, source: str = "training") -> float | None:
        found = [getattr(r, source).get(key) for r in self.runs]
        found = [v for v in found if isinstance(v, (int, float))]
        return float(np.mean(found)) if found else None


def configurations(runs: list[Run], replicates: Sequence[str] = ("seed",)) -> list[Configuration]:
    """Runs grouped by the overrides that differ between them, in order of first appearance; the ``replicates`` (the seed,
    and e.g. ckpt for evaluations of several training runs of one recipe) are left out: their runs are pooled."""
    replicates = tuple(dict.fromkeys(["seed", *replicates]))
    for key in replicates[1:]:
        if not any(key in r.given for r in runs):
            raise ReportError(f"report.replicates names {key}, which no run's command line sets: give keys of the sweep, e.g. "
                              "report.replicates=[seed,ckpt]")
    for r in runs:
        r.replicates = replicates
    kinds = {r.kind for r in runs}
    if len(kinds) > 1:
        raise ReportError("training runs and evaluate.py runs in one report: report on each kind of folder apart")
    for what, key in (("feature networks", lambda r: r.row.get("feature")), ("data sets", lambda r: r.data)):
        seen = {key(r) for r in runs if r.row}
        if len(seen) > 1:
            raise ReportError(f"these runs were scored on different {what} ({', '.join(sorted(map(str, seen)))}): their FD values "
                              "are not comparable; report on runs of one kind")
    scorers = {r.row["scorer"] for r in runs if r.row.get("scorer")}  # rows written before scorers were recorded: unknown
    if len(scorers) > 1:
        raise ReportError(f"these runs were scored by networks with different weights (scorer {', '.join(sorted(scorers))}: a "
                          "retrained classifier is another ruler): re-score them under one with python evaluate.py ckpt=<run> "
                          "metrics.classifier_ckpt=<file>")
    keys = [k for k in dict.fromkeys(k for r in runs for k in r.overrides) if k not in replicates]
    varying = [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]
    groups: dict[str, Configuration] = {}
    for r in runs:
        # the run's own values of the varying keys (a key it leaves at its default is not named)
        label = ",".join(f"{k}={r.overrides[k]}" for k in varying if k in r.overrides) or ("defaults" if varying else "all runs")
        groups.setdefault(label, Configuration(label)).runs.append(r)
    return list(groups.values())


def interval(config: Configuration, figure: str, draws: int) -> Interval | None:
    found = _interval(config, figure, draws)
    lo, hi = RANGES.get(figure, (-math.inf, math.inf))
    if found is None or math.isnan(found.lo):
        return found
    return Interval(found.value, min(max(found.lo, lo), hi), max(min(found.hi, hi), lo), found.method)


def _interval(config: Configuration, figure: str, draws: int) -> Interval | None:
    values = config.values(figure)
    if not values:
        return None
    if len(values) >= 2:
        return t_interval(list(values.values()))
    run = next(r for r in config.runs if r.key in values)
    found = run.draws(figure, draws)
    if found is None:
        return Interval(next(iter(values.values())), math.nan, math.nan, "1 run, no interval")
    return percentile_interval(values[run.key], found, method=f"bootstrap over {len(run.scores['features'])} images")


def difference(config: Configuration, base: Configuration, figure: str, draws: int) -> Interval | None:
    """config - base: paired t over the seeds both ran (2 or more), Welch's t over unmatched seeds, or with a single run on
    either side the bootstrap over images of each side (sampling noise only)."""
    a, b = config.values(figure), base.values(figure)
    if not a or not b:
        return None
    common = sorted((k for k in set(a) & set(b) if isinstance(k, tuple)), key=str)
    unit = config.runs[0].unit
    if len(a) >= 2 and len(b) >= 2:
        if len(common) >= 2:
            found = t_interval([a[s] - b[s] for s in common])
            return Interval(found.value, found.lo, found.hi, f"paired t over {len(common)} {unit}", found.p)
        found = welch_interval(list(a.values()), list(b.values()))
        return Interval(found.value, found.lo, found.hi, found.method.replace("seeds", unit), found.p)
    sides = []
    for side, values in ((config, a), (base, b)):
        runs = [r for r in side.runs if r.key in values]
        found = [r.draws(figure, draws) for r in runs]
        if any(d is None for d in found):
            return Interval(float(np.mean(list(a.values())) - np.mean(list(b.values()))), math.nan, math.nan, "no interval")
        sides.append(np.mean(found, axis=0))
    value = float(np.mean(list(a.values())) - np.mean(list(b.values())))
    seeds = min(len(a), len(b))
    return percentile_interval(value, sides[0] - sides[1], method=f"bootstrap over images ({seeds} seed: sampling noise only)")


def verdict(diff: Interval | None, figure: str, adjusted_p: float | None = None) -> str:
    """better / worse: the difference's interval excludes 0 and, where a report asked several questions, Holm's adjusted
    p-value is under 0.05 as well; else within noise."""
    if diff is None or math.isnan(diff.lo):
        return "no interval"
    if not diff.excludes_zero() or (adjusted_p is not None and not adjusted_p < ALPHA):
        return "within noise"
    lower_is_better = FIGURES[figure][1]
    return "better" if (diff.hi < 0) == lower_is_better else "worse"


def pick_baseline(configs: list[Configuration], baseline: str | None) -> Configuration:
    if not baseline:
        return configs[0]
    wanted = [p.strip() for p in baseline.split(",") if p.strip()]
    found = [c for c in configs if all(w in c.label.split(",") for w in wanted)]
    if len(found) != 1:
        names = "; ".join(c.label for c in configs)
        raise ReportError(f"report.baseline={baseline!r} matches {len(found)} configurations; give one of: {names}")
    return found[0]


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"


def _count(x: float | None) -> str:
    return "" if x is None or math.isnan(x) else f"{x:,.0f}"  # a mean over seeds of whole numbers: 752, not 752.333


def _with_interval(i: Interval | None) -> str:
    if i is None:
        return ""
    return _fmt(i.value) + ("" if math.isnan(i.lo) else f" [{_fmt(i.lo)}, {_fmt(i.hi)}]")


def _signed(i: Interval | None) -> str:
    if i is None:
        return ""
    body = f"{i.value:+.3g}" + ("" if math.isnan(i.lo) else f" [{i.lo:+.3g}, {i.hi:+.3g}]")
    return body


def write_report(paths: Sequence[str | Path], out: str | Path | None = None, baseline: str | None = None, draws: int = 1000,
                 command: str | None = None, replicates: Sequence[str] = ("seed",)) -> Path:
    """report.md, report.json (its tables), curves.png, grids.png and settings.png in ``out`` (default: the first folder);
    -> report.md."""
    left_out: list[tuple[Path, str]] = []
    runs = read_runs(paths, left_out)
    configs = configurations(runs, replicates)
    base = pick_baseline(configs, baseline)
    out = Path(out or paths[0])
    out.mkdir(parents=True, exist_ok=True)
    kind = runs[0].kind
    figures = [f for f in FIGURES if any(f in r.row for r in runs)]
    unit = runs[0].unit

    head = ["configuration", unit] + (["steps", "wall time", "images seen", "val/loss"] if kind == "train" else [])
    head += [FIGURES[f][0] for f in figures] + ["weakest class"]
    results = []
    for c in configs:
        cells = [c.label + (" (baseline)" if c is base else ""), str(len(c.runs))]
        if kind == "train":
            seconds = c.mean("train_seconds")
            cells += [_count(c.mean("train_steps")), _duration(seconds), _count(c.mean("images_seen")), _fmt(c.mean("val_loss"))]
        cells += [_with_interval(interval(c, f, draws)) for f in figures]
        cells.append(_weakest(c))
        results.append(cells)

    # every question the report asks (configuration x figure) gets its p-value corrected for the others (Holm)
    asked = [f for f in VERDICT_FIGURES if f in figures]
    diffs = {(c.label, f): difference(c, base, f, draws) for c in configs if c is not base for f in asked}
    tested = [k for k, d in diffs.items() if d is not None and not math.isnan(d.lo) and not math.isnan(d.p)]
    adjusted = dict(zip(tested, holm([diffs[k].p for k in tested])))
    verdict_head = ["configuration", *(f"{FIGURES[f][0]}: difference [95%]" for f in asked), "rests on"]
    verdicts, power = [], []
    for c in configs:
        if c is base:
            continue
        cells, methods, smallest = [c.label], set(), [c.label]
        for f in asked:
            diff = diffs[(c.label, f)]
            word = verdict(diff, f, adjusted.get((c.label, f)))
            if diff is None:
                cells.append("")
            elif word == "no interval":
                cells.append(f"{_signed(diff)} (no interval)")
            else:
                cells.append(f"{_signed(diff)} p {_p(diff.p)}, Holm {_p(adjusted[(c.label, f)])} **{word}**"
                             if (c.label, f) in adjusted else f"{_signed(diff)} **{word}**")
                methods.add(diff.method)
            smallest.append("" if diff is None or math.isnan(diff.lo) else f"±{_fmt(diff.half_width)}")
        cells.append("; ".join(sorted(methods)))
        verdicts.append(cells)
        power.append(smallest)

    plots = _plots(configs, kind, out) + _by_setting(configs, figures, draws, out)
    sizes = sorted({len(c.runs) for c in configs})
    what = {"seeds": "Seeds", "replicates": f"Replicates ({', '.join(runs[0].replicates)})"}[unit]
    command = command or "python -m difflab.report " + " ".join(str(p) for p in paths) + (f' --baseline "{baseline}"' if baseline else "") \
        + (f" --replicates {','.join(replicates)}" if tuple(replicates) != ("seed",) else "")
    text = [f"# Report: {len(runs)} {'training runs' if kind == 'train' else 'evaluations'} in {len(configs)} configurations",
            "", f"Folders: {', '.join(str(p) for p in paths)}. {what} per configuration: {', '.join(map(str, sizes))}. "
            f"Features: {runs[0].row.get('feature', '?')}, n = {runs[0].row.get('n', '?')} samples per run "
            f"({runs[0].row.get('sampler', '?')} {runs[0].row.get('steps', '')} steps, guidance {runs[0].row.get('guidance', '?')}).",
            "", f"Regenerate: `{command}`", ""]
    text += [f"Left out: {len(left_out)} run folder(s) that are not finished runs:", "",
             *(f"- `{folder}`: {why}" for folder, why in left_out), ""] if left_out else []
    text += ["## Results", "", *_table(head, results), ""]
    text += _unequal_steps(configs) if kind == "train" else []
    text += [f"## Against the baseline: {base.label}", ""]
    text += _table(verdict_head, verdicts) if len(configs) > 1 else ["(one configuration: nothing to compare)"]
    if len(configs) > 1:
        text += ["", "Smallest difference each comparison could have detected (the half-width of its 95% interval: a measured "
                 "difference smaller than this cannot be told from noise):", "", *_table(["configuration", *(FIGURES[f][0] for f in asked)], power)]
    text += ["", *(f"![{name}]({name}.png)" for name in plots), "",
             f"Methods: intervals are 95%. With 2 or more {unit}, Student's t over their values (a difference: the paired t "
             f"interval of the per-{unit[:-1]} differences where both ran the same {unit}, else Welch's). With one run, a percentile "
             "bootstrap (resampling the generated images within each class, FD recomputed against the same real features): it "
             "covers the sampling noise of that one model, not what another training seed would give. "
             f"{len(tested)} comparisons (configurations x figures) are corrected together by Holm's method: better / worse "
             "where the interval of the difference excludes 0 and the Holm-adjusted p-value is under 0.05; within noise "
             "otherwise."]
    path = out / "report.md"
    path.write_text("\n".join(text) + "\n")
    tables = {"results": {"columns": head, "rows": results}, "verdicts": {"columns": verdict_head, "rows": verdicts},
              "detectable": {"columns": ["configuration", *(FIGURES[f][0] for f in asked)], "rows": power},
              "left_out": {"columns": ["folder", "why"], "rows": [[str(f), w] for f, w in left_out]}}
    (out / "report.json").write_text(json.dumps({"baseline": base.label, "tables": tables}, indent=2) + "\n")
    return path


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.2g}" if p < 0.1 else f"{p:.2f}"


def _unequal_steps(configs: list[Configuration]) -> list[str]:
    """A line when the configurations made different numbers of steps (a time budget lets a faster one train longer)."""
    means = {c.label: c.mean("train_steps") for c in configs}
    if any(v is None for v in means.values()) or min(means.values()) <= 0 or max(means.values()) / min(means.values()) <= 1 + UNEQUAL_STEPS:
        return []
    each = "; ".join(f"{c.label}: {'/'.join(_count(r.training.get('train_steps')) for r in c.runs)}" for c in configs)
    return [f"Unequal training: the configurations made different numbers of steps ({each}). Under a time budget a faster "
            "configuration trains longer, so each difference below is that of the setting together with its speed; compare "
            "at equal steps (trainer.max_steps) to separate them.", ""]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _weakest(c: Configuration) -> str:
    per_class: dict[str, list[float]] = {}
    for r in c.runs:
        for k, v in r.row.items():
            if k.startswith("cond_acc/"):
                per_class.setdefault(k.split("/", 1)[1], []).append(float(v))
    if not per_class:
        return ""
    name, values = min(per_class.items(), key=lambda kv: np.mean(kv[1]))
    return f"{name} {np.mean(values):.2f}"


def _plots(configs: list[Configuration], kind: str, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    made = []
    if kind == "train":
        panels = [("val/loss", "val/loss"), ("FD", "val/fd"), ("balanced accuracy", "val/cond_acc")]
        fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.2 * len(panels)), squeeze=False)
        for row, (title, key) in enumerate(panels):
            final = {"val/fd": "fd", "val/cond_acc": "cond_acc"}.get(key)
            for c, color in zip(configs, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
                for col, x_of in enumerate((lambda p: p[0] / 60, lambda p: p[1])):
                    ax = axes[row][col]
                    curves = [[(x_of(p), p[2]) for p in r.curve(key)] for r in c.runs]
                    curves = [cv for cv in curves if cv]
                    if curves:
                        _band(ax, curves, color, c.label)
                    if final:  # the final quality of each seed, at its end
                        pts = [(x_of((r.training.get("train_seconds", 0), r.training.get("images_seen", 0))), r.row[final])
                               for r in c.runs if final in r.row]
                        if pts:
                            ax.plot(*zip(*pts), "o", color=color, label=None if curves else c.label)
                    ax.set_title(title)
                    ax.set_xlabel("wall time (min)" if col == 0 else "images seen")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=90)
        plt.close(fig)
        made.append("curves")

    grids = []
    for c in configs:
        # the lowest seed that left a final grid (a run skipped as finished by an older version may have none)
        for run in sorted(c.runs, key=lambda r: (r.seed is None, r.seed or 0)):
            found = sorted((run.folder / "samples").glob("epoch*_step*[0-9].png")) if kind == "train" else [run.folder / "samples.png"]
            if found and found[-1].is_file():
                seed = f" ({'training ' if kind == 'train' else ''}seed {run.seed})" if run.seed is not None else ""
                grids.append((c.label + seed, np.asarray(Image.open(found[-1]).convert("RGB"))))
                break
    if grids:
        fig, axes = plt.subplots(1, len(grids), figsize=(max(3.2 * len(grids), 4.8), 3.6), squeeze=False)
        for ax, (label, image) in zip(axes[0], grids):
            ax.imshow(image, interpolation="nearest")
            ax.set_title(label, fontsize=8)
            ax.axis("off")
        fig.suptitle("final samples, the same sampling noise in every panel", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "grids.png", dpi=110)
        plt.close(fig)
        made.append("grids")
    return made


def _by_setting(configs: list[Configuration], figures: list[str], draws: int, out: Path) -> list[str]:
    """settings.png: where the configurations differ in one numeric setting (ema.length=0.02,0.05,...; steps=10,25,50),
    FD and balanced accuracy against it with their intervals; a configuration whose value is not a number (null: the
    checkpoint's own EMA, auto) as a horizontal line and band."""
    keys = {c.label.split("=", 1)[0] for c in configs}
    if len(keys) != 1 or any("," in c.label or "=" not in c.label for c in configs):
        return []
    key = keys.pop()
    numeric = {}
    for c in configs:
        try:
            numeric[c.label] = float(c.label.split("=", 1)[1])
        except ValueError:
            pass
    shown = [f for f in ("fd", "cond_acc") if f in figures]
    if len(numeric) < 2 or not shown:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shown), figsize=(5.2 * len(shown), 3.8), squeeze=False)
    for ax, f in zip(axes[0], shown):
        xs, ys, lo, hi = [], [], [], []
        for c in configs:
            i = interval(c, f, draws)
            if i is None:
                continue
            if c.label in numeric:
                xs.append(numeric[c.label])
                ys.append(i.value)
                lo.append(i.value - i.lo if not math.isnan(i.lo) else 0)
                hi.append(i.hi - i.value if not math.isnan(i.hi) else 0)
            else:
                line = ax.axhline(i.value, ls="--", lw=1, color="gray", label=c.label)
                if not math.isnan(i.lo):
                    ax.axhspan(i.lo, i.hi, color=line.get_color(), alpha=0.15)
        order = np.argsort(xs)
        ax.errorbar(np.array(xs)[order], np.array(ys)[order], yerr=[np.array(lo)[order], np.array(hi)[order]], fmt="o-",
                    capsize=3, label="mean, 95% interval")
        on_x = [c for c in configs if c.label in numeric]
        shared = set.intersection(*(set(c.values(f)) for c in on_x))
        for n, replicate in enumerate(sorted((k for k in shared if isinstance(k, tuple)), key=str)):  # each across the values
            points = sorted((numeric[c.label], c.values(f)[replicate]) for c in on_x)
            ax.plot(*zip(*points), "-", color="gray", lw=0.8, alpha=0.7, label="each replicate" if n == 0 else None)
        if min(xs) > 0 and max(xs) / min(xs) > 4:
            ax.set_xscale("log")
            ax.set_xticks(sorted(xs), [f"{x:g}" for x in sorted(xs)])
            ax.minorticks_off()
        ax.set_xlabel(key)
        ax.set_title(FIGURES[f][0] + (" (lower is better)" if FIGURES[f][1] else " (higher is better)"))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "settings.png", dpi=90)
    plt.close(fig)
    return ["settings"]


def _band(ax: Any, curves: list[list[tuple[float, float]]], color: str, label: str) -> None:
    """The mean of the seeds' curves on a common x grid, with the band between the lowest and highest seed."""
    lo, hi = max(cv[0][0] for cv in curves), min(cv[-1][0] for cv in curves)
    if len(curves) == 1 or hi <= lo:  # one seed, or seeds whose curves do not overlap: each as it is
        for i, cv in enumerate(curves):
            ax.plot(*zip(*cv), ".-", color=color, alpha=0.8, label=label if i == 0 else None)
        return
    grid = np.linspace(lo, hi, 50)
    ys = np.stack([np.interp(grid, *zip(*cv)) for cv in curves])
    ax.plot(grid, ys.mean(0), color=color, label=f"{label} ({len(curves)} seeds)")
    ax.fill_between(grid, ys.min(0), ys.max(0), color=color, alpha=0.2)


class SweepReport(Callback):
    """Hydra callback: when a -m sweep ends, its report (report.baseline= / report.draws= from the sweep's command line),
    printed, and logged to the sweep's W&B group when it logged to W&B."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.sweep.dir))
        settings = config.get("report") or {}
        baseline = settings.get("baseline")
        replicates = [str(k) for k in settings.get("replicates") or ["seed"]]
        command = f"python -m difflab.report {folder}" + (f' --baseline "{baseline}"' if baseline else "") + \
            (f" --replicates {','.join(replicates)}" if replicates != ["seed"] else "")
        try:
            path = write_report([folder], folder, baseline, int(settings.get("draws", 1000)), command, replicates)
        except DifflabError as err:
            print(f"\nno sweep report: {err}")
            return
        print("\n" + path.read_text() + f"\nreport: {path}")
        if "wandb" in (config.get("logger") or {}):
            log_to_wandb(config, folder, path)


def log_to_wandb(config: DictConfig, folder: Path, report: Path) -> None:
    """The report (its text and plots) as a run of the sweep's W&B group (offline without a key)."""
    import wandb

    from difflab.loggers import use_wandb_offline_without_key

    use_wandb_offline_without_key()
    group = f"{config.hydra.job.name}-{folder.name}"  # as the runs' group (difflab_sweep_group)
    run = wandb.init(project=config.logger.wandb.get("project", "difflab"), group=group, name=f"report-{folder.name}",
                     job_type="report", dir=str(folder), reinit=True)
    tables = json.loads((report.parent / "report.json").read_text())["tables"]
    run.log({"report": wandb.Html(f"<pre>{report.read_text()}</pre>"),
             **{f"report/{name}": wandb.Table(columns=t["columns"], data=t["rows"]) for name, t in tables.items() if t["rows"]},
             **{f"report/{p.stem}": wandb.Image(str(p)) for p in sorted(folder.glob("*.png")) if p.stem in ("curves", "grids", "settings")}})
    run.finish()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m difflab.report", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="a sweep folder, or run folders (train.py or evaluate.py runs)")
    parser.add_argument("--baseline", help='the configuration to compare with, as key=value[,key=value] (default: the first)')
    parser.add_argument("--out", help="where report.md and its plots go (default: the first folder)")
    parser.add_argument("--draws", type=int, default=1000, help="bootstrap draws (default 1000)")
    parser.add_argument("--replicates", default="seed", help="what is pooled within a configuration and pairs two of them, "
                        "comma-separated (default seed; seed,ckpt: evaluations of several training runs of one recipe)")
    args = parser.parse_args(argv)
    path = write_report(args.folders, args.out, args.baseline, args.draws, replicates=args.replicates.split(","))
    print(path.read_text())
    print(f"written: {path}")
    return path


if __name__ == "__main__":
    from difflab.cli import run

    run(main)
