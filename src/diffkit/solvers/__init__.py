"""Solver registry and `sample()`.

A solver is a plain function `solver(denoiser, x, sigmas, *, cond=None, callback=None, progress=False,
**options)` over the canonical state x̄ and a decreasing σ̄ grid; `sample` maps noise to the start of the
process, builds the grid from a step count or a hard budget of model calls, counts the calls, and maps the
result back to the process's native space.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..noise import make_noise_sampler
from ..schedules import ENDS, get_sigmas, validate_sigmas
from .adaptive import dpm_adaptive
from .base import CallCounter
from .dpm import dpm_solver, dpmpp_2s, dpmpp_multistep, singlestep_orders
from .euler import euler, heun
from .multistep import deis, ipndm, lms, pndm
from .stochastic import (
    ddim_eta,
    ddpm,
    dpmpp_2s_sde,
    dpmpp_sde,
    edm_sde,
    euler_ancestral,
    euler_maruyama,
    pc,
    sa_solver,
    ts_sampler,
)
from .unipc import unipc

Tensor = torch.Tensor

__all__ = ["sample", "solvers", "get_solver", "SolverSpec", "Choice", "DEFAULTS", "default_for", "plan"]


def _one_call_per_step(sig: list[float], opts: dict) -> int:
    return len(sig) - 1


def _two_calls_per_step(sig: list[float], opts: dict) -> int:
    return 2 * (len(sig) - 1) - (sig[-1] == 0)


def _singlestep_calls(sig: list[float], opts: dict) -> int:
    n = len(sig) - 1
    orders = opts.get("orders") or [opts.get("order", 3)] * n
    return sum(orders[:-1]) + (1 if sig[-1] == 0 else orders[-1])


def _pndm_calls(sig: list[float], opts: dict) -> int:
    k = opts.get("prk_steps", 3)
    return sum(4 if (i < k and sig[i + 1] > 0) else 1 for i in range(len(sig) - 1))


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver: its function, preset options, how many calls a grid costs, how a budget of calls
    becomes a step count (and options), the smallest budget, and its default schedule."""

    name: str
    fn: Callable
    calls: Callable[[list, dict], int]
    budget: Callable[[int, str, dict], tuple[int, dict]]
    min_nfe: int = 1
    schedule: str = "logsnr"
    preset: dict = field(default_factory=dict)
    summary: str = ""
    stochastic: bool = False  # takes a noise sampler `noise(sigma, sigma_next)` (see diffkit.noise)
    adaptive: bool = False  # places its own steps: a named schedule only gives the σ̄ range


def _budget_one(nfe, end, opts):
    return nfe, {}


def _budget_two(nfe, end, opts):
    return ((nfe + 1) // 2 if end != "sigma_min" else nfe // 2), {}


def _budget_singlestep(nfe, end, opts):
    order = opts.get("order", 3)
    if end != "sigma_min":  # the last step, into σ̄ = 0, is a single denoising call
        orders = singlestep_orders(nfe - 1, order) + [1]
    else:
        orders = singlestep_orders(nfe, order)
    return len(orders), {"orders": orders}


def _budget_pndm(nfe, end, opts):
    k = opts.get("prk_steps", 3)
    return nfe - 3 * k, {}


def _budget_adaptive(nfe, end, opts):
    return (2 if end != "sigma_min" else 1), {"max_nfe": nfe}


def _spec(name, fn, calls=_one_call_per_step, budget=_budget_one, **kw):
    return SolverSpec(name, fn, calls, budget, **kw)


_REGISTRY: dict[str, SolverSpec] = {
    s.name: s
    for s in [
        _spec("euler", euler, schedule="karras", summary="Euler / DDIM, order 1"),
        _spec("ddim", euler, schedule="trailing", summary="alias of euler (DDIM with eta = 0)"),
        _spec("heun", heun, _two_calls_per_step, _budget_two, schedule="karras",
              summary="EDM Heun, order 2, two calls per step"),
        _spec("dpm_solver_1", dpm_solver, _singlestep_calls, _budget_singlestep, preset={"order": 1},
              summary="DPM-Solver-1 (= DDIM)"),
        _spec("dpm_solver_2", dpm_solver, _singlestep_calls, _budget_singlestep, preset={"order": 2},
              summary="singlestep DPM-Solver-2"),
        _spec("dpm_solver_3", dpm_solver, _singlestep_calls, _budget_singlestep, preset={"order": 3},
              summary="singlestep DPM-Solver-3 (budgets split as DPM-Solver-fast)"),
        _spec("dpmpp_2s", dpmpp_2s, _two_calls_per_step, _budget_two, summary="DPM-Solver++(2S)"),
        _spec("dpmpp_2m", dpmpp_multistep, preset={"order": 2}, summary="DPM-Solver++(2M)"),
        _spec("dpmpp_3m", dpmpp_multistep, preset={"order": 3}, summary="DPM-Solver++(3M)"),
        _spec("unipc", unipc, preset={"order": 3, "variant": "bh2"}, summary="UniPC-3 bh2 with UniC"),
        _spec("unipc_bh1", unipc, preset={"order": 3, "variant": "bh1"}, summary="UniPC-3 bh1 with UniC"),
        _spec("deis", deis, preset={"order": 3}, summary="DEIS tAB3"),
        _spec("ipndm", ipndm, schedule="karras", preset={"order": 4}, summary="iPNDM (order 4)"),
        _spec("pndm", pndm, _pndm_calls, _budget_pndm, min_nfe=13, schedule="trailing",
              summary="PNDM: 3 pseudo Runge-Kutta steps, then PLMS"),
        _spec("lms", lms, schedule="karras", preset={"order": 4}, summary="linear multistep in sigma, order 4"),
        _spec("dpm_adaptive", dpm_adaptive, lambda s, o: o.get("max_nfe") or 0, _budget_adaptive, min_nfe=4,
              adaptive=True,
              summary="DPM-Solver-23 adaptive step size in log-SNR"),
    ]
}


def _pc_calls(sig: list[float], opts: dict) -> int:
    return (1 + opts.get("n_corrector", 1)) * (len(sig) - 1)


def _budget_pc(nfe, end, opts):
    return nfe // (1 + opts.get("n_corrector", 1)), {}


# Stochastic samplers (solvers/stochastic.py): `sample` hands them a noise sampler (generator / seeds / noise_kind).
# Default schedules from bench/stochastic.py: log-SNR-uniform grids beat Karras grids for the one-call samplers.
_REGISTRY.update({
    s.name: s
    for s in [
        _spec("ddpm", ddpm, schedule="logsnr", stochastic=True,
              summary="DDPM ancestral sampling (posterior variance; variance='large' for beta)"),
        _spec("ddim_eta", ddim_eta, schedule="logsnr", stochastic=True, preset={"eta": 1.0},
              summary="DDIM with eta (eta=0: DDIM, eta=1: DDPM)"),
        _spec("euler_ancestral", euler_ancestral, schedule="logsnr", stochastic=True,
              summary="Euler-ancestral (eta, s_noise)"),
        _spec("edm_sde", edm_sde, _two_calls_per_step, _budget_two, schedule="karras", stochastic=True,
              preset={"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.0},
              summary="EDM stochastic sampler (S_churn, S_tmin, S_tmax, S_noise), Heun steps"),
        _spec("dpmpp_2m_sde", dpmpp_sde, stochastic=True, preset={"order": 2, "solver_type": "midpoint"},
              summary="SDE-DPM-Solver++(2M), midpoint"),
        _spec("dpmpp_2m_sde_heun", dpmpp_sde, stochastic=True, preset={"order": 2, "solver_type": "heun"},
              summary="SDE-DPM-Solver++(2M), Heun (exact linear term)"),
        _spec("dpmpp_3m_sde", dpmpp_sde, stochastic=True, preset={"order": 3, "solver_type": "heun"},
              summary="SDE-DPM-Solver++(3M)"),
        _spec("dpmpp_2s_sde", dpmpp_2s_sde, _two_calls_per_step, _budget_two, stochastic=True,
              summary="singlestep SDE-DPM-Solver++(2S), midpoint, two calls per step"),
        _spec("dpmpp_2s_sde_heun", dpmpp_2s_sde, _two_calls_per_step, _budget_two, stochastic=True,
              preset={"solver_type": "heun"}, summary="singlestep SDE-DPM-Solver++(2S), Heun (exact linear term)"),
        _spec("sa_solver", sa_solver, stochastic=True, summary="SA-Solver: stochastic Adams predictor-corrector"),
        _spec("euler_maruyama", euler_maruyama, schedule="logsnr", stochastic=True,
              summary="Euler-Maruyama on the reverse SDE of the process"),
        _spec("pc", pc, _pc_calls, _budget_pc, min_nfe=2, schedule="karras", stochastic=True,
              summary="predictor-corrector: ancestral predictor + Langevin corrector (snr)"),
        _spec("ts_ddpm", ts_sampler, schedule="logsnr", stochastic=True, preset={"eta": 1.0},
              summary="time-shift sampler (exposure bias) on DDPM steps"),
        _spec("ts_ddim", ts_sampler, schedule="logsnr", stochastic=True, preset={"eta": 0.0},
              summary="time-shift sampler (exposure bias) on DDIM steps"),
    ]
})


@dataclass(frozen=True)
class Choice:
    """A complete sampler configuration: solver, its options, schedule (with options) and end."""

    solver: str
    schedule: str
    end: str = "zero"
    options: dict = field(default_factory=dict)
    schedule_options: dict = field(default_factory=dict)


# Default configuration per budget of model calls, chosen from bench/solvers.py (BENCHMARKS.md, "Candidate
# defaults"): per budget, the swept configuration with the smallest worst-case ratio to the best anchor over the
# testbeds (held-out noise checked). Up to 12 calls that is the `tuned` step density (fitted by
# `python -m diffkit.calibrate.step_density` on a family of 20 mixtures × 2 processes that contains none of the
# testbeds) with the solver that won its tuning at that budget: UniPC at 5-7 and 11-12 calls, DEIS with ε̂
# extrapolated in log σ̄ at 8-10; at 13-30 DEIS(log σ̄) on the Karras grid; above, iPNDM on the tuned density.
# Rows of (largest nfe the row covers, choice).
DEFAULTS: list[tuple[int, Choice]] = [
    (7, Choice("unipc", "tuned", "sigma_min")),
    (10, Choice("deis", "tuned", "sigma_min", {"coordinate": "log_sigma"})),
    (12, Choice("unipc", "tuned", "sigma_min")),
    (15, Choice("deis", "karras", "replace", {"coordinate": "log_sigma"})),
    (20, Choice("deis", "karras", "sigma_min", {"coordinate": "log_sigma"})),
    (30, Choice("deis", "karras", "zero", {"coordinate": "log_sigma"})),
    (10**9, Choice("ipndm", "tuned", "zero")),
]


def default_for(nfe: int) -> Choice:
    """The default configuration for a budget of `nfe` model calls."""
    for top, choice in DEFAULTS:
        if nfe <= top:
            return choice
    raise AssertionError("DEFAULTS must cover every budget")


def solvers() -> list[str]:
    """Names accepted by `sample(..., solver=...)`."""
    return sorted(_REGISTRY)


def get_solver(name: str) -> SolverSpec:
    """The registered `SolverSpec` for a name (ValueError listing the valid names otherwise)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown solver {name!r}; valid: {', '.join(solvers())}")
    return _REGISTRY[name]


def _check_count(value, what: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer; got {value!r}")
    return value


def plan(solver: str | None = None, *, process=None, nfe: int | None = None, steps: int | None = None,
         schedule: str | Sequence[float] | Tensor | None = None, end: str | None = None, options: dict | None = None,
         schedule_options: dict | None = None, sigma_min: float | None = None,
         sigma_max: float | None = None) -> tuple[SolverSpec, Tensor, dict, int]:
    """Resolve what `sample` will run: (solver spec, σ̄ grid, solver options, model calls it will make).

    With no solver named, the budget's default `Choice` fills in solver, schedule, end and options (explicit
    arguments still win)."""
    nfe, steps = _check_count(nfe, "nfe"), _check_count(steps, "steps")
    if nfe is not None and steps is not None:
        raise ValueError("give either nfe (a budget of model calls) or steps, not both")
    if end is not None and end not in ENDS:
        raise ValueError(f"unknown schedule end {end!r}; valid: {', '.join(ENDS)}")
    options, schedule_options = dict(options or {}), dict(schedule_options or {})
    if solver is None:
        choice = default_for(nfe or steps or 10)
        solver, options = choice.solver, {**choice.options, **options}
        if schedule is None:
            schedule, schedule_options = choice.schedule, {**choice.schedule_options, **schedule_options}
        end = end or choice.end
    end = end or "zero"
    spec = get_solver(solver)
    options = {**spec.preset, **options}
    if schedule is not None and not isinstance(schedule, str):
        sigmas = validate_sigmas(schedule)
    else:
        if nfe is not None:
            if nfe < spec.min_nfe:
                raise ValueError(f"a budget of {nfe} model calls is below the minimum of {spec.min_nfe} for "
                                 f"solver {solver!r}")
            steps, extra = spec.budget(nfe, end, options)
            if steps < 1:
                raise ValueError(f"a budget of {nfe} model calls is too small for solver {solver!r} with "
                                 f"end={end!r}")
            options = {**options, **extra}
        elif steps is None:
            steps = 10
        if spec.adaptive:  # the grid is only the range [σ̄_max, σ̄_min] (and the end)
            schedule, schedule_options = "logsnr", {}
        sigmas = get_sigmas(schedule or spec.schedule, steps, process=process, sigma_min=sigma_min,
                            sigma_max=sigma_max, end=end, **schedule_options)
    calls = spec.calls(sigmas.tolist(), options)
    if nfe is not None and calls > nfe:
        raise ValueError(f"solver {solver!r} needs {calls} model calls on this grid, above the budget of {nfe}")
    return spec, sigmas, options, calls


_resolve = plan  # `sample` takes a `plan=` argument (a SolverPlan); inside it this name reaches the function


def sample(denoiser, noise: Tensor, *, solver: str | None = None, nfe: int | None = None,
           steps: int | None = None, schedule: str | Sequence[float] | Tensor | None = None,
           end: str | None = None, options: dict | None = None, schedule_options: dict | None = None,
           cond: dict | None = None, generator: torch.Generator | Sequence[torch.Generator] | None = None,
           seeds: Sequence[int] | None = None, noise_kind: str | Callable | None = None,
           callback: Callable | None = None, progress: bool = False, return_info: bool = False,
           sigma_min: float | None = None, sigma_max: float | None = None, plan=None):
    """Solve the probability-flow ODE from noise to data (Song et al. 2021, "Score-Based Generative Modeling
    through SDEs", Eq. 13, in the canonical variables of Karras et al. 2022, Eq. 4).

    `denoiser` is a `diffkit.Denoiser` (or any callable D(x̄, σ̄), then give `schedule` as a grid or
    `sigma_min`/`sigma_max`). `noise` is standard normal and is mapped to the start of the process (VE/EDM:
    x = σ_max noise; VP: x_T = noise; Flow: x_1 = noise). `nfe` is a hard budget of model calls, `steps` a step
    count (give one; default: 10 steps). `schedule` is a schedule name (see `diffkit.schedules.schedules()`,
    with `schedule_options` such as rho) or an explicit σ̄ grid; `end` is 'zero' (final denoising step) or
    'sigma_min' (default: 'zero', or the default configuration's when no solver is named). `options` go to
    the solver, `cond` to the model. Returns the samples in native space (and an info dict with `return_info`).

    Stochastic solvers (`get_solver(name).stochastic`) draw their step noise from a noise sampler built here:
    `noise_kind` 'gaussian' (default) or 'brownian' (a Brownian tree over σ̄: outputs converge as steps grow), or
    a ready callable noise(sigma, sigma_next). Its randomness: `generator` (one torch.Generator for the batch,
    or a list of one generator per sample) or `seeds` (one integer per sample: sample i then depends only on
    seeds[i]; draw the start with `diffkit.noise.randn(shape, seeds=seeds)` for the same guarantee), else
    torch's global generator. Deterministic solvers ignore them.

    `plan` (a `diffkit.SolverPlan` from `diffkit.calibrate`) replaces solver, grid and options: it fixes its call
    levels and step rule, so give none of solver/steps/schedule/end/options (nfe, if given, must be the plan's).
    """
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        raise TypeError("noise must be a floating-point tensor of shape (batch, ...)")
    if noise.ndim < 1 or noise.shape[0] == 0:
        raise ValueError("noise must have a non-empty batch dimension")
    if not torch.isfinite(noise.sum()):  # one reduction: any NaN or inf makes the sum non-finite
        raise ValueError("noise contains non-finite values")
    process = getattr(denoiser, "process", None)
    if plan is not None:
        return _sample_plan(plan, denoiser, noise, process, nfe=nfe, cond=cond, callback=callback, progress=progress,
                            return_info=return_info, fixed=dict(solver=solver, steps=steps, schedule=schedule, end=end,
                                                                options=options, schedule_options=schedule_options,
                                                                sigma_min=sigma_min, sigma_max=sigma_max))
    if process is None and schedule is None and (sigma_min is None or sigma_max is None):
        raise ValueError("a denoiser without a process needs an explicit sigma grid or sigma_min and sigma_max")
    spec, sigmas, options, calls = _resolve(solver, process=process, nfe=nfe, steps=steps, schedule=schedule,
                                        end=end, options=options, schedule_options=schedule_options,
                                        sigma_min=sigma_min, sigma_max=sigma_max)
    s0, s_end = float(sigmas[0]), float(sigmas[-1])
    x = noise * s0 if process is None else process.noise_to_canonical(noise, s0).to(noise.dtype)
    if hasattr(denoiser, "prepare"):
        denoiser.prepare(sigmas)
    counter = CallCounter(denoiser)
    info: dict = {}
    kwargs = dict(cond=cond, callback=callback, progress=progress, **options)
    if spec.stochastic:
        kwargs["noise"] = make_noise_sampler(noise_kind, x, sigmas, generator=generator, seeds=seeds)
    if spec.fn is dpm_adaptive:
        kwargs["info"] = info
    out = spec.fn(counter, x, sigmas, **kwargs)
    if nfe is not None and counter.calls > nfe:  # pragma: no cover - a solver bug, never a user error
        raise RuntimeError(f"solver {spec.name!r} made {counter.calls} model calls, above the budget of {nfe}")
    out = _to_native(out, process, s_end)
    if return_info:
        return out, {"solver": spec.name, "nfe": counter.calls, "sigmas": sigmas, "options": options}
    return out


def _to_native(out: Tensor, process, s_end: float) -> Tensor:
    """x̄ at σ̄_end > 0 back to the process's native scale (x = alpha x̄)."""
    if s_end > 0 and process is not None:
        out = out * float(process.alpha(process.t_of_sigma_bar(torch.tensor(s_end, dtype=torch.float64))))
    return out


def _sample_plan(plan, denoiser, noise, process, *, nfe, cond, callback, progress, return_info, fixed):
    from ..calibrate.plan import SolverPlan

    if not isinstance(plan, SolverPlan):
        raise TypeError(f"plan must be a diffkit.SolverPlan (SolverPlan.load(path) reads a file); got "
                        f"{type(plan).__name__}")
    given = [k for k, v in fixed.items() if v is not None]
    if given:
        raise ValueError(f"a plan fixes the solver, grid and options; do not also give {', '.join(given)}")
    plan.check(denoiser, nfe)
    s0 = plan.sigmas[0]
    x = noise * s0 if process is None else process.noise_to_canonical(noise, s0).to(noise.dtype)
    if hasattr(denoiser, "prepare"):
        denoiser.prepare(torch.tensor(plan.sigmas + [plan.sigma_end], dtype=torch.float64))
    counter = CallCounter(denoiser)
    out = _to_native(plan.run(counter, x, cond=cond, callback=callback, progress=progress), process, plan.sigma_end)
    if return_info:
        return out, {"solver": f"plan:{plan.method}", "nfe": counter.calls, "sigmas": plan.sigmas + [plan.sigma_end],
                     "options": {}}
    return out


class _CallableModule(types.ModuleType):
    """`diffkit.solvers` is both this subpackage (diffkit.solvers.dpm, ...) and the function listing the solver
    names: calling the module returns `solvers()`."""

    def __call__(self) -> list[str]:
        return solvers()


sys.modules[__name__].__class__ = _CallableModule
