"""Stochastic samplers in the canonical variables x̄ = x0 + σ̄ eps (λ = -log σ̄, h = λ_next - λ > 0).

Every forward process x_t = alpha x0 + sigma eps with its Markov noising kernel is, in x̄, the same Brownian
motion in σ̄²: x̄(σ̄_s) = x̄(σ̄_t) + sqrt(σ̄_s² - σ̄_t²) z. Hence the DDPM posterior q(x̄_t | x̄_s, x0) of any process is
the Brownian bridge
    mean = x0 + (σ̄_t²/σ̄_s²)(x̄_s - x0),  variance = σ̄_t² (σ̄_s² - σ̄_t²) / σ̄_s²,
and the reverse SDEs that keep the marginals p(x̄; σ̄) form one family ("Elucidating the Design Space of
Diffusion-Based Generative Models", Karras et al. 2022, Eq. 6, with β(σ̄) = η/σ̄):
    dx̄ = (1 + η) (x̄ - D(x̄, σ̄))/σ̄ dσ̄ + sqrt(2 η σ̄) dW̄,   i.e. in λ:  dx̄/dλ = -(1 + η)(x̄ - D) + noise.
η = 0 is the probability-flow ODE, η = 1 the reverse diffusion SDE. Its exact solution with D frozen is
    x̄_t = e^{-(1+η)h} x̄_s + (1 - e^{-(1+η)h}) D + σ̄_t sqrt(1 - e^{-2ηh}) z,
which for η = 1 is the bridge above: DDPM, DDIM with η = 1, Euler-ancestral and first-order SDE-DPM-Solver++
coincide in canonical variables. The multistep SDE solvers integrate a polynomial in λ through D's history
against the weight (1+η) e^{-(1+η)(λ_t - λ)} exactly (`exp_moments`).

Each sampler is ``fn(denoiser, x, sigmas, *, noise=None, ..., cond=None, callback=None, progress=False)``;
`noise(sigma, sigma_next)` returns standard normal noise like x (see `diffkit.noise`; default: fresh
`GaussianNoise` from torch's global generator). A step into σ̄ = 0 is the deterministic denoising step x̄ = D.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ..noise import GaussianNoise
from .base import as_floats, emit, evaluate, lam, lincomb, lower_order_final_default, multistep_order, step_loop, steps

Tensor = torch.Tensor

__all__ = ["ancestral_split", "ddpm", "ddim_eta", "euler_ancestral", "edm_sde", "dpmpp_sde", "dpmpp_2s_sde",
           "sa_solver", "euler_maruyama", "pc", "ts_sampler", "exp_moments", "exp_lagrange_weights"]


# -- helpers --------------------------------------------------------------------------------------------------


def _nonneg(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number; got {value!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a non-negative finite number; got {value!r}")
    return v


def _noise(noise, x: Tensor):
    if noise is None:
        return GaussianNoise(x)
    if not callable(noise):
        raise TypeError("noise must be a callable noise(sigma, sigma_next) -> tensor like x (see diffkit.noise)")
    return noise


def _draw(noise, sigma: float, sigma_next: float, x: Tensor) -> Tensor:
    z = noise(sigma, sigma_next)
    if z.shape != x.shape:
        raise ValueError(f"the noise sampler returned shape {tuple(z.shape)} for a state of shape {tuple(x.shape)}")
    return z.to(dtype=x.dtype, device=x.device)


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    """(batch,) -> (batch, 1, ..., 1) in x's dtype/device."""
    return v.to(dtype=x.dtype, device=x.device).reshape((-1,) + (1,) * (x.ndim - 1))


def ancestral_split(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) of an ancestral step σ̄ -> σ̄' ("Denoising Diffusion Implicit Models", Song et al. 2021,
    Eq. 16 in canonical variables): σ_up = min(σ̄', η σ̄' sqrt(1 - σ̄'²/σ̄²)), σ_down = sqrt(σ̄'² - σ_up²).
    The step is x̄' = D + σ_down ε̂ + σ_up z with ε̂ = (x̄ - D)/σ̄; η = 1 is the DDPM posterior (σ_down = σ̄'²/σ̄)."""
    if sigma_next == 0:
        return 0.0, 0.0
    up = min(sigma_next, eta * sigma_next * math.sqrt(max(0.0, 1.0 - (sigma_next / sigma) ** 2)))
    return math.sqrt(max(0.0, sigma_next**2 - up**2)), up


def exp_moments(H: float, kmax: int) -> list[float]:
    """I_k(H) = ∫_0^1 H e^{-H(1-v)} v^k dv for k = 0..kmax: the exact weights of the exponential integrator
    ("DPM-Solver++", Lu et al. 2022, Eq. 9; "SA-Solver", Xue et al. 2023, Eq. 14) for a polynomial in
    v = (λ - λ_s)/h with H = (1+η) h. I_0 = 1 - e^{-H}, I_k = 1 - (k/H) I_{k-1}; a power series for H < 1."""
    if not H > 0:
        raise ValueError(f"H must be positive; got {H}")
    if H < 1.0:
        # H e^{-H} Σ_m H^m / (m! (m + k + 1)): terms fall faster than 1/m!
        out = []
        pref = H * math.exp(-H)
        for k in range(kmax + 1):
            term, total, m = 1.0, 0.0, 0
            while True:
                add = term / (m + k + 1)
                total += add
                if add < 1e-18 * total or m > 60:
                    break
                m += 1
                term *= H / m
            out.append(pref * total)
        return out
    out = [-math.expm1(-H)]
    for k in range(1, kmax + 1):
        out.append(1.0 - k / H * out[-1])
    return out


def exp_lagrange_weights(nodes, H: float) -> np.ndarray:
    """w_j = ∫_0^1 H e^{-H(1-v)} L_j(v) dv for the Lagrange basis L_j on `nodes` (positions in v = (λ - λ_s)/h):
    the stochastic-Adams coefficients of "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion
    Models" (Xue et al. 2023, Eq. 14 predictor b_j, Eq. 17 corrector c_j) in canonical variables."""
    nodes = [float(v) for v in nodes]
    moments = np.array(exp_moments(H, len(nodes) - 1))
    w = np.empty(len(nodes))
    for j, vj in enumerate(nodes):
        others = [vm for m, vm in enumerate(nodes) if m != j]
        coef = np.polynomial.polynomial.polyfromroots(others) if others else np.ones(1)
        coef = coef / np.prod([vj - vm for vm in others]) if others else coef
        w[j] = float(coef @ moments[: len(coef)])
    return w


# -- ancestral family: DDPM, DDIM(η), Euler-ancestral ---------------------------------------------------------


def ddpm(denoiser, x, sigmas, *, noise=None, variance: str = "small", cond=None, callback=None, progress=False):
    """DDPM ancestral sampling ("Denoising Diffusion Probabilistic Models", Ho et al. 2020, Alg. 2 and Eq. 7) on
    any grid, in canonical variables: x̄' = D + (σ̄'²/σ̄²)(x̄ - D) + c z with the posterior variance ('small',
    σ² = β̃: c² = σ̄'²(σ̄² - σ̄'²)/σ̄²) or the 'large' choice σ² = β of Ho et al. Sec. 3.2 under ᾱ = 1/(1 + σ̄²)
    (c² = (σ̄² - σ̄'²)(1 + σ̄'²)/(1 + σ̄²)). One call per step."""
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' (posterior β̃) or 'large' (β); got {variance!r}")
    noise = _noise(noise, x)

    def step(i, x, d, si, ti):
        if variance == "small":
            c = ti * math.sqrt(max(0.0, 1 - (ti / si) ** 2))
        else:
            c = math.sqrt((si**2 - ti**2) * (1 + ti**2) / (1 + si**2))
        return torch.lerp(d, x, (ti / si) ** 2) + c * _draw(noise, si, ti, x)

    return step_loop(denoiser, x, sigmas, cond, callback, progress, step)


def _ancestral(denoiser, x, sigmas, noise, eta, s_noise, cond, callback, progress):
    noise = _noise(noise, x)

    def step(i, x, d, si, ti):
        down, up = ancestral_split(si, ti, eta)
        x_new = torch.lerp(d, x, down / si)  # = D + σ_down ε̂
        return x_new + (s_noise * up) * _draw(noise, si, ti, x) if up > 0 else x_new

    return step_loop(denoiser, x, sigmas, cond, callback, progress, step)


def ddim_eta(denoiser, x, sigmas, *, noise=None, eta: float = 1.0, cond=None, callback=None, progress=False):
    """DDIM with stochasticity η ("Denoising Diffusion Implicit Models", Song et al. 2021, Eq. 12 and 16), divided
    by alpha_t: x̄' = D + sqrt(σ̄'² - c²) ε̂ + c z, c = η σ̄' sqrt(1 - σ̄'²/σ̄²) (η = 0: DDIM, η = 1: DDPM; c is
    capped at σ̄' for η > 1). One call per step."""
    return _ancestral(denoiser, x, sigmas, noise, _nonneg("eta", eta), 1.0, cond, callback, progress)


def euler_ancestral(denoiser, x, sigmas, *, noise=None, eta: float = 1.0, s_noise: float = 1.0, cond=None,
                    callback=None, progress=False):
    """Euler-ancestral (k-diffusion's sampler for "Elucidating the Design Space", Karras et al. 2022): an Euler
    step of the probability-flow ODE to σ_down then fresh noise of level σ_up (`ancestral_split`),
    x̄' = x̄ + (σ_down - σ̄) ε̂ + s_noise σ_up z; identical to `ddim_eta` for s_noise = 1. One call per step."""
    return _ancestral(denoiser, x, sigmas, noise, _nonneg("eta", eta), _nonneg("s_noise", s_noise), cond,
                      callback, progress)


# -- EDM stochastic sampler ---------------------------------------------------------------------------------------


def edm_sde(denoiser, x, sigmas, *, noise=None, s_churn: float = 0.0, s_tmin: float = 0.0,
            s_tmax: float = math.inf, s_noise: float = 1.0, cond=None, callback=None, progress=False):
    """EDM's stochastic sampler ("Elucidating the Design Space of Diffusion-Based Generative Models", Karras et
    al. 2022, Alg. 2): γ_i = min(S_churn/N, √2 - 1) for σ̄_i in [S_tmin, S_tmax] (else 0), σ̂ = (1 + γ_i) σ̄_i,
    x̂ = x̄ + sqrt(σ̂² - σ̄_i²) S_noise z, then a Heun step of the probability-flow ODE from σ̂ to σ̄_{i+1} (Euler
    into σ̄ = 0). σ̂ may exceed the grid's first level. Two calls per step, one for the step into 0."""
    s_churn, s_noise = _nonneg("s_churn", s_churn), _nonneg("s_noise", s_noise)
    s_tmin = _nonneg("s_tmin", s_tmin)
    if not (isinstance(s_tmax, (int, float)) and s_tmax >= s_tmin):
        raise ValueError(f"need 0 <= s_tmin <= s_tmax; got s_tmin={s_tmin!r}, s_tmax={s_tmax!r}")
    cond, noise = cond or {}, _noise(noise, x)
    s = as_floats(sigmas)
    n = len(s) - 1
    gamma_max = min(s_churn / n, math.sqrt(2.0) - 1.0)
    for i in steps(n, progress):
        si, ti = s[i], s[i + 1]
        gamma = gamma_max if s_tmin <= si <= s_tmax else 0.0
        s_hat = si * (1.0 + gamma)
        if gamma > 0:
            # the draw belongs to this step's interval [σ̄_{i+1}, σ̄_i]: with Brownian noise, disjoint across steps
            x = x + (s_noise * math.sqrt(s_hat**2 - si**2)) * _draw(noise, si, ti, x)
        x, d = evaluate(denoiser, x, s_hat, cond)
        emit(callback, i, x, s_hat, ti, d)
        e = (x - d) / s_hat
        x_next = x + (ti - s_hat) * e
        if ti > 0:
            x_next, d2 = evaluate(denoiser, x_next, ti, cond)
            e2 = (x_next - d2) / ti
            x_next = x + (ti - s_hat) * 0.5 * (e + e2)
        x = x_next
    return x


# -- DPM-Solver++ SDE multistep ------------------------------------------------------------------------------------


def dpmpp_sde(denoiser, x, sigmas, *, noise=None, order: int = 2, solver_type: str = "midpoint", eta: float = 1.0,
              s_noise: float = 1.0, lower_order_final: bool | None = None, cond=None, callback=None,
              progress=False):
    """SDE-DPM-Solver++(2M)/(3M) ("DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models", Lu et al. 2022, App. B, Eq. 18-19, generalised to the η family of the module docstring): with
    H = (1+η) h and the Newton divided differences d1, d2 of D's history in v = (λ - λ_s)/h,
      x̄_t = e^{-H} x̄_s + (1 - e^{-H}) D_0 + c_1 d1 + I_2(H) d2 + s_noise σ̄_t sqrt(1 - e^{-2ηh}) z,
    c_1 = (1 - e^{-H})/2 ('midpoint', the paper's 2M) or I_1(H) = 1 - (1 - e^{-H})/H ('heun', exact for D linear
    in λ); the third-order term integrates the quadratic interpolant exactly (`exp_moments`). η = 1 is the
    paper's SDE solver, η = 0 the ODE solver DPM-Solver++(2M)/(3M). One call per step."""
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3; got {order!r}")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun'; got {solver_type!r}")
    eta, s_noise = _nonneg("eta", eta), _nonneg("s_noise", s_noise)
    noise = _noise(noise, x) if eta > 0 and s_noise > 0 else None
    s = as_floats(sigmas)
    lof = lower_order_final_default(len(s) - 1) if lower_order_final is None else lower_order_final
    hist_d, hist_l = [], []

    def step(i, x, d, si, ti):
        hist_d.insert(0, d), hist_l.insert(0, lam(si))
        del hist_d[3:], hist_l[3:]
        o = multistep_order(i, s, order, lof)
        h = math.log(si / ti)
        H = (1.0 + eta) * h
        moments = exp_moments(H, 2)
        # weights of D_0, D_1, D_2 (one fused multiply-add each): d1_0 = (D_0 - D_1)/r0, d1_1 = (D_1 - D_2)/r1,
        # d2 = (d1_0 - d1_1)/(r0 + r1), d1 = d1_0 + r0 d2
        w = [moments[0], 0.0, 0.0]
        if o >= 2:
            r0 = (hist_l[0] - hist_l[1]) / h
            a0 = 1.0 / r0
            if o == 2:
                c1 = 0.5 * moments[0] if solver_type == "midpoint" else moments[1]
                w = [w[0] + c1 * a0, -c1 * a0, 0.0]
            else:
                r1 = (hist_l[1] - hist_l[2]) / h
                a1, b = 1.0 / r1, 1.0 / (r0 + r1)
                d2 = (b * a0, -b * (a0 + a1), b * a1)
                d1 = (a0 + r0 * d2[0], -a0 + r0 * d2[1], r0 * d2[2])
                w = [w[0] + moments[1] * d1[0] + moments[2] * d2[0], moments[1] * d1[1] + moments[2] * d2[1],
                     moments[1] * d1[2] + moments[2] * d2[2]]
        x_new = lincomb((math.exp(-H), x), *((wk, hist_d[k]) for k, wk in enumerate(w[:o])))
        if eta > 0 and s_noise > 0:
            x_new = x_new + (s_noise * ti * math.sqrt(-math.expm1(-2.0 * eta * h))) * _draw(noise, si, ti, x)
        return x_new

    return step_loop(denoiser, x, s, cond, callback, progress, step)


def dpmpp_2s_sde(denoiser, x, sigmas, *, noise=None, eta: float = 1.0, r: float = 0.5, solver_type: str = "midpoint",
                 s_noise: float = 1.0, cond=None, callback=None, progress=False):
    """Singlestep SDE-DPM-Solver++(2S): DPM-Solver++(2S) ("DPM-Solver++", Lu et al. 2022, Alg. 1) on the η-family
    SDE of the module docstring, with κ = 1 + η, H = κh, φ(H) = 1 - e^{-H}. The intermediate level σ̄_u = σ̄_s e^{-rh}:
      u   = e^{-κrh} x̄_s + φ(κrh) D_s + σ̄_u sqrt(1 - e^{-2ηrh}) z_1
      x̄_t = e^{-H} x̄_s + φ(H) D_s + c (D(u) - D_s)/r + e^{-κ(1-r)h} σ̄_u sqrt(1 - e^{-2ηrh}) z_1
            + σ̄_t sqrt(1 - e^{-2η(1-r)h}) z_2,
    c = φ(H)/2 ('midpoint', the paper's 2S for η = 0) or I_1(H) ('heun'); the noise is the exact Gaussian part over
    [σ̄_u, σ̄_s] carried to σ̄_t plus a fresh draw over [σ̄_t, σ̄_u], so the two draws belong to disjoint intervals
    (their variances add up to σ̄_t²(1 - e^{-2ηh})). Two calls per step, one for the step into σ̄ = 0."""
    eta, s_noise = _nonneg("eta", eta), _nonneg("s_noise", s_noise)
    if not 0 < r < 1:
        raise ValueError(f"r must be in (0, 1); got {r!r}")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun'; got {solver_type!r}")
    cond, noise = cond or {}, _noise(noise, x)
    kappa = 1.0 + eta

    def step(i, x, d, si, ti):
        h = math.log(si / ti)
        su = si * math.exp(-r * h)
        u = math.exp(-kappa * r * h) * x + (-math.expm1(-kappa * r * h)) * d
        x_new = math.exp(-kappa * h) * x + (-math.expm1(-kappa * h)) * d
        if eta > 0 and s_noise > 0:
            n1 = (s_noise * su * math.sqrt(-math.expm1(-2 * eta * r * h))) * _draw(noise, si, su, x)
            u = u + n1
            x_new = x_new + math.exp(-kappa * (1 - r) * h) * n1
            x_new = x_new + (s_noise * ti * math.sqrt(-math.expm1(-2 * eta * (1 - r) * h))) * _draw(noise, su, ti, x)
        u, d_u = evaluate(denoiser, u, su, cond)
        m = exp_moments(kappa * h, 1)
        c = 0.5 * m[0] if solver_type == "midpoint" else m[1]
        return x_new + (c / r) * (d_u - d)

    return step_loop(denoiser, x, sigmas, cond, callback, progress, step)


# -- SA-Solver -------------------------------------------------------------------------------------------------------


def sa_solver(denoiser, x, sigmas, *, noise=None, predictor_order: int = 3, corrector_order: int = 3,
              tau: float | Callable[[float], float] = 1.0, use_corrector: bool = True,
              lower_order_final: bool | None = None, s_noise: float = 1.0, cond=None, callback=None,
              progress=False):
    """SA-Solver ("SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion Models", Xue et al. 2023,
    Alg. 1; predictor Eq. 14, corrector Eq. 17) in canonical variables, data prediction, with τ(σ̄) the noise
    scale (η = τ², H = (1+τ²) h):
      predictor  x̄^p = e^{-H} x̄_s + Σ_j b_j D_{s-j} + s_noise σ̄_t sqrt(1 - e^{-2τ²h}) ξ
      corrector  x̄_t = e^{-H} x̄_s + c_new D(x̄^p, σ̄_t) + Σ_j c_j D_{s-j} + (the same noise)
    with b_j, c_j the `exp_lagrange_weights` of the Lagrange interpolant in λ. The evaluation at x̄^p is reused
    by the next step, so a step costs one call; the last step is predictor-only. τ is a number or a function
    of σ̄ (held fixed within a step)."""
    for name, o in (("predictor_order", predictor_order), ("corrector_order", corrector_order)):
        if o not in (1, 2, 3, 4):
            raise ValueError(f"{name} must be 1..4; got {o!r}")
    if callable(tau):
        tau_of = tau
    else:
        tau_const = _nonneg("tau", tau)

        def tau_of(_sigma):
            return tau_const
    s_noise = _nonneg("s_noise", s_noise)
    cond, noise = cond or {}, _noise(noise, x)
    s = as_floats(sigmas)
    n = len(s) - 1
    lof = lower_order_final_default(n) if lower_order_final is None else lower_order_final
    hist_d, hist_l = [], []
    x, d = evaluate(denoiser, x, s[0], cond)
    keep = max(predictor_order, corrector_order)
    for i in steps(n, progress):
        si, ti = s[i], s[i + 1]
        emit(callback, i, x, si, ti, d)
        hist_d.insert(0, d), hist_l.insert(0, lam(si))
        del hist_d[keep:], hist_l[keep:]
        if ti == 0:
            x = d
            continue
        eta = _nonneg("tau(sigma)", tau_of(si)) ** 2
        h = math.log(si / ti)
        H = (1.0 + eta) * h
        base = math.exp(-H) * x
        if eta > 0 and s_noise > 0:
            base = base + (s_noise * ti * math.sqrt(-math.expm1(-2.0 * eta * h))) * _draw(noise, si, ti, x)
        po = multistep_order(i, s, predictor_order, lof)
        v_hist = [(l_ - hist_l[0]) / h for l_ in hist_l[:po]]
        b = exp_lagrange_weights(v_hist, H)
        x_pred = base
        for w, dj in zip(b, hist_d[:po]):
            x_pred = x_pred + float(w) * dj
        if i + 1 == n:  # last step into a positive level: predictor only (no call to spend on a corrector)
            x = x_pred
            continue
        x_pred, d = evaluate(denoiser, x_pred, ti, cond)
        if not use_corrector:
            x = x_pred
            continue
        co = min(corrector_order, len(hist_d) + 1)
        c = exp_lagrange_weights([1.0] + [(l_ - hist_l[0]) / h for l_ in hist_l[: co - 1]], H)
        x = base + float(c[0]) * d
        for w, dj in zip(c[1:], hist_d[: co - 1]):
            x = x + float(w) * dj
    return x


# -- Euler–Maruyama on the reverse SDE ----------------------------------------------------------------------------


def _native_sde(process, sigma_bar: float) -> tuple[float, float, float, float]:
    """(t, alpha, f, g²) of the process's forward SDE dx = f x dt + g dW at σ̄ (Song et al. 2021, Eq. 5 with
    f = alpha'/alpha and g² = d sigma²/dt - 2 f sigma²)."""
    t = process.t_of_sigma_bar(torch.tensor(sigma_bar, dtype=torch.float64))
    a, sg = float(process.alpha(t)), float(process.sigma(t))
    da, ds = float(process.d_alpha(t)), float(process.d_sigma(t))
    f = da / a
    return float(t), a, f, 2.0 * (sg * ds - f * sg**2)


def euler_maruyama(denoiser, x, sigmas, *, noise=None, time: str | None = None, cond=None, callback=None,
                   progress=False):
    """Euler–Maruyama on the reverse-time SDE dx = [f x - g² ∇log p_t(x)] dt + g dW̄ ("Score-Based Generative
    Modeling through Stochastic Differential Equations", Song et al. 2021, Eq. 6), with the score from the
    denoiser, ∇log p_t(x_t) = (alpha D - x_t)/sigma². time='native' steps in the process's own time and
    variable (VP, VE, flow, any interpolant; needs a denoiser with a process, the default then);
    time='sigma' steps the canonical (VE) SDE in σ̄: x̄' = x̄ + 2(σ̄' - σ̄) ε̂ + sqrt(2 σ̄ (σ̄ - σ̄')) z.
    The step into σ̄ = 0 is Tweedie's denoising x̄ = D. One call per step."""
    process = getattr(denoiser, "process", None)
    time = time or ("native" if process is not None else "sigma")
    if time not in ("native", "sigma"):
        raise ValueError(f"time must be 'native' or 'sigma'; got {time!r}")
    if time == "native" and process is None:
        raise ValueError("time='native' needs a diffkit.Denoiser with a process; use time='sigma'")
    noise = _noise(noise, x)

    def step(i, x, d, si, ti):
        z = _draw(noise, si, ti, x)
        if time == "sigma":
            return x + (2.0 * (si - ti) / si) * (d - x) + math.sqrt(2.0 * si * (si - ti)) * z
        t_i, a_i, f, g2 = _native_sde(process, si)
        t_n = float(process.t_of_sigma_bar(torch.tensor(ti, dtype=torch.float64)))
        a_n = float(process.alpha(torch.tensor(t_n, dtype=torch.float64)))
        dt = t_i - t_n
        sig2 = (si * a_i) ** 2  # native sigma(t_i)²
        # native x = a x̄, score = a (D - x̄)/sigma²:  x' = x - (f x - g² score) dt + g sqrt(dt) z
        x_nat = a_i * x
        score = (a_i / sig2) * (d - x)
        return (x_nat - (f * x_nat - g2 * score) * dt + math.sqrt(max(g2 * dt, 0.0)) * z) / a_n

    return step_loop(denoiser, x, sigmas, cond, callback, progress, step)


# -- predictor-corrector ---------------------------------------------------------------------------------------------

PREDICTORS = ("ancestral", "reverse_diffusion")


def pc(denoiser, x, sigmas, *, noise=None, snr: float = 0.16, n_corrector: int = 1, predictor: str = "ancestral",
       norm: str = "batch", cond=None, callback=None, progress=False):
    """Predictor-corrector sampling ("Score-Based Generative Modeling through Stochastic Differential Equations",
    Song et al. 2021, Alg. 1 with the Langevin corrector of Alg. 4/5): at each level, `n_corrector` Langevin
    steps x̄ <- x̄ + ε s + sqrt(2ε) z with score s = (D - x̄)/σ̄² and step ε = 2 (snr ||z|| / ||s||)², then a
    predictor step to the next level: 'ancestral' (x̄' = D + (σ̄'²/σ̄²)(x̄ - D) + σ̄' sqrt(1 - σ̄'²/σ̄²) z) or
    'reverse_diffusion' (same mean, noise sqrt(σ̄² - σ̄'²) z). norm='batch' averages ||z|| and ||s|| over the
    batch as the reference code does (a sample then depends on its batch); norm='sample' uses each sample's own
    norms (batch-invariant, but in few dimensions ||z||/||s|| is heavy-tailed and the steps erratic).
    (1 + n_corrector) calls per step."""
    snr = _nonneg("snr", snr)
    if isinstance(n_corrector, bool) or not isinstance(n_corrector, int) or n_corrector < 0:
        raise ValueError(f"n_corrector must be a non-negative integer; got {n_corrector!r}")
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; valid: {', '.join(PREDICTORS)}")
    if norm not in ("batch", "sample"):
        raise ValueError(f"norm must be 'batch' or 'sample'; got {norm!r}")
    cond, noise = cond or {}, _noise(noise, x)
    s = as_floats(sigmas)
    for i in steps(len(s) - 1, progress):
        si, ti = s[i], s[i + 1]
        # disjoint pieces of [σ̄', σ̄] for the corrector and predictor draws (independent Brownian increments)
        cuts = np.linspace(si, ti, n_corrector + 2).tolist()
        for k in range(n_corrector):
            x, d = evaluate(denoiser, x, si, cond)
            score = (d - x) / si**2
            z = _draw(noise, cuts[k], cuts[k + 1], x)
            zn = z.flatten(1).norm(dim=1)
            sn = score.flatten(1).norm(dim=1)
            if norm == "batch":
                zn, sn = zn.mean().expand_as(zn), sn.mean().expand_as(sn)
            sn = sn.clamp_min(1e-30)
            step = _per_sample(2.0 * (snr * zn / sn) ** 2, x)
            x = x + step * score + (2.0 * step).sqrt() * z
        x, d = evaluate(denoiser, x, si, cond)
        emit(callback, i, x, si, ti, d)
        if ti == 0:
            x = d
            continue
        c = ti * math.sqrt(1 - (ti / si) ** 2) if predictor == "ancestral" else math.sqrt(si**2 - ti**2)
        x = torch.lerp(d, x, (ti / si) ** 2) + c * _draw(noise, cuts[-2], cuts[-1], x)
    return x


# -- time-shift sampler ----------------------------------------------------------------------------------------------


def ts_sampler(denoiser, x, sigmas, *, noise=None, eta: float = 0.0, window: float = 0.5, cutoff_sigma: float = 1.0,
               data_var: float = 0.0, cond=None, callback=None, progress=False):
    """Time-Shift Sampler ("Alleviating Exposure Bias in Diffusion Models through Sampling with Shifted Time
    Steps", Li et al. 2024, Alg. 1) on DDIM(η) steps, in canonical variables. At step i > 0 with σ̄_i above
    `cutoff_sigma`, the noise level that best matches the state is read off its per-sample variance over
    features, σ̃² = Var(x̄) - data_var (since x̄ = x0 + σ̄ eps); the network is evaluated at
    σ̄_s = clip(σ̃, σ̄_i^{1-w} σ̄_{i+1}^w, σ̄_i^{1-w} σ̄_{i-1}^w) (w = `window` in [0, 1), a fraction of the log-step
    to each neighbour) and the DDIM(η) step runs from σ̄_s to σ̄_{i+1}. `data_var` is the per-sample variance of
    a clean sample over its features (e.g. ≈ 0.2-0.3 for images in [-1, 1]); the estimate needs many features
    per sample. window = 0 is plain DDIM(η). One call per step."""
    eta, data_var = _nonneg("eta", eta), _nonneg("data_var", data_var)
    window, cutoff_sigma = _nonneg("window", window), _nonneg("cutoff_sigma", cutoff_sigma)
    if window >= 1:
        raise ValueError(f"window must be in [0, 1); got {window}")
    if x[0].numel() < 2:
        raise ValueError("the time-shift sampler estimates the noise level from the variance over features; "
                         "it needs at least two features per sample")
    cond, noise = cond or {}, _noise(noise, x)
    s = as_floats(sigmas)
    for i in steps(len(s) - 1, progress):
        si, ti = s[i], s[i + 1]
        if i > 0 and window > 0 and ti > 0 and si > cutoff_sigma:
            lo = si ** (1 - window) * ti**window
            hi = si ** (1 - window) * s[i - 1] ** window
            var = x.flatten(1).to(torch.float64).var(dim=1) - data_var
            sig = var.clamp_min(lo**2).sqrt().clamp(lo, hi)  # (batch,) float64
        else:
            sig = torch.full((x.shape[0],), si, dtype=torch.float64)
        x, d = evaluate(denoiser, x, sig, cond)
        emit(callback, i, x, si, ti, d)
        if ti == 0:
            x = d
            continue
        sb = _per_sample(sig, x)
        eps = (x - d) / sb
        c = eta * ti * (1 - (ti / sb) ** 2).clamp_min(0).sqrt()
        c = torch.minimum(c, torch.full_like(c, ti))
        x = d + (ti**2 - c**2).clamp_min(0).sqrt() * eps
        if eta > 0:
            x = x + c * _draw(noise, si, ti, x)
    return x
