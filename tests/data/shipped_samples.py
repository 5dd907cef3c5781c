"""Writes tests/data/shipped_samples.npz: raw float32 samples (before the output stage) of the shipped checkpoints with
each sampler and edit, four images each, precision 32, per-image generator noise (seed 0). tests/test_shipped_samples.py
holds today's code to them within the float32 chain bound (difflab.tolerance.chain_tol).

The committed file was made at commit 12a62fd, by the discrete-time core that came before the continuous schedules, on an
AMD EPYC with AVX-512-BF16 (python tests/data/shipped_samples.py): it is the reference, not a snapshot of today's code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

from difflab.editing import Inpaint, Interpolate, Vary
from difflab.export import sampling_spec
from difflab.masks import region
from difflab.model import load_model
from difflab.sampling import SamplingPlan, generate

LABELS = [0, 2, 3, 5]  # hero, food, magic-item, side-facing
CASES = {  # name: (checkpoint, sampler, steps, edit)
    "pretrained_ddpm": ("pretrained", "ddpm", None, None),
    "pretrained_ddim": ("pretrained", "ddim", None, None),
    "pretrained_dpmpp": ("pretrained", "dpmpp", None, None),
    "pretrained_unipc": ("pretrained", "unipc", None, None),
    "pretrained_heun": ("pretrained", "heun", 10, None),
    "pretrained_fast_consistency": ("pretrained_fast", "auto", None, None),
    "pretrained_inpaint_dpmpp": ("pretrained_inpaint", "dpmpp", None, "inpaint"),
    "pretrained_repaint_dpmpp": ("pretrained", "dpmpp", None, "inpaint"),
    "pretrained_vary_ddim": ("pretrained", "ddim", None, "vary"),
    "pretrained_interpolate_dpmpp": ("pretrained", "dpmpp", None, "interpolate"),
}


def sources() -> torch.Tensor:
    """Four held-out sprites of the shipped data set (the deterministic split's first images of LABELS' classes)."""
    datamodule = instantiate(load_model("pretrained").config["data"])
    datamodule.setup("fit")
    images, contexts = datamodule.val_set.tensors[:2]
    return torch.stack([images[int((contexts.argmax(1) == c).nonzero()[0])] for c in LABELS])


def plan_of(name: str) -> SamplingPlan:
    ckpt, sampler, steps, _ = CASES[name]
    return sampling_spec(sampler, steps, 2.0).bind(load_model(ckpt))


def make(name: str, plan: SamplingPlan, src: torch.Tensor) -> torch.Tensor:
    """Case ``name``'s raw images (4, C, H, W), sampled with ``plan``."""
    edit = CASES[name][3]
    top = region("top", 16)[None, None].expand(len(LABELS), 1, 16, 16)
    the_edit = {"inpaint": lambda: Inpaint(src, top), "vary": lambda: Vary(src, 0.5),
                "interpolate": lambda: Interpolate([(0, 0), (1, 0)], torch.linspace(0, 1, len(LABELS), dtype=torch.float64)),
                None: lambda: None}[edit]()
    return generate(plan, torch.eye(6)[LABELS], edit=the_edit).images


def main() -> None:
    torch.set_num_threads(2)
    src = sources()
    out = {"labels": np.array(LABELS), "sources": src.numpy()}
    for name in CASES:
        out[name] = make(name, plan_of(name), src).numpy()
    np.savez_compressed(Path(__file__).with_suffix(".npz"), **out)


if __name__ == "__main__":
    main()
