"""Consistency models: the parametrisation f, the curriculum of paired timesteps, the teacher's step, the loss, multistep
consistency sampling, and who may sample what (sampler=auto, the distilled guidance)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from difflab.config import to_container
from difflab.diffusion import Denoised
from difflab.errors import ConfigError
from difflab.model import build_model
from difflab.objectives import Consistency, EpsPrediction, VPrediction, X0Prediction
from difflab.samplers import ConsistencySampler, DDIMSampler, DPMSolverPP2MSampler
from difflab.sampling import ImageNoise, SamplingSpec, generate
from difflab.schedules import LinearSchedule, RectifiedFlow

from support import compose_cfg


def draws(b: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 4, 4, generator=g) * 1.8 - 0.9, torch.randn(b, 3, 4, 4, generator=g)


def at(*steps: int, T: int = 100) -> torch.Tensor:
    """The times t = (k + 1) / T of steps k of a T-step grid (k = -1: t = 0, the clean image)."""
    return (torch.tensor(steps, dtype=torch.float64) + 1) / T


class Oracle(nn.Module):
    """A network that knows x_0 (B, C, H, W) of every row and predicts exactly the target of ``prediction`` at any x_t
    (rows beyond B repeat them: the guided call stacks the batch twice), whatever the context: the ideal denoiser of a
    data set of one image per row, whose probability-flow ODE maps every x_t straight to that x_0."""

    def __init__(self, x0, prediction, s):
        super().__init__()
        self.x0, self.prediction, self.s = x0, prediction, s
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, context=None, context_keep=None):
        # t: the network's time input, the step k of a grid point (VPSchedule.net_time); x: x_t (the input on a VP schedule)
        x0 = self.x0.repeat(len(x) // len(self.x0), 1, 1, 1)
        assert torch.equal(t, t.round()), t  # the pairs lie on the grid
        a, sig = self.s.coefs((t + 1) / self.s.timesteps, x)
        eps = (x - a.float() * x0) / sig.float()
        return self.prediction.target(x0, eps, a, sig)


@pytest.mark.parametrize("prediction", [EpsPrediction(), X0Prediction(), VPrediction()])
def test_f_is_the_prediction_as_x0(prediction) -> None:
    s = LinearSchedule(100)
    x0, noise = draws()
    t = at(0, 10, 40, 70, 90, 99)
    x_t = s.add_noise(x0, t, noise)
    a, sig = s.coefs(t, x0)
    target = prediction.target(x0, noise, a, sig)
    as_x0 = prediction.denoised(x_t, target, a, sig).x0
    torch.testing.assert_close(as_x0, x0, rtol=0, atol=2e-4 if isinstance(prediction, EpsPrediction) else 1e-5)
    # the network is called at the network time of t (the step k on a VP grid) and its output read as x_0
    f = Consistency(prediction).f(lambda x, k: prediction.target(x0, noise, *s.coefs((k + 1) / 100, x0)), s, x_t, t)
    torch.testing.assert_close(f, as_x0)


def test_partner_halves_the_gap_each_stage_and_stops_at_max_stage() -> None:
    """At stage k, on a T-step grid, the partner of step i is step j = i - ceil((i + 1) / 2^k), as times (j + 1) / T
    (j = -1: r = 0, the clean image); on a continuous schedule r = t - t / 2^k."""
    c = Consistency(VPrediction(), stage_steps=10, max_stage=3)
    s = LinearSchedule(100)
    i = torch.arange(100)
    t = at(*i.tolist())
    assert torch.equal(c.partner(t, 0, s), torch.zeros_like(t))  # stage 0: every t is paired with the clean image
    for step, k in [(10, 1), (25, 2), (30, 3), (1000, 3)]:
        r = c.partner(t, step, s)
        gap = -(-(i + 1) // 2**k)  # ceil((i + 1) / 2^k), by hand
        assert torch.equal(r, at(*(i - gap).tolist()))
        assert (r < t).all() and (r >= 0).all()
    assert c.partner(at(0), 1000, s).item() == 0  # the first step always pairs with the clean image
    flow = RectifiedFlow()
    u = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    assert torch.equal(c.partner(u, 0, flow), torch.zeros_like(u))
    for step, k in [(10, 1), (25, 2), (1000, 3)]:
        assert torch.equal(c.partner(u, step, flow), u - u / 2**k)  # one rounding of the same real number either way


def test_pseudo_huber_distance() -> None:
    c = Consistency(VPrediction(), huber_c=0.1)
    a, b = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    b[0, 0, 0, 0] = 3.0
    cc = 0.1 * 48**0.5
    torch.testing.assert_close(c.distance(a, b), torch.tensor([(9 + cc**2) ** 0.5 - cc, 0.0]))


@pytest.mark.parametrize("prediction", [EpsPrediction(), VPrediction()])
def test_teacher_step_with_an_exact_teacher_lands_on_the_same_noise_trajectory(prediction) -> None:
    """The ideal denoiser's ODE keeps the noise of x_t: DDIM from x_t to r gives x_r = alpha_r x_0 + sigma_r (the same
    noise) (and x_0 for r = 0), whatever the guidance (conditional and unconditional outputs agree)."""
    s = LinearSchedule(100)
    x0, noise = draws()
    t = at(5, 20, 50, 80, 99, 99)
    r = at(-1, 10, 30, 79, 0, -1)
    c = Consistency(prediction, guidance=2.0)
    x_t = s.add_noise(x0, t, noise)
    x_r = c.teacher_step(Oracle(x0, prediction, s), s, x_t, t, r, torch.eye(6))
    expected = torch.where((r == 0).reshape(-1, 1, 1, 1), x0, s.add_noise(x0, r, noise))
    torch.testing.assert_close(x_r, expected, rtol=0, atol=1e-4)


def test_pair_loss_is_zero_for_the_exact_consistency_function_and_positive_otherwise() -> None:
    s = LinearSchedule(100)
    x0, noise = draws()
    c = Consistency(VPrediction(), stage_steps=5, max_stage=4, huber_c=0.0)
    oracle = Oracle(x0, VPrediction(), s)
    t = at(0, 3, 30, 60, 90, 99)
    for step in (0, 5, 12, 100):
        assert c.pair_loss(oracle, oracle, s, x0, t, noise, step, torch.eye(6)).max() < 1e-3
    wrong = Oracle(x0 * 0.5, VPrediction(), s)  # a student that halves every image
    assert (c.pair_loss(wrong, oracle, s, x0, t, noise, 0, torch.eye(6)) > 0.1).all()
    # the targets f(x_r, r) come from target_net when one is given: an exact target pulls the halving student back
    # (stage 2: every step k > 2 has a noisy partner r > 0, a target from the network), the halving one as target agrees
    # with it at r
    t = at(3, 30, 60, 90, 99, 50)
    assert (c.partner(t, 10, s) > 0).all()
    own = c.pair_loss(wrong, oracle, s, x0, t, noise, 10, torch.eye(6))
    assert own.max() < 1e-3  # the halving student is consistent with itself: what a target from the network misses
    assert (c.pair_loss(wrong, oracle, s, x0, t, noise, 10, torch.eye(6), target_net=oracle) > 0.1).all()


def test_target_ema_is_checked_and_the_target_network_follows_the_student(tmp_path) -> None:
    """theta- <- mu theta- + (1 - mu) theta after every step, from the weights the run starts with."""
    with pytest.raises(ConfigError, match=r"target_ema=1.0: must be in \[0, 1\)"):
        Consistency(VPrediction(), target_ema=1.0)
    from difflab.consistency import ConsistencyTuning

    teacher = tmp_path / "teacher.ckpt"
    diffusion = build_model(to_container(compose_cfg(["model=unet_tiny", "timesteps=50"], tmp_path)))
    torch.save({"state_dict": {f"net.{k}": v for k, v in diffusion.net.state_dict().items()}, "difflab_config": diffusion.config,
                "class_names": diffusion.class_names, "difflab_export": {"source": "test"}}, teacher)
    model = build_model(compose_cfg(["model=unet_tiny", "timesteps=50", "objective=consistency", "objective.target_ema=0.9"], tmp_path))
    module = ConsistencyTuning(model, torch.optim.Adam, str(teacher))
    module.on_train_start()  # step 0: the target starts as the student
    assert all(torch.equal(a, b) for a, b in zip(module.target_net.parameters(), module.net.parameters()))
    before = [p.clone() for p in module.target_net.parameters()]
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(1.0)
    module.trainer = SimpleNamespace(global_step=1, current_epoch=0, log_every_n_steps=50)  # (the hook also checks finiteness)
    module.on_train_batch_end(None, None, 0)
    for slow, start, fast in zip(module.target_net.parameters(), before, module.net.parameters()):
        assert torch.allclose(slow, 0.9 * start + 0.1 * fast, atol=1e-6)
    assert any(k.startswith("target_net.") for k in module.state_dict())  # saved: a resumed run continues with it
    off = ConsistencyTuning(build_model(compose_cfg(["model=unet_tiny", "timesteps=50", "objective=consistency",
                                                     "objective.target_ema=0"], tmp_path)), torch.optim.Adam, str(teacher))
    assert off.target_net is None and not any(k.startswith("target_net.") for k in off.state_dict())


def constant_x0(c):
    """A denoiser whose every x_0 prediction is the image ``c`` (a consistency model whose data set is one image)."""

    def denoise(x, level):
        # eps = (x_t - alpha x_0) / sigma
        return Denoised(c.expand_as(x), (x - level.alpha * c) / level.sigma)

    return denoise


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_sampling_returns_f_and_renoises_with_the_images_own_stream(steps) -> None:
    s = LinearSchedule(100)
    c = torch.rand(1, 3, 4, 4) * 1.6 - 0.8
    sampler = ConsistencySampler(steps)
    noise = ImageNoise(0, [0, 1])
    x_T = noise.randn((3, 4, 4))
    out = sampler.sample(constant_x0(c), s, x_T, noise, record_every=1)
    torch.testing.assert_close(out.images, c.expand(2, -1, -1, -1), rtol=0, atol=1e-5)
    ts = sampler.times(s)
    assert out.chain_t == [1.0, *ts[1:], 0.0] and ts[0] == 1.0  # from step T-1 (t = 1) to the clean image
    if steps > 1:  # x_{t1} = alpha x_0 + sigma z, z the images' second draws
        again = ImageNoise(0, [0, 1])
        again.randn((3, 4, 4))
        z = again.randn((3, 4, 4))
        ab = s.alphas_cumprod[round(ts[1] * 100) - 1]
        torch.testing.assert_close(out.chain[1], ab.sqrt() * c + (1 - ab).sqrt() * z, rtol=0, atol=1e-5)


def grid_steps(sampler: ConsistencySampler, T: int) -> list[int]:
    """The steps k of a sampler's times on a T-step grid (each t = (k + 1) / T exactly)."""
    ts = sampler.times(LinearSchedule(T))
    ks = [round(t * T) - 1 for t in ts]
    assert ts == [(k + 1) / T for k in ks], ts
    return ks


def test_consistency_sampler_settings_are_checked() -> None:
    assert grid_steps(ConsistencySampler(2, timesteps=[999, 299]), 1000) == [999, 299]
    assert grid_steps(ConsistencySampler(2), 1000) == [999, 500]  # (T - 1) (1 - i/2): round(499.5) = 500
    assert grid_steps(ConsistencySampler(4), 1000) == [999, 749, 500, 250]
    assert grid_steps(ConsistencySampler(2, rho=2.0), 1000) == [999, 250]  # (T - 1) (1 - i/2)^2
    with pytest.raises(ConfigError, match="repeats timesteps"):
        ConsistencySampler(8, rho=3.0).times(LinearSchedule(20))
    with pytest.raises(ConfigError, match="1 to 8 steps"):
        ConsistencySampler(9)
    with pytest.raises(ConfigError, match="2 decreasing timesteps"):
        ConsistencySampler(2, timesteps=[100, 300])
    with pytest.raises(ConfigError, match=r"\[0, T-1=99\]"):
        ConsistencySampler(2, timesteps=[999, 10]).times(LinearSchedule(100))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = tmp_path_factory.mktemp("cm")
    diffusion = build_model(compose_cfg(["model=unet_tiny", "timesteps=50"], out))
    consistency = build_model(compose_cfg(["model=unet_tiny", "timesteps=50", "objective=consistency", "module=consistency"], out))
    return diffusion, consistency


def test_sampler_auto_follows_the_model(models) -> None:
    diffusion, consistency = models
    spec = SamplingSpec({"diffusion": {"_target_": "difflab.samplers.DPMSolverPP2MSampler", "steps": 15},
                         "consistency": {"_target_": "difflab.samplers.ConsistencySampler", "steps": 2}}, steps=3, palette=None)
    on_diffusion, on_consistency = spec.bind(diffusion), spec.bind(consistency)
    assert isinstance(on_diffusion.sampler, DPMSolverPP2MSampler) and on_diffusion.steps == 3
    assert isinstance(on_consistency.sampler, ConsistencySampler) and on_consistency.steps == 3
    assert on_consistency.record()["sampler"] == "consistency" and on_diffusion.record()["sampler"] == "dpmpp"


def test_who_may_sample_what(models) -> None:
    diffusion, consistency = models
    with pytest.raises(ConfigError, match="samples consistency models only"):
        SamplingSpec(ConsistencySampler(2), palette=None).bind(diffusion)
    with pytest.raises(ConfigError, match="is a consistency model: sample it with sampler=consistency"):
        SamplingSpec(DDIMSampler(2), palette=None).bind(consistency)
    with pytest.raises(ConfigError, match="guidance 2 distilled in"):
        SamplingSpec(ConsistencySampler(2), guidance=3.0, palette=None).bind(consistency)
    # the distilled guidance as it is: sampled with no guidance of its own
    assert SamplingSpec(ConsistencySampler(2), guidance=2.0, palette=None).bind(consistency).guidance.scale == 0


def test_a_consistency_step_is_one_plain_network_call(models) -> None:
    """The distilled guidance means no second (unconditional) call: 2 steps = 2 calls on the batch as it is."""
    _, consistency = models
    calls = []
    handle = consistency.net.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        generate(SamplingSpec(ConsistencySampler(2), precision="32", palette=None).bind(consistency), torch.eye(consistency.num_classes)[:3])
    finally:
        handle.remove()
    assert calls == [3, 3]


def test_consistency_tuning_needs_a_teacher_of_the_same_prediction(tmp_path) -> None:
    from difflab.train import train

    with pytest.raises(ConfigError, match="init_from="):
        train(compose_cfg(["experiment=sprites_consistency", "model=unet_tiny"], tmp_path))
