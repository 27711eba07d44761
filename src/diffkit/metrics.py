"""Distribution-level metrics for sample sets.

Against an analytic testbed (`diffkit.testbeds.GaussianMixture` p = Σ_k w_k N(μ_k, Σ_k)):

* `cross_entropy`: H(q, p) = -E_q log p(x), with the exact log p; the Monte Carlo average over the samples of
  q is its only error. It is not a divergence: an under-dispersed q can score below the entropy of p.
* `mode_weights` / `mode_weight_error`: soft mode weights ŵ_k = mean_i r_k(x_i) with the exact responsibilities
  r_k(x) = p(k | x) (for q = p, E ŵ_k = w_k exactly), and the total variation ½ Σ_k |ŵ_k - w_k|.
* `component_errors`: responsibility-weighted mean and covariance per component, μ̂_k = Σ r_ik x_i / Σ r_ik,
  Σ̂_k likewise (consistent for q = p since E_p[r_k x] = w_k μ_k), reported as a Mahalanobis mean error
  sqrt((μ̂_k - μ_k)ᵀ Σ_k⁻¹ (μ̂_k - μ_k)) and a whitened covariance error ||Σ_k^{-1/2} Σ̂_k Σ_k^{-1/2} - I||_F,
  both averaged over components with the weights w_k. A noise coefficient off by a factor shows up in the
  covariance error first.

Between any two sample sets:

* `sliced_wasserstein`: SW_2 over random directions, the 1-D W_2 between projected quantile functions
  ("Sliced and Radon Wasserstein Barycenters of Measures", Bonneel et al. 2015, Eq. 4).
* `mmd_mixture`: MMD²(q, p) with an RBF kernel against the mixture itself: the terms with p are Gaussian
  integrals in closed form, only E_q k(x, x') is a U-statistic over the samples (no reference sample needed).
* `mmd`: unbiased MMD² with a stated kernel ("A Kernel Two-Sample Test", Gretton et al. 2012, Eq. 3):
  'rbf' Σ_b exp(-|x-y|²/(2 b²)) over the bandwidths b, 'laplace' Σ_b exp(-|x-y|/b), or 'energy' -|x-y| (the
  energy distance of "Energy statistics", Székely & Rizzo 2013, Eq. 2.2).
* `frechet_distance`: |μ_1 - μ_2|² + tr(Σ_1 + Σ_2 - 2 (Σ_1^{1/2} Σ_2 Σ_1^{1/2})^{1/2}) between Gaussian fits of
  two feature sets (Dowson & Landau 1982; the FID of "GANs Trained by a Two Time-Scale Update Rule Converge to
  a Local Nash Equilibrium", Heusel et al. 2017, Eq. 6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Tensor = torch.Tensor

__all__ = ["cross_entropy", "mixture_entropy", "mode_weights", "mode_weight_error", "component_errors",
           "mmd_mixture", "sliced_wasserstein", "mmd", "frechet_distance", "feature_statistics", "mixture_report",
           "KERNELS"]

KERNELS = ("rbf", "laplace", "energy")
_F64 = torch.float64


def _points(x, name: str = "samples", min_n: int = 1) -> Tensor:
    """A sample set as a float64 (n, d) tensor: rows are samples, trailing dimensions are flattened."""
    t = torch.as_tensor(x)
    if t.ndim == 1:
        raise ValueError(f"{name} must have shape (n, features...); got a 1-D tensor (use x[:, None] for 1-D data)")
    if t.ndim == 0 or t.shape[0] < min_n:
        raise ValueError(f"{name} must hold at least {min_n} sample(s) of shape (n, features...); got shape "
                         f"{tuple(t.shape)}")
    t = t.reshape(t.shape[0], -1).to(_F64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains non-finite values")
    return t


def _same_dim(x: Tensor, y: Tensor, what=("x", "y")):
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sample sets of mismatched dimension: {what[0]} has {x.shape[1]} features per sample, "
                         f"{what[1]} has {y.shape[1]}")


def _mixture_points(samples, mixture) -> Tensor:
    x = _points(samples)
    if x.shape[1] != mixture.dim:
        raise ValueError(f"samples of dimension {x.shape[1]} do not match the mixture's dimension {mixture.dim}")
    return x


# -- against a testbed mixture ---------------------------------------------------------------------------------


def cross_entropy(samples, mixture) -> float:
    """H(q, p) = -(1/n) Σ_i log p(x_i) in nats, with p the mixture's exact density (cross-entropy of the sample
    distribution q relative to p; "Elements of Information Theory", Cover & Thomas 2006, Eq. 2.90 ff.)."""
    x = _mixture_points(samples, mixture)
    return float(-mixture.log_prob(x).mean())


def mixture_entropy(mixture, n: int = 200_000, seed: int = 0) -> tuple[float, float]:
    """Monte Carlo entropy H(p) = -E_p log p of the mixture and its standard error (the floor of
    `cross_entropy`: H(q, p) = H(q) + KL(q || p))."""
    x = mixture.sample(n, generator=torch.Generator().manual_seed(seed), dtype=_F64)
    lp = mixture.log_prob(x)
    return float(-lp.mean()), float(lp.std() / math.sqrt(n))


def mode_weights(samples, mixture) -> Tensor:
    """Soft mode weights ŵ_k = (1/n) Σ_i p(k | x_i) with the exact responsibilities at σ̄ = 0 (for exact samples
    E ŵ_k = w_k: the mixture's own weights, Bishop 2006, "Pattern Recognition and Machine Learning", Eq. 9.23)."""
    x = _mixture_points(samples, mixture)
    return mixture.responsibilities(x, 0.0).mean(0)


def mode_weight_error(samples, mixture) -> float:
    """Total-variation distance ½ Σ_k |ŵ_k - w_k| between the soft mode weights and the true weights."""
    return float(0.5 * (mode_weights(samples, mixture) - mixture.weights).abs().sum())


def _component_cov(mixture, k: int) -> Tensor:
    U, lam = mixture.eigvecs[k], mixture.eigvals[k]
    return U @ torch.diag(lam) @ U.T


def component_errors(samples, mixture) -> dict:
    """Per-component responsibility-weighted mean and covariance (Bishop 2006, Eq. 9.24-9.25) against the true
    μ_k, Σ_k: Mahalanobis mean errors and whitened covariance errors per component and their w-weighted averages
    `mean_error`, `cov_error` (module docstring)."""
    x = _mixture_points(samples, mixture)
    r = mixture.responsibilities(x, 0.0)
    mean_err, cov_err, means, covs = [], [], [], []
    for k in range(mixture.K):
        rk = r[:, k]
        mass = rk.sum()
        if mass <= 1e-12:
            m = torch.full((mixture.dim,), math.nan, dtype=_F64)
            c = torch.full((mixture.dim, mixture.dim), math.nan, dtype=_F64)
            mean_err.append(math.inf), cov_err.append(math.inf)
            means.append(m), covs.append(c)
            continue
        m = (rk[:, None] * x).sum(0) / mass
        dx = x - m
        c = (rk[:, None] * dx).T @ dx / mass
        U, lam = mixture.eigvecs[k], mixture.eigvals[k]
        white = U / lam.sqrt()  # columns: Σ^{-1/2} in the eigenbasis
        dm = white.T @ (m - mixture.means[k])
        cw = white.T @ c @ white
        mean_err.append(float(dm.norm()))
        cov_err.append(float((cw - torch.eye(mixture.dim, dtype=_F64)).norm()))
        means.append(m), covs.append(c)
    w = mixture.weights
    return {"mean_error": float(sum(wk * e for wk, e in zip(w.tolist(), mean_err))),
            "cov_error": float(sum(wk * e for wk, e in zip(w.tolist(), cov_err))),
            "mean_errors": mean_err, "cov_errors": cov_err, "means": torch.stack(means),
            "covariances": torch.stack(covs)}


def mixture_report(samples, mixture) -> dict:
    """Every mixture metric at once: cross_entropy, mode_weight_error, mean_error, cov_error."""
    ce = component_errors(samples, mixture)
    return {"cross_entropy": cross_entropy(samples, mixture), "mode_weight_error": mode_weight_error(samples, mixture),
            "mean_error": ce["mean_error"], "cov_error": ce["cov_error"]}


def _bandwidths(bandwidth) -> list[float]:
    bws = [float(bandwidth)] if isinstance(bandwidth, (int, float)) else [float(b) for b in bandwidth]
    if not bws or not all(b > 0 and math.isfinite(b) for b in bws):
        raise ValueError(f"bandwidths must be positive and finite; got {bandwidth!r}")
    return bws


def _gauss_kernel_mean(x: Tensor, mean: Tensor, cov: Tensor, bw: float) -> Tensor:
    """E_{y ~ N(mean, cov)} exp(-|x - y|²/(2 bw²)), with A = cov + bw² I:
    bw^d det(A)^{-1/2} exp(-½ (x - mean)ᵀ A^{-1} (x - mean))."""
    d = mean.numel()
    a = cov + bw**2 * torch.eye(d, dtype=_F64)
    lam, U = torch.linalg.eigh(a)
    y = (x - mean) @ U
    quad = (y**2 / lam).sum(-1)
    return torch.exp(d * math.log(bw) - 0.5 * lam.log().sum() - 0.5 * quad)


def mmd_mixture(samples, mixture, bandwidth: float | Sequence[float] = 1.0) -> float:
    """MMD²(q, p) between the sample distribution q and the mixture p for the RBF kernel Σ_b exp(-|x-y|²/(2b²))
    (Gretton et al. 2012, Eq. 3 with the population terms of p exact): the U-statistic
    (1/(n(n-1))) Σ_{i≠j} k(x_i, x_j) - (2/n) Σ_i E_p k(x_i, y) + E_{p⊗p} k(y, y'), where the Gaussian integrals
    E_{N(μ,Σ)} k(x, y) = b^d det(Σ + b²I)^{-1/2} exp(-½(x-μ)ᵀ(Σ + b²I)^{-1}(x-μ)) and, for two components,
    the same with Σ_k + Σ_l. Unbiased; zero in expectation for exact samples."""
    x = _mixture_points(samples, mixture)
    if x.shape[0] < 2:
        raise ValueError("mmd_mixture needs at least two samples")
    bws = _bandwidths(bandwidth)
    n = x.shape[0]
    covs = [_component_cov(mixture, k) for k in range(mixture.K)]
    w = mixture.weights
    kxx = _kernel_sum(x, x, "rbf", bws, True) / (n * (n - 1))
    kxp = sum(float(w[k]) * _gauss_kernel_mean(x, mixture.means[k], covs[k], b).mean()
              for b in bws for k in range(mixture.K))
    kpp = sum(float(w[k] * w[m]) * _gauss_kernel_mean(mixture.means[k][None], mixture.means[m], covs[k] + covs[m],
                                                      b)[0]
              for b in bws for k in range(mixture.K) for m in range(mixture.K))
    return float(kxx - 2 * kxp + kpp)


# -- between two sample sets -----------------------------------------------------------------------------------


def _quantiles(sorted_vals: Tensor, levels: Tensor) -> Tensor:
    """Linear interpolation of the empirical quantile function (columns sorted ascending) at `levels` in (0, 1)."""
    n = sorted_vals.shape[0]
    pos = levels * n - 0.5
    lo = pos.floor().clamp(0, n - 1).long()
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo).clamp(0, 1)[:, None]
    return sorted_vals[lo] * (1 - w) + sorted_vals[hi] * w


def sliced_wasserstein(x, y, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance SW_2(x, y) = sqrt(E_θ W_2²(θᵀx, θᵀy)) over `n_projections` uniform random
    directions (Bonneel et al. 2015, Eq. 4); the 1-D W_2 compares quantile functions (sorted values when the
    sets have equal size, interpolated quantiles otherwise). Directions come from `seed`."""
    x, y = _points(x, "x"), _points(y, "y")
    _same_dim(x, y)
    if isinstance(n_projections, bool) or not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(f"n_projections must be a positive integer; got {n_projections!r}")
    theta = torch.randn(x.shape[1], n_projections, generator=torch.Generator().manual_seed(seed), dtype=_F64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(0).values, (y @ theta).sort(0).values
    if px.shape[0] != py.shape[0]:
        m = max(px.shape[0], py.shape[0])
        levels = (torch.arange(m, dtype=_F64) + 0.5) / m
        px, py = _quantiles(px, levels), _quantiles(py, levels)
    return float(((px - py) ** 2).mean().sqrt())


def _kernel_sum(a: Tensor, b: Tensor, kernel: str, bandwidths: Sequence[float], same: bool, chunk: int = 2048):
    """Σ_{i,j} k(a_i, b_j), excluding i = j when `same`."""
    total = torch.zeros((), dtype=_F64)
    for i in range(0, a.shape[0], chunk):
        ai = a[i:i + chunk]
        dist = torch.cdist(ai, b)
        if kernel == "rbf":
            d2 = dist.pow_(2)
            k = sum(torch.exp(d2 * (-0.5 / bw**2)) for bw in bandwidths)
        elif kernel == "laplace":
            k = sum(torch.exp(dist * (-1.0 / bw)) for bw in bandwidths)
        else:
            k = -dist
        if same:  # remove the diagonal i = j of this block
            idx = torch.arange(ai.shape[0])
            k[idx, idx + i] = 0.0
        total = total + k.sum()
    return total


def mmd(x, y, kernel: str = "rbf", bandwidth: float | Sequence[float] = 1.0) -> float:
    """Unbiased MMD²_u(x, y) (Gretton et al. 2012, "A Kernel Two-Sample Test", Eq. 3):
    (1/(n(n-1))) Σ_{i≠j} k(x_i, x_j) + (1/(m(m-1))) Σ_{i≠j} k(y_i, y_j) - (2/(nm)) Σ_{i,j} k(x_i, y_j),
    with kernel 'rbf' (Σ_b exp(-|x-y|²/(2b²))), 'laplace' (Σ_b exp(-|x-y|/b)) over `bandwidth` (a number or a
    list), or 'energy' (k = -|x-y|: the energy distance; no bandwidth). Zero in expectation when x and y come
    from the same distribution (so it can be slightly negative)."""
    x, y = _points(x, "x", 2), _points(y, "y", 2)
    _same_dim(x, y)
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
    bws = [] if kernel == "energy" else _bandwidths(bandwidth)
    n, m = x.shape[0], y.shape[0]
    kxx = _kernel_sum(x, x, kernel, bws, True) / (n * (n - 1))
    kyy = _kernel_sum(y, y, kernel, bws, True) / (m * (m - 1))
    kxy = _kernel_sum(x, y, kernel, bws, False) / (n * m)
    return float(kxx + kyy - 2 * kxy)


def feature_statistics(features) -> tuple[Tensor, Tensor]:
    """(mean, covariance) of a feature set (n, d), float64, unbiased covariance (as FID uses)."""
    f = _points(features, "features", 2)
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def _sqrtm_psd(a: Tensor) -> Tensor:
    lam, U = torch.linalg.eigh(0.5 * (a + a.T))
    return (U * lam.clamp_min(0).sqrt()) @ U.T


def frechet_distance(x, y) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (Heusel et al. 2017, Eq. 6; Dowson & Landau
    1982): |μ_x - μ_y|² + tr(Σ_x + Σ_y - 2 (Σ_x^{1/2} Σ_y Σ_x^{1/2})^{1/2}). `x` and `y` are feature sets (n, d) or
    (mean, covariance) pairs from `feature_statistics`; the matrix square root uses symmetric eigendecompositions
    (stable for singular covariances)."""
    mx, sx = x if isinstance(x, tuple) else feature_statistics(x)
    my, sy = y if isinstance(y, tuple) else feature_statistics(y)
    mx, my = torch.as_tensor(mx, dtype=_F64).flatten(), torch.as_tensor(my, dtype=_F64).flatten()
    sx, sy = torch.as_tensor(sx, dtype=_F64), torch.as_tensor(sy, dtype=_F64)
    if mx.shape != my.shape:
        raise ValueError(f"feature sets of mismatched dimension: {mx.numel()} and {my.numel()}")
    d = mx.numel()
    if sx.shape != (d, d) or sy.shape != (d, d):
        raise ValueError(f"covariances must have shape ({d}, {d}); got {tuple(sx.shape)} and {tuple(sy.shape)}")
    r = _sqrtm_psd(sx)
    cross = torch.linalg.eigvalsh(0.5 * ((r @ sy @ r) + (r @ sy @ r).T)).clamp_min(0).sqrt().sum()
    return float(((mx - my) ** 2).sum() + torch.trace(sx) + torch.trace(sy) - 2 * cross)
