"""Calibration methods. Each takes a `Problem` (the denoiser, calibration starts, teacher targets, the starting
solver and grid) and returns plan tensors (τ, α, B); `diffkit.calibrate` keeps the result only if it beats the
starting plan on the calibration noises.

- `grid`: the step grid, by gradient descent through the solver (LD3-style: "Learning to Discretize Denoising
  Diffusion ODEs", Tong et al. 2024);
- `evolution`: the step grid, by evolutionary search (AutoDiffusion, Li et al. 2023);
- `s3`: per-step solver (order, prediction type, corrector) and grid (S³: "A Unified Sampling Framework for Solver
  Searching of Diffusion Probabilistic Models", Liu et al. 2024);
- `linear_subspace`: each next state a least-squares combination of the previous states and outputs (OLSS,
  Duan et al. 2023);
- `dc_solver`: per-step compensation ratios of a predictor-corrector (DC-Solver, Zhao et al. 2024);
- `dpm_solver_v3`: empirical model statistics, the linear part of D integrated exactly (Zheng et al. 2023);
- `momentum`: heavy-ball momentum on the solver's slope ("Diffusion Sampling with Momentum for Mitigating
  Divergence Artifacts", Wizadwongsa et al. 2023);
- `joint`: grid, then coefficients, then levels and coefficients together by L-BFGS on the teacher loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .plan import run_linear
from .probe import PlanOfGrid, plan_tensors, unflatten

Tensor = torch.Tensor
F64 = torch.float64

__all__ = ["Problem", "METHODS", "methods"]


@dataclass
class Problem:
    """What every method sees. `x0`/`target`: canonical starts at σ̄_max and teacher outputs at `sigma_end` for the
    calibration noises; `teacher(x, s_from, s_to)` maps states between levels; `grid` the starting solver grid.
    `batch_size` bounds how many samples go through the model at once (None: all): the losses, their gradients
    and the methods' model calls run chunk by chunk (`chunks`), so memory is that of one chunk."""

    denoiser: Callable
    x0: Tensor
    target: Tensor
    teacher: Callable
    solver: str
    options: dict
    grid: list[float]
    process: object = None
    cond: dict = field(default_factory=dict)
    deadline: float = math.inf
    log: Callable = print
    evals: int = 0
    x0_val: Tensor | None = None  # validation split of the calibration noises: early stopping of the optimisers
    target_val: Tensor | None = None
    weights: Tensor | None = None  # per-noise weights (importance weights of a mined calibration set; None: equal)
    weights_val: Tensor | None = None
    batch_size: int | None = None

    @property
    def n(self) -> int:
        return len(plan_tensors(self.solver, self.grid, self.options, self.process)[0])

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def denoise(self, x: Tensor, sigma: float) -> Tensor:
        """D(x̄, σ̄) for a batch of states, without gradients, in chunks."""
        with torch.no_grad():
            return in_chunks(lambda xc, cond: self.denoiser(xc, sigma, **cond), x, self.cond, self.batch_size)

    def loss(self, tau, alpha, B) -> Tensor:
        """Relative mean squared error of the plan's output against the teacher on the calibration noises;
        differentiable in τ, α and B (through the model's noise-level input for τ), chunk by chunk."""
        self.evals += 1
        return self._rel_mse(tau, alpha, B, self.x0, self.target, self.weights)

    def val_loss(self, tau, alpha, B) -> float:
        """The same on the validation split (the training loss when there is none)."""
        with torch.no_grad():
            tau, alpha, B = (v.detach() if isinstance(v, Tensor) else v for v in (tau, alpha, B))
            if self.x0_val is None:
                return self.loss(tau, alpha, B).item()
            return self._rel_mse(tau, alpha, B, self.x0_val, self.target_val, self.weights_val).item()

    def _rel_mse(self, tau, alpha, B, x0, target, weights) -> Tensor:
        denom = squared_error(torch.zeros_like(target), target, weights)
        parts = chunks(len(x0), self.batch_size)
        cond = self.cond

        def part(i, t, a, b):
            sl = parts[i]
            sig = (lambda s, y: s.expand(y.shape[0])) if t.requires_grad else None
            out = run_linear(self.denoiser, x0[sl], t, a, b, cond=index_cond(cond, sl, len(x0)), sigma_arg=sig)
            return squared_error(out, target[sl], None if weights is None else weights[sl]) / denom

        return chunked_sum(part, len(parts), tau, alpha, B)

    def base(self, grid=None, solver=None, options=None):
        return plan_tensors(solver or self.solver, grid or self.grid, self.options if options is None else options,
                            self.process)


def squared_error(out: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Σ_i w_i ‖out_i - target_i‖² (w = 1 when `weights` is None)."""
    per = (out - target).pow(2).flatten(1).sum(1)
    return per.sum() if weights is None else (per * weights.to(out.device, out.dtype)).sum()


def rel_mse(out: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Σ_i w_i ‖out_i - target_i‖² / Σ_i w_i ‖target_i‖² (equal weights when `weights` is None): the relative
    mean squared error, or its importance-weighted estimate over a population the noises were drawn from."""
    return squared_error(out, target, weights) / squared_error(torch.zeros_like(target), target, weights)


def chunks(n: int, batch_size: int | None) -> list[slice]:
    """Consecutive slices of at most `batch_size` of n samples (one slice when `batch_size` is None)."""
    size = n if batch_size is None else batch_size
    return [slice(i, min(i + size, n)) for i in range(0, n, max(size, 1))]


def index_cond(cond: dict, index, n: int) -> dict:
    """The conditioning of the samples `index` (a slice or an index tensor) of a batch of n: tensors whose first
    dimension is that batch are indexed with it, everything else is shared."""
    return {k: v[index] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n else v for k, v in cond.items()}


def in_chunks(fn: Callable, x: Tensor, cond: dict, batch_size: int | None) -> Tensor:
    """fn(x_chunk, cond_chunk) over the chunks of the batch x, concatenated."""
    parts = chunks(len(x), batch_size)
    if len(parts) == 1:
        return fn(x, cond)
    return torch.cat([fn(x[sl], index_cond(cond, sl, len(x))) for sl in parts])


class _ChunkedSum(torch.autograd.Function):
    """Σ_c part(c, *tensors) whose gradient with respect to the tensors is accumulated chunk by chunk during the
    forward pass (each chunk's graph through the model is freed before the next one is built), so that the
    memory of a full-batch loss and its backward pass is that of one chunk."""

    @staticmethod
    def forward(ctx, part, n_parts, *tensors):
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = [torch.zeros_like(leaf) for leaf in wanted]
        total = None
        for c in range(n_parts):
            with torch.enable_grad():
                value = part(c, *leaves)
                if wanted and value.requires_grad:
                    for acc, g in zip(grads, torch.autograd.grad(value, wanted, allow_unused=True)):
                        if g is not None:
                            acc += g
            total = value.detach() if total is None else total + value.detach()
        ctx.save_for_backward(*grads)
        ctx.wanted = [t.requires_grad for t in tensors]
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        return None, None, *(grad_out * next(saved) if w else None for w in ctx.wanted)


def chunked_sum(part: Callable, n_parts: int, *tensors: Tensor) -> Tensor:
    """Σ_c part(c, *tensors) for c < n_parts, differentiable in the tensors with the memory of one part at a time
    (`_ChunkedSum`); a plain sum without gradients when none is needed."""
    tensors = tuple(torch.as_tensor(t, dtype=F64) if not isinstance(t, Tensor) else t for t in tensors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _ChunkedSum.apply(part, n_parts, *tensors)
    with torch.no_grad():
        return sum(part(c, *tensors) for c in range(n_parts))


def _lbfgs(params, closure_loss, problem: Problem, max_evals: int, plan_of: Callable | None = None):
    """Full-batch L-BFGS with strong-Wolfe line search, stopped by the evaluation count or the deadline. Returns
    the parameters with the best validation loss seen (`plan_of()` builds the plan from the current parameters;
    without it, the best training loss): early stopping against overfitting the calibration noises."""
    opt = torch.optim.LBFGS(params, lr=1, max_iter=max_evals, max_eval=max_evals, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-14, tolerance_change=1e-16)
    best = [math.inf, [p.detach().clone() for p in params]]

    def closure():
        opt.zero_grad()
        if problem.out_of_time():
            raise _Stop
        loss = closure_loss()
        if not torch.isfinite(loss):
            return loss
        score = problem.val_loss(*plan_of()) if plan_of is not None else loss.item()
        if score < best[0]:
            best[0], best[1] = score, [p.detach().clone() for p in params]
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except _Stop:
        pass
    with torch.no_grad():
        for p, v in zip(params, best[1]):
            p.copy_(v)
    return best[0]


class _Stop(Exception):
    pass


# -- grids ------------------------------------------------------------------------------------------------------


MIN_GAP = 0.1  # each log-gap keeps at least MIN_GAP / m of the log-range: no bunched levels, no huge coefficients


def _gap_fractions(logits: Tensor) -> Tensor:
    m = len(logits)
    return MIN_GAP / m + (1 - MIN_GAP) * torch.softmax(logits, 0)


def _grid_param(grid: list[float]) -> tuple[Tensor, float, float, bool]:
    """Free parameters of a grid [σ_0, g_1 .. g_{m-1}, g_last(, 0)]: logits of the m log-gaps between the fixed
    first and last positive levels, as fractions of the log-range floored at MIN_GAP / m (any logits give a
    strictly decreasing grid)."""
    to_zero = grid[-1] == 0
    pos = grid[:-1] if to_zero else grid
    frac = torch.tensor(np.diff(-np.log(pos)), dtype=F64)
    frac = frac / frac.sum()
    m = len(frac)
    inner = ((frac - MIN_GAP / m) / (1 - MIN_GAP)).clamp_min(1e-3 / m)
    return inner.log(), pos[0], pos[-1], to_zero


def _grid_of(logits: Tensor, first: float, last: float, to_zero: bool = False) -> Tensor:
    w = _gap_fractions(logits)
    logs = math.log(first) + (math.log(last) - math.log(first)) * torch.cat([w.new_zeros(1), w.cumsum(0)])
    return logs  # log of the positive levels (the zero end is added by the caller)


def _grid_list(logits: Tensor, first, last, to_zero) -> list[float]:
    g = _grid_of(logits.detach(), first, last, to_zero).exp().tolist()
    g[0], g[-1] = first, last
    return g + ([0.0] if to_zero else [])


def grid(problem: Problem, max_evals: int = 60):
    """LD3-style grid optimisation: minimise the teacher loss over the step grid by L-BFGS, with the solver's
    coefficients differentiated with respect to the grid (`PlanOfGrid`) and the model with respect to its
    noise-level input (autograd)."""
    logits, first, last, to_zero = _grid_param(problem.grid)
    if len(logits) < 2:
        return problem.base()
    logits.requires_grad_(True)
    n = problem.n

    def plan_of(lg):
        logs = _grid_of(lg, first, last, to_zero)
        flat = PlanOfGrid.apply(logs, problem.solver, problem.options, 0.0 if to_zero else -1.0, problem.process)
        return unflatten(flat, n)

    def closure_loss():
        tau, alpha, B = plan_of(logits)
        return problem.loss(tau, alpha, B)

    _lbfgs([logits], closure_loss, problem, max_evals,
           plan_of=lambda: problem.base(_grid_list(logits, first, last, to_zero)))
    problem.grid = _grid_list(logits, first, last, to_zero)
    return problem.base()


def evolution(problem: Problem, population: int = 16, generations: int = 25, sigma: float = 0.3, seed: int = 0):
    """AutoDiffusion's evolutionary search (Li et al. 2023, Sec. 3.3) over the step grid: a population of grids
    (log-gap logits), fitness = teacher loss of the starting solver on the calibration noises (no gradients),
    each generation keeps the best quarter and refills with mutations (Gaussian in the logits) and uniform
    crossovers of the survivors."""

    def fitness(grid):
        with torch.no_grad():
            v = problem.loss(*problem.base(grid)).item()
        return v if math.isfinite(v) else math.inf

    best = _evolve_grid(problem, fitness, generations, population, sigma, seed, crossover=0.5)
    if best is not None:
        problem.grid = best
    return problem.base()


# -- per-step solver choice ----------------------------------------------------------------------------------------

S3_CANDIDATES = {
    "euler": ("euler", {}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "dpmpp_3m": ("dpmpp_3m", {}),
    "deis_2": ("deis", {"order": 2, "coordinate": "log_sigma"}),
    "deis_3": ("deis", {"order": 3, "coordinate": "log_sigma"}),
    "unipc_2": ("unipc", {"order": 2}),
    "unipc_3": ("unipc", {"order": 3}),
    "unipc_3_no_corrector": ("unipc", {"order": 3, "corrector": False}),
    "ipndm": ("ipndm", {}),
}


def s3(problem: Problem, sweeps: int = 2, candidates: dict | None = None):
    """S³-style solver-schedule search (Liu et al. 2024): every one-call-per-step linear solver is a row of
    coefficients per step on a shared grid, so a per-step choice of order, prediction type (data: DPM-Solver++ /
    UniPC; noise: DEIS / iPNDM) and corrector is a choice of rows. Coordinate descent over the steps (each step
    tries every candidate's row, keeping the best teacher loss), alternated with evolutionary search of the grid for
    the chosen rows."""
    cands = candidates or S3_CANDIDATES
    n = len(problem.grid) - 1

    def tables(grid):
        out = {}
        for name, (solver, opts) in cands.items():
            tau, alpha, B = plan_tensors(solver, grid, opts, problem.process)
            if len(tau) == n:
                out[name] = (tau, alpha, B)
        return out

    def compose(tab, choice):
        tau = tab[choice[0]][0]
        alpha = torch.stack([tab[c][1][j] for j, c in enumerate(choice)])
        B = torch.stack([tab[c][2][j] for j, c in enumerate(choice)])
        return tau, alpha, B

    def score(tab, choice):
        with torch.no_grad():
            v = problem.loss(*compose(tab, choice)).item()
        return v if math.isfinite(v) else math.inf

    tab = tables(problem.grid)
    start = min(tab, key=lambda c: score(tab, [c] * n))
    choice = [start] * n
    best = score(tab, choice)
    for _ in range(sweeps):
        for j in range(n):
            for c in tab:
                if problem.out_of_time():
                    break
                trial = choice[:j] + [c] + choice[j + 1:]
                v = score(tab, trial)
                if v < best:
                    best, choice = v, trial
        # the grid for these rows: a short evolutionary search through the composed plan
        solver_rows = choice

        def fitness_grid(grid, rows=solver_rows):
            t = tables(grid)
            return score(t, rows) if all(r in t for r in rows) else math.inf

        g = _evolve_grid(problem, fitness_grid, generations=8)
        if g is not None:
            problem.grid, tab = g, tables(g)
            best = score(tab, choice)
    problem.s3_choice = choice
    return compose(tab, choice)


def _evolve_grid(problem: Problem, fitness, generations: int, population: int = 12, sigma: float = 0.25, seed=1,
                 crossover: float = 0.0):
    """Evolve grid log-gap logits from the problem's grid: keep the best quarter of the population, refill with
    uniform crossovers of two survivors (probability `crossover`) or Gaussian mutations of one; `fitness(grid)`
    scores a grid. Returns the best grid (None when the grid has no free level)."""
    base, first, last, to_zero = _grid_param(problem.grid)
    if len(base) < 2:
        return None
    rng = np.random.default_rng(seed)

    def score(logits):
        return fitness(_grid_list(torch.as_tensor(logits), first, last, to_zero))

    pop = [base.numpy()] + [base.numpy() + sigma * rng.standard_normal(len(base)) for _ in range(population - 1)]
    scores = [score(p) for p in pop]
    for _ in range(generations):
        if problem.out_of_time():
            break
        order = np.argsort(scores)[:max(2, population // 4)]
        keep, kscores = [pop[i] for i in order], [scores[i] for i in order]
        kids = []
        while len(keep) + len(kids) < population:
            if crossover and rng.random() < crossover:
                a, b = rng.choice(len(keep), 2, replace=False)
                kids.append(np.where(rng.random(len(base)) < 0.5, keep[a], keep[b]))
            else:
                kids.append(keep[rng.integers(len(keep))] + sigma * rng.standard_normal(len(base)))
        pop, scores = keep + kids, kscores + [score(k) for k in kids]
    return _grid_list(torch.as_tensor(pop[int(np.argmin(scores))]), first, last, to_zero)


# -- learned coefficients ------------------------------------------------------------------------------------------


def teacher_states(problem: Problem, tau: Tensor) -> list[Tensor]:
    """Teacher states at τ_1 .. τ_{n-1} chained from the calibration starts, then the teacher output."""
    states, x, s = [], problem.x0, float(tau[0])
    for lv in tau[1:].tolist():
        x = problem.teacher(x, s, lv)
        states.append(x)
        s = lv
    return states + [problem.target]


def linear_subspace(problem: Problem, ridge: float = 1e-6, init=None):
    """Optimal Linear Subspace Search (Duan et al. 2023, Eq. 9): on the starting grid, each next state
    x̄_{j+1} = α_j x̄_j + Σ_k B_jk D_k is fitted by (ridge-regularised) least squares to the teacher's state at
    τ_{j+1}, row by row along the student's own trajectory; the ridge pulls towards the starting solver's row."""
    tau, alpha0, B0 = init if init is not None else problem.base()
    targets = teacher_states(problem, tau)
    n = len(tau)
    alpha, B = alpha0.clone(), B0.clone()
    x, outs = problem.x0, []
    rw = torch.ones(1, dtype=F64, device=x.device)  # per-element weights (mean 1) of the weighted least squares
    if problem.weights is not None:
        w = problem.weights.to(x.device, F64)
        rw = (w * len(w) / w.sum()).repeat_interleave(x[0].numel())
    with torch.no_grad():
        for j in range(n):
            outs.append(problem.denoise(x, float(tau[j])))
            feats = torch.stack([x.flatten()] + [o.flatten() for o in outs], 1).to(F64)  # (N*d, j+2)
            y = targets[j].flatten().to(F64)
            c0 = torch.cat([alpha0[j:j + 1], B0[j, :j + 1]])
            wf = feats * rw[:, None]
            # the (j+2)-dimensional normal equations are solved on the CPU, beside the plan's coefficients
            gram, rhs = (wf.T @ feats / len(y)).cpu(), (wf.T @ y / len(y)).cpu()
            scale = torch.diagonal(gram).clamp_min(1e-30)
            c = torch.linalg.solve(gram + ridge * torch.diag(scale), rhs + ridge * scale * c0)
            alpha[j], B[j, :j + 1] = c[0], c[1:]
            x = (alpha[j] * x + sum(B[j, k] * outs[k] for k in range(j + 1))).to(x.dtype)
    return tau, alpha, B


def joint(problem: Problem, max_evals: int = 400, grid_evals: int = 40):
    """Grid (LD3-style), then learned coefficients (OLSS, kept if they lower the validation loss), then L-BFGS on
    levels, α and B together against the teacher output (the final state is what users see; intermediate states
    are free to leave the teacher path).
    The levels keep the grid parametrisation (first and last fixed, log-gaps floored), with early stopping on the
    validation split. The OLSS stage runs even when the grid stage has used the time budget: it costs one teacher
    pass through the grid and is worth more per second than either gradient stage (on the digits UNet at 6 calls,
    budget 20 s: calibration error 0.21 -> 0.065 with it, 0.21 after the grid stage alone)."""
    start = time.monotonic()
    gridded = grid(problem, max_evals=grid_evals)
    fitted = linear_subspace(problem, init=gridded)
    with torch.no_grad():  # OLSS fits the teacher path, not the output: keep it only if the output improves
        tau, alpha, B = min((gridded, fitted), key=lambda p: problem.val_loss(*p))
    levels = tau.tolist() + ([problem.grid[-1]] if problem.grid[-1] > 0 else [])
    logits, first, last, _ = _grid_param(levels)
    n = len(tau)
    if len(logits) < 1 or n < 2:
        return tau, alpha, B
    logits.requires_grad_(True)
    a, b = alpha.clone().requires_grad_(True), B.clone().requires_grad_(True)
    mask = torch.tril(torch.ones_like(B))

    def current():
        return _grid_of(logits, first, last).exp()[:n], a, b * mask

    _lbfgs([logits, a, b], lambda: problem.loss(*current()), problem, max_evals, plan_of=current)
    problem.log(f"joint: {time.monotonic() - start:.1f} s")
    tau, alpha, B = (v.detach() for v in current())
    tau[0] = first
    return tau, alpha, B


# -- compensation, statistics, momentum ----------------------------------------------------------------------------


def _lagrange_weights(nodes: Tensor, at: Tensor) -> Tensor:
    """Lagrange basis ℓ_k(at) over `nodes` (differentiable in `at`)."""
    w = []
    for k in range(len(nodes)):
        others = torch.cat([nodes[:k], nodes[k + 1:]])
        w.append(torch.prod((at - others) / (nodes[k] - others)) if len(others) else at.new_ones(()))
    return torch.stack(w)


def dc_solver(problem: Problem, max_evals: int = 60, order: int = 3):
    """DC-Solver's dynamic compensation (Zhao et al. 2024, Sec. 3.2): in a predictor-corrector (UniPC) the newest
    output D_j is used at λ_j although the corrector has since moved the state; DC replaces it by the Lagrange
    interpolation of the last outputs at λ_{j-1} + ρ_j (λ_j - λ_{j-1}) (ρ_j = 1: no compensation), with one ratio
    per step fitted on the calibration noises (L-BFGS)."""
    tau0, alpha, B0 = problem.base(solver="unipc", options={"order": min(order, 3)})
    n = len(tau0)
    lam = -tau0.log()
    rho = torch.ones(n, dtype=F64, requires_grad=True)

    def compensated(r):
        rows = []
        for j in range(n):
            row = B0[j].clone()
            if j >= 1:
                k = min(order, j + 1)
                nodes = lam[j - k + 1:j + 1]
                at = lam[j - 1] + r[j] * (lam[j] - lam[j - 1])
                w = _lagrange_weights(nodes, at)
                row = torch.cat([row[:j - k + 1], row[j - k + 1:j + 1] + B0[j, j] * (w - (nodes == lam[j]).to(F64)),
                                 row[j + 1:]])
            rows.append(row)
        return torch.stack(rows)

    _lbfgs([rho], lambda: problem.loss(tau0, alpha, compensated(rho)), problem, max_evals,
           plan_of=lambda: (tau0, alpha, compensated(rho)))
    problem.dc_ratios = rho.detach().tolist()
    return tau0, alpha, compensated(rho).detach()


def ems_slopes(problem: Problem, levels: Tensor) -> Tensor:
    """DPM-Solver-v3's empirical model statistics in their scalar form: at each level σ̄ the least-squares slope
    l(σ̄) = Cov(D, x̄) / Var(x̄) of the model output on its input over teacher states (Zheng et al. 2023, Eq. 11
    with l a multiple of the identity), the linear part of D that the solver then integrates exactly."""
    ls = []
    x, s = problem.x0, float(levels[0])
    with torch.no_grad():
        for lv in levels.tolist():
            if lv != s:
                x = problem.teacher(x, s, lv)
                s = lv
            d = problem.denoise(x, lv)
            xc, dc = x - x.mean(0), d - d.mean(0)
            ls.append(float((xc * dc).sum() / xc.pow(2).sum().clamp_min(1e-300)))
    return torch.tensor(ls, dtype=F64)


def dpm_solver_v3(problem: Problem, order: int = 2, fine: int = 8, quad: int = 16, max_slope: float = 0.999):
    """DPM-Solver-v3 (Zheng et al. 2023) with scalar empirical model statistics. Writing D = l x̄ + (1 - l) R with
    l(λ) the EMS slope (`ems_slopes`, capped at `max_slope`), the ODE in λ = -log σ̄ is
    dx̄/dλ = (1 - l)(R - x̄): its linear part is integrated exactly (integrating factor e^{-∫(1-l)dλ}) and the
    rescaled residual R_k = (D_k - l_k x̄_k) / (1 - l_k) is extrapolated by a polynomial in λ through the last
    `order` calls — the paper's Eq. 14 with its s_λ term played by the 1 - l weight and b_λ = 0. R is constant for
    a single Gaussian (R = its mean), where the method is exact up to quadrature; l = 0 gives the exponential
    Adams–Bashforth (DPM-Solver++ family) with exact φ-integrals. l is measured at `fine` levels per step and
    interpolated linearly in λ."""
    grid_ = problem.grid
    to_zero = grid_[-1] == 0
    tau = torch.tensor(grid_[:-1], dtype=F64)
    n = len(tau)
    lam_nodes = -tau.log()
    lam_end = -math.log(grid_[-1]) if not to_zero else lam_nodes[-1].item() + 4.0
    # statistics on a fine λ grid
    fine_lams = torch.cat([torch.linspace(float(lam_nodes[i]), float(lam_nodes[i + 1] if i + 1 < n else lam_end),
                                          fine + 1, dtype=F64)[:-1] for i in range(n)] + [torch.tensor([lam_end])])
    slopes = ems_slopes(problem, (-fine_lams).exp()).clamp(max=max_slope)
    gl_x, gl_w = np.polynomial.legendre.leggauss(quad)

    def l_at(lv):
        return float(np.interp(lv, fine_lams.numpy(), slopes.numpy()))

    def L(a, b):  # ∫_a^b (1 - l) dλ by Gauss–Legendre
        m, r = (a + b) / 2, (b - a) / 2
        return r * sum(w * (1 - l_at(m + r * x)) for x, w in zip(gl_x, gl_w))

    # coordinates of states in the basis (x̄_0, D_0, .., D_{n-1})
    M = torch.zeros(n + 1, n + 1, dtype=F64)
    M[0, 0] = 1.0
    for j in range(n):
        a = float(lam_nodes[j])
        b = float(lam_nodes[j + 1]) if j + 1 < n else lam_end
        k = min(order, j + 1)
        nodes = [float(lam_nodes[j - i]) for i in range(k)]
        # R_i = (D_i - l_i x̄_i) / (1 - l_i) in coordinates
        R = []
        for i in range(k):
            li = l_at(nodes[i])
            r = -li * M[j - i].clone()
            r[j - i + 1] += 1.0
            R.append(r / (1 - li))
        m, rr = (a + b) / 2, (b - a) / 2
        integral = torch.zeros(n + 1, dtype=F64)
        for x, w in zip(gl_x, gl_w):
            u = m + rr * x
            lw = _lagrange_weights(torch.tensor(nodes, dtype=F64), torch.tensor(u, dtype=F64))
            integral += rr * w * (1 - l_at(u)) * math.exp(-L(u, b)) * sum(lw[i] * R[i] for i in range(k))
        M[j + 1] = math.exp(-L(a, b)) * M[j] + integral
        if to_zero and j == n - 1:  # the last step into σ̄ = 0 is the final denoising D_{n-1}
            M[j + 1] = 0.0
            M[j + 1, n] = 1.0
    from .probe import coordinates_to_plan

    alpha, B = coordinates_to_plan(M)
    return tau, alpha, B


def momentum(problem: Problem, betas: tuple = tuple(0.2 + 0.05 * i for i in range(17))):
    """Polyak heavy-ball momentum on the solver's slope ("Diffusion Sampling with Momentum for Mitigating Divergence
    Artifacts", Wizadwongsa et al. 2023, Eq. 10): v_j = (1 - β) v_{j-1} + β d_j with d_j = (x̄_{j+1} - x̄_j) /
    (τ_{j+1} - τ_j) the starting solver's slope and x̄_{j+1} = x̄_j + (τ_{j+1} - τ_j) v_j; β = 1 is the solver. β is
    chosen on the calibration noises. Works on one-call-per-step solvers."""
    tau, alpha0, B0 = problem.base()
    n = len(tau)
    levels = tau.tolist() + [problem.grid[-1]]
    if len(problem.grid) != n + 1:
        raise ValueError("momentum needs a solver with one model call per step")

    def build(beta):
        M = torch.zeros(n + 1, n + 1, dtype=F64)
        M[0, 0] = 1.0
        v = None
        for j in range(n):
            base_next = alpha0[j] * M[j]
            base_next[1:j + 2] += B0[j, :j + 1]
            dt = levels[j + 1] - levels[j]
            d = (base_next - M[j]) / dt
            v = d if v is None else (1 - beta) * v + beta * d
            M[j + 1] = M[j] + dt * v
        from .probe import coordinates_to_plan

        a, b = coordinates_to_plan(M)
        return tau, a, b

    scores = []
    for beta in betas:
        with torch.no_grad():
            scores.append(problem.loss(*build(float(beta))).item())
    best = float(betas[int(np.nanargmin(scores))])
    problem.momentum_beta = best
    return build(best)


METHODS = ("solver", "grid", "evolution", "s3", "linear_subspace", "dc_solver", "dpm_solver_v3", "momentum", "joint")


def methods() -> list[str]:
    """Names accepted by `diffkit.calibrate(method=...)`."""
    return list(METHODS)
