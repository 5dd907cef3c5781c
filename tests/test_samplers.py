"""Samplers against diffusers' schedulers, a perfect denoiser, Gaussian data, and the guidance wrappers.

diffusers is the reference implementation here: the same model output, sample and noise must give the
same x_{t-1}. diffusers builds its schedule with a float32 cumprod and we with a float64 one, so results
agree to float32 rounding (checked with rtol / atol 1e-5 on values of order 1).

A sampler is a step rule ``step(x, denoise, schedule, cur, nxt, noise)`` that calls the denoiser itself: where
diffusers is handed a fixed model output, ours is handed a denoiser that returns it (``fixed_eps``), read through the
objective (EpsPrediction: x_0 = (x_t - sigma eps) / alpha) as a model's would be.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from difflab.diffusion import Denoised, Level
from difflab.guidance import Guidance, guided_output
from difflab.nn.unet import UNet
from difflab.objectives import EpsPrediction, FlowMatching
from difflab.samplers import (
    ConsistencySampler,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    EulerSampler,
    HeunSampler,
    UniPCSampler,
    spaced_timesteps,
    walk,
)
from difflab.samplers.grids import karras
from difflab.schedules import CosineSchedule, EDMSchedule, LinearSchedule, NoiseSchedule, RectifiedFlow

from support import U32, reorder_tol

SCHEDULES = [("linear", "linear"), ("cosine", "squaredcos_cap_v2")]  # ours, diffusers' beta_schedule
SHAPE = (2, 3, 4, 4)
U64 = torch.finfo(torch.float64).eps / 2  # float64 unit roundoff, 2^-53


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def schedule(kind: str, T: int) -> NoiseSchedule:
    return LinearSchedule(T) if kind == "linear" else CosineSchedule(T)


def step_of(level: Level, T: int) -> int:
    """The 0-based step k of a level on a T-step grid (t = (k + 1) / T; -1: the clean image)."""
    return round(level.t * T) - 1


def eps_denoiser(model):
    """The Denoiser of an eps model ``model(x_t, net_t)``, read by EpsPrediction as a network's output is (its network
    input x_t / sqrt(a^2 + s^2), x_0 = (x_t - sigma eps) / alpha), in the model's dtype (float64 runs stay float64)."""
    objective = EpsPrediction()

    def denoise(x: torch.Tensor, level: Level) -> Denoised:
        a, s = level.alpha, level.sigma
        return objective.denoised(x, model(objective.net_input(x, a, s), level.net_t), a, s)

    return denoise


def fixed_eps(eps: torch.Tensor):
    """A denoiser whose eps is ``eps`` whatever x: the model output diffusers' step(model_output, t, x) is given."""
    return eps_denoiser(lambda x, t: eps)


def gaussian_model(s: NoiseSchedule, scale: float = 0.5, wiggle: float = 0.05):
    """A deterministic eps_theta(x, k) on a VP grid (k its step, the network's time input): the exact denoiser for data
    x_0 ~ N(mu, scale^2 I), plus a small non-linear term so that nothing is exactly linear in x.

    eps*(x, k) = sigma_k (x - alpha_k mu) / (alpha_k^2 scale^2 + sigma_k^2) + wiggle alpha_k sin(x + k/100)
    (the perturbation is scaled by alpha_k so that the implied x_0 stays bounded as alpha_k -> 0).
    """
    ab_all = s.alphas_cumprod.double().cpu()
    mu = torch.linspace(-0.5, 0.5, math.prod(SHAPE[1:]), dtype=torch.float64).reshape(1, *SHAPE[1:])

    def eps(x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1).long().expand(x.shape[0])
        ab = ab_all[t].reshape(-1, 1, 1, 1)
        a, sig = ab.sqrt(), (1 - ab).sqrt()
        xd = x.double()
        out = sig * (xd - a * mu) / (ab * scale**2 + sig**2) + wiggle * a * torch.sin(xd + t.reshape(-1, 1, 1, 1) / 100)
        return out.to(x.dtype)

    return eps


def oracle(x0: torch.Tensor):
    """The perfect denoiser for a known x_0, as an eps model: eps = (x_t - alpha_t x_0) / sigma_t (float64)."""

    def denoise(x: torch.Tensor, level: Level) -> Denoised:
        eps = (x.double() - level.alpha * x0) / level.sigma
        return EpsPrediction().denoised(x, eps, level.alpha, level.sigma)

    return denoise


def velocity(x: torch.Tensor, net_t) -> torch.Tensor:
    """A deterministic velocity u(x, t) of a flow model (net_t = 1000 t, its time input), computed in float64 and rounded
    once: |du/dx| <= 0.5 + 0.3 = 0.8 and |du/dt| <= 0.3."""
    xd = x.double()
    return (0.5 * torch.tanh(xd) + 0.3 * torch.sin(xd + float(net_t) / 1000) - 0.2).to(x.dtype)


def flow_denoiser():
    """The velocity model read by FlowMatching (rectified flow: x_0 = x_t - t u, eps = x_t + (1 - t) u)."""
    return FlowMatching().denoiser(lambda x, level: velocity(x, level.net_t))


def float64_ddpm(ref: DDPMScheduler) -> DDPMScheduler:
    """diffusers keeps alpha_bar in float32 and re-derives beta_t = 1 - ab_t / ab_{t-1} in each step: for
    small t that cancellation loses ~4 digits (6e-5 absolute on x_{t-1} at t = 1, T = 500). Recompute its
    alpha_bar in float64 from its own betas, so the scalar coefficients are exact and the comparison
    tests the update rule, not float32 rounding; the tensors stay float32."""
    ref.alphas_cumprod = torch.cumprod(1 - ref.betas.double(), 0)
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    return ref


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal up to float32 rounding: the absolute slack scales with the largest value (x_{t-1} reaches ~10
    at cosine's t = T-1, where x_0 ~ 1e4 is multiplied by coefficients ~ 1e-3)."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


# ---- timestep spacing ----


@pytest.mark.parametrize("T,steps", [(1000, 25), (1000, 50), (500, 20), (1000, 7), (10, 10)])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_spaced_timesteps_match_diffusers_ddim(T: int, steps: int, spacing: str) -> None:
    """diffusers' DDIM timesteps as steps k, and the sampler's levels at t = (k + 1) / T, each on grid point k."""
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
    ref.set_timesteps(steps)
    ts = spaced_timesteps(T, steps, spacing)
    assert ts == ref.timesteps.tolist()
    assert len(ts) == steps and len(set(ts)) == steps and ts == sorted(ts, reverse=True)
    assert 0 <= ts[-1] and ts[0] <= T - 1
    s = LinearSchedule(T)
    levels = DDIMSampler(steps, spacing=spacing).levels(s)
    assert [step_of(lv, T) for lv in levels] == ts + [-1]
    assert [lv.net_t for lv in levels[:-1]] == [float(k) for k in ts]  # the network sees the step k itself
    assert levels[-1].clean and levels[-1].t == 0.0


def test_spaced_timesteps_by_hand() -> None:
    # trailing: round(1000 - 250 k) - 1 ; leading: 250 k ; linspace(0, 9, 4) = [0, 3, 6, 9]
    assert spaced_timesteps(1000, 4, "trailing") == [999, 749, 499, 249]
    assert spaced_timesteps(1000, 4, "leading") == [750, 500, 250, 0]
    assert spaced_timesteps(10, 4, "linspace") == [9, 6, 3, 0]
    # T/steps not an integer: trailing 10/3 -> round([10, 6.67, 3.33]) - 1 ; leading 10 // 3 = 3
    assert spaced_timesteps(10, 3, "trailing") == [9, 6, 2]
    assert spaced_timesteps(10, 3, "leading") == [6, 3, 0]
    assert spaced_timesteps(5, 5, "trailing") == [4, 3, 2, 1, 0]


def test_spaced_timesteps_bad_input() -> None:
    with pytest.raises(ValueError, match=r"sampler.spacing=uniform: choose one of leading, trailing, linspace"):
        spaced_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match=r"steps must be in \[1, T=100\], got 101"):
        spaced_timesteps(100, 101)
    with pytest.raises(ValueError, match=r"steps must be in \[1, T=100\], got 0"):
        spaced_timesteps(100, 0)


def test_dpmpp_linspace_takes_at_most_t_minus_1_steps_and_names_the_steps_typed() -> None:
    s = LinearSchedule(100)
    # every step but k = 0, whose place the clean image takes
    assert DPMSolverPP2MSampler(steps=99).times(s) == [(k + 1) / 100 for k in range(99, 0, -1)]
    for steps in (100, 5000):
        with pytest.raises(ValueError, match=rf"steps must be in \[1, T-1=99\], got {steps}$"):
            DPMSolverPP2MSampler(steps=steps).times(s)
    with pytest.raises(ValueError, match=r"steps must be in \[1, T=100\], got 101"):
        DPMSolverPP2MSampler(steps=101, spacing="trailing").times(s)


def test_ddpm_sampler_rejects_unknown_variance() -> None:
    with pytest.raises(ValueError, match=r"sampler.variance=learned: choose one of beta, posterior"):
        DDPMSampler(variance="learned")


# ---- DDPM ----


@pytest.mark.parametrize("T", [500, 1000])
@pytest.mark.parametrize("kind,beta_schedule", SCHEDULES)
@pytest.mark.parametrize("variance,variance_type", [("posterior", "fixed_small"), ("beta", "fixed_large")])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_matches_diffusers(kind, beta_schedule, T, variance, variance_type, clip) -> None:
    """Both steps draw their noise with torch.randn(x.shape, generator=g) (diffusers' randn_tensor with
    one CPU generator), so the same seeded generator gives the same z and x_{t-1} can be compared whole."""
    s = schedule(kind, T)
    ref = float64_ddpm(
        DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, variance_type=variance_type, clip_sample=clip)
    )
    sampler = DDPMSampler(variance, clip_x0=clip)
    ab_all = s.alphas_cumprod
    for t in [0, 1, 2, T // 2, T - 2, T - 1]:
        g = gen(t)
        ab = ab_all[t]
        x0 = torch.rand(SHAPE, generator=g) * 2 - 1
        noise = torch.randn(SHAPE, generator=g)
        x_t = (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).float()
        eps = noise + 0.3 * torch.randn(SHAPE, generator=g)  # an imperfect model, so clipping matters
        cur, nxt = s.level_at(t), s.level_at(t - 1)
        ours, x0_ours = sampler.step(x_t, fixed_eps(eps), s, cur, nxt, gen(100 + t))
        theirs = ref.step(eps, t, x_t, generator=gen(100 + t))
        # x_0 is ~1/sqrt(ab_t) times larger than x_t: compare it relative to its size
        torch.testing.assert_close(x0_ours, theirs.pred_original_sample, rtol=1e-5, atol=1e-5 * float(x0_ours.abs().max()))
        close(ours, theirs.prev_sample)
        if clip:
            assert float(x0_ours.abs().max()) <= 1.0
        # the step noise: none at t = 0, sigma_t z otherwise, with beta_t or beta~_t = beta_t (1 - ab_{t-1}) / (1 - ab_t)
        other, _ = sampler.step(x_t, fixed_eps(eps), s, cur, nxt, gen(999))
        ab_prev = ab_all[t - 1] if t > 0 else torch.ones((), dtype=torch.float64)
        var = s.betas[t] if variance == "beta" else s.betas[t] * (1 - ab_prev) / (1 - ab)
        if t == 0:
            assert nxt.clean
            assert torch.equal(other, ours)
        else:
            z_ours = torch.randn(SHAPE, generator=gen(100 + t))
            z_other = torch.randn(SHAPE, generator=gen(999))
            close(other - ours, var.sqrt() * (z_other - z_ours))


@pytest.mark.parametrize("kind,beta_schedule", SCHEDULES)
def test_ddpm_full_chain_matches_diffusers(kind, beta_schedule) -> None:
    """All T steps through Sampler.sample vs a diffusers loop sharing one generator's draws in order."""
    T = 50
    s = schedule(kind, T)
    model = gaussian_model(s)
    x_T = torch.randn(SHAPE, generator=gen(0))
    ours = DDPMSampler("posterior", clip_x0=False).sample(eps_denoiser(model), s, x_T, noise=gen(1)).images
    ref = float64_ddpm(
        DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, variance_type="fixed_small", clip_sample=False)
    )
    x, g = x_T.clone(), gen(1)
    for t in range(T - 1, -1, -1):
        x = ref.step(model(x, t), t, x, generator=g).prev_sample
    close(ours, x, 1e-4)
    other = DDPMSampler("posterior", clip_x0=False).sample(eps_denoiser(model), s, x_T, noise=gen(2)).images
    assert not torch.allclose(ours, other)


# ---- DDIM ----


@pytest.mark.parametrize("kind,beta_schedule", SCHEDULES)
@pytest.mark.parametrize(
    "T,steps,spacing", [(1000, 50, "trailing"), (1000, 25, "leading"), (500, 20, "trailing"), (500, 10, "leading")]
)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_steps_match_diffusers(kind, beta_schedule, T, steps, spacing, eta) -> None:
    """Every step of the schedule, including the last (t_prev = -1, alpha_bar_prev = 1 = set_alpha_to_one).

    With T divisible by steps, diffusers' prev_timestep = t - T // steps is our next level's step. Our step draws
    its noise as torch.randn(x.shape, generator=g); diffusers gets the same tensor as variance_noise.
    """
    s = schedule(kind, T)
    ref = DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule=beta_schedule,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing=spacing,
    )
    ref.set_timesteps(steps)
    sampler = DDIMSampler(steps, eta, spacing, clip_x0=False)
    levels = sampler.levels(s)
    assert [step_of(lv, T) for lv in levels[:-1]] == ref.timesteps.tolist()
    pairs = list(zip(levels, levels[1:]))
    for i, (cur, nxt) in enumerate(pairs):
        t, t_prev = step_of(cur, T), step_of(nxt, T)
        assert t_prev == (t - T // steps if t - T // steps >= 0 else -1)
        g = gen(i)
        x_t = torch.randn(SHAPE, generator=g)
        eps = 0.9 * x_t + 0.2 * torch.randn(SHAPE, generator=g)
        ours, x0_ours = sampler.step(x_t, fixed_eps(eps), s, cur, nxt, gen(50 + i))
        kwargs = {"variance_noise": torch.randn(SHAPE, generator=gen(50 + i))} if eta > 0 else {}
        theirs = ref.step(eps, t, x_t, eta=eta, **kwargs)
        torch.testing.assert_close(x0_ours, theirs.pred_original_sample, rtol=1e-5, atol=1e-5 * float(x0_ours.abs().max()))
        scale = max(1.0, float(theirs.prev_sample.abs().max()))
        torch.testing.assert_close(ours, theirs.prev_sample, rtol=1e-5, atol=1e-5 * scale)
    # the last step lands on the predicted x_0 (alpha_bar_prev = 1, sigma = 0)
    assert pairs[-1][1].clean
    torch.testing.assert_close(ours, x0_ours, rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_clipped_steps_match_diffusers(eta: float) -> None:
    """clip_x0=True re-derives eps from the clipped x_0: diffusers' clip_sample + use_clipped_model_output."""
    T, steps = 1000, 20
    s = LinearSchedule(T)
    ref = DDIMScheduler(
        num_train_timesteps=T, clip_sample=True, set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing"
    )
    ref.set_timesteps(steps)
    sampler = DDIMSampler(steps, eta, "trailing", clip_x0=True)
    levels = sampler.levels(s)
    clipped = 0
    for i, (cur, nxt) in enumerate(zip(levels, levels[1:])):
        g = gen(i)
        x_t = torch.randn(SHAPE, generator=g) * 1.5
        eps = torch.randn(SHAPE, generator=g)
        ours, x0 = sampler.step(x_t, fixed_eps(eps), s, cur, nxt, gen(7))
        kwargs = {"variance_noise": torch.randn(SHAPE, generator=gen(7))} if eta > 0 else {}
        theirs = ref.step(eps, step_of(cur, T), x_t, eta=eta, use_clipped_model_output=True, **kwargs)
        close(x0, theirs.pred_original_sample)
        close(ours, theirs.prev_sample)
        clipped += int((x0.abs() == 1).sum())
    assert clipped > 0  # clipping was exercised


def test_ddim_eta0_deterministic_eta1_not() -> None:
    s = LinearSchedule(100)
    denoise = eps_denoiser(gaussian_model(s))
    x_T = torch.randn(SHAPE, generator=gen(0))
    a = DDIMSampler(10, eta=0.0, clip_x0=False).sample(denoise, s, x_T, noise=gen(1)).images
    b = DDIMSampler(10, eta=0.0, clip_x0=False).sample(denoise, s, x_T, noise=gen(2)).images
    assert torch.equal(a, b)
    c = DDIMSampler(10, eta=1.0, clip_x0=False).sample(denoise, s, x_T, noise=gen(1)).images
    d = DDIMSampler(10, eta=1.0, clip_x0=False).sample(denoise, s, x_T, noise=gen(2)).images
    assert (c - d).abs().max() > 1e-2
    assert torch.equal(c, DDIMSampler(10, eta=1.0, clip_x0=False).sample(denoise, s, x_T, noise=gen(1)).images)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_x0_is_ddpm_x0_prediction(clip: bool) -> None:
    """The x_0 a DDIM step returns is DDPM's x_0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t), from the schedule's alpha_bar
    (computed here in float64), clipped where asked."""
    s = CosineSchedule(1000)
    g = gen(0)
    x_t = torch.randn(SHAPE, generator=g)
    eps = torch.randn(SHAPE, generator=g)
    for t, t_prev in [(999, 959), (500, 460), (40, 0), (0, -1)]:
        _, x0 = DDIMSampler(25, eta=0.0, clip_x0=clip).step(x_t, fixed_eps(eps), s, s.level_at(t), s.level_at(t_prev), None)
        ab = s.alphas_cumprod[t]
        expected = ((x_t.double() - (1 - ab).sqrt() * eps.double()) / ab.sqrt()).float()
        if clip:
            expected = expected.clamp(-1, 1)
        torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_ddim_eta1_every_step_equals_ddpm_posterior() -> None:
    """Song et al.: DDIM with eta = 1 over all T steps is DDPM with sigma_t^2 = beta~_t. With x_t =
    sqrt(ab_t) x_0 + sqrt(1-ab_t) eps, the posterior mean is sqrt(ab_{t-1}) x_0 + coef2 sqrt(1-ab_t) eps and
    coef2^2 (1 - ab_t) = 1 - ab_{t-1} - beta~_t, which is DDIM's direction term. Both draw z at t = T-1..1."""
    T = 30
    s = LinearSchedule(T, beta_start=1e-3, beta_end=0.2)
    denoise = eps_denoiser(gaussian_model(s))
    x_T = torch.randn(SHAPE, generator=gen(0))
    ddpm_sampler = DDPMSampler("posterior", clip_x0=False)
    ddim_sampler = DDIMSampler(T, eta=1.0, spacing="trailing", clip_x0=False)
    assert ddim_sampler.levels(s) == ddpm_sampler.levels(s)  # the same grid: every step
    ddpm = ddpm_sampler.sample(denoise, s, x_T, noise=gen(5)).images
    ddim = ddim_sampler.sample(denoise, s, x_T, noise=gen(5)).images
    close(ddim, ddpm, 1e-4)


# ---- DPM-Solver++(2M) ----


@pytest.mark.parametrize("kind,beta_schedule", SCHEDULES)
@pytest.mark.parametrize("T", [500, 1000])
@pytest.mark.parametrize("steps", [10, 15])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_dpmpp_full_run_matches_diffusers(kind, beta_schedule, T, steps, spacing) -> None:
    """A whole run with a fixed deterministic model: same timesteps (the network's time input), same final sample.

    Stock diffusers takes alpha_bar from a float32 cumprod, ~1e-5 relative off at cosine's tail (alpha_bar
    ~ 1e-9), and the first step's x_0 = (x - sigma eps) / alpha carries that into the sample (up to 3.5e-4
    absolute here). With its alpha_bar recomputed in float64 from its own betas (sigmas are still cast to
    float32 by set_timesteps) the two agree to 1e-5, and ours is within 1e-6 of a float64 run of ours (its model
    outputs rounded to float32 as a network's are: the float64 eps of the model itself would move the first x_0 =
    (x - sigma eps) / alpha by ~u |eps| / alpha ~ 1e-3 at cosine's alpha ~ 1e-4, which the sampler is not asked to undo).
    """
    s = schedule(kind, T)
    model = gaussian_model(s)
    x_T = torch.randn(SHAPE, generator=gen(0))
    seen: list[float] = []

    def spy(x, t):
        seen.append(float(t))
        return model(x, t)

    ours = DPMSolverPP2MSampler(steps=steps, spacing=spacing, clip_x0=False).sample(eps_denoiser(spy), s, x_T).images
    ref = DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        beta_schedule=beta_schedule,
        algorithm_type="dpmsolver++",
        solver_order=2,
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing=spacing,
        use_karras_sigmas=False,
        thresholding=False,
    )
    stock = ref.alphas_cumprod
    ref.alphas_cumprod = torch.cumprod(1 - ref.betas.double(), 0)
    finals = []
    for alphas_cumprod in [ref.alphas_cumprod, stock]:
        ref.alphas_cumprod = alphas_cumprod
        ref.set_timesteps(steps)
        x = x_T.clone()
        for t in ref.timesteps:
            x = ref.step(model(x, t), t, x).prev_sample
        finals.append(x)
    assert seen == [float(t) for t in ref.timesteps.tolist()]
    assert len(seen) == steps
    assert float(finals[0].abs().max()) > 0.5  # a non-trivial sample
    close(ours, finals[0], 1e-5)
    close(ours, finals[1], 1e-3)
    # a float64 run of ours: the same float32 model outputs (the objective's denoiser reads the network's output as
    # float32, Objective.denoiser), the sampler's arithmetic on float64 x: float32 arithmetic costs < 1e-6
    ours64 = DPMSolverPP2MSampler(steps=steps, spacing=spacing, clip_x0=False).sample(
        EpsPrediction().denoiser(lambda x, level: model(x, level.net_t)), s, x_T.double()).images
    assert ours64.dtype == torch.float64
    close(ours, ours64, 1e-6)


def test_dpmpp_second_order_differs_from_first_order() -> None:
    """After the first step the 2M update uses the previous x_0: the run differs from DDIM (= DPM-Solver++ 1)
    on the same levels, and only there (one step: identical)."""
    s = LinearSchedule(1000)
    denoise = eps_denoiser(gaussian_model(s, wiggle=0.3))
    x_T = torch.randn(SHAPE, generator=gen(0))
    dpm = DPMSolverPP2MSampler(steps=10, clip_x0=False)
    times = dpm.times(s)

    class FirstOrder(DDIMSampler):
        def times(self, schedule):
            return times

    ddim = FirstOrder(10, eta=0.0, clip_x0=False)
    assert ddim.levels(s) == dpm.levels(s)
    x_dpm = dpm.sample(denoise, s, x_T).images
    x_ddim = ddim.sample(denoise, s, x_T).images
    assert (x_dpm - x_ddim).abs().max() > 1e-3
    # the first step of both is the same first-order update
    levels = dpm.levels(s)
    dpm.reset()
    close(dpm.step(x_T, denoise, s, levels[0], levels[1], None)[0], ddim.step(x_T, denoise, s, levels[0], levels[1], None)[0])


# ---- a perfect denoiser ----


def known_x0() -> torch.Tensor:
    return torch.rand(SHAPE, generator=gen(42), dtype=torch.float64) * 1.8 - 0.9  # inside [-1, 1]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize(
    "sampler", [DDIMSampler(10, eta=0.0, clip_x0=False), DPMSolverPP2MSampler(10, clip_x0=False)], ids=["ddim", "dpmpp"]
)
def test_deterministic_samplers_follow_the_oracle_trajectory(kind, sampler) -> None:
    """With eps = (x_t - sqrt(ab_t) x_0) / sqrt(1 - ab_t), DDIM (eta 0) and DPM-Solver++ keep the implied
    noise constant: every frame is sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps_T, and the last is x_0."""
    T = 1000
    s = schedule(kind, T)
    x0 = known_x0()
    x_T = torch.randn(SHAPE, generator=gen(0))
    out = sampler.sample(oracle(x0), s, x_T, record_every=1)
    levels = sampler.levels(s)
    assert out.chain_t == sampler.times(s) + [0.0] == [lv.t for lv in levels]
    eps_T = (x_T.double() - levels[0].alpha * x0) / levels[0].sigma
    for level, frame in zip(levels[1:-1], out.chain[1:-1]):
        close(frame, level.alpha * x0 + level.sigma * eps_T, 1e-4)
    close(out.images, x0, 1e-4)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddpm_with_oracle_returns_x0(kind) -> None:
    """DDPM with the perfect denoiser: at t = 0, alpha_bar_{-1} = 1 gives coef1 = 1, coef2 = 0 and no noise,
    so the last step returns the predicted x_0 = x_0 whatever noise was drawn on the way."""
    T = 50
    s = schedule(kind, T)
    x0 = known_x0()
    x_T = torch.randn(SHAPE, generator=gen(0))
    sampler = DDPMSampler("posterior", clip_x0=False)
    a = sampler.sample(oracle(x0), s, x_T, noise=gen(1), record_every=10)
    b = sampler.sample(oracle(x0), s, x_T, noise=gen(2))
    close(a.images, x0, 1e-5)
    close(b.images, x0, 1e-5)
    # the intermediate states do depend on the noise
    assert not torch.allclose(a.chain[1], sampler.sample(oracle(x0), s, x_T, noise=gen(2), record_every=10).chain[1])


# ---- Gaussian data: the exact probability-flow ODE ----

DATA_STD = 0.5
DATA_MEAN = torch.linspace(-0.5, 0.5, math.prod(SHAPE[1:]), dtype=torch.float64).reshape(1, *SHAPE[1:])
ALL_SCHEDULES = {
    "linear": lambda: LinearSchedule(1000),
    "cosine": lambda: CosineSchedule(1000),
    "flow": lambda: RectifiedFlow(),
    "edm": lambda: EDMSchedule(),
}


def gaussian_denoiser(c: float = DATA_STD, mu: torch.Tensor = DATA_MEAN):
    """The exact denoiser of data x_0 ~ N(mu, c^2 I) at any level (a, s), in x's dtype:
    x0 = mu + a c^2 / (a^2 c^2 + s^2) (x - a mu), eps = (x - a x0) / s (at pure noise, a = 0: x0 = mu)."""

    def denoise(x: torch.Tensor, level: Level) -> Denoised:
        a, s = level.alpha, level.sigma
        m = mu.to(x.dtype)
        x0 = m + (a * c**2 / (a**2 * c**2 + s**2)) * (x - a * m)
        return Denoised(x0, (x - a * x0) / s)

    return denoise


def rho_spaced(cls):
    """``cls`` on EDM's rho-spaced levels (grids.karras) of the schedule's ODE time instead of its own grid."""

    class RhoSpaced(cls):
        def times(self, schedule):
            return karras(schedule, self.steps)

    return RhoSpaced


# (name, constructor, order, multistep)
DETERMINISTIC = [
    ("ddim", lambda steps: DDIMSampler(steps, eta=0.0, clip_x0=False), 1, False),
    ("euler", lambda steps: EulerSampler(steps), 1, False),
    ("heun", lambda steps: HeunSampler(steps), 2, False),
    ("dpmpp", lambda steps: DPMSolverPP2MSampler(steps, clip_x0=False), 2, True),
    ("unipc", lambda steps: UniPCSampler(steps, clip_x0=False), 2, True),
]


@pytest.mark.parametrize("kind", list(ALL_SCHEDULES))
@pytest.mark.parametrize("name,make,order,multistep", DETERMINISTIC, ids=[d[0] for d in DETERMINISTIC])
def test_deterministic_samplers_converge_at_their_order_on_gaussian_data(kind, name, make, order, multistep) -> None:
    """Data x_0 ~ N(mu, c^2 I) has the exact denoiser above, and the probability-flow ODE keeps
    w = (x_t - a_t mu) / sqrt(a_t^2 c^2 + s_t^2) constant: from x at the first level (x = sqrt(a0^2 + s0^2) z, as
    generate starts) the exact end is mu + c w0. Float64 throughout, so only the discretisation errs.

    Every sampler's last step, to the clean image, is the denoiser's x_0 at the last noisy level N (checked): the end
    is mu + (a_N c^2 / r_N) w_N, r_N = sqrt(a_N^2 c^2 + s_N^2), whose distance from the exact end is c |w0| (1 - a_N c / r_N)
    (where the grid stops: fixed at a VP schedule's k = 0, about 1e-4) plus (a_N c^2 / r_N) |w_N - w0|. The solver's
    error is the second: max |w_N - w0| falls by ~2^order per doubling of the steps (asserted: first order 1.7 to 2.3,
    second order > 3; UniPC's corrector makes it third order on most grids). Step counts 80 / 160 / 320: past the
    pre-asymptotic bumps of the multistep solvers (at 10 to 40 steps, ratios from 0.3 to 13 were seen).

    On a VP grid (uniform in t down to k = 0) the multistep solvers' last steps have lambda-lengths
    h ~ log((j + 1) / j) / 2 that do not shrink with the step count, and DPM-Solver++ converges there more slowly than
    second order (ratios 3.0 to 3.3 from 100 to 800 steps); on VP schedules their order is measured on EDM's rho-spaced
    levels instead, where every h shrinks as 1 / steps (diffusers' use_karras_sigmas)."""
    s = ALL_SCHEDULES[kind]()
    c, mu = DATA_STD, DATA_MEAN
    denoise = gaussian_denoiser()
    z = torch.randn(SHAPE, generator=gen(0), dtype=torch.float64)
    errors = []
    for steps in (80, 160, 320):
        sampler = make(steps)
        if multistep and s.timesteps is not None:
            sampler = rho_spaced(type(sampler))(steps, clip_x0=False)
        levels = sampler.levels(s)
        first, last = levels[0], levels[-2]
        x = math.sqrt(first.alpha**2 + first.sigma**2) * z
        out = sampler.sample(denoise, s, x, record_every=1)
        assert out.images.dtype == torch.float64 and len(out.chain) == len(levels)
        w0 = (x - first.alpha * mu) / math.sqrt(first.alpha**2 * c**2 + first.sigma**2)
        w_last = (out.chain[-2] - last.alpha * mu) / math.sqrt(last.alpha**2 * c**2 + last.sigma**2)
        # the last step is the denoiser's x_0 (a few float64 roundings)
        expected = denoise(out.chain[-2], last).x0
        torch.testing.assert_close(out.images, expected, rtol=0, atol=8 * U64 * float(expected.abs().max()))
        errors.append(float((w_last - w0).abs().max()))
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    if order == 1:
        assert all(1.7 < r < 2.3 for r in ratios), (errors, ratios)
    else:
        assert all(r > 3 for r in ratios), (errors, ratios)
    assert errors[-1] < 0.1  # converging to the exact end, not merely at a rate


@pytest.mark.parametrize("kind", list(ALL_SCHEDULES))
def test_ddim_eta0_unclipped_is_euler_step_by_step(kind) -> None:
    """DDIM with eta = 0 and no clipping, x_s = alpha_s x_0 + sqrt(sigma_s^2 - 0) eps, is Euler's x_s = alpha_s x_0 +
    sigma_s eps on the same (trailing) levels: bitwise, since sqrt(fl(s^2)) = s in IEEE arithmetic, from the same x
    at every step (float32), and so over the whole run."""
    s = ALL_SCHEDULES[kind]()
    denoise = gaussian_denoiser()
    ddim, euler = DDIMSampler(12, eta=0.0, clip_x0=False), EulerSampler(12)
    levels = ddim.levels(s)
    assert levels == euler.levels(s)
    x_T = math.sqrt(levels[0].alpha ** 2 + levels[0].sigma ** 2) * torch.randn(SHAPE, generator=gen(3))
    x = x_T
    for cur, nxt in zip(levels, levels[1:]):
        x_ddim, x0_ddim = ddim.step(x, denoise, s, cur, nxt, gen(1))
        x_euler, x0_euler = euler.step(x, denoise, s, cur, nxt, gen(2))
        assert torch.equal(x_ddim, x_euler) and torch.equal(x0_ddim, x0_euler), (cur, nxt)
        x = x_ddim
    assert float((x - x_T).abs().max()) > 0.1  # the run moves
    assert torch.equal(ddim.sample(denoise, s, x_T).images, euler.sample(denoise, s, x_T).images)
    assert torch.equal(euler.sample(denoise, s, x_T).images, x)


# ---- Euler on rectified flow ----


@pytest.mark.parametrize("steps", [10, 28])
def test_euler_on_rectified_flow_matches_diffusers_flow_match_euler(steps: int) -> None:
    """EulerSampler on RectifiedFlow(t_min=1e-3) with linspace spacing against diffusers' FlowMatchEulerDiscreteScheduler
    (shift 1, num_train_timesteps 1000), both given the same velocity model u(x, t) (ours read through FlowMatching:
    x_0 = x - t u, eps = x + (1 - t) u, so alpha_s x_0 + sigma_s eps = x + (s - t) u, diffusers' sample + dt u).

    Same grid: diffusers' sigmas are float32(linspace(1, sigma_min, n)) with sigma_min = float32(1e-3), ~5e-11 above it,
    so within 2 u t of ours; the time inputs 1000 t within 3 u of 1000 t. Same x at every step: from diffusers' x, one
    step each. Ours rounds ~6 times on terms no larger than |x| + |u| (x_0, eps, the products, the sum), diffusers ~3 times
    and its dt carries its two sigmas' rounding (2 u |u|); the time inputs move u by <= 0.3 x 3 u. The bound
    16 u (|x| + 2 |u| + 1) is about twice that sum. The whole runs: each step's difference carried with the step's
    Lipschitz constant 1 + |dt| max|du/dx| = 1 + 0.8 |dt|.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = RectifiedFlow(t_min=1e-3)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    ref.set_timesteps(steps)
    sampler = EulerSampler(steps, spacing="linspace")
    levels = sampler.levels(s)
    t = torch.tensor([lv.t for lv in levels], dtype=torch.float64)
    assert len(levels) == len(ref.sigmas) == steps + 1 and levels[0].t == 1.0 and levels[-1].clean
    assert bool(((ref.sigmas.double() - t).abs() <= 2 * U32 * t).all()), (ref.sigmas, t)
    net_t = torch.tensor([lv.net_t for lv in levels[:-1]], dtype=torch.float64)
    assert bool(((ref.timesteps.double() - net_t).abs() <= 3 * U32 * net_t).all())
    denoise = flow_denoiser()
    x_T = torch.randn(SHAPE, generator=gen(0)) * 1.5

    def local(x: torch.Tensor, u: torch.Tensor) -> float:
        return float((16 * U32 * (x.abs() + 2 * u.abs() + 1)).max())

    x, theirs_chain, carried, bounds = x_T, [x_T], 0.0, [0.0]
    for i, (cur, nxt) in enumerate(zip(levels, levels[1:])):
        timestep = ref.timesteps[i]
        u = velocity(x, timestep)
        theirs = ref.step(u, timestep, x).prev_sample
        ours, x0 = sampler.step(x, denoise, s, cur, nxt, None)
        bound = 16 * U32 * (x.abs() + 2 * u.abs() + 1)
        assert bool(((ours - theirs).abs() <= bound).all()), (i, float((ours - theirs).abs().max()))
        torch.testing.assert_close(x0, x - cur.t * u, rtol=0, atol=local(x, u))  # rectified flow's x_0 = x_t - t u
        carried = (1 + 0.8 * (cur.t - nxt.t)) * carried + local(x, u)
        x = theirs
        theirs_chain.append(x)
        bounds.append(carried)
    assert float((x - x_T).abs().max()) > 0.5  # the run moves
    out = sampler.sample(denoise, s, x_T, record_every=1)
    assert out.chain_t == [lv.t for lv in levels]
    for i, (frame, expected, bound) in enumerate(zip(out.chain, theirs_chain, bounds)):
        assert float((frame - expected).abs().max()) <= bound, (i, float((frame - expected).abs().max()), bound)


# ---- a level of pure noise (rectified flow at t = 1: alpha = 0, lambda = -inf) ----

ON_PURE_NOISE = [
    ("ddpm", lambda: DDPMSampler("beta", steps=50)),
    ("ddpm_posterior", lambda: DDPMSampler("posterior", clip_x0=True, steps=50)),
    ("ddim", lambda: DDIMSampler(10, eta=0.0)),
    ("ddim_eta1", lambda: DDIMSampler(10, eta=1.0)),
    ("euler", lambda: EulerSampler(10)),
    ("heun", lambda: HeunSampler(10)),
    ("dpmpp", lambda: DPMSolverPP2MSampler(10)),
    ("unipc", lambda: UniPCSampler(10)),
    ("unipc_bh1", lambda: UniPCSampler(10, variant="bh1")),
    ("unipc3", lambda: UniPCSampler(10, order=3, clip_x0=False)),
    ("consistency", lambda: ConsistencySampler(3)),
]


@pytest.mark.parametrize("make", [m for _, m in ON_PURE_NOISE], ids=[n for n, _ in ON_PURE_NOISE])
def test_samplers_step_off_a_level_of_pure_noise(make) -> None:
    """Every sampler on rectified flow starts at t = 1, where alpha = 0 (EDM's sigma / alpha and lambda infinite): a
    flow model's x_0 = x - u is defined there; every frame and every x_0 of the run is finite, and the run arrives
    somewhere (not at x_T, not at zero)."""
    s = RectifiedFlow()
    sampler = make()
    levels = sampler.levels(s)
    assert levels[0].t == 1.0 and levels[0].alpha == 0.0 and levels[0].lam == -math.inf and levels[0].edm_sigma == math.inf
    x_T = torch.randn(SHAPE, generator=gen(0))
    out = sampler.sample(flow_denoiser(), s, x_T, noise=gen(1), record_every=1)
    assert len(out.chain) == len(levels)
    for frame in [*out.chain, *out.x0_chain]:
        assert bool(torch.isfinite(frame).all())
    assert float(out.images.abs().max()) > 0.1 and float((out.images - x_T).abs().max()) > 0.1


MULTISTEP = [
    ("dpmpp", lambda s: DPMSolverPP2MSampler(10, clip_x0=False)),
    ("unipc", lambda s: UniPCSampler(10, clip_x0=False)),
    ("unipc_bh1", lambda s: UniPCSampler(10, variant="bh1", clip_x0=False)),
    ("unipc3", lambda s: UniPCSampler(10, order=3, clip_x0=False)),
]


@pytest.mark.parametrize("make", [m for _, m in MULTISTEP], ids=[n for n, _ in MULTISTEP])
def test_multistep_solvers_restart_their_history_after_pure_noise(make) -> None:
    """A level of pure noise has no finite lambda, so no finite differences with it: DPM-Solver++ and UniPC start their
    history afresh after it. The run from t = 1 is, bitwise, its first step followed by a fresh sampler walked from the
    second level. The control: from a finite first level (t_max = 0.999) the history is used, and the same split run
    differs (the second step is second order in one, first order in the other)."""
    denoise = flow_denoiser()
    x_T = torch.randn(SHAPE, generator=gen(0))
    for t_max, restarts in [(1.0, True), (0.999, False)]:
        s = RectifiedFlow(t_max=t_max)
        sampler = make(s)
        levels = sampler.levels(s)
        assert (levels[0].alpha == 0) == restarts and levels[1].alpha > 0
        whole = sampler.sample(denoise, s, x_T).images
        sampler.reset()
        x1, _ = sampler.step(x_T, denoise, s, levels[0], levels[1], None)
        split = walk(make(s), denoise, s, levels[1:], x1).images
        assert bool(torch.isfinite(whole).all())
        if restarts:
            assert torch.equal(whole, split)
        else:
            assert float((whole - split).abs().max()) > 1e-4


@pytest.mark.parametrize("t_max", [1.0, 0.999])
def test_heun_churn_stays_on_the_schedule_of_rectified_flow(t_max: float) -> None:
    """EDM's churn raises the noise to tau_hat = (1 + gamma) tau before a step; on rectified flow (tau = t) that must
    stay on the schedule, t <= t_max (alpha >= 0), as t_of_sigma keeps it on the others, and a start at pure noise
    (nothing to add) must step as without churn: finite."""
    s = RectifiedFlow(t_max=t_max)
    denoise = flow_denoiser()
    seen: list[Level] = []

    def spy(x, level):
        seen.append(level)
        return denoise(x, level)

    out = HeunSampler(10, churn=5.0).sample(spy, s, torch.randn(SHAPE, generator=gen(0)), noise=gen(1))
    assert bool(torch.isfinite(out.images).all())
    assert all(0 <= lv.t <= t_max and lv.alpha >= 0 for lv in seen), [lv for lv in seen if lv.t > t_max]


# ---- classifier-free guidance ----

K = 6


def tiny_conditional() -> UNet:
    model = UNet(
        image_size=8,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.0,
        num_classes=K,
        norm_groups=8,
    )
    g = gen(0)
    with torch.no_grad():  # the zero-initialised tensors (output conv, null embedding, ...) get small values
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def cond_net() -> UNet:
    return tiny_conditional()


def test_guidance_zero_is_conditional_model(cond_net) -> None:
    x = torch.randn(3, 3, 8, 8, generator=gen(0))
    t = torch.tensor([5, 50, 500])
    ctx = torch.eye(K)[[0, 2, 5]]
    with torch.no_grad():
        assert torch.equal(guided_output(cond_net, ctx, 0.0)(x, t), cond_net(x, t, ctx))
        assert torch.equal(guided_output(cond_net, None, 2.0)(x, t), cond_net(x, t, None))


@pytest.mark.parametrize("w", [1.0, 2.0, 7.5])
def test_guidance_is_extrapolation_from_null_context(cond_net, w: float) -> None:
    x = torch.randn(3, 3, 8, 8, generator=gen(0))
    t = torch.tensor([5, 50, 500])
    ctx = torch.eye(K)[[0, 2, 5]]
    ctx[1, 0] = 0.6  # a mixed context
    keep = torch.tensor([True] * 3 + [False] * 3)
    with torch.no_grad():
        eps_c = cond_net(x, t, ctx)
        eps_u = cond_net(x, t, ctx, torch.zeros(3, dtype=torch.bool))
        assert torch.equal(eps_u, cond_net(x, t, None))  # dropping every row = the null context
        # the guided denoiser evaluates both branches in one batch of 2B rows
        both_c, both_u = cond_net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx, ctx]), keep).chunk(2)
        guided = guided_output(cond_net, ctx, w)(x, t)
    assert (eps_c - eps_u).abs().max() > 1e-2
    # the batch of 2B rows sums in another order than two of B (kernels differ between CPUs): rounding only
    for batched, alone in ((both_c, eps_c), (both_u, eps_u)):
        assert (batched - alone).abs().max() <= reorder_tol(alone, layers=8, width=9 * 32)
    # eps = (1 + w) eps_c - w eps_u: two products and a difference, each rounded once (<= u of its magnitude),
    # so the error is at most 3 u ((1 + w)|eps_c| + w|eps_u|) elementwise: grows with 1 + w, as it must. The guided call
    # runs the network again on its own copy of the batch, and oneDNN's kernels may sum in another order for another
    # buffer (alignment): both branches may then differ by a reordering, weighted (1 + w) and w
    reorder = (1 + 2 * w) * reorder_tol(both_c, layers=8, width=9 * 32)
    bound = 3 * U32 * ((1 + w) * both_c.abs() + w * both_u.abs()) + reorder
    assert bool(((guided - ((1 + w) * both_c - w * both_u)).abs() <= bound).all())


def test_guidance_with_bf16_weights_returns_float32(cond_net) -> None:
    import copy

    x = torch.randn(2, 3, 8, 8, generator=gen(0))
    t = torch.tensor([5, 500])
    ctx = torch.eye(K)[[0, 1]]
    with torch.no_grad():
        ref = guided_output(cond_net, ctx, 1.0)(x, t)
        out = guided_output(copy.deepcopy(cond_net).to(torch.bfloat16), ctx, 1.0)(x, t)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


# ---- EDM Heun with Karras sigmas ----


def smooth_model(scale: float = 0.5):
    """A deterministic eps_theta(x_t, t) defined for fractional t (EDM's sampler evaluates between trained steps)."""

    def eps(x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0]).reshape(-1, 1, 1, 1)
        return (scale * torch.tanh(x.double()) + 0.1 * torch.sin(x.double() + t / 100)).to(x.dtype)

    return eps


@pytest.mark.parametrize("T,steps", [(1000, 18), (500, 7)])
def test_heun_karras_matches_diffusers_step_by_step(T: int, steps: int) -> None:
    """HeunSampler on a VP schedule against diffusers' HeunDiscreteScheduler with Karras sigmas (alpha_bar in float64):
    the same EDM noise levels sigma / alpha and network time inputs (the fractional steps between grid points), and
    the same x after every step. Ours walks VP x_t from the x it is given (generate: sqrt(a0^2 + s0^2) z = z), diffusers
    EDM's x = x_t / alpha from the same point (x_T / alpha_0 = sqrt(1 + sigma_0^2) x_T: its init_noise_sigma with
    "leading" spacing); it makes 2N - 1 calls, the odd ones completing a step, the last Euler's to the clean image."""
    from diffusers import HeunDiscreteScheduler

    s = LinearSchedule(T)
    ref = HeunDiscreteScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                use_karras_sigmas=True)
    ref.alphas_cumprod = torch.cumprod(1 - ref.betas.double(), 0)  # float64 as ours (see float64_ddpm)
    ref.set_timesteps(steps)
    model = smooth_model()
    x_T = torch.randn(SHAPE, generator=gen(0))
    ours = HeunSampler(steps)
    levels = ours.levels(s)
    sigmas = torch.tensor([lv.edm_sigma for lv in levels[:-1]])
    torch.testing.assert_close(sigmas.float(), ref.sigmas[::2].float(), rtol=1e-5, atol=0)
    step_times = torch.cat([ref.timesteps[:1], ref.timesteps[1::2]]).double()  # one per step
    net_t = torch.tensor([lv.net_t for lv in levels[:-1]], dtype=torch.float64)
    torch.testing.assert_close(net_t, step_times, rtol=1e-5, atol=1e-4)
    assert len(ref.timesteps) == 2 * steps - 1
    out = ours.sample(eps_denoiser(model), s, x_T, record_every=1)
    assert len(out.chain) == steps + 1
    x = x_T / levels[0].alpha
    for j, t in enumerate(ref.timesteps):
        x = ref.step(model(ref.scale_model_input(x, t), t), t, x).prev_sample
        if j % 2 == 1 or j == len(ref.timesteps) - 1:
            i = (j + 1) // 2 if j % 2 == 1 else steps
            close(out.chain[i], x * levels[i].alpha)  # diffusers' EDM x in VP units
    assert levels[-1].clean
    close(out.images, x)


def test_heun_solves_the_probability_flow_ode_of_gaussian_data() -> None:
    """Data x_0 ~ N(mu, c^2 I) through an eps model in float32, read by EpsPrediction (the production path):
    eps = (x_t - a D) / s with D = mu + a c^2 / (a^2 c^2 + s^2) (x_t - a mu) exact, computed in float64 and rounded.
    From x at the first level the ODE ends at mu + c (x - a0 mu) / sqrt(a0^2 c^2 + s0^2). Heun is second order:
    doubling the steps divides the error by about 4 (Euler: 2), down to the float32 rounding of x_0 = (x - s eps) / a
    and to the last step's c |w| (1 - a c / r) at k = 0 (<= 3e-4 here; see the Gaussian test above)."""
    s, c, mu = LinearSchedule(1000), 0.5, 0.3
    D = gaussian_denoiser(c, torch.full((1, *SHAPE[1:]), mu, dtype=torch.float64))

    def eps(x: torch.Tensor, level: Level) -> torch.Tensor:
        xd = x.double()
        return ((xd - level.alpha * D(xd, level).x0) / level.sigma).float()

    denoise = EpsPrediction().denoiser(eps)
    x_T = torch.randn(SHAPE, generator=gen(1))
    errors = []
    for steps in (25, 50, 100):
        sampler = HeunSampler(steps)
        first = sampler.levels(s)[0]
        exact = mu + c * (x_T.double() - first.alpha * mu) / math.sqrt(first.alpha**2 * c**2 + first.sigma**2)
        errors.append(float((sampler.sample(denoise, s, x_T).images.double() - exact).abs().max()))
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5, errors
    assert errors[2] < 5e-3


# ---- guidance interval and CFG rescale ----


def test_guidance_interval_guides_only_inside_it(cond_net) -> None:
    """Guidance(w, (lo, hi)).output guides at the levels whose EDM sigma / alpha lies in [lo, hi] (inclusive) and
    returns the plain conditional output elsewhere, with the level's network time input."""
    s = LinearSchedule(1000)
    x = torch.randn(2, 3, 8, 8, generator=gen(3))
    ctx = torch.eye(K)[[0, 1]]
    lo, hi = s.level_at(150).edm_sigma, s.level_at(400).edm_sigma
    output = Guidance(2.0, (lo, hi)).output(cond_net, ctx)
    with torch.no_grad():
        for k in (100, 149, 150, 400, 401, 900):
            level = s.level_at(k)
            tt = torch.full((2,), level.net_t)
            plain, full = guided_output(cond_net, ctx, 0.0)(x, tt), guided_output(cond_net, ctx, 2.0)(x, tt)
            assert not torch.equal(plain, full)
            assert torch.equal(output(x, level), full if 150 <= k <= 400 else plain), k


def test_cfg_rescale_is_diffusers_rescale_noise_cfg(cond_net) -> None:
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    x, t = torch.randn(2, 3, 8, 8, generator=gen(4)), torch.tensor([300, 300])
    ctx = torch.eye(K)[[2, 3]]
    with torch.no_grad():
        eps_c = guided_output(cond_net, ctx, 0.0)(x, t)
        eps_cfg = guided_output(cond_net, ctx, 3.0)(x, t)
        got = guided_output(cond_net, ctx, 3.0, rescale=0.7)(x, t)
    # eps_c here comes from a batch of B, inside the guided call from one of 2B: rounding apart (see above)
    torch.testing.assert_close(got, rescale_noise_cfg(eps_cfg, eps_c, 0.7), rtol=1e-4, atol=1e-5 * float(eps_cfg.abs().max()))
    assert (got - eps_cfg).abs().max() > 1e-3  # it does something
    # Guidance(w, rescale=phi).output is the same guided output at a level
    level = LinearSchedule(1000).level_at(300)
    with torch.no_grad():
        assert torch.equal(Guidance(3.0, rescale=0.7).output(cond_net, ctx)(x, level),
                           guided_output(cond_net, ctx, 3.0, rescale=0.7)(x, torch.full((2,), level.net_t)))


def test_guidance_interval_in_sigma_maps_to_levels() -> None:
    """The interval is on EDM's sigma / alpha of the level: on a VP grid [sigma_200, sigma_600] guides steps 200..600
    (the network sees the step k); pure noise (rectified flow at t = 1, sigma / alpha = inf) lies outside any interval,
    and without an interval every level is guided."""
    s = LinearSchedule(1000)
    seen = []
    net = lambda x, t, c, keep: seen.append((float(t[0]), keep is not None)) or torch.zeros_like(x)  # noqa: E731
    net.parameters = lambda: iter([torch.zeros(1)])
    guidance = Guidance(2.0, (s.level_at(200).edm_sigma, s.level_at(600).edm_sigma))
    output = guidance.output(net, torch.eye(K)[:1])
    for k in (199, 200, 600, 601):
        output(torch.zeros(1, 3, 2, 2), s.level_at(k))
    assert seen == [(199.0, False), (200.0, True), (600.0, True), (601.0, False)]
    assert [guidance.active(s.level_at(k)) for k in (199, 200, 600, 601)] == [False, True, True, False]
    pure = RectifiedFlow().level(1.0)
    assert pure.edm_sigma == math.inf and not guidance.active(pure)
    assert Guidance(2.0, (0.0, 1e30)).active(RectifiedFlow().level(0.5)) and Guidance(2.0).active(pure)


# ---- UniPC ----


@pytest.mark.parametrize("kind,beta_schedule", SCHEDULES)
@pytest.mark.parametrize("steps", [5, 10])
@pytest.mark.parametrize("order,variant", [(2, "bh2"), (2, "bh1"), (3, "bh2")])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_unipc_matches_diffusers_step_by_step(kind, beta_schedule, steps, order, variant, spacing) -> None:
    """Every step's sample (the predictor's x_t, as both hand it on) against diffusers' UniPCMultistepScheduler with
    its alpha_bar in float64 (its sigmas are still float32: set_timesteps casts them)."""
    from diffusers import UniPCMultistepScheduler

    T = 1000
    s = schedule(kind, T)
    model = gaussian_model(s, wiggle=0.3)
    x_T = torch.randn(SHAPE, generator=gen(0))
    sampler = UniPCSampler(steps=steps, order=order, variant=variant, spacing=spacing, clip_x0=False)
    ours = sampler.sample(eps_denoiser(model), s, x_T, record_every=1)
    ref = UniPCMultistepScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, solver_order=order, solver_type=variant,
                                  predict_x0=True, lower_order_final=True, timestep_spacing=spacing, final_sigmas_type="zero")
    ref.alphas_cumprod = torch.cumprod(1 - ref.betas.double(), 0)
    ref.set_timesteps(steps)
    assert [step_of(lv, T) for lv in sampler.levels(s)[:-1]] == ref.timesteps.tolist()
    assert ours.chain_t == [lv.t for lv in sampler.levels(s)]
    x = x_T.clone()
    for i, t in enumerate(ref.timesteps):
        x = ref.step(model(x, t), t, x).prev_sample
        if variant == "bh1" and i == steps - 1:
            # diffusers' bh1 multiplies B(h) = -h = -inf by an empty sum at the step to the clean image (NaN); the step is
            # first order there: x_0 = the data prediction, which ours returns
            close(ours.chain[-1], ours.x0_chain[-1], 0.0)
            continue
        close(ours.chain[i + 1], x, 2e-5)
    assert torch.isfinite(ours.images).all() and float(ours.images.abs().max()) > 0.5
