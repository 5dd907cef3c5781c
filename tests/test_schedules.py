"""Noise schedules against closed forms, hand-computed values and diffusers' DDPMScheduler.

A schedule maps t in [0, 1] to (alpha_t, sigma_t). VP schedules compute float64 buffers on their T-step grid (grid point
k at t = (k + 1) / T); RectifiedFlow and EDMSchedule are closed forms. Comparisons with independent float64 references
(plain Python floats) allow the float64 rounding of the operations between them (unit roundoff U64 = 2^-53 ~ 1.1e-16),
amplified where a quantity is a small difference (1 - alpha_bar near the clean end, beta_k = sigma_t^2 - ...); diffusers
works in float32 (U32 = 2^-24 ~ 6e-8).
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from difflab.diffusion import Level
from difflab.errors import ConfigError
from difflab.schedules import CosineSchedule, EDMSchedule, LinearSchedule, NoiseSchedule, RectifiedFlow, VPSchedule

from support import U32

TS = [2, 500, 512, 1000]
KINDS = ["linear", "cosine"]
U64 = torch.finfo(torch.float64).eps / 2  # float64 unit roundoff, 2^-53

BUFFERS = ["betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_sigmas"]


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


# |beta (ours) - beta (reference)|: linear: linspace and the Python formula each round <= 3 times values <= beta_end;
# cosine: cos is correctly rounded to 1 ulp in both, f = cos^2 and the ratio add 3 roundings each, 1 - ratio one more,
# all of values <= 1 (the arguments are the same float64 expression in both)
BETA_ERR = {"linear": 8 * U64 * 0.02, "cosine": 16 * U64}


def product_rel_err(betas: list[float], beta_err: float) -> torch.Tensor:
    """Bound on the relative difference of two running products of (1 - beta_j), j <= k, whose betas differ by at most
    beta_err: each factor differs by (beta_err + U64) / (1 - beta_j) relatively, and each product rounds once more."""
    b = f64(betas)
    return ((beta_err + 2 * U64) / (1 - b)).cumsum(0)


def make(kind: str, T: int) -> VPSchedule:
    return LinearSchedule(T) if kind == "linear" else CosineSchedule(T)


def f64(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


def close(actual: torch.Tensor, expected, rtol=0.0, atol=0.0) -> None:
    """|actual - expected| <= atol + rtol |expected| elementwise (rtol, atol: numbers or tensors)."""
    expected = f64(expected)
    assert actual.dtype == torch.float64
    bound = torch.as_tensor(atol, dtype=torch.float64) + torch.as_tensor(rtol, dtype=torch.float64) * expected.abs()
    err = (actual - expected).abs()
    assert bool((err <= bound).all()), f"max error {float(err.max()):.3g}, bound there {float(bound[err.argmax()]):.3g}"


def grid(T: int) -> torch.Tensor:
    """t = (k + 1) / T for k = 0 .. T-1, float64 (as sample_uniform and the samplers' grids make them)."""
    return (torch.arange(T) + 1).double() / T


# ---- betas ----


@pytest.mark.parametrize("T", TS)
def test_linear_betas_closed_form(T: int) -> None:
    s = LinearSchedule(T)
    assert s.timesteps == T and s.betas.shape == (T,) and s.betas.dtype == torch.float64
    close(s.betas, linear_betas(T), atol=BETA_ERR["linear"])
    # endpoints are exactly beta_start / beta_end
    assert s.betas[0].item() == 1e-4 and s.betas[-1].item() == 0.02
    assert bool((s.betas[1:] > s.betas[:-1]).all())


def test_linear_custom_endpoints() -> None:
    s = LinearSchedule(5, beta_start=0.1, beta_end=0.5)
    # (0.5 - 0.1) / 4 = 0.1 per step
    close(s.betas, [0.1, 0.2, 0.3, 0.4, 0.5], atol=8 * U64 * 0.5)


@pytest.mark.parametrize("T", TS)
def test_cosine_betas_closed_form(T: int) -> None:
    s = CosineSchedule(T)
    close(s.betas, cosine_betas(T), atol=BETA_ERR["cosine"])
    # f(T) = cos(pi/2)^2 ~ 0, so the last beta is always capped at max_beta
    assert s.betas[-1].item() == 0.999
    assert s.betas.max().item() <= 0.999


def test_cosine_alpha_bar_is_f_ratio() -> None:
    # below the cap, alpha_bar_t telescopes to f(t+1)/f(0) (Nichol & Dhariwal eq. 17); the product of k + 1 factors
    # differs from the ratio by the factors' rounding (product_rel_err) plus f's own (3 roundings each)
    T, s_ = 1000, 0.008
    s = CosineSchedule(T)
    rel = product_rel_err(cosine_betas(T), BETA_ERR["cosine"])

    def f(t: float) -> float:
        return math.cos(((t / T + s_) / (1 + s_)) * math.pi / 2) ** 2

    for t in [0, 1, 100, 500, 900, 990]:
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=float(rel[t]) + 8 * U64, abs=0)


# ---- derived terms ----


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("kind", KINDS)
def test_alphas_cumprod_is_running_product(kind: str, T: int) -> None:
    s = make(kind, T)
    betas = ref_betas(kind, T)
    rel = product_rel_err(betas, BETA_ERR[kind])
    close(s.alphas_cumprod, running_product(betas), rtol=rel)
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("kind", KINDS)
def test_sqrt_terms_and_log_sigmas(kind: str, T: int) -> None:
    """sqrt(ab), sqrt(1 - ab) and EDM's log sigma = log(sqrt(1 - ab) / sqrt(ab)) against Python's, from the running
    product. 1 - ab carries ab's relative error times ab / (1 - ab) (10^4 at k = 0 of the linear schedule): computed
    from a float32 ab it would lose those digits, which is why the buffers are float64."""
    s = make(kind, T)
    ab = running_product(ref_betas(kind, T))
    rel_ab = product_rel_err(ref_betas(kind, T), BETA_ERR[kind]) + U64
    abt = f64(ab)
    rel_1mab = rel_ab * abt / (1 - abt) + U64
    close(s.sqrt_alphas_cumprod, [math.sqrt(a) for a in ab], rtol=rel_ab / 2 + 2 * U64)
    close(s.sqrt_one_minus_alphas_cumprod, [math.sqrt(1 - a) for a in ab], rtol=rel_1mab / 2 + 2 * U64)
    log_sigma = [0.5 * (math.log(1 - a) - math.log(a)) for a in ab]
    # d log x = dx / x: half the two relative errors, plus the logs' and the difference's rounding
    close(s.log_sigmas, log_sigma, atol=(rel_ab + rel_1mab) / 2 + 4 * U64 * f64(log_sigma).abs().max())


@pytest.mark.parametrize("kind", KINDS)
def test_posterior_through_levels_is_ho_et_al(kind: str) -> None:
    """q(x_{k-1} | x_k, x_0) from two levels t = (k + 1) / T and s = k / T, as the DDPM sampler forms it:
    alpha_{t|s} = alpha_t / alpha_s, sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 (q(x_t | x_s)),
    mean = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x_0, var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2,
    against Ho et al.'s beta form (eq. 6-7) from the buffers: sigma_{t|s}^2 = beta_k, alpha_{t|s}^2 = 1 - beta_k,
    coef1 = sqrt(ab_{k-1}) beta_k / (1 - ab_k), coef2 = sqrt(1 - beta_k) (1 - ab_{k-1}) / (1 - ab_k),
    var = beta_k (1 - ab_{k-1}) / (1 - ab_k); and the identities that follow from x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps:
    coef1 + coef2 sqrt(ab_k) = sqrt(ab_{k-1}), var + coef2^2 (1 - ab_k) = 1 - ab_{k-1}, alpha^2 + sigma^2 = 1.

    Rounding: sigma_{t|s}^2 is a difference of values <= 1 (a few U64 absolute, so 32 U64 / beta_k relative);
    1 - ab from the buffer adds U64 / (1 - ab) relative; every other step a few U64."""
    T = 1000
    s = make(kind, T)
    k = torch.arange(1, T)
    a_t, s_t = s.alpha_sigma((k + 1).double() / T)
    a_s, s_s = s.alpha_sigma(k.double() / T)
    a_ts = a_t / a_s
    var_ts = s_t**2 - a_ts**2 * s_s**2
    coef1, coef2, var = a_s * var_ts / s_t**2, a_ts * s_s**2 / s_t**2, var_ts * s_s**2 / s_t**2
    beta, ab, ab_prev = s.betas[k], s.alphas_cumprod[k], s.alphas_cumprod[k - 1]
    rtol = 32 * U64 / beta + 8 * U64 / (1 - ab) + 8 * U64 / (1 - ab_prev) + 16 * U64
    close(var_ts, beta, rtol=rtol)
    close(a_ts**2, 1 - beta, atol=8 * U64)
    close(a_t**2 + s_t**2, torch.ones(T - 1), atol=4 * U64)
    close(coef1, ab_prev.sqrt() * beta / (1 - ab), rtol=rtol)
    close(coef2, (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab), rtol=rtol)
    close(var, beta * (1 - ab_prev) / (1 - ab), rtol=rtol)
    # the identities, on values <= 1
    close(coef1 + coef2 * ab.sqrt(), ab_prev.sqrt(), atol=rtol * 4)
    close(var + coef2**2 * (1 - ab), 1 - ab_prev, atol=rtol * 4)


def test_linear_T2_hand_computed() -> None:
    """T = 2, beta_start = 1e-4, beta_end = 0.02, computed by hand:

    betas       = [1e-4, 0.02]
    alpha_bar   = [0.9999, 0.9999 * 0.98 = 0.979902]
    1-alpha_bar = [1e-4, 0.020098]
    sqrt(1 - alpha_bar) = [0.01, sqrt(0.020098) = 0.14176741]
    posterior of grid point 1 -> 0 (levels t = 1 and t = 1/2):
        variance 0.02 * (1 - 0.9999) / 0.020098 = 2e-6 / 0.020098 = 9.9512389e-5
        coef1 0.02 * sqrt(0.9999) / 0.020098 = 0.0199990000 / 0.020098 = 0.99507414
        coef2 1e-4 * sqrt(0.98) / 0.020098 = 0.98994949e-4 / 0.020098 = 4.9256120e-3
    posterior of grid point 0 -> the clean image (t = 0): variance 0, coef1 1, coef2 0, exactly.

    The decimals above are exact expressions below; 1 - ab rounds 0.9999's float64 error into 1e-4 (relative
    U64 / 1e-4), which bounds the tolerances.
    """
    s = LinearSchedule(2)
    cancel = 4 * U64 / 1e-4
    close(s.betas, [1e-4, 0.02], rtol=2 * U64)
    close(s.alphas_cumprod, [0.9999, 0.9999 * 0.98], rtol=4 * U64)
    close(s.sqrt_one_minus_alphas_cumprod, [0.01, math.sqrt(0.020098)], rtol=[cancel, 4 * U64 / 0.020098])
    assert math.sqrt(0.020098) == pytest.approx(0.14176741, abs=1e-8)  # the hand decimals, to their last digit

    def posterior(cur: Level, nxt: Level) -> tuple[float, float, float]:
        a_ts = cur.alpha / nxt.alpha
        var_ts = cur.sigma**2 - a_ts**2 * nxt.sigma**2
        return nxt.alpha * var_ts / cur.sigma**2, a_ts * nxt.sigma**2 / cur.sigma**2, var_ts * nxt.sigma**2 / cur.sigma**2

    assert (s.level_at(1).t, s.level_at(0).t, s.level_at(-1).t) == (1.0, 0.5, 0.0)
    coef1, coef2, var = posterior(s.level_at(1), s.level_at(0))
    expected = (0.02 * math.sqrt(0.9999) / 0.020098, 1e-4 * math.sqrt(0.98) / 0.020098, 0.02 * 1e-4 / 0.020098)
    rtol = 2 * cancel + 32 * U64 / 0.02
    assert (coef1, coef2, var) == pytest.approx(expected, rel=rtol, abs=0)
    assert expected == pytest.approx((0.99507414, 4.9256120e-3, 9.9512389e-5), rel=1e-7)  # the hand decimals
    assert posterior(s.level_at(0), s.level_at(-1)) == (1.0, 0.0, 0.0)


# ---- diffusers parity ----


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("kind,beta_schedule", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_matches_diffusers(kind: str, beta_schedule: str, T: int) -> None:
    """diffusers' betas are float32 (linear: a float32 linspace, <= 4 roundings of values <= beta_end; cosine: Python
    floats rounded once), and its alpha_bar a float32 running product: k + 1 factors (1 - beta), each rounded twice and
    carrying its beta's error, so relative (k + 1) 2 U32 + sum_j 4 U32 max(beta) / (1 - beta_j)."""
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule)
    s = make(kind, T)
    assert ref.betas.dtype == torch.float32
    beta_err = 4 * U32 * float(s.betas.max())
    close(s.betas, ref.betas.double(), atol=beta_err)
    k = torch.arange(T, dtype=torch.float64)
    rel = 2 * U32 * (k + 1) + (beta_err / (1 - s.betas)).cumsum(0)
    close(s.alphas_cumprod, ref.alphas_cumprod.double(), rtol=rel)


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
        VPSchedule(torch.tensor([0.1]))


@pytest.mark.parametrize("kwargs", [{"beta_end": 1.5}, {"beta_start": 0.0}, {"beta_start": -0.1}, {"beta_end": 1.0}])
def test_betas_outside_unit_interval(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"every beta must lie in \(0, 1\).*beta_start / schedule\.beta_end"):
        LinearSchedule(10, **kwargs)


def test_raw_betas_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match=r"every beta must lie in \(0, 1\); got 2 outside"):
        VPSchedule(torch.tensor([0.0, 0.5, 1.0]))


@pytest.mark.parametrize("build,message", [
    (lambda: RectifiedFlow(t_min=0.0), r"schedule\.t_min=0\.0: must be a finite number in \[1e-06, 0\.5\]"),
    (lambda: RectifiedFlow(t_max=1.5), r"schedule\.t_max=1\.5: must be a finite number in \[0\.5, 1\] \(1: pure noise"),
    (lambda: EDMSchedule(sigma_max=float("nan")), r"schedule\.sigma_max=nan: must be a finite number"),
    (lambda: EDMSchedule(sigma_min=50.0), r"schedule\.sigma_min=50\.0: must be a finite number in \[1e-06, 40\]"),
    (lambda: EDMSchedule(rho=0.5), r"schedule\.rho=0\.5: must be a finite number in \[1, 20\]"),
])
def test_continuous_schedule_settings_name_the_key(build, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


# ---- buffers ----


def test_buffers_non_persistent_float64_and_not_parameters() -> None:
    s = LinearSchedule(10)
    assert set(dict(s.named_buffers())) == set(BUFFERS)
    assert all(getattr(s, k).dtype == torch.float64 for k in BUFFERS)
    assert list(s.parameters()) == []
    assert s.state_dict() == {}
    parent = nn.Module()
    parent.schedule = s
    parent.lin = nn.Linear(2, 2)
    assert set(parent.state_dict()) == {"lin.weight", "lin.bias"}
    assert not any(n.startswith("schedule") for n, _ in parent.named_parameters())
    # the continuous schedules hold no tensors at all
    for c in (RectifiedFlow(), EDMSchedule()):
        assert list(c.buffers()) == [] and list(c.parameters()) == [] and c.state_dict() == {}


def test_buffers_move_with_to() -> None:
    s = CosineSchedule(10)
    expected = s.alphas_cumprod.clone()
    s.to(torch.float64)
    assert all(getattr(s, k).dtype == torch.float64 for k in BUFFERS)
    assert torch.equal(s.alphas_cumprod, expected)
    s.to("meta")  # a device move that needs no accelerator
    assert all(getattr(s, k).device.type == "meta" for k in BUFFERS)
    assert s.device.type == "meta"
    # the coefficients of a batch come on the batch's device whatever the schedule's
    t = torch.tensor([0.5, 1.0], dtype=torch.float64)
    a, sig = CosineSchedule(10).coefs(t, torch.zeros(2, 3, 4, 4, device="meta"))
    assert a.shape == sig.shape == (2, 1, 1, 1) and a.device.type == "meta" and a.dtype == torch.float64


# ---- VP levels: the grid exactly, log-linear between ----


@pytest.mark.parametrize("T", [2, 100, 1000])
@pytest.mark.parametrize("kind", KINDS)
def test_vp_level_at_grid_points_is_the_buffers_exactly(kind: str, T: int) -> None:
    """At t = (k + 1) / T: (alpha, sigma) are the float64 buffers bit for bit and the network's time input is exactly
    k, the 0-based step DDPM networks are trained with; t = 0 (level_at(-1)) is the clean image."""
    s = make(kind, T)
    t = grid(T)
    a, sig = s.alpha_sigma(t)
    assert a.dtype == sig.dtype == torch.float64
    assert torch.equal(a, s.sqrt_alphas_cumprod) and torch.equal(sig, s.sqrt_one_minus_alphas_cumprod)
    assert torch.equal(s.net_time(t), torch.arange(T).double())
    for k in {0, 1, T // 2, T - 1}:
        level = s.level_at(k)
        assert level == s.level((k + 1) / T)
        assert (level.alpha, level.sigma, level.net_t) == (s.sqrt_alphas_cumprod[k].item(),
                                                           s.sqrt_one_minus_alphas_cumprod[k].item(), float(k))
        assert not level.clean and level.edm_sigma == level.sigma / level.alpha
    clean = s.level_at(-1)
    assert clean.t == 0.0 and (clean.alpha, clean.sigma) == (1.0, 0.0) and clean.clean and clean.lam == math.inf
    assert (s.timesteps, s.t_min, s.t_max) == (T, 1 / T, 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_vp_between_grid_points_log_sigma_is_linear_in_t(kind: str) -> None:
    """For t between grid points k and k + 1: log(sigma / alpha) = (1 - f) log_sigmas[k] + f log_sigmas[k + 1] with
    f = t T - 1 - k, alpha^2 + sigma^2 = 1 (still VP), and the network's time input is the fractional step k + f.
    Rounding: sigma / alpha = exp(interpolated) to a few U64, its log to a few U64 times |log sigma|."""
    T = 100
    s = make(kind, T)
    k = torch.tensor([0, 0, 17, 50, 50, 98]).double()
    f = torch.tensor([0.25, 0.5, 0.5, 0.1, 0.9, 0.75], dtype=torch.float64)
    t = (k + 1 + f) / T
    a, sig = s.alpha_sigma(t)
    lo, hi = s.log_sigmas[k.long()], s.log_sigmas[k.long() + 1]
    scale = 8 * U64 * (1 + s.log_sigmas.abs().max())
    close((sig / a).log(), (1 - f) * lo + f * hi, atol=scale)
    close(a**2 + sig**2, torch.ones(6), atol=4 * U64)
    close(s.net_time(t), k + f, atol=4 * U64 * T)  # t T - 1: t's rounding times T
    # strictly between the neighbouring grid levels
    assert bool((sig > s.sqrt_one_minus_alphas_cumprod[k.long()]).all() and (sig < s.sqrt_one_minus_alphas_cumprod[k.long() + 1]).all())


@pytest.mark.parametrize("kind", KINDS)
def test_vp_t_of_sigma_inverts_alpha_sigma(kind: str) -> None:
    """t_of_sigma(sigma_t / alpha_t) = t: the grid points, fractional t between them, and sigmas outside the grid clamped
    to [t_min, t_max] = [1/T, 1]. The error in t is the error in log sigma (a few U64 times |log sigma|) over the
    log-sigma spacing of the grid, over T."""
    T = 100
    s = make(kind, T)
    t_tol = 8 * U64 * (1 + s.log_sigmas.abs().max()) / s.log_sigmas.diff().min() / T + 4 * U64
    t = grid(T)
    close(s.t_of_sigma(s.log_sigmas.exp()), t, atol=t_tol)
    frac = torch.tensor([0.0125, 0.2525, 0.505, 0.99875, 1.0], dtype=torch.float64)
    a, sig = s.alpha_sigma(frac)
    close(s.t_of_sigma(sig / a), frac, atol=t_tol)
    assert s.t_of_sigma(torch.tensor([1e-9, 1e9])).tolist() == [1 / T, 1.0]
    assert float(s.t_of_sigma(s.level(0.5).edm_sigma)) == pytest.approx(0.5, abs=float(t_tol))  # a Python float too


# the earlier integer-index API, kept here as the reference the levels are held to (difflab before t in [0, 1])


def old_vp_sigmas(s: VPSchedule) -> torch.Tensor:
    return s.sqrt_one_minus_alphas_cumprod / s.sqrt_alphas_cumprod


def old_sigma_to_t(s: VPSchedule, sigma: torch.Tensor) -> torch.Tensor:
    log_sigmas = old_vp_sigmas(s).log()
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log().clamp(log_sigmas[0], log_sigmas[-1])
    lo = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    return lo + (log_sigma - log_sigmas[lo]) / (log_sigmas[lo + 1] - log_sigmas[lo])


def old_signal_noise_at(s: VPSchedule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_sigma = old_vp_sigmas(s).log()
    t = t.double()
    lo = t.floor().long().clamp(0, len(log_sigma) - 2)
    sigma = (log_sigma[lo] + (t - lo) * (log_sigma[lo + 1] - log_sigma[lo])).exp()
    a = (1 + sigma**2).rsqrt()
    return a, sigma * a


@pytest.mark.parametrize("kind", KINDS)
def test_vp_keeps_the_old_integer_index_semantics(kind: str) -> None:
    """The old fractional step index u in [0, T-1] is t T - 1: sigma_to_t(s, sigma) == s.t_of_sigma(sigma) T - 1,
    signal_noise_at(s, u) == s.alpha_sigma((u + 1) / T), vp_sigmas(s) == s.log_sigmas.exp(). The two compute log sigma
    differently (log of a ratio of square roots vs half a difference of logs): a few U64 times |log sigma|, over the
    grid's log-sigma spacing for an index; t T - 1 adds t's rounding times T."""
    T = 1000
    s = make(kind, T)
    log_err = 8 * U64 * (1 + s.log_sigmas.abs().max())
    close(old_vp_sigmas(s).log(), s.log_sigmas, atol=log_err)
    sigmas = torch.tensor([1e-9, 0.02, 0.3, 1.0, 7.5, 60.0, 1e9], dtype=torch.float64)
    index_tol = 2 * log_err / s.log_sigmas.diff().min() + 4 * U64 * T
    close(s.t_of_sigma(sigmas) * T - 1, old_sigma_to_t(s, sigmas), atol=index_tol)
    u = torch.tensor([0.0, 0.25, 1.0, 99.5, 500.0, 998.75, 999.0], dtype=torch.float64)
    a, sig = s.alpha_sigma((u + 1) / T)
    a_old, sig_old = old_signal_noise_at(s, u)
    # index error (t's rounding times T) times the slope of log sigma, plus the log's difference
    log_tol = log_err + 4 * U64 * T * s.log_sigmas.diff().max()
    close(sig / a, sig_old / a_old, rtol=2 * log_tol)
    close(a, a_old, rtol=2 * log_tol)


# ---- continuous schedules: closed forms ----


def test_rectified_flow_closed_form() -> None:
    """alpha = 1 - t, sigma = t (exactly: one float64 subtraction); the network's time 1000 t; EDM's sigma t / (1 - t)
    and t_of_sigma = sigma / (1 + sigma) its inverse (2 roundings each way: relative 8 U64), clamped to [t_min, t_max]
    (inf -> 1: pure noise); ODE coordinates (1, t), so tau = t."""
    s = RectifiedFlow()
    assert (s.timesteps, s.t_min, s.t_max) == (None, 1e-3, 1.0)
    t = torch.tensor([0.0, 1e-3, 0.1, 0.25, 0.5, 0.9, 0.999, 1.0], dtype=torch.float64)
    a, sig = s.alpha_sigma(t)
    assert a.tolist() == [1 - x for x in t.tolist()] and sig.tolist() == t.tolist()
    assert s.net_time(t).tolist() == [1000.0 * x for x in t.tolist()]
    inner = t[1:-1]
    close(s.t_of_sigma(inner / (1 - inner)), inner, rtol=8 * U64)
    assert s.t_of_sigma(torch.tensor([1e-9, 0.0, math.inf])).tolist() == [1e-3, 1e-3, 1.0]
    for x in [0.3, 0.75, 1.0]:
        level = s.level(x)
        assert (level.t, level.alpha, level.sigma, level.net_t) == (x, 1 - x, x, 1000 * x)
        assert s.ode(level) == (1.0, x) and s.t_of_tau(x) == x
    assert s.level(1.0).edm_sigma == math.inf and s.level(1.0).lam == -math.inf
    clean = s.level(0.0)
    assert clean == Level(0.0, 1.0, 0.0, 0.0) and clean.clean
    narrow = RectifiedFlow(t_min=0.01, t_max=0.99)
    assert narrow.t_of_sigma(torch.tensor([1e-9, 1e9])).tolist() == [0.01, 0.99]


def test_edm_schedule_closed_form() -> None:
    """alpha = 1, sigma = sigma_max t^rho (EDM's rho-spaced levels are uniform steps in t), t_min = (sigma_min /
    sigma_max)^(1/rho); t_of_sigma = (sigma / sigma_max)^(1/rho) its inverse (pow's error divided by rho: relative
    8 U64), clamped; the network's time 1000 t; ODE coordinates EDM's own (alpha, sigma)."""
    s = EDMSchedule()
    assert (s.sigma_min, s.sigma_max, s.rho) == (0.002, 80.0, 7.0)
    assert s.t_min == pytest.approx((0.002 / 80) ** (1 / 7), rel=4 * U64) and s.t_max == 1.0
    t = torch.tensor([0.0, s.t_min, 0.3, 0.5, 0.8, 1.0], dtype=torch.float64)
    a, sig = s.alpha_sigma(t)
    assert a.tolist() == [1.0] * 6
    close(sig, [80 * x**7 for x in t.tolist()], rtol=8 * U64)
    assert s.level(s.t_min).sigma == pytest.approx(0.002, rel=16 * U64)
    assert s.level(1.0).sigma == 80.0
    close(s.t_of_sigma(sig[1:]), t[1:], rtol=8 * U64)
    assert s.t_of_sigma(torch.tensor([1e-9, 1e9])).tolist() == [s.t_min, 1.0]
    assert s.net_time(t).tolist() == [1000.0 * x for x in t.tolist()]
    level = s.level(0.5)
    assert s.ode(level) == (1.0, level.sigma) and s.t_of_tau(level.sigma) == pytest.approx(0.5, rel=8 * U64)
    clean = s.level(0.0)
    assert clean == Level(0.0, 1.0, 0.0, 0.0) and clean.clean
    other = EDMSchedule(sigma_min=0.01, sigma_max=10.0, rho=3.0)
    assert other.level(0.5).sigma == pytest.approx(10 * 0.5**3, rel=8 * U64)
    assert other.t_min == pytest.approx((0.01 / 10) ** (1 / 3), rel=4 * U64)


SCHEDULES = {"linear": lambda: LinearSchedule(100), "cosine": lambda: CosineSchedule(100), "flow": RectifiedFlow,
             "edm": EDMSchedule}


@pytest.mark.parametrize("name", SCHEDULES)
def test_ode_coordinates_are_straight_and_invertible(name: str) -> None:
    """Heun integrates y = x_t / scale = A x_0 + B eps in time tau (NoiseSchedule.ode): A = alpha / scale and
    B = sigma / scale must be affine in tau (straight trajectories for a fixed x_0 and eps), and t_of_tau(tau) = t.
    Checked by the slopes of A and B between three levels, equal to the rounding of the quotients (the level values
    are float64 to a few U64, divided by tau differences of order 0.1)."""
    s = SCHEDULES[name]()
    ts = [s.t_min + (s.t_max - s.t_min) * f for f in (0.3, 0.5, 0.7)]  # inside the range, away from pure noise
    # t_of_tau's error: the closed forms' 8 U64 relative; a VP grid's as in test_vp_t_of_sigma_inverts_alpha_sigma
    t_tol = (8 * U64 * (1 + float(s.log_sigmas.abs().max())) / float(s.log_sigmas.diff().min()) / s.timesteps + 4 * U64
             if s.timesteps else 8 * U64)
    coords = []
    for t in ts:
        level = s.level(t)
        scale, tau = s.ode(level)
        coords.append((tau, level.alpha / scale, level.sigma / scale))
        assert s.t_of_tau(tau) == pytest.approx(t, abs=t_tol)
    (t0, a0, b0), (t1, a1, b1), (t2, a2, b2) = coords
    assert t0 < t1 < t2
    slope_tol = 64 * U64 * (1 + max(abs(b0), abs(b1), abs(b2))) / min(t1 - t0, t2 - t1)
    assert (a1 - a0) / (t1 - t0) == pytest.approx((a2 - a1) / (t2 - t1), abs=slope_tol)
    assert (b1 - b0) / (t1 - t0) == pytest.approx((b2 - b1) / (t2 - t1), abs=slope_tol)
    assert s.level(0.0).clean and s.level(0.0).alpha == 1.0


@pytest.mark.parametrize("name", SCHEDULES)
def test_levels_increase_in_noise_with_t(name: str) -> None:
    """sigma / alpha strictly increases with t over [t_min, t_max] (samplers walk decreasing t as decreasing noise)."""
    s = SCHEDULES[name]()
    t = torch.linspace(s.t_min, s.t_max, 257, dtype=torch.float64)
    a, sig = s.alpha_sigma(t)
    ratio = sig / a
    assert bool((ratio[1:] > ratio[:-1]).all())
    assert isinstance(s, NoiseSchedule)


def test_coefs_gather_per_row_and_broadcast() -> None:
    """coefs (the old extract): row b's (alpha, sigma) at t[b], float64, shaped (B, 1, ..., 1) for x's number of dims."""
    s = LinearSchedule(3)
    t = torch.tensor([3 / 3, 1 / 3], dtype=torch.float64)  # grid points 2 and 0
    for shape in [(2, 5, 6, 7), (2, 5)]:
        a, sig = s.coefs(t, torch.zeros(shape))
        assert a.shape == sig.shape == (2, *[1] * (len(shape) - 1)) and a.dtype == torch.float64
        assert a.flatten().tolist() == s.sqrt_alphas_cumprod[[2, 0]].tolist()
        assert sig.flatten().tolist() == s.sqrt_one_minus_alphas_cumprod[[2, 0]].tolist()
