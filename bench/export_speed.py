"""Seconds per 64 sprites: PyTorch ``generate`` against the exported ONNX generator in onnxruntime, one run, this CPU.

python bench/export_speed.py [--ckpt pretrained] [--sampler auto] [--steps N] [--n 64] [--repeats 3] [--threads CORES] [--inpaint]

The same model, sampler, steps and guidance on both sides (the graph is exported here, into a temporary folder), both
at --threads intra-op threads (default: every core), median of --repeats timed runs after one warm-up each. Sampling
only: the palette stage (PIL, the same on both sides) is left out. PyTorch runs in float32, as the graph does, and in
the precision sample.py picks by default (auto: bf16 on CPUs with AMX or AVX-512-BF16). --inpaint: the export's
--inpaint graph against generate(edit=Inpaint), the top half of held-out sprites to fill (e.g. --ckpt pretrained_inpaint).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from difflab.checkpoint import resolve_checkpoint
from difflab.config import PROJECT_ROOT, register_resolvers
from difflab.editing import Inpaint
from difflab.export import export_onnx, sampling_spec
from difflab.masks import region
from difflab.model import load_model
from difflab.sampling import generate
from report import cpu_name  # bench/report.py (python bench/export_speed.py puts bench/ on the path)


def timed(work, repeats: int) -> float:
    work()  # warm-up: kernel selection, allocator, onnxruntime's graph optimisation
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="pretrained")
    p.add_argument("--sampler", default="auto")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--inpaint", action="store_true", help="time inpainting (the top half of held-out sprites)")
    args = p.parse_args()
    import onnxruntime as ort

    register_resolvers()
    torch.set_num_threads(args.threads)
    src = resolve_checkpoint(args.ckpt, PROJECT_ROOT / "logs" / "train")
    model = load_model(src)
    distilled = model.objective.distilled_guidance
    guidance = distilled if args.guidance is None and distilled is not None else args.guidance
    labels = torch.arange(args.n) % max(model.num_classes, 1)
    contexts = torch.nn.functional.one_hot(labels, model.num_classes).float() if model.num_classes else None
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, _ = export_onnx(src, Path(tmp) / "generator", args.sampler, args.steps, guidance, inpaint=args.inpaint)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    # the raw pixels, as the graph's: no output stage
    plan32 = sampling_spec(args.sampler, args.steps, guidance, "32", palette="null").bind(model)  # precision 32, as the graph
    plan_auto = sampling_spec(args.sampler, args.steps, guidance, "auto", palette="null").bind(model)
    record = plan32.record()
    noise = np.random.default_rng(0).standard_normal((args.n, session.get_inputs()[0].shape[1], *model.image_shape), dtype=np.float32)
    feed = {"noise": noise, **({"labels": labels.numpy()} if model.num_classes else {})}
    edit = None
    if args.inpaint:
        from hydra.utils import instantiate

        datamodule = instantiate(model.config["data"])
        datamodule.setup("fit")
        held_out = datamodule.val_set.tensors[0]
        source = held_out[torch.arange(args.n) % len(held_out)]
        fill = region("top", model.image_shape[-1]).expand(args.n, 1, *model.image_shape[1:])
        edit = Inpaint(source, fill)
        feed |= {"source": source.permute(0, 2, 3, 1).contiguous().numpy(), "fill": fill[:, 0].numpy().astype(np.uint8)}
    rows = [
        ("PyTorch generate", "float32", timed(lambda: generate(plan32, contexts, args.n, edit=edit), args.repeats)),
        ("PyTorch generate", f"auto ({str(plan_auto.model.dtype).removeprefix('torch.')})",
         timed(lambda: generate(plan_auto, contexts, args.n, edit=edit), args.repeats)),
        ("onnxruntime", "float32", timed(lambda: session.run(["pixels"], feed), args.repeats)),
    ]
    per64 = [(name, precision, s * 64 / args.n) for name, precision, s in rows]
    base = per64[0][2]
    what = f", inpainting the top half ({edit.for_model(model.inpainting, plan32.steps).method})" if edit else ""
    print(f"{src.name}{what}: {record['sampler']} {record['steps']} steps, guidance {record['guidance']:g}, {args.n} sprites, "
          f"median of {args.repeats}, {args.threads} threads; {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}\n")
    print("| runtime | precision | s / 64 sprites | speed-up vs PyTorch float32 |\n|---|---|---|---|")
    for name, precision, s in per64:
        print(f"| {name} | {precision} | {s:.2f} | {base / s:.2f}x |")


if __name__ == "__main__":
    main()
