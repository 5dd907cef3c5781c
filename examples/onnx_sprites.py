"""Sprites from an exported generator, as a game would make them: onnxruntime, numpy and Pillow, no PyTorch.

    python -m difflab.export pretrained sprites --format onnx      # sprites.onnx + sprites.json
    python examples/onnx_sprites.py sprites.onnx --label all --n 8 --seed 0 --out grid.png

The graph takes ``noise`` (B, D, C, H, W): D standard normal draws per sprite (x_T and one per noisy sampler step, in
sprites.json as noise_draws), and ``labels`` (B,) class indices (a conditional model); it returns ``pixels`` (B, H, W, C)
uint8. The output stage in sprites.json (palette sprite: each sprite snapped to its own 16 colours) is applied here, as
difflab.images.snap_to_palette does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np
from PIL import Image

ORT_PIN = "onnxruntime==1.31.1"  # as in requirements.txt


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def snap_to_palette(pixels: np.ndarray, colors: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> each sprite's own ``colors`` colours: median cut, no dithering (difflab.images)."""
    out = [Image.fromarray(p).quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).convert("RGB")
           for p in pixels]
    return np.stack([np.asarray(p) for p in out])


def grid(pixels: np.ndarray, nrow: int, scale: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> one image, ``nrow`` sprites a row, ``scale``x nearest-neighbour, white gaps of ``scale``."""
    n, h, w, c = pixels.shape
    big = pixels.repeat(scale, 1).repeat(scale, 2)
    rows = -(-n // nrow)
    out = np.full((rows * (h * scale + scale) + scale, nrow * (w * scale + scale) + scale, c), 255, np.uint8)
    for i, img in enumerate(big):
        y, x = scale + (i // nrow) * (h * scale + scale), scale + (i % nrow) * (w * scale + scale)
        out[y : y + h * scale, x : x + w * scale] = img
    return out[..., 0] if c == 1 else out


def labels_for(label: str | None, n: int, class_names: list[str]) -> tuple[np.ndarray | None, int]:
    """-> (labels (N,) int64 or None for an unconditional model, sprites per grid row)."""
    if not class_names:
        if label is not None:
            fail("this generator is unconditional: leave out --label")
        return None, n
    if label in (None, "all"):
        return np.repeat(np.arange(len(class_names)), n), n
    if label not in class_names:
        fail(f"unknown label {label!r}; this generator knows: {', '.join(class_names)} or all")
    return np.full(n, class_names.index(label)), n


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", type=Path, help="the exported .onnx (its .json beside it, or inside it)")
    parser.add_argument("--label", help="a class name, or all (default: all; none for an unconditional model)")
    parser.add_argument("--n", type=int, default=8, help="sprites per label")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("onnx_sprites.png"))
    parser.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the grid")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.scale < 1:
        fail(f"--n {args.n} --scale {args.scale}: both must be >= 1")
    try:
        import onnxruntime as ort
    except ImportError:
        fail(f"this example needs onnxruntime: pip install {ORT_PIN}")
    if not args.onnx.is_file():
        fail(f"{args.onnx} not found: export one with python -m difflab.export <checkpoint> <out> --format onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(args.onnx), options, providers=["CPUExecutionProvider"])
    # the .json beside it, or the same record inside the graph's metadata (a game may ship the .onnx alone)
    sidecar = args.onnx.with_suffix(".json")
    meta = json.loads(sidecar.read_text() if sidecar.is_file() else session.get_modelmeta().custom_metadata_map["difflab"])
    labels, nrow = labels_for(args.label, args.n, meta["class_names"])
    count = len(labels) if labels is not None else args.n
    rng = np.random.default_rng(args.seed)
    noise = rng.standard_normal((count, meta["noise_draws"], *meta["image_shape"]), dtype=np.float32)
    batch = meta["batch"] or count  # a fixed-batch graph: pad the last chunk, keep what was asked for
    pixels = []
    for start in range(0, count, batch):
        chunk = np.resize(noise[start : start + batch], (batch, *noise.shape[1:]))
        feed = {"noise": chunk}
        if labels is not None:
            feed["labels"] = np.resize(labels[start : start + batch], batch).astype(np.int64)
        pixels.append(session.run(["pixels"], feed)[0][: count - start])
    pixels = np.concatenate(pixels)
    stage = meta["output_stage"]
    if stage and stage["palette"] == "sprite":
        pixels = snap_to_palette(pixels, stage["colors"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(pixels, nrow, args.scale)).save(args.out)
    print(f"{args.out}: {count} sprites ({meta['sampling']['sampler']}, {meta['sampling']['steps']} steps, seed {args.seed})")
    return args.out


if __name__ == "__main__":
    main()
