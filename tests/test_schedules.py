"""Noise schedules against closed forms, hand-computed values and diffusers' DDPMScheduler.

The schedule computes in float64 and stores float32 buffers, so comparisons with float64 closed forms
use a relative tolerance of a few float32 ulps (2^-24 ~ 6e-8).
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from difflab.schedules import CosineSchedule, LinearSchedule, NoiseSchedule, extract

TS = [2, 500, 512, 1000]
KINDS = ["linear", "cosine"]
F32_RTOL = 2e-7  # float32 storage of a float64 value: relative error <= 2^-24 ~ 6e-8

BUFFERS = [
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
]


# ---- independent references, plain Python floats ----


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> list[float]:
    return [beta_start + (beta_end - beta_start) * t / (T - 1) for t in range(T)]


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> list[float]:
    def f(t: float) -> float:
        return math.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2

    return [min(1 - f(t + 1) / f(t), max_beta) for t in range(T)]


def ref_betas(kind: str, T: int) -> list[float]:
    return linear_betas(T) if kind == "linear" else cosine_betas(T)


def running_product(betas: list[float]) -> list[float]:
    out, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        out.append(prod)
    return out


def make(kind: str, T: int) -> NoiseSchedule:
    return LinearSchedule(T) if kind == "linear" else CosineSchedule(T)


def f64(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


def close(actual: torch.Tensor, expected, rtol: float = F32_RTOL, atol: float = 0.0) -> None:
    torch.testing.assert_close(actual.double(), f64(expected), rtol=rtol, atol=atol)


# ---- betas ----


@pytest.mark.parametrize("T", TS)
def test_linear_betas_closed_form(T: int) -> None:
    s = LinearSchedule(T)
    assert s.timesteps == T and s.betas.shape == (T,) and s.betas.dtype == torch.float32
    close(s.betas, linear_betas(T))
    # endpoints are exactly the float32 of beta_start / beta_end
    assert s.betas[0].item() == torch.tensor(1e-4, dtype=torch.float32).item()
    assert s.betas[-1].item() == torch.tensor(0.02, dtype=torch.float32).item()
    assert bool((s.betas[1:] > s.betas[:-1]).all())


def test_linear_custom_endpoints() -> None:
    s = LinearSchedule(5, beta_start=0.1, beta_end=0.5)
    # (0.5 - 0.1) / 4 = 0.1 per step
    close(s.betas, [0.1, 0.2, 0.3, 0.4, 0.5])


@pytest.mark.parametrize("T", TS)
def test_cosine_betas_closed_form(T: int) -> None:
    s = CosineSchedule(T)
    close(s.betas, cosine_betas(T))
    # f(T) = cos(pi/2)^2 ~ 0, so the last beta is always capped at max_beta
    assert s.betas[-1].item() == torch.tensor(0.999, dtype=torch.float32).item()
    assert s.betas.max().item() <= torch.tensor(0.999, dtype=torch.float32).item()


def test_cosine_alpha_bar_is_f_ratio() -> None:
    # below the cap, alpha_bar_t telescopes to f(t+1)/f(0) (Nichol & Dhariwal eq. 17)
    T, s_ = 1000, 0.008
    s = CosineSchedule(T)

    def f(t: float) -> float:
        return math.cos(((t / T + s_) / (1 + s_)) * math.pi / 2) ** 2

    for t in [0, 1, 100, 500, 900, 990]:
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-6)


# ---- derived terms ----


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("kind", KINDS)
def test_alphas_cumprod_is_running_product(kind: str, T: int) -> None:
    s = make(kind, T)
    betas = ref_betas(kind, T)
    ab = running_product(betas)
    close(s.alphas, [1 - b for b in betas], rtol=1e-6)
    # cosine's last alpha_bar is ~1e-9; relative tolerance only
    close(s.alphas_cumprod, ab, rtol=1e-6)
    assert s.alphas_cumprod_prev[0].item() == 1.0
    assert torch.equal(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("kind", KINDS)
def test_sqrt_and_posterior_terms(kind: str, T: int) -> None:
    s = make(kind, T)
    betas = ref_betas(kind, T)
    ab = running_product(betas)
    ab_prev = [1.0] + ab[:-1]
    close(s.sqrt_alphas_cumprod, [math.sqrt(a) for a in ab], rtol=1e-6)
    close(s.sqrt_one_minus_alphas_cumprod, [math.sqrt(1 - a) for a in ab], rtol=1e-6)
    close(s.sqrt_recip_alphas_cumprod, [1 / math.sqrt(a) for a in ab], rtol=1e-6)
    close(s.sqrt_recipm1_alphas_cumprod, [math.sqrt(1 / a - 1) for a in ab], rtol=1e-6)
    # Ho et al. eq. 7: beta~_t = (1 - ab_{t-1}) / (1 - ab_t) beta_t
    pv = [(1 - ap) / (1 - a) * b for b, a, ap in zip(betas, ab, ab_prev)]
    close(s.posterior_variance, pv, rtol=1e-6)
    assert s.posterior_variance[0].item() == 0.0
    close(s.posterior_log_variance_clipped, [math.log(pv[1])] + [math.log(v) for v in pv[1:]], rtol=1e-6)
    # mu~_t = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x_0 + sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) x_t
    close(s.posterior_mean_coef1, [math.sqrt(ap) * b / (1 - a) for b, a, ap in zip(betas, ab, ab_prev)], rtol=1e-6)
    close(s.posterior_mean_coef2, [math.sqrt(1 - b) * (1 - ap) / (1 - a) for b, a, ap in zip(betas, ab, ab_prev)], rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_posterior_consistency_identities(kind: str) -> None:
    """Identities that follow from x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, not from the formulas.

    E[x_{t-1} | x_0] = coef1 x_0 + coef2 E[x_t | x_0]  ->  coef1 + coef2 sqrt(ab_t) = sqrt(ab_{t-1})
    Var[x_{t-1} | x_0] = E[Var(.|x_t)] + Var(E[.|x_t])  ->  beta~_t + coef2^2 (1 - ab_t) = 1 - ab_{t-1}
    """
    s = make(kind, 1000)
    d = {k: getattr(s, k).double() for k in BUFFERS}
    lhs_mean = d["posterior_mean_coef1"] + d["posterior_mean_coef2"] * d["sqrt_alphas_cumprod"]
    torch.testing.assert_close(lhs_mean, d["alphas_cumprod_prev"].sqrt(), rtol=1e-5, atol=1e-7)
    lhs_var = d["posterior_variance"] + d["posterior_mean_coef2"] ** 2 * (1 - d["alphas_cumprod"])
    torch.testing.assert_close(lhs_var, 1 - d["alphas_cumprod_prev"], rtol=1e-5, atol=1e-7)


def test_linear_T2_hand_computed() -> None:
    """T = 2, beta_start = 1e-4, beta_end = 0.02, computed by hand:

    betas       = [1e-4, 0.02]
    alphas      = [0.9999, 0.98]
    alpha_bar   = [0.9999, 0.9999 * 0.98 = 0.979902]
    1-alpha_bar = [1e-4, 0.020098]
    posterior variance: t=0: 1e-4 * (1 - 1) / 1e-4 = 0
                        t=1: 0.02 * (1 - 0.9999) / 0.020098 = 2e-6 / 0.020098 = 9.9512389e-5
    coef1: t=0: 1e-4 * sqrt(1) / 1e-4 = 1 ;  t=1: 0.02 * sqrt(0.9999) / 0.020098 = 0.0199990000 / 0.020098 = 0.99507414
    coef2: t=0: (1 - 1) * ... = 0         ;  t=1: 1e-4 * sqrt(0.98) / 0.020098 = 0.98994949e-4 / 0.020098 = 4.9256120e-3
    sqrt(1 - alpha_bar) = [0.01, sqrt(0.020098) = 0.14176741]
    """
    s = LinearSchedule(2)
    close(s.betas, [1e-4, 0.02])
    close(s.alphas, [0.9999, 0.98])
    close(s.alphas_cumprod, [0.9999, 0.979902], rtol=1e-6)
    close(s.alphas_cumprod_prev, [1.0, 0.9999])
    close(s.posterior_variance, [0.0, 9.9512389e-5], rtol=1e-6)
    close(s.posterior_mean_coef1, [1.0, 0.99507414], rtol=1e-6)
    close(s.posterior_mean_coef2, [0.0, 4.9256120e-3], rtol=1e-6)
    close(s.sqrt_one_minus_alphas_cumprod, [0.01, 0.14176741], rtol=1e-6)
    # log-variance at t=0 is clipped to the t=1 value
    close(s.posterior_log_variance_clipped, [math.log(9.9512389e-5)] * 2, rtol=1e-6)


# ---- diffusers parity ----


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("kind,beta_schedule", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_matches_diffusers(kind: str, beta_schedule: str, T: int) -> None:
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule)
    s = make(kind, T)
    torch.testing.assert_close(s.betas, ref.betas, rtol=0, atol=1e-6)
    # diffusers takes a float32 cumprod, we a float64 one: they differ by float32 rounding only
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=1e-6)


# ---- bad input ----


@pytest.mark.parametrize("cls", [LinearSchedule, CosineSchedule])
@pytest.mark.parametrize("T", [1, 0, -5])
def test_too_few_timesteps(cls, T: int) -> None:
    with pytest.raises(ValueError, match=r"timesteps must be an integer >= 2"):
        cls(T)


@pytest.mark.parametrize("T", [2.5, True])
def test_non_integer_timesteps(T) -> None:
    with pytest.raises(ValueError, match=r"timesteps must be an integer"):
        LinearSchedule(T)


def test_raw_schedule_too_short() -> None:
    with pytest.raises(ValueError, match=r"at least 2 timesteps"):
        NoiseSchedule(torch.tensor([0.1]))


@pytest.mark.parametrize("kwargs", [{"beta_end": 1.5}, {"beta_start": 0.0}, {"beta_start": -0.1}, {"beta_end": 1.0}])
def test_betas_outside_unit_interval(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"every beta must lie in \(0, 1\).*beta_start / schedule\.beta_end"):
        LinearSchedule(10, **kwargs)


def test_raw_betas_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match=r"every beta must lie in \(0, 1\); got 2 outside"):
        NoiseSchedule(torch.tensor([0.0, 0.5, 1.0]))


# ---- buffers ----


def test_buffers_non_persistent_and_not_parameters() -> None:
    s = LinearSchedule(10)
    assert set(dict(s.named_buffers())) == set(BUFFERS)
    assert all(getattr(s, k).dtype == torch.float32 for k in BUFFERS)
    assert list(s.parameters()) == []
    assert s.state_dict() == {}
    parent = nn.Module()
    parent.schedule = s
    parent.lin = nn.Linear(2, 2)
    assert set(parent.state_dict()) == {"lin.weight", "lin.bias"}
    assert not any(n.startswith("schedule") for n, _ in parent.named_parameters())


def test_buffers_move_with_to() -> None:
    s = CosineSchedule(10)
    expected = s.alphas_cumprod.double()
    s.to(torch.float64)
    assert all(getattr(s, k).dtype == torch.float64 for k in BUFFERS)
    assert torch.equal(s.alphas_cumprod, expected)
    s.to("meta")  # a device move that needs no accelerator
    assert all(getattr(s, k).device.type == "meta" for k in BUFFERS)


def test_extract_gathers_and_broadcasts() -> None:
    values = torch.tensor([10.0, 20.0, 30.0])
    out = extract(values, torch.tensor([2, 0]), 4)
    assert out.shape == (2, 1, 1, 1)
    assert out.flatten().tolist() == [30.0, 10.0]
