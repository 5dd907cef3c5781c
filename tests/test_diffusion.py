"""The forward process q(x_t | x_0), its inverse, the posterior q(x_{t-1} | x_t, x_0) and L_simple."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.diffusion import predict_eps_from_x0, predict_x0_from_eps, q_posterior, q_sample, sample_timesteps
from difflab.objectives import EpsPrediction
from difflab.schedules import CosineSchedule, LinearSchedule, NoiseSchedule


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def schedule(kind: str, T: int = 1000) -> NoiseSchedule:
    return LinearSchedule(T) if kind == "linear" else CosineSchedule(T)


def ab_list(kind: str, T: int = 1000) -> list[float]:
    """alpha_bar from the closed-form betas, as a Python running product (independent of the code)."""
    if kind == "linear":
        betas = [1e-4 + (0.02 - 1e-4) * t / (T - 1) for t in range(T)]
    else:

        def f(t: float) -> float:
            return math.cos(((t / T + 0.008) / 1.008) * math.pi / 2) ** 2

        betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]
    out, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        out.append(prod)
    return out


def test_q_sample_T2_by_hand() -> None:
    # T = 2 linear: alpha_bar = [0.9999, 0.979902]; rows use their own t
    s = LinearSchedule(2)
    x0 = torch.tensor([0.5, -1.0], dtype=torch.float64).reshape(2, 1, 1, 1)
    noise = torch.tensor([2.0, 3.0], dtype=torch.float64).reshape(2, 1, 1, 1)
    x_t = q_sample(s, x0, torch.tensor([0, 1]), noise)
    expected = [math.sqrt(0.9999) * 0.5 + 0.01 * 2.0, math.sqrt(0.979902) * -1.0 + math.sqrt(0.020098) * 3.0]
    assert x_t.flatten().tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_q_sample_moments(kind: str, t: int) -> None:
    """x_t | x_0 ~ N(sqrt(ab_t) x_0, (1 - ab_t) I), checked on N = 20000 draws of 4 pixels.

    Standard errors: mean sqrt(v/N) ~ 0.0071 sqrt(v); variance v sqrt(2/(N-1)) ~ 0.01 v.
    Tolerances are 5 standard errors (the seed is fixed, so the test is deterministic).
    """
    N = 20000
    s = schedule(kind)
    ab = ab_list(kind)[t]
    x0 = torch.tensor([[-1.0, -0.3], [0.4, 0.9]], dtype=torch.float64).reshape(1, 1, 2, 2)
    noise = torch.randn((N, 1, 2, 2), generator=gen(t), dtype=torch.float64)
    x_t = q_sample(s, x0.expand(N, -1, -1, -1), torch.full((N,), t), noise)
    v = 1 - ab
    torch.testing.assert_close(x_t.mean(0), math.sqrt(ab) * x0[0], rtol=0, atol=5 * math.sqrt(v / N))
    torch.testing.assert_close(x_t.var(0), torch.full_like(x0[0], v), rtol=5 * math.sqrt(2 / (N - 1)), atol=0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_predict_x0_and_eps_invert_q_sample(kind: str) -> None:
    s = schedule(kind)
    t = torch.tensor([0, 1, 10, 500, 900, 999])
    g = gen(0)
    x0 = torch.rand((6, 3, 4, 4), generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn((6, 3, 4, 4), generator=g, dtype=torch.float64)
    x_t = q_sample(s, x0, t, noise)
    # the coefficients are float32: x_0 = x_t / sqrt(ab) - sqrt(1/ab - 1) eps loses ~ 1e-7 * |x_t| / sqrt(ab),
    # which for cosine at t = T-1 (sqrt(ab) ~ 1e-4) reaches 1e-3 absolute; compare per row, relative to that scale
    x0_hat = predict_x0_from_eps(s, x_t, t, noise)
    scale = (x_t.abs() + noise.abs()) / s.sqrt_alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    assert bool(((x0_hat - x0).abs() <= 1e-6 * scale + 1e-7).all())
    eps_hat = predict_eps_from_x0(s, x_t, t, x0)
    # eps = (x_t / sqrt(ab) - x_0) / sqrt(1/ab - 1): the error is largest at t = 0 where sqrt(1/ab - 1) = 0.01
    torch.testing.assert_close(eps_hat, noise, rtol=1e-5, atol=1e-5)
    # and the linear schedule away from the extremes is tight
    if kind == "linear":
        torch.testing.assert_close(x0_hat[:5], x0[:5], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("t", [1, 2, 250, 500, 998, 999])
def test_q_posterior_is_gaussian_product(kind: str, t: int) -> None:
    """q(x_{t-1} | x_t, x_0) ∝ N(x_{t-1}; sqrt(ab_{t-1}) x_0, 1 - ab_{t-1}) N(x_t; sqrt(a_t) x_{t-1}, b_t):

    precision = 1/(1 - ab_{t-1}) + a_t / b_t,
    mean = var (sqrt(ab_{t-1}) x_0 / (1 - ab_{t-1}) + sqrt(a_t) x_t / b_t).
    """
    s = schedule(kind)
    ab = ab_list(kind)
    ab_t, ab_prev = ab[t], ab[t - 1]
    a_t = ab_t / ab_prev
    b_t = 1 - a_t
    g = gen(t)
    x0 = torch.rand((2, 3, 4, 4), generator=g, dtype=torch.float64) * 2 - 1
    x_t = torch.randn((2, 3, 4, 4), generator=g, dtype=torch.float64)
    var = 1 / (1 / (1 - ab_prev) + a_t / b_t)
    mean = var * (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(a_t) * x_t / b_t)
    m, v, log_v = q_posterior(s, x0, x_t, torch.full((2,), t))
    assert m.shape == x0.shape and v.shape == (2, 1, 1, 1) and log_v.shape == (2, 1, 1, 1)
    torch.testing.assert_close(m, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.flatten().double(), torch.full((2,), var, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        log_v.flatten().double(), torch.full((2,), math.log(var), dtype=torch.float64), rtol=1e-5, atol=1e-6
    )


def test_q_posterior_at_t0() -> None:
    """At t = 0 (x_0 -> x_1), ab_{-1} = 1: the posterior is a point mass on x_0."""
    s = LinearSchedule(1000)
    g = gen(3)
    x0 = torch.rand((2, 3, 4, 4), generator=g) * 2 - 1
    x_t = torch.randn((2, 3, 4, 4), generator=g)
    m, v, log_v = q_posterior(s, x0, x_t, torch.zeros(2, dtype=torch.long))
    assert bool((v == 0).all())
    torch.testing.assert_close(m, x0, rtol=0, atol=1e-6)
    # the log-variance is clipped to the t = 1 value, not -inf
    assert torch.isfinite(log_v).all()
    assert log_v[0].item() == pytest.approx(math.log(s.posterior_variance[1].item()), rel=1e-6)


def test_q_posterior_per_row_timesteps() -> None:
    s = LinearSchedule(1000)
    x0 = torch.ones(3, 1, 2, 2)
    x_t = torch.ones(3, 1, 2, 2)
    t = torch.tensor([5, 500, 5])
    m, v, _ = q_posterior(s, x0, x_t, t)
    assert torch.equal(m[0], m[2]) and torch.equal(v[0], v[2])
    assert not torch.allclose(v[0], v[1])


def test_eps_objective_loss_zero_network_is_mean_noise_square() -> None:
    s = LinearSchedule(100)
    g = gen(0)
    x0 = torch.rand((3, 2, 4, 4), generator=g) * 2 - 1
    # rows with different noise scales, so a batch mean would not pass
    noise = torch.randn((3, 2, 4, 4), generator=g) * torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1, 1)
    t = torch.tensor([0, 50, 99])
    loss = EpsPrediction().loss(lambda x, t: torch.zeros_like(x), s, x0, t, noise)
    assert loss.shape == (3,)
    expected = [(noise[i] ** 2).sum().item() / 32 for i in range(3)]
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)


def test_eps_objective_loss_feeds_x_t_t_and_kwargs_to_net() -> None:
    s = LinearSchedule(2)
    x0 = torch.full((2, 1, 2, 2), 0.5)
    noise = torch.full((2, 1, 2, 2), 2.0)
    t = torch.tensor([1, 0])
    seen = {}

    def net(x, t_, context=None):
        seen.update(x=x, t=t_, context=context)
        return x  # eps_theta = x_t

    loss = EpsPrediction().loss(net, s, x0, t, noise, context="ctx")
    assert torch.equal(seen["t"], t) and seen["context"] == "ctx"
    # row 0: t=1, x_t = sqrt(0.979902) 0.5 + sqrt(0.020098) 2 ; row 1: t=0, x_t = sqrt(0.9999) 0.5 + 0.01 2
    x_t = [math.sqrt(0.979902) * 0.5 + math.sqrt(0.020098) * 2, math.sqrt(0.9999) * 0.5 + 0.01 * 2]
    assert seen["x"][:, 0, 0, 0].tolist() == pytest.approx(x_t, rel=1e-6)
    assert loss.tolist() == pytest.approx([(v - 2.0) ** 2 for v in x_t], rel=1e-5)


def test_eps_objective_loss_perfect_network_is_zero_and_differentiable() -> None:
    s = CosineSchedule(50)
    g = gen(1)
    x0 = torch.rand((2, 1, 4, 4), generator=g) * 2 - 1
    noise = torch.randn((2, 1, 4, 4), generator=g)
    w = torch.tensor(1.0, requires_grad=True)
    loss = EpsPrediction().loss(lambda x, t: w * noise, s, x0, torch.tensor([3, 40]), noise)
    assert loss.abs().max().item() == 0.0
    (EpsPrediction().loss(lambda x, t: w * 0.5 * noise, s, x0, torch.tensor([3, 40]), noise).sum()).backward()
    # d/dw mean((w n/2 - n)^2) at w=1 = mean(2 (n/2 - n) n/2) = -mean(n^2)/2 per row
    expected = -sum((noise[i] ** 2).mean().item() / 2 for i in range(2))
    assert w.grad.item() == pytest.approx(expected, rel=1e-5)


def test_sample_timesteps_range_and_seed() -> None:
    t = sample_timesteps(4000, 7, torch.device("cpu"), gen(0))
    assert t.dtype == torch.long and t.shape == (4000,)
    assert set(t.tolist()) == set(range(7))
    assert torch.equal(t, sample_timesteps(4000, 7, torch.device("cpu"), gen(0)))
