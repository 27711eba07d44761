"""Exponential-integrator solvers in λ = -log σ̄: DPM-Solver (noise form) and DPM-Solver++ (data form).

In the canonical variable the exact solution of the probability-flow ODE from σ̄_s to σ̄_t (h = λ_t - λ_s) is
  x̄_t = x̄_s - ∫ ε̂ dσ̄                                 (noise form, "DPM-Solver", Lu et al. 2022, Eq. 3.4)
  x̄_t = (σ̄_t/σ̄_s) x̄_s + σ̄_t ∫_{λ_s}^{λ_t} e^{λ} D dλ   (data form, "DPM-Solver++", Lu et al. 2022, Eq. 9)
and the solvers below expand ε̂ or D in λ. A step into σ̄ = 0 (h = ∞) is the first-order step x̄ = D.
"""

from __future__ import annotations

import math

from .base import as_floats, eps_of, evaluate, step_loop
from .stochastic import dpmpp_2s_sde, dpmpp_sde


def singlestep_orders(nfe: int, order: int) -> list[int]:
    """Split a budget of `nfe` calls into singlestep orders, the last steps lower ("DPM-Solver", Lu et al.
    2022, Sec. 3.4 'DPM-Solver-fast'): e.g. order 3 with 10 calls gives [3, 3, 3, 1]."""
    if order == 1 or nfe < 2:
        return [1] * nfe
    if order == 2:
        return [2] * (nfe // 2) + [1] * (nfe % 2)
    k, r = divmod(nfe, 3)
    if r == 0:
        return [3] * (k - 1) + [2, 1]
    return [3] * k + [r]


def dpm_solver(denoiser, x, sigmas, *, order: int = 3, orders=None, cond=None, callback=None,
               progress=False):
    """Singlestep DPM-Solver-1/2/3 (Lu et al. 2022, Alg. 1 and 2 with r1 = 1/2 for order 2, r1 = 1/3,
    r2 = 2/3 for order 3), noise form in canonical variables:
      order 1: x̄_t = x̄_s - (σ̄_s - σ̄_t) ε̂_s
      order 2: u = x̄_s - (σ̄_s - σ̄_{s1}) ε̂_s;  x̄_t = x̄_s - (σ̄_s - σ̄_t)[ε̂_s + (ε̂(u) - ε̂_s)/(2 r1)]
      order 3: x̄_t = x̄_s - (σ̄_s - σ̄_t) ε̂_s - σ̄_t((e^h - 1)/h - 1)(ε̂(u2) - ε̂_s)/r2
    with σ̄_{sk} = σ̄_s e^{-r_k h}. `orders` gives one order per step (see `singlestep_orders`)."""
    cond = cond or {}
    s = as_floats(sigmas)
    n = len(s) - 1
    orders = list(orders) if orders is not None else [order] * n
    if len(orders) != n or any(o not in (1, 2, 3) for o in orders):
        raise ValueError(f"orders must give 1, 2 or 3 for each of the {n} steps; got {orders}")

    def eps(y, sig):
        y, d = evaluate(denoiser, y, sig, cond)
        return eps_of(y, d, sig)

    return step_loop(denoiser, x, s, cond, callback, progress,
                     lambda i, x, d, si, ti: dpm_solver_step(eps, x, eps_of(x, d, si), si, ti, orders[i]))


def dpm_solver_step(eps, x, e_s, si: float, ti: float, order: int, with_lower: bool = False):
    """One singlestep DPM-Solver step from σ̄_s = si to σ̄_t = ti given ε̂_s (formulas in `dpm_solver`).

    With `with_lower` (order 3 only) also returns the second-order solution with r1 = 1/3 that shares the
    first intermediate call: the embedded pair of DPM-Solver's adaptive step size (Lu et al. 2022, Sec. 3.3).
    """
    if order == 1:
        return x - (si - ti) * e_s
    h = math.log(si / ti)
    if order == 2:
        r1 = 0.5
        s1 = si * math.exp(-r1 * h)
        u = x - (si - s1) * e_s
        return x - (si - ti) * (e_s + (eps(u, s1) - e_s) / (2 * r1))
    r1, r2 = 1 / 3, 2 / 3
    s1, s2 = si * math.exp(-r1 * h), si * math.exp(-r2 * h)
    u1 = x - (si - s1) * e_s
    d1 = eps(u1, s1) - e_s
    u2 = x - (si - s2) * e_s - (r2 / r1) * s2 * (math.expm1(r2 * h) / (r2 * h) - 1) * d1
    d2 = eps(u2, s2) - e_s
    x3 = x - (si - ti) * e_s - (ti / r2) * (math.expm1(h) / h - 1) * d2
    if with_lower:
        return x3, x - (si - ti) * (e_s + d1 / (2 * r1))
    return x3


def dpmpp_2s(denoiser, x, sigmas, *, r: float = 0.5, cond=None, callback=None, progress=False):
    """DPM-Solver++(2S) ("DPM-Solver++", Lu et al. 2022, Alg. 1), singlestep data form:
    u = (σ̄_{s1}/σ̄_s) x̄ - (e^{-r h} - 1) D_s;  x̄_t = (σ̄_t/σ̄_s) x̄ - (e^{-h} - 1)((1 - 1/(2r)) D_s + D(u)/(2r)).
    The η = 0 member of `stochastic.dpmpp_2s_sde` (midpoint form), which computes it. Two calls per step."""
    return dpmpp_2s_sde(denoiser, x, sigmas, eta=0.0, r=r, cond=cond, callback=callback, progress=progress)


def dpmpp_multistep(denoiser, x, sigmas, *, order: int = 2, lower_order_final: bool | None = None,
                    solver_type: str = "midpoint", cond=None, callback=None, progress=False):
    """Multistep DPM-Solver++(2M)/(3M) ("DPM-Solver++", Lu et al. 2022, Alg. 2 and its third-order multistep).
    With D_0 the newest data prediction, r_k = h_k / h and first differences D1_k = (D_k - D_{k+1})/r_k:
      2M: x̄_t = (σ̄_t/σ̄_s) x̄ - φ_1 (D_0 + D1_0 / 2)
      3M: x̄_t = (σ̄_t/σ̄_s) x̄ - φ_1 D_0 + φ_2 D1 - 2 φ_3 D2
    with φ_1 = e^{-h} - 1, φ_2 = φ_1/h + 1, φ_3 = φ_2/h - 1/2, D1 = D1_0 + r_0/(r_0 + r_1)(D1_0 - D1_1) ≈ h D'
    and D2 = (D1_0 - D1_1)/(r_0 + r_1) ≈ h² D''/2. The exact data-form integral expands as
    -φ_1 D + h φ_2 D' - h² φ_3 D'', so the D2 term carries the factor 2: the reference code and diffusers
    use φ_3 D2, half the needed term, which leaves their "3M" second order (tests/test_solvers.py measures
    both). Warm-up and the step into σ̄ = 0 use lower orders (`base.multistep_order`). This is the η = 0
    member of the SDE-DPM-Solver++ family, computed by `stochastic.dpmpp_sde` (the same coefficients, as exact
    exponential-integrator moments of the interpolant)."""
    return dpmpp_sde(denoiser, x, sigmas, order=order, eta=0.0, solver_type=solver_type,
                     lower_order_final=lower_order_final, cond=cond, callback=callback, progress=progress)
