"""Samplers calibrated to the user's model: `calibrate(denoiser, nfe, ...)` fits a `SolverPlan` (call levels and the
linear rule of each step, see `diffkit.calibrate.plan`) to a teacher on a few hundred noises, and
`diffkit.sample(denoiser, noise, plan=plan)` / `diffkit sample --plan FILE` use it.

    plan = diffkit.calibrate(denoiser, nfe=6, method="joint")   # teacher: the same model at high NFE
    plan.save("plan.json")
    x = diffkit.sample(denoiser, noise, plan=SolverPlan.load("plan.json"))
"""

from __future__ import annotations

import math
import sys
import time
import types
from collections.abc import Callable

import torch

from ..schedules import get_sigmas, loglinear_interp
from ..solvers import get_solver
from ..solvers import plan as resolve
from . import fitting as M
from .plan import PlanError, SolverPlan, fingerprint, run_linear
from .probe import _check_linear, linear_solvers, plan_tensors

Tensor = torch.Tensor
F64 = torch.float64

__all__ = ["calibrate", "SolverPlan", "PlanError", "solver_teacher", "methods", "plan_error", "linear_solvers",
           "run_linear", "select_noises"]

methods = M.methods


def solver_teacher(denoiser, nfe: int = 150, solver: str = "dpm_solver_3") -> Callable:
    """The default teacher: the same denoiser solved accurately, `teacher(x̄, σ̄_from, σ̄_to, **cond)` with about
    `nfe` calls per full trajectory (DPM-Solver-3 singlestep on a log-SNR grid; the final step to σ̄ = 0
    denoises)."""
    spec = get_solver(solver)
    process = getattr(denoiser, "process", None)

    def teacher(x, s_from, s_to, **cond):
        lo = s_to if s_to > 0 else min(s_from, getattr(process, "sigma_bar_min", 2e-3) or 2e-3)
        span = math.log(s_from / lo) if lo < s_from else 0.0
        full = math.log(getattr(process, "sigma_bar_max", 80.0) / getattr(process, "sigma_bar_min", 2e-3))
        steps = max(2, math.ceil(nfe / 3 * span / max(full, 1e-9)))
        if span == 0 and s_to > 0:
            return x
        grid = get_sigmas("logsnr", steps, sigma_min=lo, sigma_max=s_from, end="zero" if s_to == 0 else "sigma_min")
        with torch.no_grad():
            return spec.fn(denoiser, x, grid, cond=cond, **spec.preset)

    return teacher


def plan_error(plan: SolverPlan, denoiser, x0: Tensor, target: Tensor, cond=None, weights=None,
               batch_size: int | None = None) -> float:
    """Relative RMS error ||plan(x̄_0) - target|| / ||target|| over all samples (importance-weighted with
    `weights`, see `fitting.rel_mse`), the plan run on at most `batch_size` samples at once."""
    with torch.no_grad():
        out = M.in_chunks(lambda x, c: plan.run(denoiser, x, cond=c), x0, cond or {}, batch_size)
    return float(M.rel_mse(out, target, weights).sqrt())


def calibrate(denoiser, nfe: int, *, solver: str | None = None, noises: int | Tensor = 256,
              heldout: int | Tensor = 256, teacher: Callable | None = None, method: str = "joint",
              budget: float = 90.0, schedule: str | None = None, end: str | None = None, options: dict | None = None,
              schedule_options: dict | None = None,
              cond: dict | None = None, heldout_cond: dict | None = None, seed: int = 0, neighbours: bool = True,
              validation: bool = True, verbose: bool = False, shape: tuple | None = None,
              select: int | None = None, hard_fraction: float = 0.25, batch_size: int | None = None) -> SolverPlan:
    """Fit a `SolverPlan` with `nfe` model calls to `denoiser` (a `diffkit.Denoiser` with a process).

    The plan starts from `solver` on its grid for the budget (default: diffkit's default configuration for `nfe`;
    `schedule`, `end`, `options`, `schedule_options` as in `diffkit.sample`) and is fitted by `method` (see `methods()`;
    the table in `diffkit.calibrate.fitting`) against `teacher(x̄, σ̄_from, σ̄_to)` — by default
    `solver_teacher(denoiser)`; on a testbed pass `mixture.flow_map`, the exact flow map — on `noises` (a count, drawn
    from `seed`, or a tensor of standard-normal noise; a count needs `shape`, the shape of one sample). `heldout` noises
    (count or tensor; 0 for none) only measure. `budget` is the wall time in seconds the optimiser may use, so the
    plan depends on the machine's speed and load; `budget=math.inf` lets each method run to its own limit on loss
    evaluations, and the same inputs then give the same plan run after run. The result never does worse than its
    starting plan on the calibration noises (the start is returned when nothing better was found). `plan.metrics`
    reports calibration and held-out relative RMS errors of the start and of the plan, timings
    (`teacher_seconds` includes the screening of `select`) and, with `neighbours`, the starting solver at nfe - 1 and
    nfe + 1 with the plan's grid resampled (a grid transfers between budgets, coefficients do not). `cond` (and
    `heldout_cond` for the held-out noises, needed when `cond` holds per-sample tensors) go to the model and to the
    teacher. With `validation` (and unconditional or shared conditioning), a quarter of the calibration noises is held
    back from the gradient-based optimisers, which keep the parameters best on it (early stopping).

    `select` (fewer than the noises): the teacher labels only `select` of them, chosen by `select_noises` —
    the `hard_fraction` on which the starting solver is most wrong (screened against a cheap reference) and a
    uniform sample of the rest, importance-weighted so that every loss and error is an unbiased estimate of the
    error over all the noises. The relative RMS error of a few-step sampler is dominated by rare noises whose
    trajectories pass near a boundary between modes (a small error there sends the sample to another mode); a
    stratified calibration set sees many of them at the cost of one teacher run per selected noise.

    `batch_size` (default: all at once) bounds how many samples the model sees per call — teacher, screening,
    losses and their gradients run chunk by chunk, so calibrating a large model needs the memory of one chunk
    (a gradient through `nfe` model calls), not of all the noises; the result is the same up to rounding."""
    if method not in M.METHODS:
        raise ValueError(f"unknown calibration method {method!r}; valid: {', '.join(M.METHODS)}")
    process = getattr(denoiser, "process", None)
    if process is None:
        raise ValueError("calibrate needs a diffkit.Denoiser with a process (to map noise to the start)")
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer; got {nfe!r}")
    if not (budget > 0):
        raise ValueError(f"budget must be a positive number of seconds; got {budget!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None; got {batch_size!r}")
    spec, grid, opts, calls = resolve(solver, process=process, nfe=nfe, schedule=schedule, end=end, options=options,
                                      schedule_options=schedule_options)
    _check_linear(spec.name)
    grid = [float(s) for s in grid]
    cond = cond or {}
    t_start = time.monotonic()
    x0, xh = _starts(denoiser, noises, heldout, seed, grid[0], shape)
    if heldout_cond is None:
        if _per_sample(cond) and xh is not None:
            raise ValueError("cond holds per-sample tensors: give heldout_cond for the held-out noises")
        heldout_cond = cond
    weights, screened = None, None
    if select is not None:
        screened, t_screen = len(x0), time.monotonic()
        idx, weights = select_noises(denoiser, x0, nfe, select, (spec, grid, opts), hard_fraction=hard_fraction,
                                     seed=seed, cond=cond, batch_size=batch_size)
        x0 = x0[idx]
        cond = M.index_cond(cond, idx, screened)
        t_screen = time.monotonic() - t_screen
    teacher = teacher or solver_teacher(denoiser)
    sigma_end = grid[-1]
    target = _check_teacher(_teach(teacher, x0, grid[0], sigma_end, cond, batch_size), x0)
    target_h = (_check_teacher(_teach(teacher, xh, grid[0], sigma_end, heldout_cond, batch_size), xh)
                if xh is not None else None)
    t_teacher = time.monotonic() - t_start

    log = print if verbose else (lambda *a, **k: None)
    n_val = len(x0) // 4 if (validation and len(x0) >= 8 and not _per_sample(cond)) else 0
    fit, val = slice(0, len(x0) - n_val), slice(len(x0) - n_val, len(x0))
    problem = M.Problem(denoiser, x0[fit], target[fit], lambda x, a, b: _teach(teacher, x, a, b, cond, batch_size),
                        spec.name, opts, grid, process, cond, deadline=time.monotonic() + budget, log=log,
                        x0_val=x0[val] if n_val else None, target_val=target[val] if n_val else None,
                        weights=weights[fit] if weights is not None else None,
                        weights_val=weights[val] if weights is not None and n_val else None, batch_size=batch_size)
    candidates = {}
    if solver is None and schedule is None and options is None and not schedule_options:  # the best of a few
        spec, grid, opts, candidates = _best_start(problem, process, nfe, end or _default_end(nfe), grid,
                                                   one_call=method in ONE_CALL_PER_STEP)
        problem.solver, problem.options, problem.grid = spec.name, opts, grid
    tau0, alpha0, B0 = plan_tensors(spec.name, grid, opts, process)
    meta = dict(sigma_end=sigma_end, solver=spec.name, process=process.config(), fingerprint=fingerprint(denoiser))
    start_plan = SolverPlan.from_tensors(tau0, alpha0, B0, method="solver", **meta)
    if start_plan.nfe != nfe:
        raise ValueError(f"solver {spec.name!r} makes {start_plan.nfe} calls on its grid for nfe={nfe}")
    t0 = time.monotonic()
    run = {
        "solver": lambda: (tau0, alpha0, B0),
        "grid": lambda: M.grid(problem),
        "evolution": lambda: M.evolution(problem),
        "s3": lambda: M.s3(problem),
        "linear_subspace": lambda: M.linear_subspace(problem),
        "dc_solver": lambda: M.dc_solver(problem),
        "dpm_solver_v3": lambda: M.dpm_solver_v3(problem),
        "momentum": lambda: M.momentum(problem),
        "joint": lambda: M.joint(problem),
    }[method]
    tau, alpha, B = run()
    seconds = time.monotonic() - t0
    plan = SolverPlan.from_tensors(tau, alpha, B, method=method, **meta)
    err0 = plan_error(start_plan, denoiser, x0, target, cond, weights, batch_size)
    err = plan_error(plan, denoiser, x0, target, cond, weights, batch_size)
    fell_back = not (err <= err0)
    if fell_back:
        plan, err = SolverPlan.from_tensors(tau0, alpha0, B0, method=method, **meta), err0
    metrics = {"calibration_noises": len(x0), "start_error": err0, "error": err, "fell_back_to_start": fell_back,
               "seconds": round(seconds, 3), "teacher_seconds": round(t_teacher, 3), "loss_evaluations": problem.evals,
               "grid": problem.grid,
               "start": {"solver": spec.name, "options": opts}}
    if weights is not None:
        metrics.update(screened_noises=screened, hard_noises=int((weights == 1).sum()) if select < screened else 0,
                       screen_seconds=round(t_screen, 3))
    if candidates:
        metrics["start_candidates"] = candidates
        metrics["start"]["candidate"] = min(candidates, key=candidates.get)
    if xh is not None:
        metrics.update(heldout_noises=len(xh),
                       heldout_start_error=plan_error(start_plan, denoiser, xh, target_h, heldout_cond,
                                                      batch_size=batch_size),
                       heldout_error=plan_error(plan, denoiser, xh, target_h, heldout_cond, batch_size=batch_size))
    for key in ("s3_choice", "dc_ratios", "momentum_beta"):
        if hasattr(problem, key):
            metrics[key] = getattr(problem, key)
    if neighbours and xh is not None:
        metrics["neighbours"] = _neighbours(problem, denoiser, xh, target_h, spec.name, opts, heldout_cond)
    if batch_size is not None:
        metrics["batch_size"] = batch_size
    plan.metrics = metrics
    return plan


# starting points tried when no solver is named (the default's end is kept): (solver, schedule, solver options,
# schedule options); the singlestep DPM-Solvers (several calls per step, budget split as DPM-Solver-fast) only for
# methods that do not need one call per step. The focused UniPC grids put extra steps around σ̄_c (tuned density ×
# `focus_factor`): where samples choose their mode (σ̄ near the distance between modes), the start grid's
# allocation of calls decides how many samples a plan sends to another mode, and the fitting stays near the
# allocation it starts from (random16d at 10 calls, 5000 noises: 25 switches on the tuned grid, 9 with focus (1, 3))
FOCUS_CENTERS = (0.7, 1.0, 1.4, 2.0)
FOCUS_GAIN = 3.0
START_CANDIDATES = ((None, None, {}, {}), ("dpmpp_2m", "karras", {}, {}), ("dpmpp_2m", "logsnr", {}, {}),
                    ("dpmpp_3m", "logsnr", {}, {}), ("unipc", "logsnr", {}, {}), ("unipc", "karras", {}, {}),
                    ("deis", "logsnr", {"coordinate": "log_sigma"}, {}), ("ipndm", "karras", {}, {}),
                    ("dpm_solver_3", "logsnr", {}, {}), ("dpm_solver_2", "logsnr", {}, {}), ("unipc", "tuned", {}, {}),
                    ("ipndm", "tuned", {}, {}), ("deis", "tuned", {"coordinate": "log_sigma"}, {}),
                    *(("unipc", "tuned", {}, {"focus": (c, FOCUS_GAIN)}) for c in FOCUS_CENTERS))
ONE_CALL_PER_STEP = ("s3", "momentum", "dpm_solver_v3", "dc_solver")


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def _default_end(nfe: int) -> str:
    from ..solvers import default_for

    return default_for(nfe).end


def _best_start(problem, process, nfe, end, default_grid, one_call: bool):
    """The candidate (solver, schedule) with the smallest teacher loss on the calibration noises; the grids share
    the default's end so that the teacher targets stay valid."""
    scores, best = {}, None
    for solver, schedule, options, schedule_options in START_CANDIDATES:
        try:
            spec, grid, opts, calls = resolve(solver, process=process, nfe=nfe, schedule=schedule, end=end,
                                              options=options or None, schedule_options=schedule_options or None)
            grid = [float(s) for s in grid]
            if calls != nfe or not (_close(grid[0], default_grid[0]) and _close(grid[-1], default_grid[-1])):
                continue
            if one_call and len(grid) - 1 != nfe:
                continue
            grid[0], grid[-1] = default_grid[0], default_grid[-1]  # the teacher's levels exactly
            tau, alpha, B = plan_tensors(spec.name, grid, opts, process)
            with torch.no_grad():
                err = float(problem.loss(tau, alpha, B).sqrt())
        except ValueError:
            continue
        label = f"{spec.name}:{schedule or 'default'}" + "".join(f"({k} {v})" for k, v in schedule_options.items())
        scores[label] = err
        if best is None or err < best[0]:
            best = (err, spec, grid, opts)
    return best[1], best[2], best[3], scores


def select_noises(denoiser, x0: Tensor, nfe: int, select: int, start: tuple, *, hard_fraction: float = 0.25,
                  seed: int = 0, cond: dict | None = None, screen_nfe: int | None = None,
                  batch_size: int | None = None) -> tuple[Tensor, Tensor]:
    """A stratified calibration set of `select` of the starts `x0` (N of them): their indices and importance
    weights (`cond` tensors with a batch dimension are per-start conditioning).

    Score every start by ‖start solver(x̄) - reference(x̄)‖² (the reference: `solver_teacher` with `screen_nfe`
    calls, default max(4 nfe, 24), far cheaper than the teacher); the stratum H = the h = round(hard_fraction ·
    select) highest scores is taken whole (weight 1), the rest E by a uniform sample of select - h (weight
    (N - h) / (select - h)). Then Σ_i w_i f(x̄_i) over the selection is an unbiased estimate of Σ_{all N} f, the
    standard stratified estimator (Cochran, "Sampling Techniques", Eq. 5.1). Returned in a random order (so a
    validation slice mixes both strata), weights summing to N. The screening runs on at most `batch_size` starts at
    once."""
    n = len(x0)
    if not isinstance(select, int) or select < 2:
        raise ValueError(f"select must be an integer >= 2; got {select!r}")
    if select > n:
        raise ValueError(f"select={select} is more than the {n} calibration noises to choose from")
    if not 0 <= hard_fraction < 1:
        raise ValueError(f"hard_fraction must be in [0, 1); got {hard_fraction!r}")
    g = torch.Generator().manual_seed(seed + 7919)
    h = min(int(round(hard_fraction * select)), select - 1)
    if select == n:
        return torch.arange(n), torch.ones(n, dtype=F64)
    spec, grid, opts = start
    ref_teacher = solver_teacher(denoiser, nfe=screen_nfe or max(4 * nfe, 24))
    cond = cond or {}
    with torch.no_grad():
        tau, alpha, B = (v.tolist() for v in plan_tensors(spec.name, grid, opts, denoiser.process))
        out = M.in_chunks(lambda x, c: run_linear(denoiser, x, tau, alpha, B, cond=c), x0, cond, batch_size)
        ref = _teach(ref_teacher, x0, grid[0], grid[-1], cond, batch_size)
    score = (out - ref).pow(2).flatten(1).sum(1)
    if not torch.isfinite(score).all():
        raise ValueError("screening produced non-finite errors (check the denoiser)")
    order = score.argsort(descending=True).cpu()
    hard, rest = order[:h], order[h:]
    easy = rest[torch.randperm(len(rest), generator=g)[:select - h]]
    idx = torch.cat([hard, easy])
    w = torch.cat([torch.ones(h, dtype=F64), torch.full((select - h,), (n - h) / (select - h), dtype=F64)])
    perm = torch.randperm(select, generator=g)
    return idx[perm], w[perm]


def _starts(denoiser, noises, heldout, seed, sigma_max, shape):
    process = denoiser.process

    def draw(spec, offset):
        if isinstance(spec, Tensor):
            if not spec.is_floating_point() or not torch.isfinite(spec).all():
                raise ValueError("noises must be finite floating-point tensors")
            return process.noise_to_canonical(spec, sigma_max).to(spec.dtype)
        if not isinstance(spec, int) or spec < 0:
            raise ValueError(f"noise counts must be non-negative integers or tensors; got {spec!r}")
        if spec == 0:
            return None
        if shape is None:
            raise ValueError("give noises as a tensor, or their count with shape=(sample shape)")
        g = torch.Generator().manual_seed(seed + offset)
        return process.noise_to_canonical(torch.randn(spec, *shape, generator=g, dtype=F64), sigma_max)

    x0 = draw(noises, 0)
    if x0 is None:
        raise ValueError("calibration needs at least one noise")
    xh = draw(heldout, 1_000_003) if not (isinstance(heldout, int) and heldout == 0) else None
    if xh is not None and xh.shape[1:] != x0.shape[1:]:
        raise ValueError(f"held-out noises have shape {tuple(xh.shape[1:])}, calibration noises {tuple(x0.shape[1:])}")
    return x0, xh


def _per_sample(cond: dict) -> bool:
    return any(isinstance(v, Tensor) and v.ndim > 0 for v in cond.values())


def _teach(teacher, x, s_from, s_to, cond, batch_size=None):
    """The teacher's map of the states x from σ̄_from to σ̄_to, on at most `batch_size` states at once."""
    return M.in_chunks(lambda xc, c: teacher(xc, s_from, s_to, **c) if c else teacher(xc, s_from, s_to), x, cond,
                       batch_size)


def _check_teacher(y, x):
    if not isinstance(y, Tensor) or y.shape != x.shape:
        raise ValueError(f"teacher returned shape {tuple(getattr(y, 'shape', ()))} for starts of shape "
                         f"{tuple(x.shape)}: teacher and student must have the same shapes")
    if not torch.isfinite(y).all():
        raise ValueError("teacher returned non-finite values")
    return y.to(x.dtype)


def _neighbours(problem, denoiser, xh, target_h, solver, opts, cond) -> dict:
    """Held-out error of the starting solver at nfe ± 1 on the plan's grid resampled log-linearly."""
    out = {}
    grid = problem.grid
    to_zero = grid[-1] == 0
    positive = grid[:-1] if to_zero else grid
    for dn in (-1, 1):
        m = len(positive) + dn
        if m < 2:
            continue
        g = loglinear_interp(positive, m).tolist() + ([0.0] if to_zero else [])
        try:
            tau, alpha, B = plan_tensors(solver, g, opts, problem.process)
        except ValueError as e:
            out[str(len(g) - 1)] = f"n/a ({e})"
            continue
        p = SolverPlan.from_tensors(tau, alpha, B, sigma_end=grid[-1])
        out[str(len(tau))] = plan_error(p, denoiser, xh, target_h, cond, batch_size=problem.batch_size)
    return out


class _CallableModule(types.ModuleType):
    """`diffkit.calibrate` is both this subpackage and the function: calling the module calls `calibrate`."""

    def __call__(self, *args, **kwargs) -> SolverPlan:
        return calibrate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
