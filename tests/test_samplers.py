"""Samplers against diffusers' schedulers, a perfect denoiser, and the guidance / generation wrappers.

diffusers is the reference implementation here: the same model output, sample and noise must give the
same x_{t-1}. diffusers builds its schedule with a float32 cumprod and we with a float64 one, so results
agree to float32 rounding (checked with rtol / atol 1e-5 on values of order 1).
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from difflab.diffusion import predict_x0_from_eps
from difflab.guidance import guided_output
from difflab.nn.unet import UNet
from difflab.samplers import DDIMSampler, DDPMSampler, DPMSolverPP2MSampler, spaced_timesteps
from difflab.schedules import CosineSchedule, LinearSchedule, NoiseSchedule

from support import U32, reorder_tol

SCHEDULES = [("linear", "linear"), ("cosine", "squaredcos_cap_v2")]  # ours, diffusers' beta_schedule
SHAPE = (2, 3, 4, 4)


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def schedule(kind: str, T: int) -> NoiseSchedule:
    return LinearSchedule(T) if kind == "linear" else CosineSchedule(T)


def gaussian_model(s: NoiseSchedule, scale: float = 0.5, wiggle: float = 0.05):
    """A deterministic eps_theta(x, t): the exact denoiser for data x_0 ~ N(mu, scale^2 I), plus a small
    non-linear term so that nothing is exactly linear in x.

    eps*(x, t) = sigma_t (x - alpha_t mu) / (alpha_t^2 scale^2 + sigma_t^2) + wiggle alpha_t sin(x + t/100)
    (the perturbation is scaled by alpha_t so that the implied x_0 stays bounded as alpha_t -> 0).
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


def oracle(s: NoiseSchedule, x0: torch.Tensor):
    """The perfect denoiser for a known x_0: eps = (x_t - sqrt(ab_t) x_0) / sqrt(1 - ab_t) (float64)."""
    ab_all = s.alphas_cumprod.double()

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = ab_all[t.long()].reshape(-1, 1, 1, 1)
        return (x.double() - ab.sqrt() * x0) / (1 - ab).sqrt()

    return eps


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
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
    ref.set_timesteps(steps)
    ts = spaced_timesteps(T, steps, spacing)
    assert ts == ref.timesteps.tolist()
    assert len(ts) == steps and len(set(ts)) == steps and ts == sorted(ts, reverse=True)
    assert 0 <= ts[-1] and ts[0] <= T - 1


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
    with pytest.raises(ValueError, match=r"unknown timestep spacing 'uniform'"):
        spaced_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match=r"steps must be in \[1, T=100\], got 101"):
        spaced_timesteps(100, 101)
    with pytest.raises(ValueError, match=r"steps must be in \[1, T=100\], got 0"):
        spaced_timesteps(100, 0)


def test_dpmpp_linspace_takes_at_most_t_minus_1_steps_and_names_the_steps_typed() -> None:
    from difflab.samplers import DPMSolverPP2MSampler

    assert DPMSolverPP2MSampler(steps=99).timesteps(100) == list(range(99, 0, -1))  # every t but 0 (the clean image)
    for steps in (100, 5000):
        with pytest.raises(ValueError, match=rf"steps must be in \[1, T-1=99\], got {steps}$"):
            DPMSolverPP2MSampler(steps=steps).timesteps(100)
    with pytest.raises(ValueError, match=r"steps must be in \[1, T=100\], got 101"):
        DPMSolverPP2MSampler(steps=101, spacing="trailing").timesteps(100)


def test_ddpm_sampler_rejects_unknown_variance() -> None:
    with pytest.raises(ValueError, match=r"unknown DDPM variance 'learned'"):
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
    for t in [0, 1, 2, T // 2, T - 2, T - 1]:
        g = gen(t)
        ab = s.alphas_cumprod[t].double()
        x0 = torch.rand(SHAPE, generator=g) * 2 - 1
        noise = torch.randn(SHAPE, generator=g)
        x_t = (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).float()
        eps = noise + 0.3 * torch.randn(SHAPE, generator=g)  # an imperfect model, so clipping matters
        ours, x0_ours = sampler.step(s, eps, t, t - 1, x_t, gen(100 + t))
        theirs = ref.step(eps, t, x_t, generator=gen(100 + t))
        # x_0 is ~1/sqrt(ab_t) times larger than x_t: compare it relative to its size
        torch.testing.assert_close(x0_ours, theirs.pred_original_sample, rtol=1e-5, atol=1e-5 * float(x0_ours.abs().max()))
        close(ours, theirs.prev_sample)
        if clip:
            assert float(x0_ours.abs().max()) <= 1.0
        # the step noise: none at t = 0, sigma_t z otherwise
        other, _ = sampler.step(s, eps, t, t - 1, x_t, gen(999))
        var = s.betas[t] if variance == "beta" else s.posterior_variance[t]
        if t == 0:
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
    ours = DDPMSampler("posterior", clip_x0=False).sample(model, s, x_T, generator=gen(1)).images
    ref = float64_ddpm(
        DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, variance_type="fixed_small", clip_sample=False)
    )
    x, g = x_T.clone(), gen(1)
    for t in range(T - 1, -1, -1):
        x = ref.step(model(x, t), t, x, generator=g).prev_sample
    close(ours, x, 1e-4)
    assert not torch.allclose(ours, DDPMSampler("posterior", clip_x0=False).sample(model, s, x_T, generator=gen(2)).images)


# ---- DDIM ----


@pytest.mark.parametrize("kind,beta_schedule", SCHEDULES)
@pytest.mark.parametrize(
    "T,steps,spacing", [(1000, 50, "trailing"), (1000, 25, "leading"), (500, 20, "trailing"), (500, 10, "leading")]
)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_steps_match_diffusers(kind, beta_schedule, T, steps, spacing, eta) -> None:
    """Every step of the schedule, including the last (t_prev = -1, alpha_bar_prev = 1 = set_alpha_to_one).

    With T divisible by steps, diffusers' prev_timestep = t - T // steps is our next timestep. Our step draws
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
    ts = sampler.timesteps(T)
    assert ts == ref.timesteps.tolist()
    pairs = list(zip(ts, ts[1:] + [-1]))
    for i, (t, t_prev) in enumerate(pairs):
        assert t_prev == (t - T // steps if t - T // steps >= 0 else -1)
        g = gen(i)
        x_t = torch.randn(SHAPE, generator=g)
        eps = 0.9 * x_t + 0.2 * torch.randn(SHAPE, generator=g)
        ours, x0_ours = sampler.step(s, eps, t, t_prev, x_t, gen(50 + i))
        kwargs = {"variance_noise": torch.randn(SHAPE, generator=gen(50 + i))} if eta > 0 else {}
        theirs = ref.step(eps, t, x_t, eta=eta, **kwargs)
        torch.testing.assert_close(x0_ours, theirs.pred_original_sample, rtol=1e-5, atol=1e-5 * float(x0_ours.abs().max()))
        scale = max(1.0, float(theirs.prev_sample.abs().max()))
        torch.testing.assert_close(ours, theirs.prev_sample, rtol=1e-5, atol=1e-5 * scale)
    # the last step lands on the predicted x_0 (alpha_bar_prev = 1, sigma = 0)
    assert pairs[-1][1] == -1
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
    ts = sampler.timesteps(T)
    clipped = 0
    for i, (t, t_prev) in enumerate(zip(ts, ts[1:] + [-1])):
        g = gen(i)
        x_t = torch.randn(SHAPE, generator=g) * 1.5
        eps = torch.randn(SHAPE, generator=g)
        ours, x0 = sampler.step(s, eps, t, t_prev, x_t, gen(7))
        kwargs = {"variance_noise": torch.randn(SHAPE, generator=gen(7))} if eta > 0 else {}
        theirs = ref.step(eps, t, x_t, eta=eta, use_clipped_model_output=True, **kwargs)
        close(x0, theirs.pred_original_sample)
        close(ours, theirs.prev_sample)
        clipped += int((x0.abs() == 1).sum())
    assert clipped > 0  # clipping was exercised


def test_ddim_eta0_deterministic_eta1_not() -> None:
    s = LinearSchedule(100)
    model = gaussian_model(s)
    x_T = torch.randn(SHAPE, generator=gen(0))
    a = DDIMSampler(10, eta=0.0, clip_x0=False).sample(model, s, x_T, generator=gen(1)).images
    b = DDIMSampler(10, eta=0.0, clip_x0=False).sample(model, s, x_T, generator=gen(2)).images
    assert torch.equal(a, b)
    c = DDIMSampler(10, eta=1.0, clip_x0=False).sample(model, s, x_T, generator=gen(1)).images
    d = DDIMSampler(10, eta=1.0, clip_x0=False).sample(model, s, x_T, generator=gen(2)).images
    assert (c - d).abs().max() > 1e-2
    assert torch.equal(c, DDIMSampler(10, eta=1.0, clip_x0=False).sample(model, s, x_T, generator=gen(1)).images)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_x0_is_ddpm_x0_prediction(clip: bool) -> None:
    s = CosineSchedule(1000)
    g = gen(0)
    x_t = torch.randn(SHAPE, generator=g)
    eps = torch.randn(SHAPE, generator=g)
    for t, t_prev in [(999, 959), (500, 460), (40, 0), (0, -1)]:
        x_prev, x0 = DDIMSampler(25, eta=0.0, clip_x0=clip).step(s, eps, t, t_prev, x_t, None)
        expected = predict_x0_from_eps(s, x_t, torch.full((SHAPE[0],), t), eps)
        if clip:
            expected = expected.clamp(-1, 1)
        torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_ddim_eta1_every_step_equals_ddpm_posterior() -> None:
    """Song et al.: DDIM with eta = 1 over all T steps is DDPM with sigma_t^2 = beta~_t. With x_t =
    sqrt(ab_t) x_0 + sqrt(1-ab_t) eps, the posterior mean is sqrt(ab_{t-1}) x_0 + coef2 sqrt(1-ab_t) eps and
    coef2^2 (1 - ab_t) = 1 - ab_{t-1} - beta~_t, which is DDIM's direction term. Both draw z at t = T-1..1."""
    T = 30
    s = LinearSchedule(T, beta_start=1e-3, beta_end=0.2)
    model = gaussian_model(s)
    x_T = torch.randn(SHAPE, generator=gen(0))
    ddpm = DDPMSampler("posterior", clip_x0=False).sample(model, s, x_T, generator=gen(5)).images
    ddim = DDIMSampler(T, eta=1.0, spacing="trailing", clip_x0=False).sample(model, s, x_T, generator=gen(5)).images
    close(ddim, ddpm, 1e-4)


# ---- DPM-Solver++(2M) ----


@pytest.mark.parametrize("kind,beta_schedule", SCHEDULES)
@pytest.mark.parametrize("T", [500, 1000])
@pytest.mark.parametrize("steps", [10, 15])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_dpmpp_full_run_matches_diffusers(kind, beta_schedule, T, steps, spacing) -> None:
    """A whole run with a fixed deterministic model: same timesteps, same final sample.

    Stock diffusers takes alpha_bar from a float32 cumprod, ~1e-5 relative off at cosine's tail (alpha_bar
    ~ 1e-9), and the first step's x_0 = (x - sigma eps) / alpha carries that into the sample (up to 3.5e-4
    absolute here). With its alpha_bar recomputed in float64 from its own betas (sigmas are still cast to
    float32 by set_timesteps) the two agree to 1e-5, and ours is within 1e-6 of a float64 run of ours.
    """
    s = schedule(kind, T)
    model = gaussian_model(s)
    x_T = torch.randn(SHAPE, generator=gen(0))
    seen: list[int] = []

    def denoise(x, t):
        seen.append(int(t[0]))
        return model(x, t)

    ours = DPMSolverPP2MSampler(steps=steps, spacing=spacing, clip_x0=False).sample(denoise, s, x_T).images
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
    assert seen == ref.timesteps.tolist()
    assert len(seen) == steps
    assert float(finals[0].abs().max()) > 0.5  # a non-trivial sample
    close(ours, finals[0], 1e-5)
    close(ours, finals[1], 1e-3)
    # float64 run of ours: the float32 buffers cost < 1e-6
    ours64 = (
        DPMSolverPP2MSampler(steps=steps, spacing=spacing, clip_x0=False)
        .sample(model, schedule(kind, T).double(), x_T.double())
        .images
    )
    close(ours, ours64, 1e-6)


def test_dpmpp_second_order_differs_from_first_order() -> None:
    """After the first step the 2M update uses the previous x_0: the run differs from DDIM (= DPM-Solver++ 1)
    on the same timesteps, and only there (one step: identical)."""
    s = LinearSchedule(1000)
    model = gaussian_model(s, wiggle=0.3)
    x_T = torch.randn(SHAPE, generator=gen(0))
    dpm = DPMSolverPP2MSampler(steps=10, clip_x0=False)
    ts = dpm.timesteps(1000)

    class FirstOrder(DDIMSampler):
        def timesteps(self, T):
            return ts

    ddim = FirstOrder(10, eta=0.0, clip_x0=False)
    x_dpm = dpm.sample(model, s, x_T).images
    x_ddim = ddim.sample(model, s, x_T).images
    assert (x_dpm - x_ddim).abs().max() > 1e-3
    # the first step of both is the same first-order update
    eps = model(x_T, torch.full((2,), ts[0]))
    dpm.reset()
    close(dpm.step(s, eps, ts[0], ts[1], x_T, None)[0], ddim.step(s, eps, ts[0], ts[1], x_T, None)[0])


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
    out = sampler.sample(oracle(s, x0), s, x_T, record_every=1)
    ts = sampler.timesteps(T)
    assert out.chain_t == ts + [-1]
    ab = s.alphas_cumprod.double()
    eps_T = (x_T.double() - ab[ts[0]].sqrt() * x0) / (1 - ab[ts[0]]).sqrt()
    for t, frame in zip(out.chain_t[1:-1], out.chain[1:-1]):
        close(frame, ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * eps_T, 1e-4)
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
    a = sampler.sample(oracle(s, x0), s, x_T, generator=gen(1), record_every=10)
    b = sampler.sample(oracle(s, x0), s, x_T, generator=gen(2))
    close(a.images, x0, 1e-5)
    close(b.images, x0, 1e-5)
    # the intermediate states do depend on the noise
    assert not torch.allclose(a.chain[1], sampler.sample(oracle(s, x0), s, x_T, generator=gen(2), record_every=10).chain[1])


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
    # so the error is at most 3 u ((1 + w)|eps_c| + w|eps_u|) elementwise: grows with 1 + w, as it must
    bound = 3 * U32 * ((1 + w) * both_c.abs() + w * both_u.abs())
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
    from diffusers import HeunDiscreteScheduler

    from difflab.samplers import HeunSampler

    s = LinearSchedule(T)
    ref = HeunDiscreteScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                use_karras_sigmas=True)
    ref.alphas_cumprod = torch.cumprod(1 - ref.betas.double(), 0)  # float64 as ours (see float64_ddpm)
    ref.set_timesteps(steps)
    model = smooth_model()
    x_T = torch.randn(SHAPE, generator=gen(0))
    ours = HeunSampler(steps)
    torch.testing.assert_close(torch.as_tensor(ours.sigmas(s)[:-1]).float(), ref.sigmas[::2].float(), rtol=1e-5, atol=0)
    x = x_T * ref.init_noise_sigma
    for t in ref.timesteps:
        x = ref.step(model(ref.scale_model_input(x, t), t), t, x).prev_sample
    assert len(ref.timesteps) == 2 * steps - 1
    close(ours.sample(model, s, x_T).images, x)


def test_heun_solves_the_probability_flow_ode_of_gaussian_data() -> None:
    """Data x_0 ~ N(mu, c^2 I): D(x; sigma) = mu + c^2 / (c^2 + sigma^2) (x - mu) exactly, and the ODE's solution is
    x(sigma) = mu + (x(sigma_max) - mu) sqrt(c^2 + sigma^2) / sqrt(c^2 + sigma_max^2). Heun is second order: doubling
    the steps divides the error at sigma = 0 by about 4 (Euler: 2), down to the float32 rounding of D = x - sigma eps."""
    from difflab.samplers import HeunSampler
    from difflab.schedules import vp_sigmas

    s, c, mu = LinearSchedule(1000), 0.5, 0.3
    log_sigmas = torch.as_tensor(vp_sigmas(s)).log()

    def eps(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # t -> sigma by the same log-linear interpolation the sampler inverts; then eps = (x - D(x)) / sigma
        lo = t.double().floor().long().clamp(max=len(log_sigmas) - 2)
        sigma = (log_sigmas[lo] + (t.double() - lo) * (log_sigmas[lo + 1] - log_sigmas[lo])).exp().reshape(-1, 1, 1, 1)
        x = x_vp.double() * (1 + sigma**2).sqrt()
        return ((x - (mu + c**2 / (c**2 + sigma**2) * (x - mu))) / sigma).float()

    x_T = torch.randn(SHAPE, generator=gen(1))
    errors = []
    for steps in (25, 50, 100):
        sampler = HeunSampler(steps)
        sigma_max = float(sampler.sigmas(s)[0])
        exact = mu + (x_T.double() * sigma_max - mu) * c / math.sqrt(c**2 + sigma_max**2)
        errors.append(float((sampler.sample(eps, s, x_T).images.double() - exact).abs().max()))
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5, errors
    assert errors[2] < 5e-3


# ---- guidance interval and CFG rescale ----


def test_guidance_interval_guides_only_inside_it(cond_net) -> None:
    x = torch.randn(2, 3, 8, 8, generator=gen(3))
    ctx = torch.eye(K)[[0, 1]]
    with torch.no_grad():
        for t in (100, 400, 401, 900):
            tt = torch.full((2,), t)
            plain, full = guided_output(cond_net, ctx, 0.0)(x, tt), guided_output(cond_net, ctx, 2.0)(x, tt)
            got = guided_output(cond_net, ctx, 2.0, interval=(150.0, 400.0))(x, tt)
            assert torch.equal(got, full if 150 <= t <= 400 else plain), t


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


def test_guidance_interval_in_sigma_maps_to_timesteps() -> None:
    from difflab.guidance import Guidance
    from difflab.schedules import vp_sigmas

    s = LinearSchedule(1000)
    sig = vp_sigmas(s)
    seen = []
    net = lambda x, t, c, keep: seen.append((float(t[0]), keep is not None)) or torch.zeros_like(x)  # noqa: E731
    net.parameters = lambda: iter([torch.zeros(1)])
    denoise = Guidance(2.0, (float(sig[200]), float(sig[600]))).output(net, torch.eye(K)[:1], s)
    for t in (199, 200, 600, 601):
        denoise(torch.zeros(1, 3, 2, 2), torch.full((1,), t))
    assert [guided for _, guided in seen] == [False, True, True, False]


# ---- UniPC ----


@pytest.mark.parametrize("kind,beta_schedule", SCHEDULES)
@pytest.mark.parametrize("steps", [5, 10])
@pytest.mark.parametrize("order,variant", [(2, "bh2"), (2, "bh1"), (3, "bh2")])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_unipc_matches_diffusers_step_by_step(kind, beta_schedule, steps, order, variant, spacing) -> None:
    """Every step's sample (the predictor's x_t, as both hand it on) against diffusers' UniPCMultistepScheduler with
    its alpha_bar in float64 (its sigmas are still float32: set_timesteps casts them)."""
    from diffusers import UniPCMultistepScheduler

    from difflab.samplers import UniPCSampler

    T = 1000
    s = schedule(kind, T)
    model = gaussian_model(s, wiggle=0.3)
    x_T = torch.randn(SHAPE, generator=gen(0))
    ours = UniPCSampler(steps=steps, order=order, variant=variant, spacing=spacing, clip_x0=False).sample(model, s, x_T, record_every=1)
    ref = UniPCMultistepScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, solver_order=order, solver_type=variant,
                                  predict_x0=True, lower_order_final=True, timestep_spacing=spacing, final_sigmas_type="zero")
    ref.alphas_cumprod = torch.cumprod(1 - ref.betas.double(), 0)
    ref.set_timesteps(steps)
    assert ours.chain_t[:-1] == ref.timesteps.tolist()
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

