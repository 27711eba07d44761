"""Exact likelihood through the probability-flow ODE.

Along the probability-flow ODE the log-density changes by the divergence of the velocity (instantaneous change
of variables, "Neural Ordinary Differential Equations", Chen et al. 2018, Thm. 1; used for diffusion models in
"Score-Based Generative Modeling through Stochastic Differential Equations", Song et al. 2021, App. D.2, Eq. 39).
In the canonical variables, with s = log σ̄, the ODE is

    dx̄/ds = x̄ - D(x̄, σ̄)        and        d/ds log p(x̄(s); σ̄) = -div(x̄ - D) = tr(∂D/∂x̄) - d,

so for data x (= x̄ at the smallest level σ̄_min)

    log p(x; σ̄_min) = log p(x̄(σ̄_max); σ̄_max) + ∫_{log σ̄_min}^{log σ̄_max} (d - tr ∂D/∂x̄) ds.

Integrating in log σ̄ instead of σ̄ keeps the right-hand side of order one over the whole range. The prior
p(y; σ̄_max) = E N(y; x0, σ̄_max² I):
* 'gaussian': N(y; 0, σ̄_max² I) (Song et al. 2021). Its error is y·E[x0]/σ̄_max² + O(tr Cov(x0)/σ̄_max²) nats
  per sample; the first term is of order |E x0|/σ̄_max, large for data with a non-zero mean.
* 'tweedie': N(y; D(y, σ̄_max), σ̄_max² I), one more model call. Expanding the expectation in y/σ̄_max², its
  error is O(tr Cov(x0)/σ̄_max²) nats per sample: the mean term cancels.
* 'tweedie_cov': the Gaussian N(μ, σ̄² I + C) fitted through Tweedie's first two moments: with J = ∂D/∂y
  (= Cov[x0 | y]/σ̄², symmetric), C = σ̄² J (I - J)⁻¹ and μ = (I - J)⁻¹(D - J y), which simplifies to
      log p(y; σ̄) ≈ -(y - D)ᵀ (I - J)⁻¹ (y - D) / (2σ̄²) - (d/2) log(2π σ̄²) + ½ log det(I - J).
  Exact when the data are Gaussian, so only the data's non-Gaussianity at scale σ̄_max remains; needs the full
  Jacobian (d vector-Jacobian products). 'auto' (default) takes it up to 64 features, 'tweedie' above.
* any callable prior(x̄, σ̄_max) -> log density per sample, e.g. a testbed's exact marginal.
The trace is exact
(one vector-Jacobian product per dimension, for small d) or Hutchinson's estimate vᵀ(∂D/∂x̄)v with probe
vectors v fixed along the trajectory ("A Stochastic Estimator of the Trace of the Influence Matrix", Hutchinson
1989; "FFJORD", Grathwohl et al. 2019, Sec. 3.1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp

from .schedules import sigma_range

Tensor = torch.Tensor

__all__ = ["likelihood", "bits_per_dim", "gaussian_prior", "tweedie_prior", "tweedie_cov_prior", "DIVERGENCES",
           "PRIORS"]

DIVERGENCES = ("exact", "hutchinson")
_PROBES = ("rademacher", "gaussian")
PRIORS = ("auto", "tweedie_cov", "tweedie", "gaussian")


def gaussian_prior(x_bar: Tensor, sigma: float) -> Tensor:
    """log N(x̄; 0, σ̄² I) per sample: the default prior at σ̄_max (Song et al. 2021, App. D.2)."""
    d = x_bar[0].numel()
    sq = x_bar.flatten(1).to(torch.float64).pow(2).sum(1)
    return -0.5 * sq / sigma**2 - 0.5 * d * math.log(2 * math.pi * sigma**2)


def tweedie_prior(denoiser, cond: dict | None = None) -> Callable[[Tensor, float], Tensor]:
    """log N(y; D(y, σ̄), σ̄² I) per sample: the Gaussian prior at σ̄_max centred on Tweedie's mean E[x0 | y]
    ("Score-Based Generative Modeling through SDEs", Song et al. 2021, App. D.2, with the mean corrected)."""

    def prior(x_bar: Tensor, sigma: float) -> Tensor:
        with torch.no_grad():
            m = denoiser(x_bar, sigma, **(cond or {}))
        return gaussian_prior(x_bar - m, sigma)

    return prior


def tweedie_cov_prior(denoiser, cond: dict | None = None) -> Callable[[Tensor, float], Tensor]:
    """The Gaussian prior matched to Tweedie's mean and covariance at σ̄_max (Efron 2011, "Tweedie's Formula and
    Selection Bias", Eq. 2.8 and its second-order form; module docstring): -(y - D)ᵀ(I - J)⁻¹(y - D)/(2σ̄²)
    - (d/2) log(2πσ̄²) + ½ log det(I - J), J = ∂D/∂y."""

    def prior(x_bar: Tensor, sigma: float) -> Tensor:
        den, jac = _jacobian(denoiser, x_bar, sigma, cond or {})
        d = x_bar[0].numel()
        a = torch.eye(d, dtype=torch.float64) - 0.5 * (jac + jac.transpose(1, 2)).to(torch.float64).cpu()
        r = (x_bar - den).flatten(1).to(torch.float64).cpu()
        chol, info = torch.linalg.cholesky_ex(a)
        if (info != 0).any():  # I - J not positive definite: not in the Gaussian regime, fall back
            return gaussian_prior(x_bar - den, sigma)
        sol = torch.cholesky_solve(r[:, :, None], chol)[:, :, 0]
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
        return -0.5 * (r * sol).sum(1) / sigma**2 - 0.5 * d * math.log(2 * math.pi * sigma**2) + 0.5 * logdet

    return prior


def _jacobian(denoiser, x: Tensor, sigma: float, cond: dict) -> tuple[Tensor, Tensor]:
    """(D(x̄, σ̄), ∂D/∂x̄ per sample of shape (batch, d, d)) by one vector-Jacobian product per feature (samples
    are independent, so each product gives one row for every sample at once)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        d_out = denoiser(x, sigma, **cond)
        flat = d_out.flatten(1)
        n = flat.shape[1]
        rows = []
        for j in range(n):
            (g,) = torch.autograd.grad(flat[:, j].sum(), x, retain_graph=j < n - 1)
            rows.append(g.flatten(1))
    return d_out.detach(), torch.stack(rows, 1)


def _trace_exact(denoiser, x: Tensor, sigma: float, cond: dict) -> tuple[Tensor, Tensor]:
    """(D(x̄, σ̄), tr ∂D/∂x̄ per sample) with one vector-Jacobian product per feature."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        d_out = denoiser(x, sigma, **cond)
        flat = d_out.flatten(1)
        tr = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        n = flat.shape[1]
        for j in range(n):
            (g,) = torch.autograd.grad(flat[:, j].sum(), x, retain_graph=j < n - 1)
            tr = tr + g.flatten(1)[:, j].to(torch.float64)
    return d_out.detach(), tr


def _trace_hutchinson(denoiser, x: Tensor, sigma: float, cond: dict, probes: Tensor) -> tuple[Tensor, Tensor]:
    """(D(x̄, σ̄), mean_k v_kᵀ (∂D/∂x̄) v_k) for probe vectors of shape (k, *x.shape)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        d_out = denoiser(x, sigma, **cond)
        tr = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for k in range(probes.shape[0]):
            (g,) = torch.autograd.grad((d_out * probes[k]).sum(), x, retain_graph=k < probes.shape[0] - 1)
            tr = tr + (g * probes[k]).flatten(1).sum(1).to(torch.float64)
    return d_out.detach(), tr / probes.shape[0]


def likelihood(denoiser, x: Tensor, *, sigma_min: float | None = None, sigma_max: float | None = None,
               divergence: str = "auto", probe: str = "rademacher", n_probes: int = 1,
               generator: torch.Generator | None = None, prior: str | Callable[[Tensor, float], Tensor] = "auto",
               rtol: float = 1e-6, atol: float = 1e-6, method: str = "RK45", cond: dict | None = None,
               return_info: bool = False):
    """log p(x) in nats per sample by the probability-flow ODE (Song et al. 2021, "Score-Based Generative Modeling
    through SDEs", Eq. 39; the module docstring gives the canonical form integrated here).

    `denoiser` is a `diffkit.Denoiser` (its process gives the default σ̄ range) or any callable D(x̄, σ̄) with
    `sigma_min`/`sigma_max`. `x` (batch, ...) is clean data, i.e. x̄ at σ̄_min; the result is the model's density
    at that level (the data density smoothed by N(0, σ̄_min²)). `divergence`: 'exact', 'hutchinson' (with
    `n_probes` probe vectors of kind `probe`, drawn from `generator`) or 'auto' (exact up to 64 features).
    `prior` is 'auto' (default: 'tweedie_cov' up to 64 features, else 'tweedie'), 'tweedie_cov', 'tweedie',
    'gaussian' or a callable prior(x̄, σ̄_max) -> log p at the top (module docstring). The ODE runs in float64 with
    scipy's `method` at `rtol`/`atol`. With `return_info`, also returns a dict with the prior and divergence
    terms, nats and bits per dimension, and the number of model calls.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] == 0:
        raise ValueError("x must be a floating-point tensor of shape (batch, features...) with batch >= 1")
    if not torch.isfinite(x).all():
        raise ValueError("x contains non-finite values")
    process = getattr(denoiser, "process", None)
    lo, hi = sigma_range(process, sigma_min, sigma_max)
    n, shape, d = x.shape[0], tuple(x.shape), x[0].numel()
    if divergence == "auto":
        divergence = "exact" if d <= 64 else "hutchinson"
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: auto, {', '.join(DIVERGENCES)}")
    if probe not in _PROBES:
        raise ValueError(f"unknown probe {probe!r}; valid: {', '.join(_PROBES)}")
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive integer; got {n_probes!r}")
    cond = cond or {}
    if isinstance(prior, str):
        if prior not in PRIORS:
            raise ValueError(f"unknown prior {prior!r}; valid: {', '.join(PRIORS)} or a callable")
        if prior == "auto":
            prior = "tweedie_cov" if d <= 64 else "tweedie"
        if prior == "tweedie_cov":
            prior = tweedie_cov_prior(denoiser, cond)
        elif prior == "tweedie":
            prior = tweedie_prior(denoiser, cond)
        else:
            prior = gaussian_prior
    elif not callable(prior):
        raise TypeError("prior must be 'auto', 'tweedie_cov', 'tweedie', 'gaussian' or a callable "
                        "prior(x_bar, sigma_max)")
    dtype, device = x.dtype, x.device
    probes = None
    if divergence == "hutchinson":
        probes = torch.randn((n_probes, *shape), generator=generator, dtype=torch.float64)
        if probe == "rademacher":
            probes = probes.sign()
        probes = probes.to(dtype=dtype, device=device)
    calls = 0

    def rhs(s: float, y: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        sigma = math.exp(s)
        xb = torch.from_numpy(y[: n * d]).reshape(shape).to(dtype=dtype, device=device)
        if divergence == "exact":
            den, tr = _trace_exact(denoiser, xb, sigma, cond)
        else:
            den, tr = _trace_hutchinson(denoiser, xb, sigma, cond, probes)
        dx = (xb - den).to(torch.float64).flatten().cpu().numpy()
        return np.concatenate([dx, (d - tr).cpu().numpy()])

    y0 = np.concatenate([x.detach().to(torch.float64).flatten().cpu().numpy(), np.zeros(n)])
    sol = solve_ivp(rhs, (math.log(lo), math.log(hi)), y0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"probability-flow ODE integration failed: {sol.message}")
    y1 = sol.y[:, -1]
    x_top = torch.from_numpy(y1[: n * d].copy()).reshape(shape)
    delta = torch.from_numpy(y1[n * d:].copy())
    prior_term = prior(x_top.to(dtype=dtype, device=device), hi).to(torch.float64).cpu()
    logp = prior_term + delta
    if not return_info:
        return logp
    info = {"prior": prior_term, "divergence_integral": delta, "x_top": x_top, "nats_per_dim": -logp / d,
            "bits_per_dim": -logp / (d * math.log(2)), "nfe": calls, "sigma_min": lo, "sigma_max": hi,
            "divergence": divergence}
    return logp, info


def bits_per_dim(denoiser, x: Tensor, *, n_bins: int = 256, data_range: tuple[float, float] = (-1.0, 1.0),
                 generator: torch.Generator | None = None, dequantize: str = "uniform", **kwargs) -> Tensor:
    """Bits per dimension of integer data x in {0, ..., n_bins-1} with uniform dequantization ("A note on the
    evaluation of generative models", Theis et al. 2016, Eq. 6; as in Song et al. 2021, App. D.2):
    v = x + u, u ~ U[0, 1)^d, y = lo + (hi - lo) v / n_bins, log p(v) = log p_model(y) + d log((hi - lo)/n_bins),
    bpd = -log p(v) / (d ln 2), a Monte Carlo upper bound on the discrete data's bits per dimension.
    dequantize='none' uses the bin centres (u = 1/2). Other keyword arguments go to `likelihood`."""
    if dequantize not in ("uniform", "none"):
        raise ValueError(f"dequantize must be 'uniform' or 'none'; got {dequantize!r}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 2:
        raise ValueError(f"n_bins must be an integer >= 2; got {n_bins!r}")
    lo, hi = (float(v) for v in data_range)
    if not hi > lo:
        raise ValueError(f"data_range must be (lo, hi) with hi > lo; got {data_range!r}")
    xi = torch.as_tensor(x)
    if xi.ndim < 2 or xi.shape[0] == 0:
        raise ValueError("x must have shape (batch, features...)")
    xf = xi.to(torch.float64)
    if (xf != xf.round()).any() or (xf < 0).any() or (xf > n_bins - 1).any():
        raise ValueError(f"x must hold integers in [0, {n_bins - 1}]")
    u = torch.rand(xf.shape, generator=generator, dtype=torch.float64) if dequantize == "uniform" else 0.5
    y = lo + (hi - lo) * (xf + u) / n_bins
    logp = likelihood(denoiser, y.to(xi.device), **kwargs)
    d = xf[0].numel()
    logp_v = logp + d * math.log((hi - lo) / n_bins)
    return -logp_v / (d * math.log(2))
