"""Ship a trained model: python -m difflab.export <checkpoint | run dir | last | pretrained> <out> [--format ckpt|onnx]

ckpt (the default): <out>, the EMA weights in float16 with the run config (difflab.checkpoint.export_weights): what
sample.py, evaluate.py and init_from= read, at a quarter of a training checkpoint's size. data/pretrained/sprites.ckpt
was made this way (data/pretrained/MODEL_CARD.md).

onnx: <out>.onnx, a sprite generator that runs without PyTorch (noise and class indices in, images out: the whole
sampling loop of the chosen sampler, any of conf/sampler/, unrolled, difflab.generator), and <out>.json, what a caller needs around it: class
names, image shape, noise draws per image, the sampling record and the output stage (examples/onnx_sprites.py).
--inpaint: the graph also takes a source sprite and a mask and fills the masked pixels, keeping the others (one pass
for a model tuned for inpainting, RePaint for another; difflab.editing.Inpaint).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from typing import Any

from difflab.checkpoint import CheckpointError, export_weights, load_checkpoint, resolve_checkpoint
from difflab.config import PROJECT_ROOT
from difflab.errors import ConfigError

ONNX_PINS = "onnx==1.23.2 onnxruntime==1.31.1"  # as in requirements.txt (tests/test_export_onnx.py checks)
OPSET = 18


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m difflab.export", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="a .ckpt, a training run folder, last or pretrained")
    parser.add_argument("out", type=Path, help="the shipped checkpoint (ckpt), or the stem of <out>.onnx and <out>.json (onnx)")
    parser.add_argument("--format", choices=("ckpt", "onnx"), default="ckpt")
    parser.add_argument("--ema-length", type=float, help="a post-hoc EMA length rebuilt from the run's snapshots (a run trained "
                        "with callbacks=posthoc_ema), e.g. 0.05; 0: the raw training weights (default: the EMA it trained with)")
    onnx = parser.add_argument_group("onnx", "the sampling baked into the graph")
    onnx.add_argument("--sampler", default="auto", help="a conf/sampler/ name (default auto: dpmpp 15 steps, or consistency 2 "
                      "steps for a consistency model)")
    onnx.add_argument("--steps", type=int, help="the sampler's steps (default: its own)")
    onnx.add_argument("--guidance", type=float, help="guidance scale (default 2; a consistency model: its distilled one)")
    onnx.add_argument("--batch", type=int, help="a fixed batch size (default: any batch size at run time)")
    onnx.add_argument("--inpaint", action="store_true", help="inputs source (B, H, W, C) uint8 and fill (B, H, W) uint8 "
                      "(nonzero: draw the pixel): fill those pixels, keep the others")
    args = parser.parse_args(argv)
    src = resolve_checkpoint(args.ckpt, PROJECT_ROOT / "logs" / "train")
    if args.format == "ckpt":
        given = [f"--{k}" for k in ("steps", "guidance", "batch") if getattr(args, k) is not None] + \
            (["--sampler"] if args.sampler != "auto" else []) + (["--inpaint"] if args.inpaint else [])
        if given:
            raise ConfigError(f"{', '.join(given)} set the sampling of an ONNX generator: add --format onnx")
        out = export_weights(src, args.out, ema_length=args.ema_length)
        what = "EMA weights" if args.ema_length is None else f"the weights of ema.length={args.ema_length}"
        print(f"{out}: {what} of {src} ({out.stat().st_size / 1e6:.1f} MB)")
        return out
    onnx_path, meta_path = export_onnx(src, args.out, args.sampler, args.steps, args.guidance, args.batch, args.inpaint, args.ema_length)
    what = "an inpainting sprite generator" if args.inpaint else "a sprite generator"
    print(f"{onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB) and {meta_path}: {what} from {src}")
    return onnx_path


def sampling_spec(sampler: str, steps: int | None, guidance: float | None, precision: str = "32", palette: str = "auto") -> Any:
    """The SamplingSpec sample.py builds from sampler=<name> steps=N guidance=W precision=P (32: the graph's) palette=..."""
    from hydra import compose, initialize_config_dir

    from difflab.sampling import SamplingSpec

    names = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "sampler").glob("*.yaml"))
    if sampler not in names:
        raise ConfigError(f"--sampler {sampler}: choose one of {', '.join(names)}")
    overrides = [f"sampler={sampler}", f"precision={precision}", f"palette={palette}"] + ([f"steps={steps}"] if steps is not None else []) + \
        ([f"guidance={guidance}"] if guidance is not None else [])
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return SamplingSpec.from_config(compose("sample", overrides))


def export_onnx(src: Path, out: Path, sampler: str = "auto", steps: int | None = None, guidance: float | None = None,
                batch: int | None = None, inpaint: bool = False, ema_length: float | None = None) -> tuple[Path, Path]:
    """<out>.onnx and <out>.json for the EMA weights of checkpoint ``src`` (``ema_length``: as load_model's); nothing is
    written when a check fails."""
    try:
        import onnx
    except ImportError as err:
        raise ConfigError(f"--format onnx needs the onnx package: pip install {ONNX_PINS}") from err
    import torch

    from difflab.generator import SpriteGenerator
    from difflab.model import load_model

    saved = load_checkpoint(src)
    if ema_length is None and "current_model_state" not in saved and "difflab_export" not in saved:
        # net_state_dict would hand out the raw training weights under the EMA name
        raise CheckpointError(f"{src} holds no EMA weights (trained without callbacks.ema): export a checkpoint of a run "
                              "with the EMA callback (the default callbacks), or fine-tune one with it")
    if batch is not None and batch < 1:
        raise ConfigError(f"--batch {batch}: must be an integer >= 1 (or leave it out for any batch size)")
    model = load_model(src, ema_length=ema_length)
    distilled = model.objective.distilled_guidance
    spec = sampling_spec(sampler, steps, distilled if guidance is None and distilled is not None else guidance)
    generator = SpriteGenerator(model, spec, inpaint).eval()
    record = generator.plan.record()
    palette = spec.palette_for(model)  # auto: sprite for pixel art, else none
    c, h, w = model.image_shape
    conditional = model.num_classes > 0
    inputs = ["noise", *(["labels"] if conditional else []), *(["source", "fill"] if inpaint else [])]
    outputs = ["images", "pixels"]
    stem = out.with_suffix("") if out.suffix in (".onnx", ".json") else out
    onnx_path, meta_path = Path(f"{stem}.onnx"), Path(f"{stem}.json")
    axis = "batch" if batch is None else batch
    meta = {
        "onnx": onnx_path.name, "source": src.name, "ema_length": ema_length, "class_names": model.class_names if conditional else [],
        "inputs": {"noise": [axis, generator.draws, c, h, w], **({"labels": [axis]} if conditional else {}),
                   **({"source": [axis, h, w, c], "fill": [axis, h, w]} if inpaint else {})},
        "image_shape": [c, h, w], "noise_draws": generator.draws, "batch": batch, "sampling": record,
        "output_stage": {"palette": "sprite", "colors": spec.palette_colors} if palette else None,
        # the output stage moves kept pixels too: the caller puts the source's back after it, as edit.py does
        "inpaint": generator.inpaint.record() if inpaint else None,
    }
    trace_batch = batch or 2  # 2 images, so no size-1 special case is baked into a graph meant for any batch size
    noise = torch.zeros(trace_batch, generator.draws, c, h, w)
    args = (noise, *([torch.zeros(trace_batch, dtype=torch.long)] if conditional else []),
            *([torch.zeros(trace_batch, h, w, c, dtype=torch.uint8), torch.zeros(trace_batch, h, w, dtype=torch.uint8)] if inpaint else []))
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = onnx_path.with_name(onnx_path.name + ".tmp")
    try:
        with warnings.catch_warnings():
            # the tracer warns at every Python number it bakes in (timesteps, schedule terms): constant by design
            warnings.simplefilter("ignore")
            # dynamo=False, the TorchScript exporter: torch.export (the default) specialises the batch axis at guidance's
            # chunk(2) and wrote 8x larger files here (weights folded per step); this one keeps one initializer per weight
            with torch.no_grad():
                torch.onnx.export(generator, args, str(tmp), dynamo=False, opset_version=OPSET, input_names=inputs,
                                  output_names=outputs,
                                  dynamic_axes=None if batch else {name: {0: "batch"} for name in inputs + outputs})
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto)
        onnx.helper.set_model_props(proto, {"difflab": json.dumps(meta)})
        onnx.save(proto, str(tmp))
        os.replace(tmp, onnx_path)
    finally:
        tmp.unlink(missing_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return onnx_path, meta_path


if __name__ == "__main__":
    from difflab.cli import run

    run(main)
