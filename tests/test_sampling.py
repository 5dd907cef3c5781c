"""The one sampling path (difflab.sampling): image i depends only on (seed, i, its label, the sampler and its
settings), through sample.py, evaluate.py and the plan's ranks; one precision policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.config import to_container
from difflab.errors import ConfigError
from difflab.model import DiffusionModel, build_model
from difflab.nn.unet import UNet
from difflab.objectives import EpsPrediction
from difflab.samplers import DDIMSampler, DDPMSampler, DPMSolverPP2MSampler, HeunSampler, UniPCSampler
from difflab.sampling import EvalPlan, ImageNoise, SamplingSpec, generate, image_seed, proportional_labels
from difflab.schedules import LinearSchedule
from difflab.train import build_module

from support import compose_cfg, reorder_tol

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny batches on a shared machine (conftest.py)

K = 6
CLASSES = ["hero", "non-hero", "food", "magic-item", "weapon", "side-facing"]
SAMPLERS = {
    "ddpm": (["sampler=ddpm"], lambda: DDPMSampler("beta")),
    "ddim_eta0": (["sampler=ddim", "steps=4", "sampler.eta=0.0"], lambda: DDIMSampler(4, eta=0.0)),
    "ddim_eta1": (["sampler=ddim", "steps=4", "sampler.eta=1.0"], lambda: DDIMSampler(4, eta=1.0)),
    "dpmpp": (["sampler=dpmpp", "steps=4"], lambda: DPMSolverPP2MSampler(4)),
    "heun": (["sampler=heun", "steps=3"], lambda: HeunSampler(3)),
    "unipc": (["sampler=unipc", "steps=4"], lambda: UniPCSampler(4)),
}


def randomize_zeros(net: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialised tensors (output conv, null embedding) get small values, so the network's output depends on
    its input, its batch and its context (an untrained network predicts eps = 0)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if not p.abs().sum():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return net


@pytest.fixture(scope="module")
def small():
    net = randomize_zeros(UNet(image_size=8, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                               dropout=0.0, num_classes=K, norm_groups=8))
    return DiffusionModel(net.eval(), LinearSchedule(20), EpsPrediction())


def spec(sampler, guidance: float = 0.0, seed: int = 0, batch_size: int = 256, precision: str = "32") -> SamplingSpec:
    return SamplingSpec(sampler, guidance=guidance, seed=seed, batch_size=batch_size, precision=precision, palette=None)


def test_image_noise_rows_are_their_own_generators() -> None:
    noise = ImageNoise(3, [5, 0, 9])
    first = noise.randn((2, 2))
    second = noise.randn((2, 2))
    for row, i in enumerate([5, 0, 9]):
        g = torch.Generator().manual_seed(image_seed(3, i))
        assert torch.equal(first[row], torch.randn((2, 2), generator=g))
        assert torch.equal(second[row], torch.randn((2, 2), generator=g))  # the stream continues
    assert len({image_seed(0, i) for i in range(1000)} | {image_seed(1, i) for i in range(1000)}) == 2000


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_image_i_depends_on_seed_and_index_not_batching(small, name) -> None:
    """n=8 in batches of 3 vs one batch of 8 vs images 5..7 alone: the same noise per image, so the same images up to
    the rounding of batched kernels (the network sums in a batch-dependent order); other seeds give other images."""
    ctx = torch.eye(K)[torch.arange(8) % K]
    make = SAMPLERS[name][1]
    a = generate(spec(make(), 2.0, seed=1, batch_size=3).bind(small), ctx).images
    b = generate(spec(make(), 2.0, seed=1, batch_size=8).bind(small), ctx).images
    c = generate(spec(make(), 2.0, seed=1, batch_size=2).bind(small), ctx[5:], index=[5, 6, 7]).images
    calls = []  # the network calls of one image's chain (Heun: two per step but the last)
    hook = small.net.register_forward_hook(lambda *_: calls.append(1))
    try:
        generate(spec(make(), 2.0, seed=1).bind(small), ctx[:1])
    finally:
        hook.remove()
    # per call: 8 layers of width <= 9 * 32, each guided eps amplifying differences by 1 + 2w = 5; calls compound
    tol = len(calls) * 5 * reorder_tol(b, layers=8, width=9 * 32)
    assert (a - b).abs().max() <= tol and (a[5:] - c).abs().max() <= tol
    assert torch.equal(generate(spec(make(), 2.0, seed=1, batch_size=3).bind(small), ctx).images, a)  # same batches: bitwise
    other = generate(spec(make(), 2.0, seed=2, batch_size=3).bind(small), ctx).images
    assert (other - a).abs().amax(dim=(1, 2, 3)).min() > 0.1  # every image changes with the seed


def test_record_every_chain_and_x0_frames(small) -> None:
    sampler = DDIMSampler(4, eta=0.0, clip_x0=False)
    plan = spec(sampler, seed=7, batch_size=2).bind(small)
    out = generate(plan, None, 3, record_every=1)
    ts = [(k + 1) / 20 for k in (19, 14, 9, 4)]  # trailing steps k of T = 20 at t = (k + 1) / T
    assert out.chain_t == ts + [0.0]  # 0.0: the clean image
    assert len(out.chain) == 5 and len(out.x0_chain) == 4  # x_T, then one x_t and one x_0 prediction per step
    assert plan.init_scale == 1.0  # a VP schedule's x_T is the draw itself
    assert torch.equal(out.chain[0], ImageNoise(7, range(3)).randn((3, 8, 8)))  # x_T: each image's first draw
    assert torch.equal(out.chain[-1], out.images) and torch.equal(out.x0_chain[-1], out.images)  # DDIM's last step is x_0
    every3 = generate(plan, None, 3, record_every=3)
    assert every3.chain_t == [ts[0], ts[3], 0.0]
    assert generate(spec(sampler, seed=7).bind(small), None, 3).chain == []


def test_generate_restores_training_mode_and_keeps_float32_weights(small) -> None:
    net = small.net
    modes = []  # the mode the network samples in: eval (dropout off), whatever it was in before
    for precision in ("bf16", "32"):
        plan = spec(DDIMSampler(2), precision=precision).bind(small)
        modes.clear()
        hook = plan.model.net.register_forward_hook(lambda m, *_: modes.append(m.training))
        net.train()
        try:
            generate(plan, torch.eye(K)[:1])
        finally:
            hook.remove()
        assert modes == [False, False] and net.training and next(net.parameters()).dtype == torch.float32
    net.eval()
    generate(spec(DDIMSampler(2)).bind(small), torch.eye(K)[:1])
    assert not net.training


def test_one_precision_policy(small, monkeypatch) -> None:
    assert spec(DDIMSampler(3), precision="32").dtype("cpu") == torch.float32
    assert spec(DDIMSampler(3), precision="bf16").dtype("cpu") == torch.bfloat16
    for has_bf16, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr("difflab.sampling.cpu_has_bf16", lambda v=has_bf16: v)
        assert spec(DDIMSampler(3), precision="auto").dtype("cpu") == dtype
    with pytest.raises(ConfigError, match="precision=fp8: choose one of auto, 32, bf16"):
        spec(DDIMSampler(3), precision="fp8")
    assert small.for_inference(torch.float32) is small
    copy = small.for_inference(torch.bfloat16)
    # the schedule is not cast: its noise levels stay float64
    assert copy.net is not small.net and copy.dtype == torch.bfloat16 and copy.schedule.betas.dtype == torch.float64
    ctx = torch.eye(K)[:4]
    full = generate(spec(DDIMSampler(3)).bind(small), ctx).images
    half_plan = spec(DDIMSampler(3), precision="bf16").bind(small)
    assert half_plan.model.dtype == torch.bfloat16 and spec(DDIMSampler(3)).bind(small).model is small
    half = generate(half_plan, ctx).images
    # bf16 weights and activations (8 bits of mantissa): close to float32, not equal
    assert 0 < (full - half).abs().max() <= 0.1


def test_plan_gives_the_same_images_on_any_number_of_ranks(small) -> None:
    bound = spec(DDIMSampler(3), guidance=1.0, seed=4, batch_size=3).bind(small)
    plan = EvalPlan(n=10, batch_size=3, num_classes=K, classes=range(K))
    one = {int(i): img for c in plan.chunks_for(0, 1) for img, i in zip(*plan.generate_chunk(bound, c)[::2])}
    two = {}
    for rank in range(2):
        for c in plan.chunks_for(rank, 2):
            images, _, index = plan.generate_chunk(bound, c)
            two.update({int(i): img for img, i in zip(images, index)})
    assert sorted(one) == sorted(two) == list(range(10))
    assert all(torch.equal(one[i], two[i]) for i in range(10))  # the same chunks: bitwise
    assert plan.chunks_for(5, 8) == [-1]  # more ranks than chunks: some make nothing


def test_proportional_labels_follow_the_weights_and_spread_out() -> None:
    labels = proportional_labels(100, [0, 2, 5], [3.0, 1.0, 1.0])
    assert torch.bincount(labels, minlength=6).tolist() == [60, 0, 20, 0, 0, 20]
    assert torch.bincount(labels[:50], minlength=6).tolist() == [30, 0, 10, 0, 0, 10]  # evenly along the index
    assert proportional_labels(7, [1, 3]).tolist().count(1) in (3, 4)


# ---- the entry points: sample.py and evaluate.py make the same image i ----


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from difflab.metrics.classifier import SmallCNN, save_classifier

    out = tmp_path_factory.mktemp("equal")
    cfg = compose_cfg(["model=unet_tiny", "logger=none", "timesteps=20"], out)
    module = build_module(cfg)
    randomize_zeros(module.net)
    ckpt = out / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "difflab_config": module.model.config, "class_names": module.model.class_names}, ckpt)
    torch.manual_seed(0)
    clf = save_classifier(out / "clf.ckpt", SmallCNN(6, channels=(8, 16)), CLASSES, 16, {}, {})
    return {"ckpt": ckpt, "classifier": clf, "cache": out / "cache"}


def npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sample_py_and_evaluate_py_make_the_same_images(checkpoint, tmp_path, name) -> None:
    """sample.py label=food n=8 with batch_size 3 and 8, and evaluate.py n=8 on the food class only (so its labels are
    the same), seed 5: evaluate's images equal sample.py's of the same batching byte for byte, and the other
    batching's up to a rounding flip of one level at a pixel that lies on a rounding boundary."""
    from difflab.evaluate import evaluate
    from difflab.sample import sample

    sampler_args = SAMPLERS[name][0]
    common = [f"ckpt={checkpoint['ckpt']}", "seed=5", "precision=32", *sampler_args]
    runs = {}
    for bs in (3, 8):
        cfg = compose_cfg([*common, "n=8", f"batch_size={bs}", "label=food", "gif=false", "device=cpu"], tmp_path / f"s{bs}", "sample")
        runs[bs] = npz(sample(cfg)["samples"])
    cfg = compose_cfg([*common, "n=8", "batch_size=3", "data=sprites", "data.classes=[food]", "reference=false",
                       f"metrics.classifier_ckpt={checkpoint['classifier']}", f"metrics.cache_dir={checkpoint['cache']}",
                       "metrics.kid_subsets=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"],
                      tmp_path / "e", "evaluate")
    evaluate(cfg)
    ev = npz(tmp_path / "e" / "samples.npz")
    assert ev["images"].shape == (8, 16, 16, 3) and ev["index"].tolist() == list(range(8))
    assert np.array_equal(ev["labels"], runs[3]["labels"]) and ev["labels"][:, 2].all()  # all food
    assert ev["images"].tobytes() == runs[3]["images"].tobytes()
    diff = np.abs(runs[8]["images"].astype(int) - runs[3]["images"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_the_cpu_noise_is_one_torch_generator_per_image_as_before():
    noise = ImageNoise(7, [0, 5])
    first, second = noise.randn((3, 4, 4)), noise.randn((3, 4, 4))
    for row, i in enumerate([0, 5]):
        g = torch.Generator().manual_seed(image_seed(7, i))
        assert torch.equal(first[row], torch.randn((3, 4, 4), generator=g))
        assert torch.equal(second[row], torch.randn((3, 4, 4), generator=g))
    spec = SamplingSpec(DDIMSampler(2))
    assert not spec.counter_noise("cpu") and spec.counter_noise("cuda") and spec.counter_noise(torch.device("cuda", 1))
    assert SamplingSpec(DDIMSampler(2), noise="counter").counter_noise("cpu")
    assert not SamplingSpec(DDIMSampler(2), noise="generator").counter_noise("cuda")


def test_counter_noise_is_standard_normal_per_image_whatever_the_batch():
    from scipy import stats

    batch = ImageNoise(3, range(64), counter=True)
    draws = [batch.randn((3, 16, 16)) for _ in range(3)]
    alone = ImageNoise(3, [17], counter=True)
    for d in draws:
        assert torch.equal(alone.randn((3, 16, 16))[0], d[17])  # image 17's stream, whatever else is in the batch
    x = torch.stack(draws).flatten().double()
    n = x.numel()
    # mean and variance of n standard normals: standard errors 1/sqrt(n) and sqrt(2/n); 5 of them
    assert abs(x.mean()) < 5 / math.sqrt(n) and abs(x.var() - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(x.numpy(), "norm").pvalue > 1e-4
    rows = torch.stack(draws)[0].flatten(1)
    off = torch.corrcoef(rows) - torch.eye(64)
    assert off.abs().max() < 5 / math.sqrt(rows.shape[1])  # images' noises are uncorrelated
    assert not torch.equal(draws[0], draws[1])


def test_counter_noise_samples_do_not_depend_on_the_batch_size(tmp_path):
    model = build_model(to_container(compose_cfg(["model=unet_tiny", "timesteps=20"], tmp_path)))
    contexts = torch.eye(model.num_classes)[torch.arange(6) % model.num_classes]
    out = {b: generate(SamplingSpec(DDIMSampler(3), noise="counter", batch_size=b, palette=None).bind(model), contexts).images
           for b in (6, 4)}
    plain = generate(SamplingSpec(DDIMSampler(3), noise="generator", palette=None).bind(model), contexts).images
    assert (out[6] - out[4]).abs().max() <= 3 * 5 * reorder_tol(out[6], layers=8, width=9 * 32)
    assert (out[6] - plain).abs().max() > 0.1  # other streams: other images
