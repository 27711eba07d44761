"""Adaptive step size in log-SNR with an embedded error estimate."""

from __future__ import annotations

import math

import torch

from .base import as_floats, emit, eps_of
from .dpm import dpm_solver_step


def vp_scale(sigma: float) -> float:
    """alpha of the variance-preserving process at canonical level σ̄: 1 / sqrt(1 + σ̄²)."""
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


def dpm_adaptive(denoiser, x, sigmas, *, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                 theta: float = 0.9, max_nfe: int | None = None, cond=None, callback=None, progress=False,
                 info: dict | None = None):
    """DPM-Solver-12/23 adaptive step size ("DPM-Solver", Lu et al. 2022, Alg. 4; error control of "Gotta Go
    Fast When Generating Data with Score-Based Models", Jolicoeur-Martineau et al. 2021):
    in λ from σ̄_0 to the last positive σ̄, each step computes a third-order x_H and the embedded second-order
    x_L, E = ||(x_H - x_L) / max(atol, rtol max(|x_L|, |x_prev|))||_RMS; the step is accepted if E <= 1 and
    h <- min(θ h E^{-1/3}, λ_end - λ). States enter E in the variance-preserving scale x̄ / sqrt(1 + σ̄²) (the
    scale DPM-Solver's tolerances are stated in: canonical x̄ grows like σ̄ and would make rtol meaningless at
    high noise). A grid ending at 0 adds a final denoising call.

    `max_nfe` is a hard budget: when an attempt no longer fits, the rest of the interval is covered by one
    DPM-Solver step of the highest order that does. `info['nfe']` receives the calls used."""
    if not (rtol > 0 and atol > 0 and h_init > 0 and 0 < theta <= 1):
        raise ValueError("need rtol > 0, atol > 0, h_init > 0 and 0 < theta <= 1")
    cond = cond or {}
    s = as_floats(sigmas)
    to_zero = s[-1] == 0
    s_end = s[-2] if to_zero else s[-1]
    reserve = 1 if to_zero else 0
    budget = math.inf if max_nfe is None else max_nfe
    nfe = 0

    def eps(y, sig):
        nonlocal nfe
        nfe += 1
        return eps_of(y, denoiser(y, sig, **cond), sig)

    lam_s, lam_end = -math.log(s[0]), -math.log(s_end)
    sig_s, h = s[0], h_init
    e_s, x_prev, i = None, vp_scale(s[0]) * x, 0
    while lam_end - lam_s > 1e-5:
        cost = 3 if e_s is None else 2
        left = budget - nfe - reserve
        if left < cost:  # the budget ends the adaptivity: one last step of the order that fits
            if e_s is None and left < 1:
                break
            if e_s is None:
                e_s, left = eps(x, sig_s), left - 1
            order = min(3, int(left) + 1)
            x, sig_s, lam_s = dpm_solver_step(eps, x, e_s, sig_s, s_end, order), s_end, lam_end
            break
        if e_s is None:
            e_s = eps(x, sig_s)
        h = min(h, lam_end - lam_s)
        sig_t = math.exp(-(lam_s + h))
        x_hi, x_lo = dpm_solver_step(eps, x, e_s, sig_s, sig_t, 3, with_lower=True)
        c = vp_scale(sig_t)
        delta = torch.maximum(torch.full_like(x_lo, atol), rtol * torch.maximum(c * x_lo.abs(), x_prev.abs()))
        err = float((c * (x_hi - x_lo) / delta).pow(2).flatten(1).mean(1).sqrt().max())
        if err <= 1:
            emit(callback, i, x, sig_s, sig_t, x - sig_s * e_s)
            x, x_prev, sig_s, lam_s, e_s, i = x_hi, c * x_lo, sig_t, lam_s + h, None, i + 1
        h = min(theta * h * max(err, 1e-10) ** (-1 / 3), lam_end - lam_s)
    if to_zero:
        d = denoiser(x, sig_s, **cond)
        nfe += 1
        emit(callback, i, x, sig_s, 0.0, d)
        x = d
    if info is not None:
        info["nfe"] = nfe
    return x
