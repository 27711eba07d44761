"""Adams–Bashforth solvers of dx̄/dσ̄ = ε̂: one engine, four methods.

A k-step Adams–Bashforth step extrapolates ε̂ by the Lagrange polynomial through the last k values, taken
in some coordinate v(σ̄), and integrates it exactly over the step:
    x̄_{i+1} = x̄_i - Σ_j c_j ε̂_{i-j},   c_j = ∫_{σ̄_{i+1}}^{σ̄_i} L_j(v(σ̄)) dσ̄
(16-point Gauss–Legendre quadrature in σ̄ for coordinates polynomial in σ̄, in log σ̄ for the others).
The coordinate is what tells the methods apart:
* ``lms``   v = σ̄: k-diffusion's linear multistep (Karras et al. 2022, Sec. 3, "LMS").
* ``deis``  v = native time t: DEIS tAB ("Fast Sampling of Diffusion Models with Exponential Integrator",
            Zhang & Chen 2022, Eq. 14); ``coordinate="log_sigma"`` is diffusers' log-ρ variant.
* ``ipndm`` v = step index: fixed equal-step coefficients, e.g. (55, -59, 37, -9)/24 for order 4 (iPNDM of
            Zhang & Chen 2022, App. B, lower orders during warm-up).
* ``pndm``  iPNDM's multistep after three pseudo Runge–Kutta warm-up steps ("Pseudo Numerical Methods for
            Diffusion Models on Manifolds", Liu et al. 2022, Eq. 11–13), with the DDIM transfer.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import MAX_EXTRAPOLATION_NOISE, as_floats, emit, eps_of, evaluate, multistep_order, steps

_GL_X, _GL_W = np.polynomial.legendre.leggauss(16)
COORDINATES = ("sigma", "t", "log_sigma", "index")


def _lagrange_weights(nodes: list[float], v: np.ndarray) -> np.ndarray:
    """L_j(v) for the Lagrange basis on `nodes`, shape (len(nodes), len(v))."""
    out = np.ones((len(nodes), len(v)))
    for j, vj in enumerate(nodes):
        for m, vm in enumerate(nodes):
            if m != j:
                out[j] *= (v - vm) / (vj - vm)
    return out


def ab_coefficients(nodes: list[float], v_of_sigma, s_hi: float, s_lo: float, log_space: bool) -> np.ndarray:
    """c_j = ∫_{s_lo}^{s_hi} L_j(v(σ̄)) dσ̄ for Lagrange nodes `nodes` (newest first), by Gauss–Legendre in σ̄
    (exact when v is polynomial in σ̄) or, with `log_space`, in u = log σ̄ with dσ̄ = e^u du (smooth for
    coordinates like log σ̄ or native time, whose steps span orders of magnitude in σ̄)."""
    if log_space:
        a, b = math.log(s_lo), math.log(s_hi)
        u = 0.5 * (b - a) * _GL_X + 0.5 * (a + b)
        sig = np.exp(u)
        w = 0.5 * (b - a) * _GL_W * sig
    else:
        sig = 0.5 * (s_hi - s_lo) * _GL_X + 0.5 * (s_hi + s_lo)
        w = 0.5 * (s_hi - s_lo) * _GL_W
    return (_lagrange_weights(nodes, v_of_sigma(sig)) * w).sum(1)


def _coordinate(denoiser, coordinate: str, s: list[float]):
    """v(σ̄) for nodes and quadrature; for 'index' a per-step function is built in the loop."""
    if coordinate == "sigma":
        return lambda sig: np.asarray(sig, dtype=np.float64)
    if coordinate == "log_sigma":
        return lambda sig: np.log(np.asarray(sig, dtype=np.float64))
    if coordinate == "t":
        process = getattr(denoiser, "process", None)
        if process is None:
            raise ValueError("coordinate 't' (DEIS tAB) needs a diffkit.Denoiser with a process; use "
                             "coordinate='log_sigma' for a plain denoiser function")
        return lambda sig: process.t_of_sigma_bar(torch.as_tensor(sig, dtype=torch.float64)).numpy()
    raise ValueError(f"unknown coordinate {coordinate!r}; valid: {', '.join(COORDINATES)}")


def adams_bashforth(denoiser, x, sigmas, *, order: int = 3, coordinate: str = "t",
                    lower_order_final: bool = False, prk_steps: int = 0, cond=None, callback=None,
                    progress=False):
    """Variable-step Adams–Bashforth on ε̂ in the chosen coordinate (module docstring); the first
    `prk_steps` steps are PNDM's pseudo Runge–Kutta (4 calls each)."""
    if order not in (1, 2, 3, 4):
        raise ValueError(f"Adams–Bashforth order must be 1..4; got {order}")
    cond = cond or {}
    s = as_floats(sigmas)
    n = len(s) - 1
    smooth_to_zero = coordinate in ("sigma", "index")
    v_of = None if coordinate == "index" else _coordinate(denoiser, coordinate, s)
    hist_e, hist_v = [], []
    for i in steps(n, progress):
        si, ti = s[i], s[i + 1]
        x, d = evaluate(denoiser, x, si, cond)
        emit(callback, i, x, si, ti, d)
        e = eps_of(x, d, si)
        hist_e.insert(0, e)
        hist_v.insert(0, float(i) if v_of is None else float(v_of(np.array([si]))[0]))
        del hist_e[order:], hist_v[order:]
        if i < prk_steps and ti > 0:
            x = _prk_step(denoiser, x, si, ti, e, cond)
            continue
        o = multistep_order(i, s, order, lower_order_final, in_log_sigma=not smooth_to_zero,
                            max_extrapolation=MAX_EXTRAPOLATION_NOISE)
        if o == 1:
            x = x - (si - ti) * e
            continue
        if v_of is None:  # step index: v = i + (σ̄_i - σ̄)/(σ̄_i - σ̄_{i+1}) within the step
            def v_step(sig, i=i, si=si, ti=ti):
                return i + (si - sig) / (si - ti)
            c = ab_coefficients(hist_v[:o], v_step, si, ti, log_space=False)
        else:
            c = ab_coefficients(hist_v[:o], v_of, si, ti, log_space=not smooth_to_zero)
        x = x - sum(float(cj) * ej for cj, ej in zip(c, hist_e[:o]))
    return x


def _prk_step(denoiser, x, si, ti, e1, cond):
    """PNDM's pseudo 4th-order Runge–Kutta step (Liu et al. 2022, Eq. 13) with the DDIM transfer
    φ(x̄, ε, σ̄_a, σ̄_b) = x̄ - (σ̄_a - σ̄_b) ε and the half step at the log-SNR midpoint."""
    mid = math.sqrt(si * ti)

    def eps(y, sig):
        y, d = evaluate(denoiser, y, sig, cond)
        return eps_of(y, d, sig)

    e2 = eps(x - (si - mid) * e1, mid)
    e3 = eps(x - (si - mid) * e2, mid)
    e4 = eps(x - (si - ti) * e3, ti)
    return x - (si - ti) * (e1 + 2 * e2 + 2 * e3 + e4) / 6


def lms(denoiser, x, sigmas, *, order: int = 4, **kw):
    """Linear multistep in σ̄ (k-diffusion's LMS; Karras et al. 2022): Adams–Bashforth with v = σ̄."""
    return adams_bashforth(denoiser, x, sigmas, order=order, coordinate="sigma", **kw)


def deis(denoiser, x, sigmas, *, order: int = 3, coordinate: str = "t", **kw):
    """DEIS tAB (Zhang & Chen 2022, Eq. 14): exponential-integrator Adams–Bashforth with ε̂ extrapolated
    in native time t (in the canonical variable the exponential integrator is x̄_t = x̄_s - ∫ ε̂ dσ̄)."""
    if order > 3:
        raise ValueError(f"DEIS order must be 1, 2 or 3; got {order}")
    return adams_bashforth(denoiser, x, sigmas, order=order, coordinate=coordinate, **kw)


def ipndm(denoiser, x, sigmas, *, order: int = 4, **kw):
    """iPNDM (Zhang & Chen 2022, App. B): equal-step Adams–Bashforth coefficients on ε̂, DDIM transfer."""
    return adams_bashforth(denoiser, x, sigmas, order=order, coordinate="index", **kw)


def pndm(denoiser, x, sigmas, *, prk_steps: int = 3, **kw):
    """PNDM (Liu et al. 2022): three pseudo Runge–Kutta steps (4 calls each), then 4th-order pseudo linear
    multistep (Eq. 12: (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3)/24) with the DDIM transfer."""
    return adams_bashforth(denoiser, x, sigmas, order=4, coordinate="index", prk_steps=prk_steps, **kw)
