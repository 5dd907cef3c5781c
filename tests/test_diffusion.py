"""The forward process q(x_t | x_0) (schedule.add_noise), its inverse (an objective's denoised), the posterior
q(x_s | x_t, x_0) (the DDPM sampler's step between two levels), L_simple (objective.loss at times t) and the draws of t.

Times are t in [0, 1]: a VP schedule's grid point k (DDPM's 0-based step) is t = (k + 1) / T. Tolerances are float64
or float32 rounding (U64 = 2^-53, U32 = 2^-24) of the few operations involved, scaled by the magnitudes they act on,
or sampling standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from difflab.diffusion import Denoised
from difflab.objectives import EpsPrediction, X0Prediction
from difflab.samplers import DDPMSampler
from difflab.schedules import CosineSchedule, EDMSchedule, LinearSchedule, NoiseSchedule, RectifiedFlow, VPSchedule

from support import U32

U64 = torch.finfo(torch.float64).eps / 2


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def schedule(kind: str, T: int = 1000) -> VPSchedule:
    return LinearSchedule(T) if kind == "linear" else CosineSchedule(T)


def at(k, T: int = 1000) -> torch.Tensor:
    """The times of grid points k: t = (k + 1) / T, float64."""
    return (torch.as_tensor(k) + 1).double() / T


def ab_list(kind: str, T: int = 1000) -> list[float]:
    """alpha_bar from the closed-form betas, as a Python running product (independent of the code)."""
    return running_product(betas_list(kind, T))


def betas_list(kind: str, T: int = 1000) -> list[float]:
    if kind == "linear":
        return [1e-4 + (0.02 - 1e-4) * t / (T - 1) for t in range(T)]

    def f(t: float) -> float:
        return math.cos(((t / T + 0.008) / 1.008) * math.pi / 2) ** 2

    return [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]


def running_product(betas: list[float]) -> list[float]:
    out, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        out.append(prod)
    return out


def ab_rel_err(kind: str, T: int = 1000) -> list[float]:
    """Bound on the relative difference of the schedule's alpha_bar_k and ab_list's: the betas differ by at most 16 U64
    (test_schedules.BETA_ERR), each factor (1 - beta_j) then by (16 + 2) U64 / (1 - beta_j), summed over j <= k."""
    out, acc = [], 0.0
    for b in betas_list(kind, T):
        acc += 18 * U64 / (1 - b)
        out.append(acc)
    return out


# ---- q(x_t | x_0): add_noise ----


def test_add_noise_T2_by_hand() -> None:
    """T = 2 linear: alpha_bar = [0.9999, 0.979902]; rows use their own t = (k + 1) / 2. float64: the coefficients
    are the schedule's to a few U64, but sqrt(1 - ab_0) = 0.01 carries 0.9999's rounding divided by 1e-4."""
    s = LinearSchedule(2)
    x0 = torch.tensor([0.5, -1.0], dtype=torch.float64).reshape(2, 1, 1, 1)
    noise = torch.tensor([2.0, 3.0], dtype=torch.float64).reshape(2, 1, 1, 1)
    x_t = s.add_noise(x0, at([0, 1], 2), noise)
    assert x_t.dtype == torch.float64
    expected = [math.sqrt(0.9999) * 0.5 + 0.01 * 2.0, math.sqrt(0.979902) * -1.0 + math.sqrt(0.020098) * 3.0]
    # row 0: sigma_0 = sqrt(1 - ab_0) carries U64 / 1e-4; row 1: sigma_1 U64 / 0.020098, alpha_1 a few U64, and the sum
    # cancels (|terms| 0.99 and 0.43 over |x_t| 0.56)
    rtol = [4 * U64 / 1e-4, 8 * U64 * (0.99 + 0.43 / 0.020098) / 0.56]
    assert x_t.flatten().tolist()[0] == pytest.approx(expected[0], rel=rtol[0], abs=0)
    assert x_t.flatten().tolist()[1] == pytest.approx(expected[1], rel=rtol[1], abs=0)
    # float32 images: the float64 coefficients rounded once to float32, then one product each and a sum
    x32, n32 = x0.float(), noise.float()
    a, sig = s.coefs(at([0, 1], 2), x32)
    assert a.dtype == torch.float64 and a.shape == (2, 1, 1, 1)
    out = s.add_noise(x32, at([0, 1], 2), n32)
    assert out.dtype == torch.float32 and torch.equal(out, a.float() * x32 + sig.float() * n32)


CASES = [("linear", k) for k in (0, 100, 500, 999)] + [("cosine", k) for k in (0, 100, 500, 999)] \
    + [("flow", t) for t in (1e-3, 0.25, 0.5, 1.0)] + [("edm", t) for t in (0.25, 0.5, 0.8, 1.0)]


def closed_form(kind: str, where: float) -> tuple[NoiseSchedule, float, float, float]:
    """(schedule, t, alpha_t, sigma_t) from the closed forms, independent of the code."""
    if kind in ("linear", "cosine"):
        ab = ab_list(kind)[where]
        return schedule(kind), (where + 1) / 1000, math.sqrt(ab), math.sqrt(1 - ab)
    if kind == "flow":
        return RectifiedFlow(), where, 1 - where, where
    return EDMSchedule(), where, 1.0, 80.0 * where**7


@pytest.mark.parametrize("kind,where", CASES)
def test_add_noise_moments(kind: str, where) -> None:
    """x_t | x_0 ~ N(alpha_t x_0, sigma_t^2 I), checked on N = 20000 draws of 4 pixels, on VP grid points (k) and on
    rectified flow (alpha = 1 - t, sigma = t) and EDM (alpha = 1, sigma = 80 t^7) at t.

    Standard errors: mean sqrt(v/N) ~ 0.0071 sqrt(v); variance v sqrt(2/(N-1)) ~ 0.01 v.
    Tolerances are 5 standard errors (the seed is fixed, so the test is deterministic).
    """
    N = 20000
    s, t, alpha, sigma = closed_form(kind, where)
    x0 = torch.tensor([[-1.0, -0.3], [0.4, 0.9]], dtype=torch.float64).reshape(1, 1, 2, 2)
    noise = torch.randn((N, 1, 2, 2), generator=gen(int(t * 1000)), dtype=torch.float64)
    x_t = s.add_noise(x0.expand(N, -1, -1, -1), torch.full((N,), t, dtype=torch.float64), noise)
    v = sigma**2
    torch.testing.assert_close(x_t.mean(0), alpha * x0[0], rtol=0, atol=5 * math.sqrt(v / N))
    torch.testing.assert_close(x_t.var(0), torch.full_like(x0[0], v), rtol=5 * math.sqrt(2 / (N - 1)), atol=0)


def test_add_noise_per_row_times() -> None:
    """Each row takes its own t: rows with the same t get the same coefficients, another t others; t = 0 is x_0."""
    s = LinearSchedule(1000)
    x0 = torch.ones(4, 1, 2, 2)
    noise = torch.full((4, 1, 2, 2), 0.5)
    t = torch.tensor([6 / 1000, 501 / 1000, 6 / 1000, 0.0], dtype=torch.float64)
    a, sig = s.coefs(t, x0)
    assert a.shape == (4, 1, 1, 1) and a.dtype == torch.float64
    assert (a[0], sig[0]) == (a[2], sig[2]) and a[0] != a[1] and sig[0] != sig[1]
    assert (a[3].item(), sig[3].item()) == (1.0, 0.0)
    x_t = s.add_noise(x0, t, noise)
    assert torch.equal(x_t[0], x_t[2]) and not torch.allclose(x_t[0], x_t[1]) and torch.equal(x_t[3], x0[3])


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_denoised_inverts_add_noise(kind: str) -> None:
    """An eps-predictor's x_0 = (x_t - sigma eps) / alpha and an x0-predictor's eps = (x_t - alpha x_0) / sigma (the old
    predict_x0_from_eps / predict_eps_from_x0) return x_0 and eps from x_t = add_noise(x_0, t, eps), in float64.

    Each is a few float64 operations on values of order |x_t| + |sigma eps| (resp. |x_t| + |alpha x_0|), then divided by
    alpha (resp. sigma): 8 U64 times that scale. The cosine schedule's alpha at k = T-1 (5e-5) and the linear one's sigma
    at k = 0 (0.01) are where it grows."""
    s = schedule(kind)
    t = at([0, 1, 10, 500, 900, 999])
    g = gen(0)
    x0 = torch.rand((6, 3, 4, 4), generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn((6, 3, 4, 4), generator=g, dtype=torch.float64)
    x_t = s.add_noise(x0, t, noise)
    a, sig = s.coefs(t, x_t)
    den = EpsPrediction().denoised(x_t, noise, a, sig)
    assert torch.equal(den.eps, noise)
    scale = (x_t.abs() + sig * noise.abs()) / a
    assert bool(((den.x0 - x0).abs() <= 8 * U64 * scale).all())
    den = X0Prediction().denoised(x_t, x0, a, sig)
    assert torch.equal(den.x0, x0)
    scale = (x_t.abs() + a * x0.abs()) / sig
    assert bool(((den.eps - noise).abs() <= 8 * U64 * scale).all())


# ---- q(x_s | x_t, x_0): the DDPM sampler's step ----


class Fixed:
    """Step noise that is a constant (anything with randn_like is a noise source for the samplers)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.value)


def oracle(x0: torch.Tensor):
    def denoise(x: torch.Tensor, level) -> Denoised:
        return Denoised(x0, (x - level.alpha * x0) / level.sigma)

    return denoise


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("k", [1, 2, 250, 500, 998, 999])
def test_ddpm_step_is_the_gaussian_posterior(kind: str, k: int) -> None:
    """q(x_{k-1} | x_k, x_0) ∝ N(x_{k-1}; sqrt(ab_{k-1}) x_0, 1 - ab_{k-1}) N(x_k; sqrt(a_k) x_{k-1}, b_k):

    precision = 1/(1 - ab_{k-1}) + a_k / b_k,
    mean = var (sqrt(ab_{k-1}) x_0 / (1 - ab_{k-1}) + sqrt(a_k) x_k / b_k),

    the DDPM sampler's step from level (k + 1) / T to k / T with the denoiser's x_0: noise 0 gives the mean, noise 1
    mean + sqrt(var) (variance="posterior"; "beta": the step's own variance b_k).

    Rounding (float64): b_k = 1 - a_k and sigma_{t|s}^2 are differences of values <= 1 (32 U64 / b_k relative); 1 - ab
    carries ab's relative error (ab_rel_err) times ab / (1 - ab).
    """
    s = schedule(kind)
    ab = ab_list(kind)
    ab_t, ab_prev = ab[k], ab[k - 1]
    a_t = ab_t / ab_prev
    b_t = 1 - a_t
    rel = ab_rel_err(kind)[k]
    rtol = 32 * U64 / b_t + 2 * rel * (ab_prev / (1 - ab_prev) + ab_t / (1 - ab_t)) + 16 * U64
    g = gen(k)
    x0 = torch.rand((2, 3, 4, 4), generator=g, dtype=torch.float64) * 2 - 1
    x_t = torch.randn((2, 3, 4, 4), generator=g, dtype=torch.float64)
    var = 1 / (1 / (1 - ab_prev) + a_t / b_t)
    mean = var * (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(a_t) * x_t / b_t)
    cur, nxt = s.level_at(k), s.level_at(k - 1)
    assert (cur.t, nxt.t) == ((k + 1) / 1000, k / 1000)
    step = DDPMSampler(variance="posterior").step
    m, x0_hat = step(x_t, oracle(x0), s, cur, nxt, Fixed(0.0))
    assert torch.equal(x0_hat, x0) and m.shape == x0.shape
    # the mean's two terms, each within rtol
    terms = var * (math.sqrt(ab_prev) * x0.abs() / (1 - ab_prev) + math.sqrt(a_t) * x_t.abs() / b_t)
    assert bool(((m - mean).abs() <= 2 * rtol * terms).all())
    # x_{k-1} - mean = sqrt(var) z with z = 1: the difference rounds |x| ~ 1 + |mean| to U64 each, relative to sqrt(var)
    one, _ = step(x_t, oracle(x0), s, cur, nxt, Fixed(1.0))
    size = 1 + float(m.abs().max())
    assert ((one - m).mean().item() ** 2) == pytest.approx(var, rel=2 * rtol + 8 * U64 * size / math.sqrt(var))
    beta, _ = DDPMSampler(variance="beta").step(x_t, oracle(x0), s, cur, nxt, Fixed(1.0))
    assert ((beta - m).mean().item() ** 2) == pytest.approx(b_t, rel=2 * rtol + 8 * U64 * size / math.sqrt(b_t))


def test_ddpm_step_to_the_clean_image_is_x0() -> None:
    """From grid point 0 (t = 1/T) to the clean image (t = 0): ab_{-1} = 1, the posterior is a point mass on x_0,
    exactly (sigma_{t|s}^2 / sigma_t^2 = 1, no noise added)."""
    s = LinearSchedule(1000)
    g = gen(3)
    x0 = torch.rand((2, 3, 4, 4), generator=g) * 2 - 1
    x_t = torch.randn((2, 3, 4, 4), generator=g)
    cur, nxt = s.level_at(0), s.level_at(-1)
    assert nxt.clean and nxt.t == 0.0
    for variance in ("beta", "posterior"):
        x, _ = DDPMSampler(variance=variance).step(x_t, oracle(x0), s, cur, nxt, Fixed(1.0))
        assert torch.equal(x, x0)


# ---- L_simple: objective.loss at times t ----


def test_eps_objective_loss_zero_network_is_mean_noise_square() -> None:
    """loss = mean over pixels of (0 - eps)^2 per row: a float32 sum of 32 squares, 32 U32 relative."""
    s = LinearSchedule(100)
    g = gen(0)
    x0 = torch.rand((3, 2, 4, 4), generator=g) * 2 - 1
    # rows with different noise scales, so a batch mean would not pass
    noise = torch.randn((3, 2, 4, 4), generator=g) * torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1, 1)
    t = at([0, 50, 99], 100)
    loss = EpsPrediction().loss(lambda x, t: torch.zeros_like(x), s, x0, t, noise)
    assert loss.shape == (3,) and loss.dtype == torch.float32
    expected = [(noise[i].double() ** 2).sum().item() / 32 for i in range(3)]
    assert loss.tolist() == pytest.approx(expected, rel=32 * U32)


def test_eps_objective_loss_feeds_x_t_net_time_and_kwargs_to_net() -> None:
    """The network gets the objective's input (x_t on a VP schedule: 1 / sqrt(alpha^2 + sigma^2) rounds to 1 in
    float32), the schedule's net_time(t), exactly the 0-based step k at t = (k + 1) / T, and the keyword arguments.
    float32: x_t's coefficients, products and sum, 4 U32 of the terms (both positive); the loss (x_t - 2)^2 twice
    x_t's relative error times |x_t| / |x_t - 2|."""
    s = LinearSchedule(2)
    x0 = torch.full((2, 1, 2, 2), 0.5)
    noise = torch.full((2, 1, 2, 2), 2.0)
    t = at([1, 0], 2)
    assert t.tolist() == [1.0, 0.5]
    seen = {}

    def net(x, t_, context=None):
        seen.update(x=x, t=t_, context=context)
        return x  # eps_theta = x_t

    loss = EpsPrediction().loss(net, s, x0, t, noise, context="ctx")
    assert seen["t"].dtype == torch.float64 and seen["t"].tolist() == [1.0, 0.0] and seen["context"] == "ctx"
    # row 0: k=1, x_t = sqrt(0.979902) 0.5 + sqrt(0.020098) 2 ; row 1: k=0, x_t = sqrt(0.9999) 0.5 + 0.01 2
    x_t = [math.sqrt(0.979902) * 0.5 + math.sqrt(0.020098) * 2, math.sqrt(0.9999) * 0.5 + 0.01 * 2]
    assert seen["x"].dtype == torch.float32
    assert seen["x"][:, 0, 0, 0].tolist() == pytest.approx(x_t, rel=4 * U32)
    rel = [2 * (4 * U32 * v / abs(v - 2) + U32) + U32 for v in x_t]
    for got, v, r in zip(loss.tolist(), x_t, rel):
        assert got == pytest.approx((v - 2.0) ** 2, rel=r)


def test_eps_objective_loss_perfect_network_is_zero_and_differentiable() -> None:
    s = CosineSchedule(50)
    g = gen(1)
    x0 = torch.rand((2, 1, 4, 4), generator=g) * 2 - 1
    noise = torch.randn((2, 1, 4, 4), generator=g)
    w = torch.tensor(1.0, requires_grad=True)
    t = at([3, 40], 50)
    loss = EpsPrediction().loss(lambda x, t: w * noise, s, x0, t, noise)
    assert loss.abs().max().item() == 0.0
    (EpsPrediction().loss(lambda x, t: w * 0.5 * noise, s, x0, t, noise).sum()).backward()
    # d/dw mean((w n/2 - n)^2) at w=1 = mean(2 (n/2 - n) n/2) = -mean(n^2)/2 per row: float32 sums of 16 terms
    expected = -sum((noise[i].double() ** 2).mean().item() / 2 for i in range(2))
    assert w.grad.item() == pytest.approx(expected, rel=32 * U32)


# ---- the draws of t ----


def test_sample_uniform_range_and_seed() -> None:
    """A T-step schedule draws its grid points t = (k + 1) / T (float64, every one of them in 4000 draws: each is
    missed with probability (6/7)^4000), the same ones under the same seed; a continuous one U(t_min, t_max)."""
    s = LinearSchedule(7)
    torch.manual_seed(0)
    t = s.sample_uniform(4000, "cpu")
    assert t.dtype == torch.float64 and t.shape == (4000,)
    assert set(t.tolist()) == {(k + 1) / 7 for k in range(7)}
    torch.manual_seed(0)
    assert torch.equal(t, s.sample_uniform(4000, "cpu"))
    flow = RectifiedFlow(t_min=0.01, t_max=0.9)
    t = flow.sample_uniform(4000, "cpu")
    assert t.dtype == torch.float64 and float(t.min()) >= 0.01 and float(t.max()) <= 0.9
    assert len(set(t.tolist())) == 4000  # continuous


def test_from_unit_maps_validation_draws_to_times() -> None:
    """Validation's fixed draws u in [0, 1): a T-step schedule's step floor(u T), t = (floor(u T) + 1) / T; a continuous
    schedule t_min + u (t_max - t_min); both increasing in u."""
    u = torch.tensor([0.0, 0.1, 0.5, 0.99, 0.999999])
    assert LinearSchedule(10).from_unit(u).tolist() == [(k + 1) / 10 for k in (0, 1, 5, 9, 9)]
    flow = RectifiedFlow(t_min=0.01, t_max=0.9)
    t = flow.from_unit(u)
    assert t.dtype == torch.float64
    torch.testing.assert_close(t, 0.01 + u.double() * 0.89, rtol=4 * U64, atol=0)
    assert bool((t[1:] > t[:-1]).all())
