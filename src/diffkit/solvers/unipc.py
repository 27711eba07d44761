"""UniPC: unified predictor-corrector in the data form ("UniPC: A Unified Predictor-Corrector Framework for
Fast Sampling of Diffusion Models", Zhao et al. 2023)."""

from __future__ import annotations

import math

import numpy as np

from .base import as_floats, emit, evaluate, lam, lincomb, lower_order_final_default, multistep_order, steps

VARIANTS = ("bh1", "bh2")


def _unipc_coefficients(h: float, rks: list[float], variant: str):
    """R (rows r_k^{j-1}) and b (b_j = φ_{j+1}(h) j! / B(h)) of UniPC Eq. 8/9 in the data form, with
    hh = -h, φ_1 = e^{hh} - 1, φ_{k+1} = φ_k / hh - 1/k!, and B(h) = hh (B1) or e^{hh} - 1 (B2)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k, fact = h_phi_1 / hh - 1, 1
    R, b = [], []
    for j in range(1, len(rks) + 1):
        R.append([r ** (j - 1) for r in rks])
        b.append(h_phi_k * fact / b_h)
        fact *= j + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return np.array(R), np.array(b), h_phi_1, b_h


def _unipc_update(x, si, ti, hist_d, hist_l, order, variant, d_new=None):
    """One UniP predictor step (d_new None) or UniC corrector step (d_new = D at the new point) of `order`:
    x̄_t = (σ̄_t/σ̄_s) x̄ - (e^{-h} - 1) D_0 - B(h) Σ_k ρ_k (D_k - D_0)/r_k  [+ ρ_c (D_t - D_0) for UniC],
    evaluated as one linear combination of x̄, D_0, D_k (and D_t)."""
    h = math.log(si / ti)
    rks = [(hist_l[k] - hist_l[0]) / h for k in range(1, order)]
    R, b, h_phi_1, b_h = _unipc_coefficients(h, rks + [1.0], variant)
    if d_new is None:
        rhos = [] if not rks else ([0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist())
    else:
        rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
    # coefficients of (D_k - D_0)/r_k for k < order, and of (D_t - D_0) (r = 1) for UniC
    weights = [-b_h * rho / r for rho, r in zip(rhos, rks + [1.0])]
    terms = [(ti / si, x), (-h_phi_1 - sum(weights), hist_d[0])]
    terms += [(w, hist_d[k]) for k, w in zip(range(1, order), weights)]
    if d_new is not None:
        terms.append((weights[-1], d_new))
    return lincomb(*terms)


def unipc(denoiser, x, sigmas, *, order: int = 3, variant: str = "bh2", corrector: bool = True,
          lower_order_final: bool | None = None, cond=None, callback=None, progress=False):
    """UniPC-p with B(h) variant bh1/bh2 (Zhao et al. 2023, Alg. 2 and 3): the UniP predictor of order p, and
    after each new model call the UniC corrector, which raises the order by one at no extra call (the
    corrected state starts the next step; the call itself is reused). One call per step."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3; got {order}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown UniPC variant {variant!r}; valid: {', '.join(VARIANTS)}")
    cond = cond or {}
    s = as_floats(sigmas)
    n = len(s) - 1
    lof = lower_order_final_default(n) if lower_order_final is None else lower_order_final
    hist_d, hist_l = [], []
    x_last, last_order = None, 0
    for i in steps(n, progress):
        si, ti = s[i], s[i + 1]
        x, d = evaluate(denoiser, x, si, cond)
        if corrector and x_last is not None:
            x = _unipc_update(x_last, s[i - 1], si, hist_d, hist_l, last_order, variant, d_new=d)
        hist_d.insert(0, d), hist_l.insert(0, lam(si))
        del hist_d[3:], hist_l[3:]
        emit(callback, i, x, si, ti, d)
        if ti == 0:
            x = d
            continue
        o = multistep_order(i, s, order, lof)
        x_last, last_order = x, o
        x = _unipc_update(x, si, ti, hist_d, hist_l, o, variant)
    return x
