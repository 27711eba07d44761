"""Distribution metrics: exact answers where they exist, zero-mean under the null, sensitivity, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import single_threaded  # noqa: F401
from scipy.linalg import sqrtm

from diffkit import metrics as M
from diffkit.testbeds import GaussianMixture

F64 = torch.float64


@pytest.fixture(scope="module")
def mix():
    cov = torch.tensor([[[0.30, 0.12], [0.12, 0.10]], [[0.05, -0.02], [-0.02, 0.20]]], dtype=F64)
    return GaussianMixture(torch.tensor([[-1.0, 0.3], [1.2, -0.4]]), weights=torch.tensor([0.35, 0.65]),
                           covariances=cov)


def _sample(m, n, seed):
    return m.sample(n, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- against a mixture --------------------------------------------------------------------------------------------


def test_exact_samples_score_near_zero_and_perturbed_ones_do_not(mix):
    x = _sample(mix, 20000, 0)
    rep = M.mixture_report(x, mix)
    assert rep["mode_weight_error"] < 0.01 and rep["mean_error"] < 0.03 and rep["cov_error"] < 0.05
    entropy, se = M.mixture_entropy(mix, 100_000)
    assert abs(rep["cross_entropy"] - entropy) < 0.03 + 3 * se
    # 10% more spread around each component: covariance error ~0.2 (whitened), cross-entropy up
    r = mix.responsibilities(x, 0.0).argmax(1)
    wide = mix.means[r] + 1.1 * (x - mix.means[r])
    rep_w = M.mixture_report(wide, mix)
    assert rep_w["cov_error"] > 0.2 and rep_w["cross_entropy"] > rep["cross_entropy"] + 0.1
    # all mass on one mode: weight error = the other mode's weight
    one = x[r == 1]
    assert abs(M.mode_weight_error(one, mix) - 0.35) < 0.02


def test_mode_weights_are_unbiased_even_with_overlapping_modes():
    """Soft weights: E_p[p(k|x)] = w_k exactly, however much the components overlap."""
    m = GaussianMixture(torch.tensor([[0.0, 0.0], [0.5, 0.0]]), torch.tensor([1.0, 1.0]), weights=[0.3, 0.7])
    est = torch.stack([M.mode_weights(_sample(m, 4000, s), m) for s in range(10)]).mean(0)
    torch.testing.assert_close(est, m.weights, rtol=0, atol=0.01)


def test_cross_entropy_of_a_gaussian_is_its_entropy():
    cov = torch.tensor([[[0.5, 0.2], [0.2, 0.4]]], dtype=F64)
    g = GaussianMixture(torch.zeros(1, 2), covariances=cov)
    want = 0.5 * math.log(np.linalg.det(2 * math.pi * math.e * cov[0].numpy()))
    assert abs(M.cross_entropy(_sample(g, 50000, 1), g) - want) < 0.02
    assert abs(M.mixture_entropy(g, 50000)[0] - want) < 0.02


def test_component_errors_recover_the_parameters(mix):
    ce = M.component_errors(_sample(mix, 40000, 2), mix)
    torch.testing.assert_close(ce["means"], mix.means, rtol=0, atol=0.02)
    true_cov = torch.stack([mix.eigvecs[k] @ torch.diag(mix.eigvals[k]) @ mix.eigvecs[k].T for k in range(2)])
    torch.testing.assert_close(ce["covariances"], true_cov, rtol=0, atol=0.01)
    assert len(ce["mean_errors"]) == 2 and len(ce["cov_errors"]) == 2


def test_empty_component_is_infinitely_wrong(mix):
    x = mix.means[1] + 0.01 * torch.randn(50, 2, dtype=F64)
    ce = M.component_errors(x, mix)
    assert math.isfinite(ce["cov_errors"][1])
    far = torch.full((20, 2), 1e3, dtype=F64)  # responsibilities underflow to one component exactly
    assert M.component_errors(far, mix)["mean_error"] > 100


def test_mmd_mixture_is_unbiased_and_matches_a_large_reference(mix):
    vals = torch.tensor([M.mmd_mixture(_sample(mix, 400, s), mix, [0.2, 0.8]) for s in range(40)])
    assert abs(float(vals.mean())) < 4 * float(vals.std()) / math.sqrt(40), (vals.mean(), vals.std())
    x = 1.1 * _sample(mix, 1000, 99)
    ref = _sample(mix, 10000, 100)
    exact = M.mmd_mixture(x, mix, [0.2, 0.8])
    assert exact > 10 * float(vals.std())
    assert abs(exact - M.mmd(x, ref, "rbf", [0.2, 0.8])) < 0.1 * exact


# -- between sample sets -------------------------------------------------------------------------------------------


def test_mmd_null_symmetry_and_energy_distance():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 3, generator=g, dtype=F64), torch.randn(400, 3, generator=g, dtype=F64)
    assert abs(M.mmd(x, y, bandwidth=1.0)) < 0.01
    assert math.isclose(M.mmd(x, y + 0.5, bandwidth=[0.5, 2.0]), M.mmd(y + 0.5, x, bandwidth=[0.5, 2.0]),
                        rel_tol=1e-12)
    assert M.mmd(x, y + 0.5, bandwidth=1.0) > 0.03
    assert M.mmd(x, y + 0.5, kernel="laplace", bandwidth=1.0) > 0.02
    # energy kernel: 2 E|X-Y| - E|X-X'| - E|Y-Y'| with the U-statistic diagonals removed
    dxy, dxx, dyy = torch.cdist(x, y), torch.cdist(x, x), torch.cdist(y, y)
    want = 2 * dxy.mean() - dxx.sum() / (500 * 499) - dyy.sum() / (400 * 399)
    assert math.isclose(M.mmd(x, y, kernel="energy"), float(want), rel_tol=1e-6, abs_tol=1e-9)


def test_mmd_chunking_does_not_change_the_value():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2500, 2, generator=g, dtype=F64), 1.2 * torch.randn(2100, 2, generator=g, dtype=F64)
    k_chunked = M._kernel_sum(x, x, "rbf", [0.7], True)
    k_whole = M._kernel_sum(x, x, "rbf", [0.7], True, chunk=10**6)
    assert math.isclose(float(k_chunked), float(k_whole), rel_tol=1e-12)
    assert M.mmd(x, y) > 0


def test_sliced_wasserstein_exact_cases():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, 1, generator=g, dtype=F64)
    b = 2 * torch.randn(1000, 1, generator=g, dtype=F64) + 1
    want = float(((a.sort(0).values - b.sort(0).values) ** 2).mean().sqrt())
    assert math.isclose(M.sliced_wasserstein(a, b, n_projections=3), want, rel_tol=1e-12)  # 1-D: ±θ, exact W2
    # a shift c: SW_2² = E_θ (θ·c)² = |c|²/d for uniform directions
    x = torch.randn(1000, 4, generator=g, dtype=F64)
    c = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=F64)
    sw = M.sliced_wasserstein(x, x + c, n_projections=2000)
    assert abs(sw - float(c.norm()) / 2) < 0.04
    assert M.sliced_wasserstein(x, x) == 0.0
    # unequal sizes use quantile interpolation
    assert abs(M.sliced_wasserstein(x, (x + c)[:400], n_projections=2000) - float(c.norm()) / 2) < 0.08


def test_frechet_distance_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.tensor([0.0, 1.0, 2.0], dtype=F64), torch.tensor([1.0, 1.0, -1.0], dtype=F64)
    a = torch.randn(3, 3, generator=g, dtype=F64)
    s1 = a @ a.T + 0.1 * torch.eye(3, dtype=F64)
    b = torch.randn(3, 3, generator=g, dtype=F64)
    s2 = b @ b.T + 0.2 * torch.eye(3, dtype=F64)
    cross = sqrtm(s1.numpy() @ s2.numpy()).real
    want = float(((m1 - m2) ** 2).sum()) + float(np.trace(s1.numpy() + s2.numpy() - 2 * cross))
    assert math.isclose(M.frechet_distance((m1, s1), (m2, s2)), want, rel_tol=1e-9)
    # diagonal covariances: Σ (sqrt a - sqrt b)²
    diag_a, diag_b = torch.diag(torch.tensor([1.0, 4.0, 9.0])), torch.diag(torch.tensor([4.0, 4.0, 1.0]))
    fd = M.frechet_distance((m1, diag_a), (m1, diag_b))
    assert math.isclose(fd, 1.0 + 0.0 + 4.0, rel_tol=1e-12)
    feats = torch.randn(500, 3, generator=g, dtype=F64)
    assert abs(M.frechet_distance(feats, feats)) < 1e-9
    mu, cov = M.feature_statistics(feats)
    torch.testing.assert_close(cov, torch.from_numpy(np.cov(feats.numpy().T)))
    assert math.isclose(M.frechet_distance(feats, (mu, cov)), 0.0, abs_tol=1e-9)


def test_frechet_distance_handles_singular_covariances():
    x = torch.zeros(100, 3, dtype=F64)
    x[:, 0] = torch.randn(100, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert abs(M.frechet_distance(x, x)) < 1e-9


# -- bad input -------------------------------------------------------------------------------------------------------


def test_mismatched_dimensions_raise_clear_errors(mix):
    a, b = torch.randn(10, 2), torch.randn(10, 3)
    for fn in (M.mmd, M.sliced_wasserstein, M.frechet_distance):
        with pytest.raises(ValueError, match="mismatched dimension"):
            fn(a, b)
    for fn in (M.cross_entropy, M.mode_weights, M.mode_weight_error, M.component_errors, M.mmd_mixture,
               M.mixture_report):
        with pytest.raises(ValueError, match="dimension"):
            fn(b, mix)


@pytest.mark.parametrize("call,match", [
    (lambda: M.mmd(torch.randn(10), torch.randn(10)), "1-D"),
    (lambda: M.mmd(torch.randn(1, 2), torch.randn(10, 2)), "at least 2"),
    (lambda: M.mmd(torch.randn(5, 2), torch.randn(5, 2), kernel="cosine"), "kernel"),
    (lambda: M.mmd(torch.randn(5, 2), torch.randn(5, 2), bandwidth=0.0), "bandwidth"),
    (lambda: M.mmd(torch.randn(5, 2), torch.randn(5, 2), bandwidth=[]), "bandwidth"),
    (lambda: M.sliced_wasserstein(torch.randn(5, 2), torch.randn(5, 2), n_projections=0), "n_projections"),
    (lambda: M.sliced_wasserstein(torch.full((5, 2), math.inf), torch.randn(5, 2)), "non-finite"),
    (lambda: M.frechet_distance((torch.zeros(2), torch.eye(3)), (torch.zeros(2), torch.eye(2))), "covariances"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
