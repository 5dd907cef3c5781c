"""Objectives: what a network predicts (eps, x0, v, EDM's F, flow matching's velocity) and how its output reads back as
x_0 and eps on every schedule, min-SNR-gamma weighting, EDM's preconditioning, the draws of t (uniform, logit-normal,
log-normal), the configs that choose them, and the objective a model is trained and sampled with.

Float32 round trips are held to 16 U32 (U32 = 2^-24; the coefficients rounded once, x_t's products and sum, the target,
the read-back: fewer than 16 roundings) times the conditioning of reading x_0 (eps) from x_t: 1 + sigma/alpha for an
eps-predictor's x_0 (x_0 = (x_t - sigma eps) / alpha), 1 + alpha/sigma for eps from an x_0 estimate, 1 where the output
carries it directly (v, flow, EDM's x_0). Statistics are held to 5 standard errors, with a fixed seed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra.utils import instantiate

from difflab.errors import ConfigError
from difflab.model import DiffusionModel
from difflab.objectives import (
    EDMPreconditioning,
    EpsPrediction,
    FlowMatching,
    LogitNormal,
    LogNormal,
    MinSNR,
    Uniform,
    UniformTime,
    VPrediction,
    X0Prediction,
)
from difflab.samplers import DDIMSampler, EulerSampler, HeunSampler, UniPCSampler
from difflab.sampling import SamplingSpec, generate
from difflab.schedules import CosineSchedule, EDMSchedule, LinearSchedule, RectifiedFlow

from support import U32, compose_cfg

U64 = torch.finfo(torch.float64).eps / 2
PREDICTIONS = {"eps": EpsPrediction, "x0": X0Prediction, "v": VPrediction}
OBJECTIVES = {**PREDICTIONS, "edm": EDMPreconditioning, "flow": FlowMatching}
SCHEDULES = {"linear": lambda: LinearSchedule(1000), "cosine": lambda: CosineSchedule(1000), "flow": RectifiedFlow,
             "edm": EDMSchedule}


def draws(seed: int = 0, b: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 4, 4, generator=g) * 2 - 1, torch.randn(b, 3, 4, 4, generator=g)


def times(s) -> torch.Tensor:
    """Four levels across a schedule's range, its ends included: a T-step grid's k = 0, 10, T/2, T-1."""
    if s.timesteps:
        T = s.timesteps
        return (torch.tensor([0, 10, T // 2, T - 1]) + 1).double() / T
    return torch.tensor([s.t_min, 0.3, 0.7, s.t_max], dtype=torch.float64)


def accepted(objective: str, schedule: str):
    """The objective and a schedule it reads: eps-prediction cannot read x_0 at alpha = 0 (rectified flow's t = 1), so
    it gets the fix its error names, schedule.t_max=0.999."""
    obj = OBJECTIVES[objective]()
    s = SCHEDULES[schedule]()
    if objective == "eps" and schedule == "flow":
        s = RectifiedFlow(t_max=0.999)
    obj.check(s)
    return obj, s


def gains(objective: str, a, s):
    """(x_0's, eps's) error per 16 U32 (|x_0| + |eps|) of reading a perfect output back (see the module docstring); 0:
    the output is that quantity itself, bit for bit."""
    one = torch.ones_like(a) if isinstance(a, torch.Tensor) else 1.0
    if objective == "eps":
        return 1 + s / a, 0 * one
    if objective == "x0":
        return 0 * one, 1 + a / s
    return one, 1 + a / s if objective == "edm" else one


def within(actual: torch.Tensor, expected: torch.Tensor, gain, size: torch.Tensor) -> None:
    err = (actual.double() - expected.double()).abs()
    bound = 16 * U32 * gain * size
    if not bool((gain == 0).all() if isinstance(gain, torch.Tensor) else gain == 0):
        assert bool((err <= bound).all()), f"error {float(err.max()):.3g} over bound {float((err / bound).max()):.3g}x"
    else:
        assert torch.equal(actual, expected)


# ---- reading a perfect output back ----


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_perfect_output_reads_back_as_x0_and_eps(objective: str, schedule: str) -> None:
    """target(x_0, eps) fed to denoised(x_t) gives back x_0 and eps, for every objective on every schedule it accepts,
    as a training batch reads it (float64 (B, 1, 1, 1) coefficients) and as a sampler does (a Level's Python floats,
    through objective.denoiser); a perfect network's loss is exactly 0."""
    obj, s = accepted(objective, schedule)
    x0, noise = draws()
    t = times(s)
    a, sig = s.coefs(t, x0)
    x_t = s.add_noise(x0, t, noise)
    target = obj.target(x0, noise, a, sig)
    assert target.dtype == torch.float32 and target.shape == x0.shape
    den = obj.denoised(x_t, target, a, sig)
    g_x0, g_eps = gains(objective, a, sig)
    size = x0.abs() + noise.abs()
    within(den.x0, x0, g_x0, size)
    within(den.eps, noise, g_eps, size)
    assert float(obj.loss(lambda inp, net_t: target, s, x0, t, noise).abs().max()) == 0.0
    for i, ti in enumerate(t.tolist()):
        level = s.level(ti)
        seen = {}

        def output(inp, lv, i=i, seen=seen):
            seen.update(inp=inp, level=lv)
            return target[i:i + 1]

        den = obj.denoiser(output)(x_t[i:i + 1], level)
        assert seen["level"] is level
        torch.testing.assert_close(seen["inp"], obj.net_input(x_t[i:i + 1], a[i], sig[i]), rtol=2 * U32, atol=0)
        g_x0, g_eps = gains(objective, level.alpha, level.sigma)
        within(den.x0, x0[i:i + 1], g_x0, size[i:i + 1])
        within(den.eps, noise[i:i + 1], g_eps, size[i:i + 1])


@pytest.mark.parametrize("objective", PREDICTIONS)
def test_vp_targets_closed_forms(objective: str) -> None:
    """On a VP schedule: eps, x_0, v = sqrt(ab) eps - sqrt(1 - ab) x_0 (Salimans & Ho), with the schedule's buffers;
    off VP, v is that of x_t / r, r = sqrt(alpha^2 + sigma^2) (rectified flow at t = 0.5: r = 1/sqrt(2)). float32: two
    products and a difference of terms <= |eps| + |x_0|."""
    x0, noise = draws()
    obj = PREDICTIONS[objective]()
    s = LinearSchedule(1000)
    k = torch.tensor([0, 10, 500, 999])
    a = s.sqrt_alphas_cumprod[k].reshape(-1, 1, 1, 1)
    sig = s.sqrt_one_minus_alphas_cumprod[k].reshape(-1, 1, 1, 1)
    expected = {"eps": noise, "x0": x0, "v": (a * noise - sig * x0).float()}[objective]
    got = obj.target(x0, noise, *s.coefs((k + 1).double() / 1000, x0))
    torch.testing.assert_close(got, expected, rtol=0, atol=4 * U32 * float((x0.abs() + noise.abs()).max()))
    flow = RectifiedFlow()
    a, sig = flow.coefs(torch.full((4,), 0.5, dtype=torch.float64), x0)
    r = math.sqrt(0.5)
    expected = {"eps": noise, "x0": x0, "v": 0.5 / r * noise - 0.5 / r * x0}[objective]
    torch.testing.assert_close(obj.target(x0, noise, a, sig), expected, rtol=0, atol=4 * U32 * float((x0.abs() + noise.abs()).max()))


def test_flow_matching_target_is_the_velocity() -> None:
    """u = eps - x_0 on any schedule (the time derivative of x_t = (1 - t) x_0 + t eps on rectified flow, checked by a
    central difference of add_noise in float64: exact for a straight line up to rounding); the network sees x_t as it is."""
    x0, noise = draws()
    obj = FlowMatching()
    for s in (RectifiedFlow(), LinearSchedule(100), EDMSchedule()):
        t = times(s)
        a, sig = s.coefs(t, x0)
        assert torch.equal(obj.target(x0, noise, a, sig), noise - x0)
        x_t = s.add_noise(x0, t, noise)
        assert torch.equal(obj.net_input(x_t, a, sig), x_t)
    s, h = RectifiedFlow(), 1e-3
    t = torch.full((4,), 0.4, dtype=torch.float64)
    x0d, nd = x0.double(), noise.double()
    velocity = (s.add_noise(x0d, t + h, nd) - s.add_noise(x0d, t - h, nd)) / (2 * h)
    torch.testing.assert_close(velocity, nd - x0d, rtol=0, atol=8 * U64 * float((x0d.abs() + nd.abs()).max()) / h)
    assert isinstance(obj.time, UniformTime) and isinstance(obj.weighting, Uniform)


def test_eps_prediction_refuses_pure_noise_with_the_fix() -> None:
    """alpha(t_max) = 0 (rectified flow's t = 1): x_0 = (x_t - sigma eps) / alpha does not exist. Refused when the
    model is built, naming the objectives that work and the schedule setting that avoids it; the others accept it."""
    fix = r"objective=eps cannot recover x_0 where alpha = 0.*use objective=flow, v or x0.*schedule\.t_max=0\.999"
    with pytest.raises(ConfigError, match=fix):
        EpsPrediction().check(RectifiedFlow())
    with pytest.raises(ConfigError, match=fix):
        DiffusionModel(torch.nn.Linear(1, 1), RectifiedFlow(), EpsPrediction())
    EpsPrediction().check(RectifiedFlow(t_max=0.999))
    for name in ("x0", "v", "edm", "flow"):
        OBJECTIVES[name]().check(RectifiedFlow())
    for s in (LinearSchedule(10), CosineSchedule(10), EDMSchedule()):
        EpsPrediction().check(s)


# ---- min-SNR weighting ----


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_min_snr_is_min_snr_gamma_in_the_units_of_the_target(objective: str, schedule: str) -> None:
    """Min-SNR-gamma weights the x_0 error by min(SNR, gamma) (Hang et al.); on an objective's own MSE that is
    min(SNR, gamma) / x0_units, with x0_units = |d target|^2 / |d x_0|^2 at a fixed x_t. x0_units is checked against a
    finite difference of the read-back, in float64: perturbing the output by d moves x_0 by denoised(x_t, out + d).x0 -
    denoised(x_t, out).x0 (linear in the output, so exact up to rounding: 16 U64 of |x_0| at each end, over |d x_0|).
    The weight is float32 (one more U32)."""
    obj, s = accepted(objective, schedule)
    t = times(s)
    a, sig = s.alpha_sigma(t)
    a4, s4 = a.reshape(-1, 1, 1, 1), sig.reshape(-1, 1, 1, 1)
    g = torch.Generator().manual_seed(1)
    x, out, d = (torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    x0_1, x0_2 = obj.denoised(x, out, a4, s4).x0, obj.denoised(x, out + d, a4, s4).x0
    dx0 = x0_2 - x0_1
    fd = d.pow(2).flatten(1).sum(1) / dx0.pow(2).flatten(1).sum(1)
    tol = 2 * 16 * U64 * (x0_1.abs() + x0_2.abs()).flatten(1).norm(dim=1) / dx0.flatten(1).norm(dim=1) + 4 * U64
    units = obj.x0_units(a, sig)
    assert units.shape == (4,) and bool(((units - fd).abs() <= tol * fd).all()), (units, fd)
    snr = (a / sig) ** 2
    for gamma in (5.0, 0.5):
        w = MinSNR(gamma)(obj, a, sig)
        assert w.dtype == torch.float32 and w.shape == (4,)
        expected = snr.clamp(max=gamma) / fd
        assert bool(((w.double() - expected).abs() <= (tol + 2 * U32) * expected).all()), (w, expected)
    assert torch.equal(Uniform()(obj, a, sig), torch.ones(4))


def test_min_snr_weights_match_diffusers_compute_snr() -> None:
    """diffusers' compute_snr (min-SNR's reference training code) on our alpha_bar: eps min(SNR, 5) / SNR, v
    min(SNR, 5) / (SNR + 1), x0 min(SNR, 5). compute_snr rounds sqrt(ab), sqrt(1 - ab) to float32 and squares their
    ratio in float32 (7 U32), our weight is rounded once: 8 U32."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    s = LinearSchedule(1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    ref.alphas_cumprod = s.alphas_cumprod  # its float32 ab loses 1 - ab's digits at k = 0
    k = torch.tensor([0, 3, 100, 250, 500, 999])
    snr = compute_snr(ref, k).double()
    a, sig = s.alpha_sigma((k + 1).double() / 1000)
    gamma = 5.0
    expected = {"eps": snr.clamp(max=gamma) / snr, "v": snr.clamp(max=gamma) / (snr + 1), "x0": snr.clamp(max=gamma)}
    for prediction, w in expected.items():
        got = MinSNR(gamma)(PREDICTIONS[prediction](), a, sig).double()
        torch.testing.assert_close(got, w, rtol=8 * U32, atol=0)
    assert torch.equal(Uniform()(VPrediction(), a, sig), torch.ones(6))
    # eps with min-SNR: weight 1 where SNR <= 5 (high noise), gamma / SNR below: small t count less
    w = MinSNR()(EpsPrediction(), a, sig)
    assert w[-1] == 1 and w[0] < 0.01


# ---- EDM's preconditioning ----


def test_edm_preconditioning_is_karras_table_1_on_any_schedule() -> None:
    """On EDM's own schedule (alpha = 1) the coefficients on x_t are Karras et al.'s Table 1 at sigma_data = 0.5:
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2). On a VP
    schedule they act on x_t = alpha x: c_skip / alpha, c_out, c_in / alpha at EDM's sigma = sigma_t / alpha_t. float64:
    a few roundings each (16 U64)."""
    obj = EDMPreconditioning()
    sd2 = 0.25
    for s in (EDMSchedule(), LinearSchedule(1000)):
        a, sig = s.alpha_sigma(times(s))
        sigma = sig / a
        c_skip, c_out, c_in = obj.coefs(a, sig)
        torch.testing.assert_close(c_skip, sd2 / (sigma**2 + sd2) / a, rtol=16 * U64, atol=0)
        torch.testing.assert_close(c_out, sigma * 0.5 / (sigma**2 + sd2).sqrt(), rtol=16 * U64, atol=0)
        torch.testing.assert_close(c_in, (sigma**2 + sd2).rsqrt() / a, rtol=16 * U64, atol=0)
    # the loss of a perfect F, and the samplers' view: x_t = sqrt(ab) x_0 + sqrt(1 - ab) n reads back as n
    s = LinearSchedule(1000)
    x0, noise = draws(2)
    t = times(s)
    a, sig = s.coefs(t, x0)
    perfect = obj.target(x0, noise, a, sig)
    c_skip, c_out, c_in = obj.coefs(a, sig)
    # the F that makes D(x; sigma) = x_0 in EDM's own variable x = x_t / alpha = x_0 + sigma n: (x_0 - c_skip(sigma) x) /
    # c_out, with c_skip(sigma) = alpha c_skip (float64 here; float32 there: 16 U32 of |x_0| + |n| over c_out)
    x0d, nd = x0.double(), noise.double()
    F = (x0d - (c_skip * a) * (x0d + sig / a * nd)) / c_out
    torch.testing.assert_close(perfect.double(), F, rtol=0, atol=16 * U32 * float(((x0d.abs() + nd.abs()) / c_out).max()))
    assert float(obj.loss(lambda inp, net_t: perfect, s, x0, t, noise).max()) == 0.0
    den = obj.denoiser(lambda inp, level: perfect[1:2])(s.add_noise(x0, t, noise)[1:2], s.level(float(t[1])))
    within(den.eps, noise[1:2], 1 + float(a[1] / sig[1]), x0[1:2].abs() + noise[1:2].abs())


def test_edm_preconditioning_draws_its_levels_log_normally_by_default() -> None:
    obj = EDMPreconditioning(p_mean=-0.5, p_std=2.0)
    assert isinstance(obj.time, LogNormal) and (obj.time.p_mean, obj.time.p_std) == (-0.5, 2.0)
    assert isinstance(EDMPreconditioning(time=LogitNormal()).time, LogitNormal)
    assert isinstance(EpsPrediction().time, UniformTime) and isinstance(FlowMatching().time, UniformTime)


# ---- the draws of t ----


def normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def clamped_normal(mu: float, sd: float, lo: float, hi: float) -> tuple[float, float]:
    """Mean and standard deviation of clamp(N(mu, sd^2), lo, hi) (lo may be -inf, hi inf): with a, b the standardised
    ends, E = a Phi(a) + phi(a) - phi(b) + b (1 - Phi(b)), E2 = a^2 Phi(a) + Phi(b) - Phi(a) + a phi(a) - b phi(b) +
    b^2 (1 - Phi(b))."""
    a, b = (lo - mu) / sd, (hi - mu) / sd

    def phi(z: float) -> float:
        return math.exp(-z * z / 2) / math.sqrt(2 * math.pi) if math.isfinite(z) else 0.0

    def times(z: float, p: float) -> float:  # z * p, 0 where z is infinite and p 0
        return z * p if math.isfinite(z) else 0.0

    pa, pb = normal_cdf(a), 1 - normal_cdf(b)
    m1 = times(a, pa) + phi(a) - phi(b) + times(b, pb)
    m2 = times(a * a if math.isfinite(a) else a, pa) + (1 - pa - pb) + times(a, phi(a)) - times(b, phi(b)) \
        + times(b * b if math.isfinite(b) else b, pb)
    return mu + sd * m1, sd * math.sqrt(m2 - m1 * m1)


def check_normal(values: torch.Tensor, mu: float, sd: float, lo: float, hi: float) -> None:
    """The sample's mean and std against the clamped normal's, within 5 standard errors: sd / sqrt(N) for the mean,
    sd / sqrt(2 (N - 1)) for the std (a normal's; clamping only lightens the tails)."""
    n = values.numel()
    mean, std = clamped_normal(mu, sd, lo, hi)
    assert float(values.mean()) == pytest.approx(mean, abs=5 * sd / math.sqrt(n))
    assert float(values.std()) == pytest.approx(std, abs=5 * sd / math.sqrt(2 * (n - 1)))


def binomial_bound(n: int, p: float) -> float:
    """5 standard deviations of a Binomial(n, p) count."""
    return 5 * math.sqrt(n * p * (1 - p))


def test_uniform_time_draws_each_grid_point_equally_on_a_vp_schedule() -> None:
    """UniformTime on a T-step schedule: t = (k + 1) / T exactly, each k with probability 1 / T: each of the T counts
    within 5 binomial standard deviations of N / T (a fixed seed; a fair draw fails a bin with probability < 6e-6)."""
    T, N = 10, 20000
    s = LinearSchedule(T)
    torch.manual_seed(0)
    t = EpsPrediction(time=UniformTime()).sample_t(s, N, "cpu")
    assert t.dtype == torch.float64 and t.shape == (N,)
    k = (t * T).round().long() - 1
    assert torch.equal(t, (k + 1).double() / T)
    counts = torch.bincount(k, minlength=T)
    assert counts.numel() == T and bool(((counts - N / T).abs() <= binomial_bound(N, 1 / T)).all()), counts


@pytest.mark.parametrize("s", [RectifiedFlow(t_min=0.05, t_max=0.95), EDMSchedule()], ids=["flow", "edm"])
def test_uniform_time_is_uniform_on_a_continuous_schedule(s) -> None:
    """UniformTime on a continuous schedule: U(t_min, t_max): inside the range, and 10 equal bins each within 5 binomial
    standard deviations of N / 10."""
    N = 20000
    torch.manual_seed(1)
    t = UniformTime().sample(s, N, "cpu")
    assert t.dtype == torch.float64 and float(t.min()) >= s.t_min and float(t.max()) <= s.t_max
    counts = torch.histc(t, bins=10, min=s.t_min, max=s.t_max)
    assert bool(((counts - N / 10).abs() <= binomial_bound(N, 0.1)).all()), counts


def test_logit_normal_time() -> None:
    """LogitNormal(loc, scale): logit(t) ~ N(loc, scale^2), here on rectified flow's [1e-3, 1] (clamping at
    logit(1e-3) = -6.9 is 9 standard deviations out); on a narrow range [0.3, 0.7] it is clamped: every draw inside, and
    the mass at each end is the normal's tail beyond it (binomial bounds)."""
    N = 20000
    torch.manual_seed(2)
    s = RectifiedFlow()
    t = LogitNormal(loc=0.5, scale=0.8).sample(s, N, "cpu")
    assert t.dtype == torch.float64 and float(t.min()) >= s.t_min and float(t.max()) <= s.t_max
    logit = (t / (1 - t)).log()
    check_normal(logit, 0.5, 0.8, math.log(s.t_min / (1 - s.t_min)), math.inf)
    narrow = RectifiedFlow(t_min=0.3, t_max=0.7)
    t = FlowMatching(time=LogitNormal(loc=0.0, scale=2.0)).sample_t(narrow, N, "cpu")
    assert float(t.min()) == 0.3 and float(t.max()) == 0.7
    edge = math.log(0.3 / 0.7)  # logit(0.3) = -logit(0.7)
    p = normal_cdf(edge / 2.0)
    for end in (0.3, 0.7):
        assert abs(int((t == end).sum()) - N * p) <= binomial_bound(N, p)


@pytest.mark.parametrize("name", ["linear", "flow"])
def test_log_normal_time(name: str) -> None:
    """LogNormal (EDM's default, Karras et al.): ln(sigma_t / alpha_t) ~ N(p_mean, p_std^2) clamped to the schedule's
    range: [sigma_0, sigma_{T-1}] = [0.01, 157] on the linear VP grid, [t_min / (1 - t_min), inf) on rectified flow; read
    back from the drawn t through alpha_sigma."""
    N = 20000
    torch.manual_seed(3)
    if name == "linear":
        s = LinearSchedule(1000)
        t = EDMPreconditioning().sample_t(s, N, "cpu")  # the old EDM objective's draws: p_mean -1.2, p_std 1.2
        mu, sd, lo, hi = -1.2, 1.2, float(s.log_sigmas[0]), float(s.log_sigmas[-1])
    else:
        s = RectifiedFlow()
        mu, sd, lo, hi = 0.3, 0.9, math.log(1e-3 / (1 - 1e-3)), math.inf
        t = FlowMatching(time=LogNormal(p_mean=mu, p_std=sd)).sample_t(s, N, "cpu")
    assert t.dtype == torch.float64 and float(t.min()) >= s.t_min and float(t.max()) <= s.t_max
    a, sig = s.alpha_sigma(t)
    check_normal((sig / a).log(), mu, sd, lo, hi)


# ---- the configs ----


@pytest.mark.parametrize("overrides,schedule,objective,time", [
    (["objective=flow"], "RectifiedFlow", "FlowMatching", "UniformTime"),
    (["objective=flow", "objective/time=logit_normal"], "RectifiedFlow", "FlowMatching", "LogitNormal"),
    (["objective=flow", "objective/time=log_normal"], "RectifiedFlow", "FlowMatching", "LogNormal"),
    (["objective=flow", "schedule=cosine"], "CosineSchedule", "FlowMatching", "UniformTime"),
    (["experiment=sprites_5min", "objective=flow"], "RectifiedFlow", "FlowMatching", "UniformTime"),
    (["experiment=sprites_5min"], "CosineSchedule", "VPrediction", "UniformTime"),
    (["objective=edm"], "LinearSchedule", "EDMPreconditioning", "LogNormal"),
])
def test_configs_compose_objective_schedule_and_time(tmp_path, overrides, schedule, objective, time) -> None:
    """objective=flow brings schedule=flow (difflab.schedules.RectifiedFlow) unless the command line names a schedule,
    also over an experiment's default schedule; objective/time= picks the draws of t."""
    cfg = compose_cfg(overrides, tmp_path)
    assert cfg.schedule._target_ == f"difflab.schedules.{schedule}"
    assert cfg.objective._target_ == f"difflab.objectives.{objective}"
    obj, s = instantiate(cfg.objective), instantiate(cfg.schedule)
    assert type(obj).__name__ == objective and type(s).__name__ == schedule and type(obj.time).__name__ == time
    if time == "LogitNormal":
        assert (obj.time.loc, obj.time.scale) == (0.0, 1.0)
    obj.check(s)


# ---- sampling a perfect predictor ----


class Oracle(torch.nn.Module):
    """A network that outputs, in its objective's parametrisation, the truth for one known x_0: at the level whose
    net_t it is given (looked up among the plan's levels, so the coefficients are the level's own), with
    eps = (x_t - alpha x_0) / sigma from its input x_t scaled as the objective scales it."""

    in_channels, image_size, num_classes = 3, 4, 0

    def __init__(self, objective, x0: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.objective, self.x0, self.levels = objective, x0, {}

    def forward(self, x_in, t, context=None, keep=None):
        level = self.levels[float(t[0])]
        a, s = level.alpha, level.sigma
        x_t = x_in / self.objective.net_input(torch.ones(()), a, s)
        eps = (x_t - a * self.x0) / s
        return self.objective.target(self.x0.expand_as(x_t), eps, a, s)


SAMPLERS = {"ddim": lambda: DDIMSampler(10, clip_x0=False), "heun": lambda: HeunSampler(8),
            "unipc": lambda: UniPCSampler(6, clip_x0=False), "euler": lambda: EulerSampler(8)}


@pytest.mark.parametrize("schedule", ["linear", "flow", "edm"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_sampling_a_perfect_predictor_of_any_kind_lands_on_x0(objective: str, schedule: str) -> None:
    """For one known x_0 the probability-flow ODE is the straight x_t = alpha_t x_0 + sigma_t z: DDIM (eta 0), Heun,
    UniPC and Euler all end on that x_0, through the objective's read-back, on every schedule it accepts.

    The last steps read x_0 from the output (a multistep solver combines up to a few of them with weights summing to
    about 2: x 4): 4 x 16 U32 times the largest read-back gain on the grid (see the module docstring), times
    |x_0| + |eps| with eps = z, the first draw, |z| < 6 (96 standard normal draws: P(|z| >= 6) < 2e-7)."""
    obj, s = accepted(objective, {"linear": "linear", "flow": "flow", "edm": "edm"}[schedule])
    if schedule == "linear":
        s = LinearSchedule(200)
    x0 = draws(1, 2)[0]
    oracle = Oracle(obj, x0)
    model = DiffusionModel(oracle, s, obj)
    for name, make in SAMPLERS.items():
        plan = SamplingSpec(make(), guidance=0, precision="32", palette=None).bind(model)
        oracle.levels = {float(torch.tensor(lv.net_t, dtype=torch.float32)): lv for lv in plan.levels[:-1]}
        assert len(oracle.levels) == len(plan.levels) - 1  # each level its own network time
        out = generate(plan, None, 2).images
        # the sampler's own arithmetic (x_s = alpha_s x_0 + sigma_s eps, the solvers' combinations) rounds too: gain >= 1
        gain = max(max(float(gains(objective, lv.alpha, lv.sigma)[0]), 1.0) if lv.alpha > 0 else 1.0 for lv in plan.levels[:-1])
        size = float(x0.abs().max()) + 6
        err = float((out - x0).abs().max())
        assert err <= 4 * 16 * U32 * gain * size, (name, err)


def test_binding_a_bare_network_is_refused_by_name() -> None:
    """The samplers read a network only through a DiffusionModel's objective: binding a bare network says so."""
    spec = SamplingSpec(DDIMSampler(4), guidance=0, precision="32", palette=None)
    with pytest.raises(TypeError, match="DiffusionModel"):
        spec.bind(torch.nn.Linear(1, 1))


def test_bad_objective_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match="objective.weighting.gamma=0: must be a finite number >= 1e-06"):
        MinSNR(0)
    with pytest.raises(ConfigError, match="objective.sigma_data=-1: must be a finite number"):
        EDMPreconditioning(sigma_data=-1)
    with pytest.raises(ConfigError, match=r"objective.time.scale=0: must be a finite number >= 0.001 \(SD3: 1\)"):
        LogitNormal(scale=0)
    with pytest.raises(ConfigError, match=r"objective.p_std=-1: must be a finite number >= 1e-06 \(EDM: 1.2\)"):
        LogNormal(p_std=-1)


# ---- training and sampling with the saved objective ----

TRAIN = ["model=unet_tiny", "debug=fast", "~callbacks.sample_grid", "~callbacks.progress_bar", "trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("objective,kind", [("v_min_snr", (VPrediction, MinSNR)), ("x0", (X0Prediction, Uniform)),
                                            ("edm", (EDMPreconditioning, Uniform))])
def test_training_saves_the_objective_and_samples_from_it(tmp_path, objective, kind) -> None:
    from difflab.model import load_model
    from difflab.sample import sample
    from difflab.train import train

    cfg = compose_cfg([*TRAIN, f"objective={objective}", "timesteps=50"], tmp_path / "run")
    train(cfg)
    obj = load_model(tmp_path / "run").objective
    assert (type(obj), type(obj.weighting)) == kind
    files = sample(compose_cfg([f"ckpt={tmp_path / 'run'}", "n=2", "steps=3", "gif=false", "device=cpu"], tmp_path / "s", "sample"))
    assert files["grid"].is_file()


def test_flow_matching_trains_and_samples_with_euler_and_heun(tmp_path) -> None:
    """python train.py objective=flow: a tiny run saves FlowMatching on RectifiedFlow, and sample.py draws from it with
    sampler=euler and sampler=heun (3 steps each), recording the sampler it used."""
    from difflab.checkpoint import load_checkpoint
    from difflab.model import load_model
    from difflab.sample import sample
    from difflab.train import train

    train(compose_cfg([*TRAIN, "objective=flow"], tmp_path / "run"))
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["difflab_config"]
    assert saved["objective"]["_target_"] == "difflab.objectives.FlowMatching"
    assert saved["schedule"]["_target_"] == "difflab.schedules.RectifiedFlow"
    model = load_model(tmp_path / "run")
    assert type(model.objective) is FlowMatching and type(model.schedule) is RectifiedFlow
    assert isinstance(model.objective.time, UniformTime)
    for sampler in ("euler", "heun"):
        files = sample(compose_cfg([f"ckpt={tmp_path / 'run'}", f"sampler={sampler}", "n=2", "steps=3", "gif=false",
                                    "device=cpu"], tmp_path / sampler, "sample"))
        assert files["grid"].is_file()
        meta = json.loads(files["meta"].read_text())
        assert (meta["sampler"], meta["steps"]) == (sampler, 3)


# ---- checkpoints and models ----


def test_checkpoints_of_earlier_versions_keep_their_objective() -> None:
    """Configs saved before the objectives were classes name one class with string switches; loading maps them, and the
    mapped nodes build today's objectives."""
    from difflab.checkpoint import PRETRAINED, load_checkpoint, upgraded

    def objective(node):
        return upgraded({"objective": node} if node else {})["objective"]

    v = objective({"_target_": "difflab.objectives.Objective", "prediction": "v", "weighting": "min_snr", "snr_gamma": 3.0})
    assert v == {"_target_": "difflab.objectives.VPrediction", "weighting": {"_target_": "difflab.objectives.MinSNR", "gamma": 3.0}}
    x0 = objective({"_target_": "difflab.objectives.Objective", "prediction": "x0", "weighting": "uniform", "snr_gamma": 5.0})
    assert x0 == {"_target_": "difflab.objectives.X0Prediction", "weighting": {"_target_": "difflab.objectives.Uniform"}}
    eps = objective(None)
    assert eps["_target_"] == "difflab.objectives.EpsPrediction"  # from before objectives were saved
    edm = objective({"_target_": "difflab.objectives.EDM", "sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2})
    assert edm == {"_target_": "difflab.objectives.EDMPreconditioning", "sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2}
    current = {"_target_": "difflab.objectives.EpsPrediction", "weighting": {"_target_": "difflab.objectives.Uniform"}}
    assert objective(current) == current
    flow = {"_target_": "difflab.objectives.FlowMatching", "weighting": {"_target_": "difflab.objectives.Uniform"},
            "time": {"_target_": "difflab.objectives.LogitNormal", "loc": 0.0, "scale": 1.0}}
    assert objective(flow) == flow
    built = {name: instantiate(node) for name, node in (("v", v), ("x0", x0), ("eps", eps), ("edm", edm))}
    assert isinstance(built["v"], VPrediction) and built["v"].weighting.gamma == 3.0
    assert isinstance(built["x0"], X0Prediction) and isinstance(built["eps"], EpsPrediction)
    assert isinstance(built["edm"], EDMPreconditioning) and isinstance(built["edm"].time, LogNormal)
    assert (built["edm"].time.p_mean, built["edm"].time.p_std) == (-1.2, 1.2)
    # the shipped model was saved with the old form: it loads as v-prediction with min-SNR-5
    saved = torch.load(PRETRAINED, map_location="cpu", weights_only=True)["difflab_config"]["objective"]
    assert saved["_target_"] == "difflab.objectives.Objective" and saved["prediction"] == "v"
    assert load_checkpoint(PRETRAINED)["difflab_config"]["objective"]["_target_"] == "difflab.objectives.VPrediction"


def test_a_network_is_sampled_only_with_its_own_objective() -> None:
    """The samplers get x_0 and eps only from a DiffusionModel, read by the objective the model carries: a bare network
    is refused, and a v-predicting network's denoiser returns eps = sigma x_t + alpha v and x_0 = alpha x_t - sigma v,
    not v (float32: two products and a sum, 4 U32 of the terms)."""
    from difflab.nn.unet import UNet

    torch.manual_seed(0)
    net = UNet(image_size=4, base_channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_classes=0,
               norm_groups=4).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the zero-initialised output conv would make v = eps = 0
    s = LinearSchedule(100)
    spec = SamplingSpec(DDIMSampler(4), guidance=0, precision="32", palette=None)
    with pytest.raises(TypeError, match="generate samples a SamplingPlan.*DiffusionModel"):
        generate(net, None, 2)
    x_t = draws(1)[0]
    denoise = DiffusionModel(net, s, VPrediction()).denoiser()
    apart = 0.0
    for k in (5, 30, 60, 99):
        level = s.level_at(k)
        a, sig = level.alpha, level.sigma
        with torch.no_grad():
            v = net(x_t, torch.full((4,), float(k)))
            den = denoise(x_t, level)
        bound = 4 * U32 * (sig * x_t.abs() + a * v.abs())
        assert bool(((den.eps - (sig * x_t + a * v)).abs() <= bound).all())
        assert bool(((den.x0 - (a * x_t - sig * v)).abs() <= 4 * U32 * (a * x_t.abs() + sig * v.abs())).all())
        apart = max(apart, float((den.eps - v).abs().max()))
    assert apart > 0.1
    as_v, as_eps = (generate(spec.bind(DiffusionModel(net, s, obj)), None, 2).images for obj in (VPrediction(), EpsPrediction()))
    assert (as_v - as_eps).abs().max() > 0.1  # the objective decides the samples
