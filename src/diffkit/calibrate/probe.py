"""Read a deterministic solver's linear rule off its code, on any grid.

On a fixed grid a deterministic solver only forms linear combinations of its start and of model outputs, so running
it once with a *probe* — a state of coordinates (1, 0, .., 0) standing for x̄_0 and a model whose k-th call returns
the unit vector of D_k — records, at each call, the coordinates of the state in the basis (x̄_0, D_0, .., D_{n-1}),
and at the end those of the output. `coordinates_to_plan` turns the coordinate matrix M into the plan form
x̄_{j+1} = α_j x̄_j + Σ_k B_jk D_k, and `PlanOfGrid` differentiates the result with respect to the grid by
central differences, so gradient-based grid optimisation works for every registered deterministic solver.
"""

from __future__ import annotations

import torch

from ..solvers import get_solver
from ..solvers import plan as resolve

Tensor = torch.Tensor
F64 = torch.float64

__all__ = ["solver_coordinates", "coordinates_to_plan", "plan_tensors", "PlanOfGrid", "linear_solvers"]


def linear_solvers() -> list[str]:
    """Registered solvers that are linear on a fixed grid (deterministic, not step-size adaptive)."""
    from ..solvers import solvers

    return [name for name in solvers() if not (get_solver(name).stochastic or get_solver(name).adaptive)]


def _check_linear(solver: str):
    spec = get_solver(solver)
    if spec.stochastic or spec.adaptive:
        raise ValueError(f"solver {solver!r} is {'stochastic' if spec.stochastic else 'adaptive'}: a plan needs a "
                         f"deterministic fixed-grid solver; valid: {', '.join(linear_solvers())}")
    return spec


def solver_coordinates(solver: str, sigmas, options: dict | None = None, process=None) -> tuple[list[float], Tensor]:
    """(call levels τ, M) for `solver` on the grid `sigmas`: row j < n of M holds the coordinates of the state of
    call j, row n those of the output, in the basis (x̄_0, D_0, .., D_{n-1}). `process` is needed by solvers that
    step in the process's native time (DEIS's default t coordinate)."""
    _check_linear(solver)
    spec, grid, opts, calls = resolve(solver, schedule=[float(s) for s in sigmas], options=options)
    width = calls + 1
    levels: list[float] = []
    rows: list[Tensor] = []

    def probe(x, sigma, **cond):
        k = len(levels)
        if k >= calls:
            raise RuntimeError(f"solver {solver!r} made more than the {calls} calls it reports")  # pragma: no cover
        levels.append(float(sigma))
        rows.append(x[0].clone())
        out = torch.zeros_like(x)
        out[:, k + 1] = 1.0
        return out

    probe.process = process
    x0 = torch.zeros(1, width, dtype=F64)
    x0[0, 0] = 1.0
    out = spec.fn(probe, x0, grid, **opts)
    if len(levels) != calls:  # pragma: no cover - a registry bug
        raise RuntimeError(f"solver {solver!r} made {len(levels)} calls, not {calls}")
    return levels, torch.stack(rows + [out[0]])


def coordinates_to_plan(M: Tensor) -> tuple[Tensor, Tensor]:
    """(α, B) with x̄_{j+1} = α_j x̄_j + Σ_{k<=j} B_jk D_k from coordinates M ((n+1) x (n+1)): α_j eliminates
    x̄_0 (α_j = M_{j+1,0} / M_{j,0}), the rest is B_jk = M_{j+1,k+1} - α_j M_{j,k+1}."""
    n = M.shape[0] - 1
    alpha = torch.zeros(n, dtype=M.dtype)
    B = torch.zeros(n, n, dtype=M.dtype)
    for j in range(n):
        a = M[j + 1, 0] / M[j, 0] if M[j, 0].abs() > 1e-300 else M.new_zeros(())
        if M[j, 0].abs() <= 1e-300 and M[j + 1, 0].abs() > 1e-12:
            raise ValueError("this solver's rule cannot be written in plan form (a state without x̄_0 is followed "
                             "by one with it)")
        alpha[j] = a
        B[j, :j + 1] = M[j + 1, 1:j + 2] - a * M[j, 1:j + 2]
        if j + 2 <= n and float((M[j + 1, j + 2:] - a * M[j, j + 2:]).abs().max()) > 1e-9:  # pragma: no cover
            raise RuntimeError("solver state depends on future model outputs")
    return alpha, B


def plan_tensors(solver: str, sigmas, options: dict | None = None, process=None) -> tuple[Tensor, Tensor, Tensor]:
    """(τ, α, B) of `solver` on `sigmas` (see `solver_coordinates`)."""
    levels, M = solver_coordinates(solver, sigmas, options, process)
    alpha, B = coordinates_to_plan(M)
    return torch.tensor(levels, dtype=F64), alpha, B


class PlanOfGrid(torch.autograd.Function):
    """(τ, α, B) of a solver as a differentiable function of its log-σ̄ grid (the free entries); the backward pass
    uses the central-difference Jacobian of the probe, one pair of probes per grid entry."""

    @staticmethod
    def forward(ctx, log_grid: Tensor, solver: str, options: dict, fixed_end: float, process=None):
        ctx.solver, ctx.options, ctx.fixed_end, ctx.process = solver, options, fixed_end, process
        ctx.save_for_backward(log_grid)
        return _flat_plan(log_grid, solver, options, fixed_end, process)

    @staticmethod
    def backward(ctx, grad):
        (log_grid,) = ctx.saved_tensors
        eps = 1e-6
        f = lambda lg: _flat_plan(lg, ctx.solver, ctx.options, ctx.fixed_end, ctx.process)  # noqa: E731
        base = f(log_grid)
        g = torch.zeros_like(log_grid)
        for i in range(len(log_grid)):
            up, dn = log_grid.clone(), log_grid.clone()
            up[i] += eps
            dn[i] -= eps
            try:  # central difference; one-sided where a shifted level would pass its neighbour
                diff = (f(up) - f(dn)) / (2 * eps)
            except ValueError:
                try:
                    diff = (f(up) - base) / eps
                except ValueError:
                    try:
                        diff = (base - f(dn)) / eps
                    except ValueError:
                        continue
            g[i] = (grad * diff).sum()
        return g, None, None, None, None


def _flat_plan(log_grid: Tensor, solver: str, options: dict, fixed_end: float, process=None) -> Tensor:
    grid = log_grid.detach().exp().tolist() + ([fixed_end] if fixed_end == 0 else [])
    tau, alpha, B = plan_tensors(solver, grid, options, process)
    return torch.cat([tau, alpha, B.flatten()])


def unflatten(flat: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    return flat[:n], flat[n:2 * n], flat[2 * n:].reshape(n, n)
