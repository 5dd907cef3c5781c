"""The benchmark's report: machine info, the markdown tables (results, ours / peer ratios) and the saved files."""

from __future__ import annotations

import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

CPU_FEATURES = {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8"}


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
    info: dict[str, Any] = {
        "cpu_model": cpu_model or platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "cpu_features": sorted(flags & CPU_FEATURES),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME", "MKL_NUM_THREADS") if k in os.environ},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "hostname": platform.node(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    for pkg in ("lightning", "diffusers", "denoising-diffusion-pytorch"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    return info


def cpu_name() -> str:
    """The CPU model and whether it has AMX (the bf16 matrix units PyTorch's oneDNN kernels use)."""
    info = machine_info(torch.device("cpu"))
    return f"{info['cpu_model']} ({'AMX' if 'amx_tile' in info['cpu_features'] else 'no AMX'})"


def fmt_rate(s: dict[str, float] | None) -> str:
    """median (IQR q1-q3)."""
    if not s:
        return "-"
    return f"{s['median']:.3g} ({s['q1']:.3g}-{s['q3']:.3g})"


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ours / peer of the median img/s, for each pair at the same image size and variant."""
    ok = [r for r in results if "error" not in r]
    out = []
    for ours in (r for r in ok if r["family"] == "ours"):
        for peer in (r for r in ok if r["family"] == "peer" and r["res"] == ours["res"] and r["variant"] == ours["variant"]):
            row = {"res": ours["res"], "variant": ours["variant"], "ours": ours["model"], "peer": peer["model"]}
            for part in ("train", "sample"):
                if ours.get(part) and peer.get(part):
                    row[part] = ours[part]["img_s"]["median"] / peer[part]["img_s"]["median"]
                    # per FLOP: the networks differ in size
                    row[f"{part}_per_flop"] = row[part] * ours["fwd_flops"] / peer["fwd_flops"]
            out.append(row)
    return out


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else "-"


def markdown(report: dict[str, Any]) -> str:
    m, peaks, cfg = report["machine"], report["peaks"], report["config"]
    c16, c32 = cfg.get("16"), cfg.get("32")

    present = [(name, c) for name, c in (("16x16", c16), ("32x32", c32)) if c]
    sizes = "/".join(name for name, _ in present)

    def both(key: str) -> str:
        return "/".join(str(c[key]) for _, c in present)

    load = m.get("load_avg")
    lines = [
        f"# difflab speed benchmark, {report['date']}",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} cores ({', '.join(m['cpu_features']) or 'no AVX info'}), "
        f"torch {m['torch']} with {m['torch_threads']} threads"
        + "".join(f", {k}={v}" for k, v in (m.get("env") or {}).items()) + f", lightning {m.get('lightning')}, device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + (f"; load average at the start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)" if load else ""),
        "- matmul peak at the start (" + ", ".join(f"{k} {v['size']}x{v['size']}: median {v['median']:.3g} GFLOP/s "
                                                   f"[{v['min']:.3g}-{v['max']:.3g}]" for k, v in peaks.items()) + ")",
        "- training: the real step. The train config composed from conf/ (`data=...`, `model=...` for ours; a peer's "
        "network enters as `cfg.model`, wrapped in bench/peers.py's PeerAdapter), the module from "
        "`difflab.train.build_module(cfg)` (DiffusionModule: t, noise, q_sample, context dropout, the loss of the config's "
        "objective: train.yaml's default is v-prediction with min-SNR-5 weighting), fitted by a "
        "`lightning.Trainer` from `cfg.trainer` (gradient clipping at gradient_clip_val, the precision plugin of "
        "trainer.precision, AdamW + LR schedule from conf/optim, the EMA callback from conf/callbacks; no logger, "
        "checkpoints, progress bar or sample grid) on random uint8 images through the project's ArrayDataModule. "
        "Each optimizer step is timed from on_train_batch_start to on_train_batch_end (EMA update included"
        + (", CUDA synchronised" if m["device"].startswith("cuda") else "") + "). "
        f"Batch {both('train_batch')} ({sizes}), {both('train_warmup')} warm-up and {both('train_repeats')} timed steps"
        + (f", x {report['rounds']} interleaved rounds" if report.get("rounds", 1) > 1 else "") + ".",
        f"- sampling: `difflab.sampling.generate(SamplingSpec(DDIMSampler(steps=25, eta=0), guidance="
        f"{report.get('guidance', 0.0):g}, batch_size=n, precision=..., palette=None), contexts)` on the module's model (its "
        "objective's reading of the network output included, no output stage): fp32 rows precision 32, bf16 rows precision bf16 "
        "(a bf16 copy of the weights, made once before the timed runs). "
        f"{both('sample_n')} images ({sizes}) in one batch, {both('sample_repeats')} timed runs after "
        f"{both('sample_warmup')} warm-up run(s) of {c16['sample_warmup_steps'] if c16 else c32['sample_warmup_steps']} steps.",
        "- img/s: median (IQR) over the timed steps / runs. GFLOP/s: training 3 x forward FLOPs x img/s, sampling forward "
        "FLOPs x 25 x img/s. %peak against the matmul peak of the row's precision (bf16 rows: bf16 peak).",
        "- forward FLOPs: torch.utils.flop_counter (conv, matmul, attention), batch 2, fp32, eval; the counter skips the CPU "
        "scaled_dot_product_attention kernel, so its QK^T and AV FLOPs (4 B heads L^2 d per call) are added by hand "
        "(column 'attn+', GFLOP/img, included in fwd).",
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
            cells += [part[size], fmt_rate(part["img_s"]), f"{part['gflops_s']:.0f}", f"{part['pct_peak']:.0f}%"] if part else ["-"] * 4
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    pairs = report.get("ratios") or []
    if pairs:
        lines += ["", "Ours / peer, median img/s of the same run (per FLOP: times ours' / the peer's forward FLOPs per image):", "",
                  "| res | variant | ours | peer | training | training per FLOP | DDIM-25 | DDIM-25 per FLOP |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in pairs:
            lines.append(f"| {p['res']} | {p['variant']} | {p['ours']} | {p['peer']} | {_x(p.get('train'))} | "
                         f"{_x(p.get('train_per_flop'))} | {_x(p.get('sample'))} | {_x(p.get('sample_per_flop'))} |")
    if report.get("notes"):
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def save(report: dict[str, Any], out: Path | str, stem: str) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    js.write_text(json.dumps(report, indent=1, default=str))
    md.write_text(markdown(report))
    return js, md


if __name__ == "__main__":
    # re-render a saved report's markdown: python bench/report.py bench/results/<stem>.json
    import sys

    for arg in sys.argv[1:]:
        path = Path(arg)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        print(f"wrote {path.with_suffix('.md')}")
