"""GaussianMixture testbed: every closed form checked against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import F64, anisotropic_mixture, single_threaded, smooth_mixture  # noqa: F401
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from diffkit.testbeds import GaussianMixture


def _covariances(gm: GaussianMixture) -> torch.Tensor:
    return gm.eigvecs @ torch.diag_embed(gm.eigvals) @ gm.eigvecs.transpose(1, 2)


def _moments(gm: GaussianMixture):
    cov = _covariances(gm)
    w, mu = gm.weights, gm.means
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (cov + mu[:, :, None] * mu[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None]


def _single_gaussian():
    mu = torch.tensor([[0.4, -1.2, 0.7]], dtype=F64)
    A = torch.tensor([[1.0, 0.3, -0.2], [0.0, 0.5, 0.4], [0.1, 0.0, 0.3]], dtype=F64)
    cov = (A @ A.T + 0.05 * torch.eye(3, dtype=F64))[None]
    return GaussianMixture(mu, covariances=cov), mu[0], cov[0]


def _points(n, d, seed=0, scale=1.5):
    return scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- closed forms on a single Gaussian -------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.7, 3.0, 40.0])
def test_single_gaussian_denoiser_closed_form(sigma):
    gm, mu, cov = _single_gaussian()
    x = _points(7, 3)
    noisy = cov + sigma**2 * torch.eye(3, dtype=F64)
    expected = mu + (cov @ torch.linalg.solve(noisy, (x - mu).T)).T  # E[x0|x̄] = μ + Σ(Σ+σ²I)^{-1}(x̄-μ)
    torch.testing.assert_close(gm.denoise(x, sigma), expected, rtol=1e-11, atol=1e-12)
    score = -torch.linalg.solve(noisy, (x - mu).T).T
    torch.testing.assert_close(gm.score(x, sigma), score, rtol=1e-11, atol=1e-12)
    if sigma > 0:
        torch.testing.assert_close(gm.eps(x, sigma), (x - expected) / sigma, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gm.score(x, sigma), (gm.denoise(x, sigma) - x) / sigma**2, rtol=1e-9,
                                   atol=1e-11)


def test_clean_limit():
    gm = anisotropic_mixture()
    x = _points(5, 2)
    torch.testing.assert_close(gm.denoise(x, 0.0), x, rtol=1e-13, atol=1e-14)  # D(x̄, 0) = x̄
    e = gm.eps(x, 0.0)
    assert torch.isfinite(e).all() and (e == 0).all()  # finite at σ̄ = 0
    r = gm.responsibilities(x, 0.3)
    assert r.shape == (5, 2)
    torch.testing.assert_close(r.sum(1), torch.ones(5, dtype=F64), rtol=1e-14, atol=1e-14)


# -- mixtures against brute force -----------------------------------------------------------------------------


def _quadrature_grid(lim=4.5, n=721):
    g = torch.linspace(-lim, lim, n, dtype=F64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    return pts, float(g[1] - g[0]) ** 2


@pytest.mark.parametrize("sigma", [0.15, 0.6, 2.0])
def test_mixture_denoiser_equals_brute_force_tweedie(sigma):
    """E[x0 | x̄] = ∫ x0 p0(x0) N(x̄; x0, σ̄²I) dx0 / ∫ p0(x0) N(x̄; x0, σ̄²I) dx0 on a fine 2-D grid."""
    gm = anisotropic_mixture()
    x0, dA = _quadrature_grid()
    log_p0 = gm.log_prob(x0)
    xb = _points(6, 2, seed=2, scale=1.0)
    logw = log_p0[None] - ((xb[:, None, :] - x0[None]) ** 2).sum(-1) / (2 * sigma**2)  # (6, G)
    w = torch.softmax(logw, 1)
    expected = w @ x0
    torch.testing.assert_close(gm.denoise(xb, sigma), expected, rtol=1e-7, atol=1e-7)
    # the noisy density is the same convolution: log p(x̄; σ̄) = log ∫ p0(x0) N(x̄; x0, σ̄²I) dx0
    lognorm = -math.log(2 * math.pi * sigma**2)
    expected_lp = torch.logsumexp(logw, 1) + math.log(dA) + lognorm
    torch.testing.assert_close(gm.log_prob(xb, sigma), expected_lp, rtol=1e-7, atol=1e-7)


def test_log_prob_matches_scipy():
    gm = anisotropic_mixture()
    cov = _covariances(gm).numpy()
    x = _points(9, 2, seed=3)
    for sigma in (0.0, 0.4, 5.0):
        comps = [math.log(float(gm.weights[k])) + multivariate_normal(gm.means[k].numpy(),
                                                                      cov[k] + sigma**2 * np.eye(2)).logpdf(x.numpy())
                 for k in range(gm.K)]
        np.testing.assert_allclose(gm.log_prob(x, sigma).numpy(), logsumexp(np.stack(comps), axis=0), rtol=1e-12,
                                   atol=1e-12)
    single, mu, c = _single_gaussian()
    x3 = _points(9, 3, seed=4)
    np.testing.assert_allclose(single.log_prob(x3, 0.2).numpy(),
                               multivariate_normal(mu.numpy(), c.numpy() + 0.04 * np.eye(3)).logpdf(x3.numpy()),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_log_prob_normalizes(sigma):
    gm = GaussianMixture.ring(n_modes=6, radius=1.0, std=0.3)
    pts, dA = _quadrature_grid(lim=5.0, n=501)
    total = float(torch.exp(gm.log_prob(pts, sigma)).sum() * dA)
    assert total == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("sigma", [0.1, 0.8, torch.tensor([0.05, 0.3, 1.0, 4.0, 0.5, 2.0], dtype=F64)])
def test_score_is_gradient_of_log_prob(sigma):
    gm = anisotropic_mixture()
    x = _points(6, 2, seed=5).requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(gm.score(x.detach(), sigma), grad, rtol=1e-10, atol=1e-12)
    # Tweedie: D = x̄ + σ̄² ∇ log p
    s2 = torch.as_tensor(sigma, dtype=F64) ** 2
    s2 = s2[:, None] if s2.ndim else s2
    torch.testing.assert_close(gm.denoise(x.detach(), sigma), x.detach() + s2 * grad, rtol=1e-10, atol=1e-12)


def test_per_sample_sigma_and_shapes():
    gm = GaussianMixture.random(4, n_components=3, seed=1)
    x = _points(5, 4, seed=6)
    sb = torch.tensor([0.01, 0.1, 1.0, 10.0, 0.5], dtype=F64)
    out = gm.denoise(x, sb)
    for i in range(5):
        torch.testing.assert_close(out[i:i + 1], gm.denoise(x[i:i + 1], float(sb[i])), rtol=1e-13, atol=1e-14)
    # features may come as (N, ...) with d elements; dtype is kept
    x4 = x.reshape(5, 2, 2).float()
    out4 = gm.denoise(x4, 0.3)
    assert out4.shape == (5, 2, 2) and out4.dtype == torch.float32
    torch.testing.assert_close(out4.reshape(5, 4).double(), gm.denoise(x4.reshape(5, 4).double(), 0.3), rtol=1e-6,
                               atol=1e-6)


# -- the exact probability-flow map -----------------------------------------------------------------------------


@pytest.mark.parametrize("s_from, s_to", [(5.0, 0.1), (20.0, 0.0), (0.1, 5.0), (1.0, 0.3)])
def test_flow_map_single_gaussian_closed_form(s_from, s_to):
    """x̄(σ) - μ = U diag(sqrt((λ+σ²)/(λ+σ0²))) Uᵀ (x̄0 - μ)."""
    gm, mu, cov = _single_gaussian()
    lam, U = torch.linalg.eigh(cov)
    x = mu + _points(8, 3, seed=7) * s_from
    M = U @ torch.diag(torch.sqrt((lam + s_to**2) / (lam + s_from**2))) @ U.T
    expected = mu + (x - mu) @ M.T
    torch.testing.assert_close(gm.flow_map(x, s_from, s_to), expected, rtol=1e-8, atol=1e-8)


def test_flow_map_pushes_noisy_marginal_to_data_exactly_for_one_gaussian():
    """The flow map of one Gaussian is affine, x ↦ μ + A(x - μ); it must carry N(μ, Σ + σ²I) to N(μ, Σ):
    A (Σ + σ²I) Aᵀ = Σ (checked deterministically by mapping μ and μ + e_i)."""
    gm, mu, cov = _single_gaussian()
    smax = 30.0
    pts = torch.cat([mu[None], mu[None] + torch.eye(3, dtype=F64)])
    out = gm.flow_map(pts, smax, 0.0)
    torch.testing.assert_close(out[0], mu, rtol=0, atol=1e-9)
    A = (out[1:] - out[0]).T
    torch.testing.assert_close(A @ (cov + smax**2 * torch.eye(3, dtype=F64)) @ A.T, cov, rtol=1e-7, atol=1e-8)
    # and with samples
    g = torch.Generator().manual_seed(0)
    n = 4000
    z = mu + torch.randn(n, 3, generator=g, dtype=F64) @ torch.linalg.cholesky(
        cov + smax**2 * torch.eye(3, dtype=F64)).T
    y = gm.flow_map(z, smax, 0.0, rtol=1e-8, atol=1e-8)
    _check_moments(y, mu, cov)


def _check_moments(y, mean, cov, n_se=4.0):
    """Sample mean and covariance within n_se standard errors of the exact ones."""
    n = y.shape[0]
    se_mean = torch.sqrt(torch.diagonal(cov) / n)
    assert ((y.mean(0) - mean).abs() <= n_se * se_mean).all(), (y.mean(0), mean)
    v = torch.diagonal(cov)
    se_cov = torch.sqrt((cov**2 + v[:, None] * v[None]) / n)  # Gaussian approximation of Var(S_ij)
    assert ((torch.cov(y.T) - cov).abs() <= n_se * se_cov * 1.5).all(), (torch.cov(y.T), cov)


def test_flow_map_pushes_noisy_mixture_to_data():
    gm = anisotropic_mixture()
    g = torch.Generator().manual_seed(1)
    n, smax = 4000, 20.0
    xb = gm.sample(n, generator=g, dtype=F64) + smax * torch.randn(n, 2, generator=g, dtype=F64)
    y = gm.flow_map(xb, smax, 0.0, rtol=1e-8, atol=1e-8)
    mean, cov = _moments(gm)
    _check_moments(y, mean, cov)
    # the component structure survives: the share of points assigned to each component matches the weights
    share = gm.responsibilities(y, 0.0).argmax(1).bincount(minlength=2).to(F64) / n
    se = torch.sqrt(gm.weights * (1 - gm.weights) / n)
    assert ((share - gm.weights).abs() <= 4 * se + 0.01).all(), share


def test_flow_map_round_trip_and_identity():
    gm = smooth_mixture()
    x = _points(6, 2, seed=8, scale=3.0)
    there = gm.flow_map(x, 3.0, 0.2)
    back = gm.flow_map(there, 0.2, 3.0)
    torch.testing.assert_close(back, x, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(gm.flow_map(x, 1.0, 1.0), x, rtol=0, atol=0)
    assert gm.flow_map(x.float(), 3.0, 0.2).dtype == torch.float32
    with pytest.raises(ValueError):
        gm.flow_map(x, -1.0, 0.0)


# -- sampling and presets -----------------------------------------------------------------------------------------


def test_sample_moments():
    gm = anisotropic_mixture()
    g = torch.Generator().manual_seed(2)
    n = 20000
    x, k = gm.sample(n, generator=g, dtype=F64, return_components=True)
    assert x.shape == (n, 2) and x.dtype == F64 and k.shape == (n,)
    mean, cov = _moments(gm)
    _check_moments(x, mean, cov)
    share = k.bincount(minlength=2).to(F64) / n
    assert ((share - gm.weights).abs() <= 4 * torch.sqrt(gm.weights * (1 - gm.weights) / n)).all()
    # per component: each group has its component's mean and covariance
    covs = _covariances(gm)
    for j in range(gm.K):
        _check_moments(x[k == j], gm.means[j], covs[j])
    assert gm.sample(3).dtype == torch.float32  # default dtype
    torch.testing.assert_close(gm.sample(5, generator=torch.Generator().manual_seed(9)),
                               gm.sample(5, generator=torch.Generator().manual_seed(9)), rtol=0, atol=0)


def test_presets():
    ring = GaussianMixture.ring(n_modes=8, radius=2.0, std=0.1)
    assert (ring.K, ring.dim) == (8, 2)
    torch.testing.assert_close(ring.means.norm(dim=1), torch.full((8,), 2.0, dtype=F64), rtol=1e-14, atol=0)
    torch.testing.assert_close(ring.eigvals, torch.full((8, 2), 0.01, dtype=F64), rtol=1e-7, atol=0)
    torch.testing.assert_close(ring.weights, torch.full((8,), 1 / 8, dtype=F64), rtol=1e-14, atol=0)
    assert ring.labels.tolist() == list(range(8))

    grid = GaussianMixture.grid(side=3, spacing=0.5)
    assert (grid.K, grid.dim) == (9, 2)
    torch.testing.assert_close(grid.means.mean(0), torch.zeros(2, dtype=F64), rtol=0, atol=1e-15)
    assert sorted(set(grid.means[:, 0].tolist())) == pytest.approx([-0.5, 0.0, 0.5])

    rnd = GaussianMixture.random(6, n_components=5, seed=3)
    assert (rnd.K, rnd.dim) == (5, 6)
    cov = _covariances(rnd)
    torch.testing.assert_close(cov, cov.transpose(1, 2), rtol=0, atol=1e-14)
    assert (torch.linalg.eigvalsh(cov) > 0).all()
    stds = rnd.eigvals.sqrt()
    assert (stds >= 0.02 - 1e-12).all() and (stds <= 0.5 + 1e-12).all()
    assert float(rnd.weights.sum()) == pytest.approx(1.0, abs=1e-14)
    again = GaussianMixture.random(6, n_components=5, seed=3)
    torch.testing.assert_close(again.means, rnd.means, rtol=0, atol=0)
    other = GaussianMixture.random(6, n_components=5, seed=4)
    assert not torch.allclose(other.means, rnd.means)


def test_presets_keep_float64_parameters():
    ring = GaussianMixture.ring(n_modes=4, std=0.1)
    grid = GaussianMixture.grid(side=2, std=0.1)
    for gm in (ring, grid):
        torch.testing.assert_close(gm.eigvals, torch.full_like(gm.eigvals, 0.1**2), rtol=1e-14, atol=0)


def test_weights_are_normalized_and_diagonal_stds():
    gm = GaussianMixture(torch.zeros(2, 3), stds=torch.tensor([[0.1, 0.2, 0.3], [1.0, 1.0, 1.0]], dtype=F64),
                         weights=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(gm.weights, torch.tensor([0.25, 0.75], dtype=F64), rtol=1e-15, atol=0)
    torch.testing.assert_close(gm.eigvals[0], torch.tensor([0.01, 0.04, 0.09], dtype=F64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("kwargs", [
    dict(means=torch.zeros(3)),  # means not (K, d)
    dict(means=torch.zeros(2, 2)),  # neither stds nor covariances
    dict(means=torch.zeros(2, 2), stds=torch.ones(2), covariances=torch.eye(2).expand(2, 2, 2)),  # both
    dict(means=torch.zeros(2, 2), stds=torch.ones(3)),
    dict(means=torch.zeros(2, 2), stds=torch.ones(2, 3)),
    dict(means=torch.zeros(2, 2), stds=torch.tensor([1.0, 0.0])),  # degenerate
    dict(means=torch.zeros(2, 2), covariances=torch.eye(2).expand(3, 2, 2)),
    dict(means=torch.zeros(2, 2), covariances=torch.tensor([[[1.0, 0.5], [0.0, 1.0]]] * 2)),  # not symmetric
    dict(means=torch.zeros(2, 2), covariances=torch.tensor([[[1.0, 2.0], [2.0, 1.0]]] * 2)),  # indefinite
    dict(means=torch.zeros(2, 2), stds=torch.ones(2), weights=torch.ones(3)),
    dict(means=torch.zeros(2, 2), stds=torch.ones(2), weights=torch.tensor([1.0, -0.5])),
    dict(means=torch.zeros(2, 2), stds=torch.ones(2), weights=torch.tensor([0.0, 0.0])),
    dict(means=torch.zeros(2, 2), stds=torch.ones(2), weights=torch.tensor([float("nan"), 1.0])),
])
def test_bad_construction(kwargs):
    with pytest.raises(ValueError):
        GaussianMixture(**kwargs)


def test_bad_point_shapes():
    gm = GaussianMixture.ring()
    for shape in [(5, 3), (5, 1), (4,)]:
        for fn in (gm.denoise, gm.score, gm.eps, gm.log_prob):
            with pytest.raises(ValueError):
                fn(torch.zeros(shape), 1.0)


@pytest.mark.parametrize("shape", [(5, 2, 2), (2,)])
def test_bad_point_shapes_with_matching_last_axis(shape):
    gm = GaussianMixture.ring()
    with pytest.raises(ValueError):
        gm.denoise(torch.zeros(shape), 1.0)
