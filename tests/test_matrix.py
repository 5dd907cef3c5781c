"""Every sampler x every way to sample: plain sampling, inpainting, variations and the ONNX export, on trained models.

The samplers are the files of conf/sampler/ (all but auto.yaml), so a sampler added there is in the matrix without a
word here, and every sampler class of difflab.samplers must have its file. The diffusion samplers run a tiny model
trained for a few steps over T = 20 steps (so DDPM's all-T walk stays quick; its EMA weights are what the export reads),
consistency sampling the shipped consistency model (pretrained_fast). Four images, a few steps each; DDPM's export is
a slow test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import difflab.samplers
from difflab.config import PROJECT_ROOT
from difflab.editing import Inpaint, Vary, repaint_path
from difflab.export import main, sampling_spec
from difflab.images import to_unit_range
from difflab.masks import region
from difflab.model import load_model
from difflab.samplers import ConsistencySampler, Sampler
from difflab.sampling import ImageNoise, SamplingPlan, generate
from difflab.tolerance import chain_tol

from support import compose_cfg

SAMPLER_DIR = PROJECT_ROOT / "conf" / "sampler"
SAMPLERS = sorted(p.stem for p in SAMPLER_DIR.glob("*.yaml") if p.stem != "auto")
# steps= per sampler (4 unless named): ddpm runs all T = 20 of the tiny model; Heun's 3 steps are 5 network calls;
# consistency sampling's 2 (its default) are too few for RePaint's jumps of 2: it inpaints by replacement
STEPS = {"ddpm": None, "heun": 3, "consistency": 2}
JUMP_LENGTH, JUMP_N_SAMPLE = 2, 2
LABELS = torch.tensor([0, 2, 3, 5])
STRENGTH = 0.6
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny batches on a shared machine (conftest.py)


def for_consistency_models(name: str) -> bool:
    return isinstance(instantiate(OmegaConf.load(SAMPLER_DIR / f"{name}.yaml")), ConsistencySampler)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny model trained for 16 steps over T = 20 (betas up to 0.2: alpha_bar falls to 0.12, a chain from near noise),
    at full learning rate from the first step and a short EMA, so its network already moves the samples and reads its
    labels: its last.ckpt, EMA weights included."""
    from difflab.train import train

    out = tmp_path_factory.mktemp("matrix")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_thread (a module's fixture runs before it)
    try:
        train(compose_cfg(["model=unet_tiny", "debug=fast", "trainer.limit_train_batches=16", "timesteps=20",
                           "schedule.beta_end=0.2", "optim.lr_scheduler.scheduler.warmup_steps=0", "optim.optimizer.lr=3e-3",
                           "callbacks.ema.decay=0.5", "logger=none", "~callbacks.sample_grid", "~callbacks.progress_bar",
                           "trainer.enable_progress_bar=false"], out))
    finally:
        torch.set_num_threads(threads)
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def plans(trained):
    """name -> (checkpoint, plan): the sampler as sample.py builds it (precision 32, the export's), bound to its model."""
    made = {}

    def plan_for(name: str) -> tuple[str, SamplingPlan]:
        if name not in made:
            ckpt = "pretrained_fast" if for_consistency_models(name) else str(trained)
            model = load_model(ckpt)
            spec = sampling_spec(name, STEPS.get(name, 4), model.objective.distilled_guidance)
            made[name] = (ckpt, spec.bind(model))
        return made[name]

    return plan_for


@pytest.fixture(scope="module")
def sources(trained) -> torch.Tensor:
    """Four held-out sprites (uint8)."""
    datamodule = instantiate(load_model(trained).config["data"])
    datamodule.setup("fit")
    return datamodule.val_set.tensors[0][:4]


def contexts(plan: SamplingPlan) -> torch.Tensor:
    return nn.functional.one_hot(LABELS, plan.model.num_classes).float()


def test_the_matrix_holds_every_sampler():
    classes = {cls for cls in Sampler.__subclasses__() if cls.__module__.startswith("difflab.")}
    assert {cls.name for cls in classes} <= set(SAMPLERS), "a sampler class without its conf/sampler/<name>.yaml"
    assert {getattr(difflab.samplers, n) for n in difflab.samplers.__all__} >= classes
    assert {"ddpm", "ddim", "dpmpp", "unipc", "heun", "euler", "consistency"} <= set(SAMPLERS)


@pytest.mark.parametrize("name", SAMPLERS)
def test_sample(plans, name):
    _, plan = plans(name)
    out = generate(plan, contexts(plan), record_every=1)
    assert out.images.shape == (4, 3, 16, 16) and out.images.isfinite().all()
    assert out.pixels.shape == (4, 3, 16, 16) and out.pixels.dtype == torch.uint8
    assert out.chain_t == [level.t for level in plan.levels] and out.chain_t[-1] == 0.0  # every level, to the clean image
    assert plan.steps == (STEPS.get(name, 4) or 20)
    assert (out.images[0] - out.images[1]).abs().max() > 0.1  # each image its own noise


@pytest.mark.parametrize("name", SAMPLERS)
def test_inpaint_keeps_every_kept_pixel(plans, sources, name):
    _, plan = plans(name)
    method = "repaint" if plan.steps > JUMP_LENGTH else "replace"
    fill = torch.stack([region(r, 16) for r in ("top", "left", "center", "right")])[:, None]
    out = generate(plan, contexts(plan), record_every=1, edit=Inpaint(sources, fill, method, JUMP_LENGTH, JUMP_N_SAMPLE))
    keep = ~fill.expand_as(sources)
    assert out.images.shape == (4, 3, 16, 16) and out.images.isfinite().all()
    assert torch.equal(out.images[keep], to_unit_range(sources)[keep])  # exactly, before the output stage
    assert torch.equal(out.pixels[keep], sources[keep])  # and after it
    assert (out.pixels[~keep] != sources[~keep]).float().mean() > 0.5  # the rest is drawn
    path = repaint_path(plan.steps, JUMP_LENGTH, JUMP_N_SAMPLE) if method == "repaint" else list(range(plan.steps + 1))
    assert out.chain_t == [plan.levels[p].t for p in path]  # RePaint's walk, jumps back up included


@pytest.mark.parametrize("name", SAMPLERS)
def test_vary_runs_the_share_of_the_steps_strength_asks_for(plans, sources, name):
    _, plan = plans(name)
    out = generate(plan, contexts(plan), record_every=1, edit=Vary(sources, STRENGTH))
    steps = round(STRENGTH * plan.steps)
    assert len(out.chain_t) - 1 == steps and out.chain_t == [level.t for level in plan.levels[plan.steps - steps :]]
    assert out.images.shape == (4, 3, 16, 16) and out.images.isfinite().all()
    assert not torch.equal(out.pixels, sources)


# DDPM's graph unrolls all T = 20 steps (half a minute to trace and load): with the long tests
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "ddpm" else n for n in SAMPLERS])
def test_export_equals_generate_on_the_same_noise(plans, tmp_path, name):
    """python -m difflab.export --format onnx --sampler <name>: on each image's own stream (ImageNoise, its D draws in
    the order generate() makes them) the graph makes generate()'s images, within the float32 chain bound."""
    ckpt, plan = plans(name)
    steps = STEPS.get(name, 4)
    onnx_path = main([ckpt, str(tmp_path / name), "--format", "onnx", "--sampler", name, *(["--steps", str(steps)] if steps else [])])
    meta = json.loads(onnx_path.with_suffix(".json").read_text())
    assert meta["sampling"] == plan.record()
    streams = ImageNoise(plan.seed, range(len(LABELS)))
    noise = torch.stack([streams.randn(plan.model.image_shape) for _ in range(meta["noise_draws"])], 1)
    peaks = []
    hook = plan.model.net.register_forward_hook(lambda m, i, o: peaks.append(float(o.abs().max())))
    try:
        out = generate(plan, contexts(plan))
    finally:
        hook.remove()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    images, pixels = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"]).run(
        None, {"noise": noise.numpy(), "labels": LABELS.numpy()})
    assert images.shape == (4, 3, 16, 16) and np.isfinite(images).all()
    assert pixels.shape == (4, 16, 16, 3) and pixels.dtype == np.uint8
    # x_0 = (x_t - sigma eps) / alpha: an output error times up to sigma / alpha (EDM's sigma) at the levels visited
    gain = max(level.edm_sigma for level in plan.levels[:-1])
    tol = chain_tol(plan.model.net, max(peaks), len(peaks), plan.guidance.scale, gain)
    assert np.abs(images - out.images.numpy()).max() <= tol
    # the bound tells the network's reading of its input apart: the same noise with other labels
    other = generate(plan, contexts(plan).roll(1, 0)).images
    assert np.abs(images - other.numpy()).max() > 2 * tol
