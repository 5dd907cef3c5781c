"""Ship a trained model: python -m difflab.export <checkpoint | run dir | last> <out.ckpt>

Writes the EMA weights in float16 with the run config (difflab.checkpoint.export_weights): what sample.py,
evaluate.py and init_from= read, at a quarter of a training checkpoint's size. data/pretrained/sprites.ckpt was
made this way (data/pretrained/MODEL_CARD.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from difflab.checkpoint import export_weights, resolve_checkpoint
from difflab.config import PROJECT_ROOT


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m difflab.export", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="a .ckpt, a training run folder, or last")
    parser.add_argument("out", type=Path, help="where to write the shipped checkpoint")
    args = parser.parse_args(argv)
    src = resolve_checkpoint(args.ckpt, PROJECT_ROOT / "logs" / "train")
    out = export_weights(src, args.out)
    print(f"{out}: EMA weights of {src} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


if __name__ == "__main__":
    from difflab.cli import run

    run(main)
