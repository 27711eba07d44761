"""Step schedules: decreasing grids of canonical noise levels σ̄_0 > σ̄_1 > ... > σ̄_n.

`get_sigmas(name, steps, ...)` returns `steps + 1` noise levels (float64), i.e. `steps` solver intervals.
Every schedule states its end:

* ``end="zero"`` (default): the grid ends at σ̄ = 0. The last interval is the final denoising step from the
  smallest non-zero level to the clean sample (k-diffusion appends 0; diffusers' ``final_sigmas_type="zero"``).
* ``end="sigma_min"``: the grid ends at σ̄_min and the sample keeps that residual noise (diffusers'
  ``final_sigmas_type="sigma_min"``). One more non-zero level is then spent on the grid itself.

* ``end="replace"``: the family's ``steps + 1`` levels down to σ̄_min with the last one replaced by 0, so the
  final denoising step counts as one interval of the family's spacing and starts one interval above σ̄_min
  (what diffusers' 'trailing' spacing amounts to, and how ComfyUI ends the Align-Your-Steps lists).

An explicit ``list`` states its own end and must have ``steps + 1`` levels.

For families spanning [σ̄_min, σ̄_max] (karras, exponential/logsnr, polyexponential, linspace, time_quadratic,
loglinear) the non-zero levels include both ends. The diffusers spacings 'trailing' and 'leading' place their
points as diffusers does and then append the end level.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from importlib import resources

import numpy as np
import torch

from .processes import DiscreteVP, Process

Tensor = torch.Tensor

ENDS = ("zero", "sigma_min", "replace")

__all__ = ["get_sigmas", "schedules", "validate_sigmas", "karras", "exponential", "polyexponential",
           "loglinear_interp", "ENDS", "sigma_range", "density_levels", "tuned", "DENSITY_KNOTS", "focus_factor"]


# -- σ̄-space families: m levels spanning [sigma_min, sigma_max] ---------------------------------------------


def karras(m: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 ("Elucidating the Design Space"), Eq. 5:
    σ_i = (σ_max^{1/ρ} + i/(m-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ."""
    ramp = torch.linspace(0, 1, m, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential(m: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Uniform in log σ̄, i.e. uniform in log-SNR λ = -log σ̄ (DPM-Solver's 'logSNR' skip type, Lu et al. 2022)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), m, dtype=torch.float64).exp()


def polyexponential(m: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """Polynomial in log σ̄ (k-diffusion): log σ_i = log σ_min + (1 - i/(m-1))^ρ (log σ_max - log σ_min)."""
    ramp = torch.linspace(1, 0, m, dtype=torch.float64) ** rho
    return (ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp()


# knots of the tuned step density: log σ̄ from log 1e-3 to log 1e3 (every half decade)
DENSITY_KNOTS = tuple(math.log(10.0) * (k / 2 - 3) for k in range(13))
_TUNED_ASSET = "step_density/step_density.json"


def density_levels(m: int, sigma_min: float, sigma_max: float, log_density: Sequence[float],
                   knots: Sequence[float] = DENSITY_KNOTS) -> Tensor:
    """m levels from σ_max down to σ_min that equidistribute a step density ρ over s = log σ̄ (de Boor's
    equidistribution principle): ∫_{s_{i+1}}^{s_i} ρ ds = (1/(m-1)) ∫_{log σ_min}^{log σ_max} ρ ds, with
    log ρ piecewise linear through (knots, log_density) and constant beyond the outer knots. ρ ≡ const is
    `exponential` (uniform in log-SNR); a density is independent of the budget and of the σ̄ range, which only
    selects the part of it that is integrated."""
    if len(log_density) != len(knots):
        raise ValueError(f"log_density needs {len(knots)} values (one per knot); got {len(log_density)}")
    ld = np.asarray(log_density, dtype=np.float64)
    if not np.isfinite(ld).all():
        raise ValueError("log_density must be finite")
    if m < 2:
        return torch.tensor([sigma_max], dtype=torch.float64)[:m]
    s = np.linspace(math.log(sigma_min), math.log(sigma_max), 4001)
    rho = np.exp(np.interp(s, np.asarray(knots, dtype=np.float64), ld - ld.max()))
    cum = np.concatenate([[0.0], np.cumsum((rho[1:] + rho[:-1]) / 2 * np.diff(s))])
    levels = np.exp(np.interp(np.linspace(cum[-1], 0.0, m), cum, s))
    levels[0], levels[-1] = sigma_max, sigma_min
    return torch.from_numpy(levels)


def tuned(m: int, sigma_min: float, sigma_max: float, log_density: Sequence[float] | None = None,
          focus: Sequence[float] | None = None) -> Tensor:
    """diffkit's tuned schedule: `density_levels` with the step density fitted for the budget nearest to m
    levels (the table in assets/step_density, written by `python -m diffkit.calibrate.step_density`, which fits
    a density per budget for UniPC, iPNDM and DEIS to the exact flow maps of a family of Gaussian mixtures under
    four σ̄ ranges and keeps the best: an Align-Your-Steps-style list, as a density so that it fits every σ̄
    range). `log_density` overrides the table (13 values at `DENSITY_KNOTS`). `focus` = (σ̄_c, gain) multiplies
    the density by `focus_factor` at the knots (more steps around σ̄_c)."""
    if log_density is None:
        table = tuned_table()
        key = min(table["log_density"], key=lambda k: (abs(int(k) - m), int(k)))
        log_density = table["log_density"][key]
    if focus is not None:
        if isinstance(focus, (str, bytes)) or not hasattr(focus, "__len__") or len(focus) != 2:
            raise ValueError(f"focus must be a pair (center σ̄, gain); got {focus!r}")
        log_density = [ld + math.log(f) for ld, f in zip(log_density, focus_factor(DENSITY_KNOTS, *focus))]
    return density_levels(m, sigma_min, sigma_max, log_density)


FOCUS_WIDTH = 0.6  # of the focus bump, in log σ̄ (about a factor 1.8 either side)


def focus_factor(log_sigmas: Sequence[float], center: float, gain: float, width: float = FOCUS_WIDTH) -> list[float]:
    """1 + gain · exp(-(s - log σ̄_c)² / (2 width²)) at each s = log σ̄: a step density multiplied by it puts
    extra steps around σ̄_c. Where a sample's mixture mode is decided (σ̄ near the distance between modes: about
    1 for data of unit scale), a few-step solver's error sends samples to another mode; a calibration can try
    grids focused there (`diffkit.calibrate`'s starting candidates)."""
    if not (center > 0 and math.isfinite(center)) or not (gain >= 0 and math.isfinite(gain)) or not width > 0:
        raise ValueError(f"focus needs a positive center σ̄, a non-negative gain and a positive width; got "
                         f"center={center!r}, gain={gain!r}, width={width!r}")
    return [1 + gain * math.exp(-(s - math.log(center)) ** 2 / (2 * width * width)) for s in log_sigmas]


@functools.lru_cache(maxsize=1)
def tuned_table() -> dict:
    """The shipped step-density table (read once; do not modify the returned dict): {"knots", "log_density":
    {levels m: 13 values}, "winners": {levels m: solver, options, nfe, end, loss}, "fits": [...]}."""
    path = resources.files("diffkit") / "assets" / _TUNED_ASSET
    if not path.is_file():
        raise FileNotFoundError("the tuned step-density table is missing: run "
                                "`python -m diffkit.calibrate.step_density`")
    return json.loads(path.read_text())


def loglinear_interp(sigmas: Sequence[float], m: int) -> Tensor:
    """Resample a decreasing σ̄ list to m levels, linear in log σ̄ against the normalized index (how the
    Align-Your-Steps lists are used at other step counts; Sabour et al. 2024). A trailing 0 is ignored."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if len(s) and s[-1] == 0:
        s = s[:-1]
    if len(s) < 2:
        raise ValueError("loglinear interpolation needs a list of at least two positive levels")
    validate_sigmas(s)
    xs = np.linspace(0, 1, len(s))
    return torch.from_numpy(np.exp(np.interp(np.linspace(0, 1, m), xs, np.log(s.numpy()))))


# -- native-time families -------------------------------------------------------------------------------------


def _discrete_spacing(process: DiscreteVP, n: int, spacing: str, offset: int) -> np.ndarray:
    """Timesteps as diffusers names the spacings (`timestep_spacing`), T = num_train_timesteps."""
    T = process.num_train_timesteps
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + offset
    raise AssertionError(spacing)


def _native_times(process: Process, m: int, kind: str, offset: int = 0, end_included: bool = True):
    """m native times for uniform-in-time spacings; `process.uniform_time_warp` applies (Flow shift)."""
    t0, t1 = process.t_min, process.t_max
    if kind == "linspace":
        u = np.linspace(t1, t0, m)
    elif kind == "time_quadratic":
        u = np.linspace(math.sqrt(t1), math.sqrt(max(t0, 0.0)), m) ** 2
    elif isinstance(process, DiscreteVP):
        u = _discrete_spacing(process, m, kind, offset)
    elif kind == "trailing":
        u = t0 + (t1 - t0) * (1 - np.arange(m) / m)
    else:  # leading
        u = t0 + (t1 - t0) * np.arange(m)[::-1] / m
    u = torch.as_tensor(np.ascontiguousarray(u), dtype=torch.float64).clamp(t0, t1)
    return process.uniform_time_warp(u)


# -- registry -----------------------------------------------------------------------------------------------------

_SIGMA_FAMILIES: dict[str, Callable] = {
    "karras": karras,
    "exponential": exponential,
    "logsnr": exponential,
    "polyexponential": polyexponential,
    "tuned": tuned,
}
_FAMILY_OPTIONS = {"karras": ("rho",), "polyexponential": ("rho",), "tuned": ("log_density", "focus")}
_TIME_SPANNING = ("linspace", "time_quadratic")
_TIME_DIFFUSERS = ("trailing", "leading")
_OTHER = ("loglinear", "list")


def schedules() -> list[str]:
    """Names accepted by `get_sigmas`."""
    return sorted([*_SIGMA_FAMILIES, *_TIME_SPANNING, *_TIME_DIFFUSERS, *_OTHER])


def get_sigmas(name: str, steps: int, *, process: Process | None = None, sigma_min: float | None = None,
               sigma_max: float | None = None, end: str = "zero", **kwargs) -> Tensor:
    """A decreasing grid of `steps + 1` canonical noise levels (float64) from the named family.

    σ̄ range: explicit `sigma_min`/`sigma_max`, else the process's. Extra options: `rho` (karras,
    polyexponential), `offset` (leading, diffusers' steps_offset), `sigmas` (loglinear, list), `log_density`
    (tuned: a step density of its own), `focus` (tuned: (σ̄_c, gain), more steps around σ̄_c).
    """
    if name not in schedules():
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(schedules())}")
    if end not in ENDS:
        raise ValueError(f"unknown schedule end {end!r}; valid: {', '.join(ENDS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    if name == "list":
        if "sigmas" not in kwargs:
            raise TypeError("schedule 'list' needs sigmas=[...]")
        s = validate_sigmas(kwargs.pop("sigmas"))
        _no_extra(name, kwargs)
        if len(s) != steps + 1:
            raise ValueError(f"an explicit list of {len(s)} levels makes {len(s) - 1} steps, not {steps}")
        return s
    if name in _TIME_DIFFUSERS and end == "replace":
        end = "zero"  # these spacings already end one interval above t_min
    m = steps if end == "zero" else steps + 1
    if name in _TIME_SPANNING or name in _TIME_DIFFUSERS:
        if process is None:
            raise ValueError(f"schedule {name!r} is uniform in native time and needs a process")
        offset = kwargs.pop("offset", 0)
        _no_extra(name, kwargs)
        if name in _TIME_DIFFUSERS:
            t = _native_times(process, steps, name, offset)
            if end == "sigma_min" and float(t[-1]) <= process.t_min:
                # the spacing already ends at t_min (leading, offset 0): spend the extra level on the spacing
                t = _native_times(process, steps + 1, name, offset)
                end = "included"
        else:
            t = _native_times(process, m, name)
        body = process.sigma_bar(t).to(torch.float64)
    elif name == "loglinear":
        if "sigmas" not in kwargs:
            raise TypeError("schedule 'loglinear' needs sigmas=[...] (the list to resample)")
        body = loglinear_interp(kwargs.pop("sigmas"), m)
        _no_extra(name, kwargs)
    else:
        lo, hi = sigma_range(process, sigma_min, sigma_max)
        opts = _pop_known(kwargs, _FAMILY_OPTIONS.get(name, ()))
        _no_extra(name, kwargs)
        body = _SIGMA_FAMILIES[name](m, lo, hi, **opts)
    if end == "replace":
        body = torch.cat([body[:-1], body.new_zeros(1)])
    elif end == "zero" or (name in _TIME_DIFFUSERS and end == "sigma_min"):
        tail = 0.0 if end == "zero" else float(sigma_range(process, sigma_min, sigma_max)[0])
        body = torch.cat([body, body.new_tensor([tail])])
    return validate_sigmas(body)


def _pop_known(kwargs: dict, names) -> dict:
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


def _no_extra(name: str, kwargs: dict):
    if kwargs:
        raise TypeError(f"schedule {name!r} got unexpected options: {', '.join(sorted(kwargs))}")


def sigma_range(process, sigma_min=None, sigma_max=None) -> tuple[float, float]:
    """(σ̄_min, σ̄_max): the explicit values where given, else the process's; checked 0 < min < max < inf."""
    lo = sigma_min if sigma_min is not None else (process.sigma_bar_min if process is not None else None)
    hi = sigma_max if sigma_max is not None else (process.sigma_bar_max if process is not None else None)
    if lo is None or hi is None:
        raise ValueError("give a process or both sigma_min and sigma_max")
    lo, hi = float(lo), float(hi)
    if not (0 < lo < hi < math.inf):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf; got {lo}, {hi}")
    return lo, hi


def validate_sigmas(sigmas) -> Tensor:
    """Check a σ̄ grid: 1-D, at least two levels, finite, strictly decreasing, positive except a final 0."""
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    if s.ndim != 1 or len(s) < 2:
        raise ValueError(f"sigmas must be a 1-D grid with at least two levels; got shape {tuple(s.shape)}")
    v = s.tolist()  # a few dozen numbers: plain Python checks cost less than tensor ops on every sample() call
    if not all(math.isfinite(x) for x in v):
        raise ValueError("sigmas must be finite")
    if any(b >= a for a, b in zip(v, v[1:])):
        raise ValueError("sigmas must be strictly decreasing (from the noisiest level down)")
    if any(x <= 0 for x in v[:-1]) or v[-1] < 0:
        raise ValueError("sigmas must be positive, except a final 0")
    return s
