"""Adaptive step size in log-SNR with an embedded error estimate."""

from __future__ import annotations

import math

import torch

from .base import CallCounter, as_floats, emit, eps_of, evaluate
from .dpm import dpm_solver_step, dpmpp_multistep


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

    `max_nfe` is a hard budget: when an attempt would leave fewer than two calls, the rest of the interval is
    covered by as many DPM-Solver++(2M) steps, uniform in λ, as calls are left (a single high-order step over a
    wide λ-range is unstable). This holds for an attempt that would finish the range too: were it rejected, the
    calls left could not reach the end. The grid only gives the range: its first level and its last positive one.
    `info['nfe']` receives the calls used."""
    if not (rtol > 0 and atol > 0 and h_init > 0 and 0 < theta <= 1):
        raise ValueError("need rtol > 0, atol > 0, h_init > 0 and 0 < theta <= 1")
    cond = cond or {}
    s = as_floats(sigmas)
    to_zero = s[-1] == 0
    s_end = s[-2] if to_zero else s[-1]
    reserve = 1 if to_zero else 0
    budget = math.inf if max_nfe is None else max_nfe
    counted = CallCounter(denoiser)

    def eps(y, sig):
        y, d = evaluate(counted, y, sig, cond)
        return eps_of(y, d, sig)

    lam_s, lam_end = -math.log(s[0]), -math.log(s_end)
    sig_s, h = s[0], h_init
    e_s, x_prev, i = None, vp_scale(s[0]) * x, 0
    while lam_end - lam_s > 1e-5:
        cost = 3 if e_s is None else 2
        left = budget - counted.calls - reserve
        if left < cost + 2:  # the budget ends the adaptivity: the rest in `left` 2M steps
            if left >= 1:
                rest = torch.exp(torch.linspace(-lam_s, -lam_end, int(left) + 1, dtype=torch.float64))
                x = dpmpp_multistep(counted, x, rest, order=2, cond=cond)
                sig_s, lam_s = s_end, lam_end
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
        x, d = evaluate(counted, x, sig_s, cond)
        emit(callback, i, x, sig_s, 0.0, d)
        x = d
    if info is not None:
        info["nfe"] = counted.calls
    return x
