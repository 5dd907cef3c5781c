"""Where a sampler's steps fall: a decreasing list of t in (0, t_max], the clean image (t = 0) appended by the sampler.

On a schedule with a T-step grid (VP) the spacings are diffusers' conventions on its steps k (t = (k + 1) / T):
trailing round(T - i T/n) - 1, starting at T-1 (Lin et al. 2023, "Common diffusion noise schedules and sample steps are
flawed"); leading i (T // n); linspace round(linspace(0, T-1, n)). On a continuous schedule the same shapes in t itself:
trailing t_max (1 - i/n), leading t_min + (t_max - t_min) i/n, linspace from t_max to t_min. ``karras``: EDM's rho
spacing of the noise level in the schedule's ODE time (schedules.NoiseSchedule.ode).
"""

from __future__ import annotations

import numpy as np

from difflab.errors import ConfigError
from difflab.schedules import NoiseSchedule
from difflab.validate import choice, integer, number

SPACINGS = ("leading", "trailing", "linspace")


def spaced_timesteps(T: int, steps: int, spacing: str = "trailing") -> list[int]:
    """Decreasing steps k of a ``steps``-step sampler over a T-step grid (diffusers' conventions)."""
    check_steps(T, steps)
    if choice("sampler.spacing", spacing, SPACINGS) == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif spacing == "leading":
        ts = (np.arange(steps) * (T // steps))[::-1]
    else:
        ts = np.linspace(0, T - 1, steps).round().astype(np.int64)[::-1]
    return [int(t) for t in ts]


def spaced(schedule: NoiseSchedule, steps: int, spacing: str) -> list[float]:
    """``steps`` decreasing levels t of ``spacing`` on this schedule."""
    T = schedule.timesteps
    if T is not None:
        return [(k + 1) / T for k in spaced_timesteps(T, steps, spacing)]
    integer("steps", steps, 1)
    lo, hi = schedule.t_min, schedule.t_max
    if choice("sampler.spacing", spacing, SPACINGS) == "trailing":
        return [hi * (1 - i / steps) for i in range(steps)]
    if spacing == "leading":
        return [lo + (hi - lo) * i / steps for i in range(steps - 1, -1, -1)]
    return [float(t) for t in np.linspace(hi, lo, steps)]  # linspace


def solver_spaced(schedule: NoiseSchedule, steps: int, spacing: str) -> list[float]:
    """The levels of a multistep ODE solver that ends at the clean image (diffusers' DPM-Solver and UniPC): with linspace,
    steps + 1 points from t_max down to t_min, the last replaced by the clean image (on a T-step grid at most T-1 steps,
    checked as typed); trailing and leading as ``spaced``."""
    if spacing != "linspace":
        return spaced(schedule, steps, spacing)
    T = schedule.timesteps
    if T is not None:
        check_steps(T, steps, reserved=1)
        return [(k + 1) / T for k in sorted(set(spaced_timesteps(T, steps + 1, "linspace")[:-1]), reverse=True)]
    return spaced(schedule, steps + 1, "linspace")[:-1]


def karras(schedule: NoiseSchedule, steps: int, rho: float = 7.0, tau_min: float | None = None, tau_max: float | None = None) -> list[float]:
    """EDM's noise levels tau_i = (tau_max^(1/rho) + i/(N-1) (tau_min^(1/rho) - tau_max^(1/rho)))^rho, i = 0 .. N-1, in the
    schedule's ODE time tau (sigma / alpha; t on rectified flow), by default its trained range; as t."""
    integer("steps", steps, 1)
    lo = schedule.ode(schedule.level(schedule.t_min))[1] if tau_min is None else tau_min
    hi = schedule.ode(schedule.level(schedule.t_max))[1] if tau_max is None else tau_max
    if not 0 < lo < hi < np.inf:
        raise ConfigError(f"sampler noise levels [{lo:g}, {hi:g}]: need 0 < sigma_min < sigma_max < inf (sampler.sigma_min, "
                          "sampler.sigma_max in the schedule's ODE time; null: its trained range)")
    ramp = np.linspace(0, 1, steps)
    taus = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return [schedule.t_of_tau(float(tau)) for tau in taus]


def every_step(schedule: NoiseSchedule, steps: int = 1000) -> list[float]:
    """Every step of a T-step grid; ``steps`` uniform steps (trailing) of a continuous schedule."""
    T = schedule.timesteps
    return [(k + 1) / T for k in range(T - 1, -1, -1)] if T is not None else spaced(schedule, steps, "trailing")


def check_steps(T: int, steps: int, reserved: int = 0) -> None:
    """1 <= steps <= T - reserved: a sampler that spends ``reserved`` of the T timesteps elsewhere allows fewer."""
    most = T - reserved
    if not 1 <= steps <= most:
        raise ConfigError(f"steps must be in [1, T{f'-{reserved}' if reserved else ''}={most}], got {steps}")


def check_settings(steps: int | None = None, spacing: str | None = None, eta: float | None = None) -> None:
    """Sampler settings as typed on the command line (steps <= T is checked once T is known)."""
    if steps is not None:
        integer("sampler.steps", steps, 1, " (or steps=N on the command line)")
    if spacing is not None:
        choice("sampler.spacing", spacing, SPACINGS)
    if eta is not None:
        number("sampler.eta", eta, 0, 1, " (0: deterministic DDIM, 1: DDPM-like noise)")
