"""Sprites from an exported generator, as a game would make them: onnxruntime, numpy and Pillow, no PyTorch.

    python -m difflab.export pretrained sprites --format onnx      # sprites.onnx + sprites.json
    python examples/onnx_sprites.py sprites.onnx --label all --n 8 --seed 0 --out grid.png

The graph takes ``noise`` (B, D, C, H, W): D standard normal draws per sprite (x_T and one per noisy sampler step, in
sprites.json as noise_draws), and ``labels`` (B,) class indices (a conditional model); it returns ``pixels`` (B, H, W, C)
uint8. The output stage in sprites.json (palette sprite: each sprite snapped to its own 16 colours) is applied here, as
difflab.images.snap_to_palette does.

An inpainting generator (export --inpaint) also takes ``source`` (B, H, W, C) uint8 and ``fill`` (B, H, W) uint8
(nonzero: draw the pixel) and keeps the other pixels; here the output stage is followed by putting them back:

    python -m difflab.export pretrained_inpaint inpaint --format onnx --inpaint
    python examples/onnx_sprites.py inpaint.onnx --image sprite.png --mask top --label hero --n 8 --out grid.png
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


def read_source(path: Path, shape: list[int]) -> np.ndarray:
    """An opaque PNG at the generator's size -> (H, W, C) uint8."""
    c, h, w = shape
    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError) as err:
        fail(f"--image {path}: not a readable image ({err})")
    if image.size != (w, h):
        fail(f"--image {path} is {image.size[0]}x{image.size[1]}: this generator draws {w}x{h} sprites")
    if "A" in image.getbands() and np.asarray(image.getchannel("A")).min() < 255:
        fail(f"--image {path} has transparent pixels: composite it onto a background first (edit.py alpha= does)")
    return np.asarray(image.convert("RGB" if c == 3 else "L")).reshape(h, w, c)


def read_mask(spec: str, h: int, w: int) -> np.ndarray:
    """top | bottom | left | right | center (the middle half), or a box x0,y0,x1,y1 (x1, y1 excluded) -> (H, W) uint8,
    1 where pixels are drawn (difflab.masks.region)."""
    yy, xx = np.mgrid[:h, :w]
    inner = lambda v, n: (n // 4 <= v) & (v < n - n // 4)  # noqa: E731
    regions = {"top": yy < h // 2, "bottom": yy >= h // 2, "left": xx < w // 2, "right": xx >= w // 2,
               "center": inner(yy, h) & inner(xx, w)}
    if spec in regions:
        return regions[spec].astype(np.uint8)
    try:
        x0, y0, x1, y1 = (int(v) for v in spec.split(","))
    except ValueError:
        fail(f"--mask {spec}: give {', '.join(regions)} or a box x0,y0,x1,y1")
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h) or (x1 - x0) * (y1 - y0) == h * w:
        fail(f"--mask {spec}: give a box with 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h} that keeps some pixels")
    return ((x0 <= xx) & (xx < x1) & (y0 <= yy) & (yy < y1)).astype(np.uint8)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", type=Path, help="the exported .onnx (its .json beside it, or inside it)")
    parser.add_argument("--label", help="a class name, or all (default: all; none for an unconditional model)")
    parser.add_argument("--n", type=int, default=8, help="sprites per label")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("onnx_sprites.png"))
    parser.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the grid")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    parser.add_argument("--image", type=Path, help="an inpainting generator's source sprite (a PNG at its size)")
    parser.add_argument("--mask", default="top", help="the pixels to draw: top | bottom | left | right | center | x0,y0,x1,y1")
    args = parser.parse_args(argv)
    if args.n < 1 or args.scale < 1:
        fail(f"--n {args.n} --scale {args.scale}: both must be >= 1")
    try:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
    except ImportError:
        fail(f"this example needs onnxruntime: pip install {ORT_PIN}")
    export = "python -m difflab.export <checkpoint> <out> --format onnx"
    if not args.onnx.is_file():
        fail(f"{args.onnx} not found: export one with {export}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    # what onnxruntime raises for a file it cannot load as a graph (they share no base class but Exception)
    try:
        session = ort.InferenceSession(str(args.onnx), options, providers=["CPUExecutionProvider"])
    except (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph, ort_state.InvalidProtobuf,
            ort_state.NotImplemented) as err:
        # "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from <path> failed:Protobuf parsing failed."
        reason = str(err).strip().splitlines()[0].rsplit("failed:", 1)[-1].strip()
        fail(f"{args.onnx} is not an ONNX graph onnxruntime can load ({reason}): give the .onnx that {export} writes")
    # the .json beside it, or the same record inside the graph's metadata (a game may ship the .onnx alone)
    sidecar = args.onnx.with_suffix(".json")
    record = sidecar.read_text() if sidecar.is_file() else session.get_modelmeta().custom_metadata_map.get("difflab")
    if record is None:
        fail(f"{args.onnx} is an ONNX graph but no difflab sprite generator (no {sidecar.name} beside it, no difflab record "
             f"inside): give the .onnx that {export} writes")
    meta = json.loads(record)
    labels, nrow = labels_for(args.label, args.n, meta["class_names"])
    count = len(labels) if labels is not None else args.n
    inpaint = meta.get("inpaint")
    if bool(inpaint) != (args.image is not None):
        fail("this generator inpaints: give --image sprite.png (and --mask)" if inpaint else
             "this generator draws from noise: leave out --image, or export one with --inpaint")
    rng = np.random.default_rng(args.seed)
    noise = rng.standard_normal((count, meta["noise_draws"], *meta["image_shape"]), dtype=np.float32)
    batch = meta["batch"] or count  # a fixed-batch graph: pad the last chunk, keep what was asked for
    edited = {}
    if inpaint:  # one source and one mask for every sprite: the same inputs in every chunk
        source = read_source(args.image, meta["image_shape"])
        fill = read_mask(args.mask, *source.shape[:2])
        edited = {"source": np.repeat(source[None], batch, 0), "fill": np.repeat(fill[None], batch, 0)}
    pixels = []
    for start in range(0, count, batch):
        chunk = np.resize(noise[start : start + batch], (batch, *noise.shape[1:]))
        feed = {"noise": chunk, **edited}
        if labels is not None:
            feed["labels"] = np.resize(labels[start : start + batch], batch).astype(np.int64)
        pixels.append(session.run(["pixels"], feed)[0][: count - start])
    pixels = np.concatenate(pixels)
    stage = meta["output_stage"]
    if stage and stage["palette"] == "sprite":
        pixels = snap_to_palette(pixels, stage["colors"])
    if inpaint:  # the palette moved kept pixels too: they are the source's again, and each row starts with the source
        pixels = np.where(fill[..., None] > 0, pixels, source)
        rows = pixels.reshape(-1, nrow, *pixels.shape[1:])
        magenta = np.array([255, 0, 255][: source.shape[-1]], np.float32)  # the pixels to draw tinted, as edit.py shows them
        shown = np.where(fill[..., None] > 0, np.round((source + magenta) / 2), source).astype(np.uint8)
        pixels = np.concatenate([np.broadcast_to(shown, (len(rows), 1, *shown.shape)), rows], 1).reshape(-1, *pixels.shape[1:])
        nrow += 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(pixels, nrow, args.scale)).save(args.out)
    print(f"{args.out}: {count} sprites ({meta['sampling']['sampler']}, {meta['sampling']['steps']} steps, seed {args.seed})")
    return args.out


if __name__ == "__main__":
    main()
