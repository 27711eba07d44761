"""Exact likelihood by the probability-flow ODE against the Gaussian mixture's closed-form log-density."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import single_threaded  # noqa: F401

import diffkit
from diffkit.likelihood import bits_per_dim, gaussian_prior, likelihood, tweedie_cov_prior, tweedie_prior
from diffkit.testbeds import GaussianMixture

F64 = torch.float64
TARGET = 0.01  # nats per dimension (the target)


def _data(mix, n, seed=0):
    return mix.sample(n, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("mix", [GaussianMixture.ring(8, 1.0, 0.08), GaussianMixture.random(4, 6, seed=1)],
                         ids=["ring2d", "random4d"])
def test_likelihood_matches_the_mixture_density(mix):
    """Default settings (Tweedie-covariance prior, exact trace) against log p(x; σ̄_min): far inside 0.01 nats/dim.
    With the exact marginal as prior only the ODE error remains."""
    den = mix.denoiser(diffkit.EDM(0.002, 80.0, 0.5), "edm")
    x = _data(mix, 48)
    truth = mix.log_prob(x, 0.002)
    lp, info = likelihood(den, x, return_info=True)
    err = (lp - truth).abs() / mix.dim
    assert float(err.max()) < TARGET / 20, float(err.max())
    assert info["divergence"] == "exact" and info["nfe"] > 10
    torch.testing.assert_close(info["nats_per_dim"], -lp / mix.dim)
    torch.testing.assert_close(info["bits_per_dim"], -lp / (mix.dim * math.log(2)))
    lp_exact_prior = likelihood(den, x, prior=mix.log_prob)
    assert float(((lp_exact_prior - truth).abs() / mix.dim).max()) < 5e-4
    # and against the data density itself: smoothing by σ̄_min = 0.002 is negligible for these components
    assert float(((lp - mix.log_prob(x, 0.0)).abs() / mix.dim).max()) < TARGET


def test_priors_in_order_of_accuracy():
    """At a small σ̄_max (14.6, Stable Diffusion's VP) and data with a non-zero mean: N(0, σ̄² I) is off by
    ~y·E[x0]/σ̄², the Tweedie-centred prior by ~tr Cov/σ̄², the Tweedie-covariance prior by much less."""
    mix = GaussianMixture.random(16, 8, seed=1)
    proc = diffkit.VP.discrete("scaled_linear")
    den = mix.denoiser(proc, "eps")
    x = _data(mix, 24)
    truth = mix.log_prob(x, proc.sigma_bar_min)
    err = {p: float(((likelihood(den, x, prior=p) - truth).abs() / 16).max()) for p in ("gaussian", "tweedie", "auto")}
    assert err["auto"] < 2e-3 and err["tweedie"] > 3 * err["auto"] and err["gaussian"] > 3 * err["auto"], err
    assert err["auto"] < TARGET / 5


def test_tweedie_priors_on_gaussian_data():
    """For Gaussian data the Tweedie-covariance prior is the exact marginal at any σ̄; the centred one is not."""
    cov = torch.tensor([[[0.5, 0.2, 0.0], [0.2, 0.3, 0.1], [0.0, 0.1, 0.4]]], dtype=F64)
    g = GaussianMixture(torch.tensor([[1.0, -2.0, 0.5]], dtype=F64), covariances=cov)
    y = 3.0 * torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    for sigma in (0.5, 3.0):
        torch.testing.assert_close(tweedie_cov_prior(g.denoise)(y, sigma), g.log_prob(y, sigma), rtol=0, atol=1e-10)
        assert float((tweedie_prior(g.denoise)(y, sigma) - g.log_prob(y, sigma)).abs().max()) > 1e-3


@pytest.mark.parametrize("process", [diffkit.VP.continuous("linear"), diffkit.VP.discrete("linear")],
                         ids=["vp_linear", "vp_discrete"])
def test_likelihood_under_vp_processes(process):
    """Any process: the ODE runs in canonical variables between the process's σ̄ range, so the answer is the
    density at its σ̄_min (0.0045 / 0.01 here)."""
    mix = GaussianMixture.random(3, 4, seed=3)
    den = mix.denoiser(process, "eps")
    x = _data(mix, 24)
    lp = likelihood(den, x, rtol=1e-7, atol=1e-7)
    truth = mix.log_prob(x, process.sigma_bar_min)
    assert float(((lp - truth).abs() / 3).max()) < 2e-3


def test_plain_callable_denoiser_needs_a_sigma_range():
    mix = GaussianMixture.ring(4, 1.0, 0.2)
    x = _data(mix, 8)
    with pytest.raises(ValueError, match="sigma_min"):
        likelihood(mix.denoise, x)
    lp = likelihood(mix.denoise, x, sigma_min=1e-3, sigma_max=50.0)
    assert float((lp - mix.log_prob(x, 1e-3)).abs().max()) < 2e-3


def test_hutchinson_is_unbiased():
    """Hutchinson's trace with probes fixed along the trajectory: its error averages out over probes."""
    mix = GaussianMixture.random(6, 4, seed=2)
    den = mix.denoiser(diffkit.EDM(0.002, 40.0, 0.5), "edm")
    x = _data(mix, 6)
    exact = likelihood(den, x, rtol=1e-5, atol=1e-5)
    one = likelihood(den, x, divergence="hutchinson", generator=torch.Generator().manual_seed(0), rtol=1e-5,
                     atol=1e-5)
    many = likelihood(den, x, divergence="hutchinson", n_probes=64,
                      generator=torch.Generator().manual_seed(1), rtol=1e-5, atol=1e-5)
    err_one = float((one - exact).abs().mean())
    err_many = float((many - exact).abs().mean())
    assert err_many < 0.5 * err_one and err_many / 6 < 0.05, (err_one, err_many)


def test_divergence_auto_uses_hutchinson_for_images():
    """An 'image' (3x8x8 = 192 features) of independent Gaussian pixels: log-density in closed form."""
    mix = GaussianMixture(torch.zeros(1, 192, dtype=F64), torch.full((1,), 0.5, dtype=F64))

    def den(x, s):
        return mix.denoise(x.flatten(1), s).reshape(x.shape)

    x = 0.5 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    lp, info = likelihood(den, x, sigma_min=1e-3, sigma_max=20.0, return_info=True, n_probes=4,
                          generator=torch.Generator().manual_seed(0), rtol=1e-5, atol=1e-5)
    assert info["divergence"] == "hutchinson"
    truth = mix.log_prob(x.flatten(1), 1e-3)
    assert float(((lp - truth).abs() / 192).max()) < 0.01


def test_bits_per_dim_with_uniform_dequantization():
    """bpd = -(log p_model(y) + d log((hi-lo)/256)) / (d ln 2) for the dequantized, rescaled y: checked against the
    exact mixture density of the very same y (same dequantization draws)."""
    mix = GaussianMixture.random(3, 3, seed=5, scale=0.4, std_range=(0.1, 0.3))
    den = mix.denoiser(diffkit.EDM(0.002, 80.0, 0.5), "edm")
    xs = _data(mix, 16).clamp(-0.99, 0.99)
    ints = ((xs + 1) / 2 * 256).floor().clamp(0, 255)
    bpd = bits_per_dim(den, ints, generator=torch.Generator().manual_seed(0))
    u = torch.rand(ints.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = -1 + 2 * (ints + u) / 256
    want = -(mix.log_prob(y, 0.002) + 3 * math.log(2 / 256)) / (3 * math.log(2))
    assert float((bpd - want).abs().max()) < 2e-3
    centred = bits_per_dim(den, ints, dequantize="none")
    want_c = -(mix.log_prob(-1 + 2 * (ints + 0.5) / 256, 0.002) + 3 * math.log(2 / 256)) / (3 * math.log(2))
    assert float((centred - want_c).abs().max()) < 2e-3


def test_gaussian_prior_is_the_isotropic_normal():
    x = torch.randn(5, 3, dtype=F64)
    want = torch.distributions.Normal(0.0, 7.0).log_prob(x).sum(1)
    torch.testing.assert_close(gaussian_prior(x, 7.0), want)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sigma_min=1.0, sigma_max=0.5), "sigma_min"),
    (dict(sigma_min=0.0, sigma_max=5.0), "sigma_min"),
    (dict(divergence="skilling"), "divergence"),
    (dict(probe="uniform"), "probe"),
    (dict(n_probes=0), "n_probes"),
    (dict(prior="laplace"), "prior"),
])
def test_likelihood_bad_arguments(kwargs, match):
    mix = GaussianMixture.ring(4, 1.0, 0.2)
    den = mix.denoiser(diffkit.EDM(0.002, 80.0, 0.5), "edm")
    with pytest.raises(ValueError, match=match):
        likelihood(den, _data(mix, 2), **kwargs)


def test_likelihood_bad_data():
    mix = GaussianMixture.ring(4, 1.0, 0.2)
    den = mix.denoiser(diffkit.EDM(0.002, 80.0, 0.5), "edm")
    with pytest.raises(ValueError):
        likelihood(den, torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError):
        likelihood(den, torch.full((2, 2), math.nan, dtype=F64))
    with pytest.raises(ValueError, match="integers"):
        bits_per_dim(den, torch.tensor([[0.5, 3.0]]))
    with pytest.raises(ValueError, match="integers"):
        bits_per_dim(den, torch.tensor([[256.0, 3.0]]))
    with pytest.raises(ValueError, match="data_range"):
        bits_per_dim(den, torch.tensor([[1.0, 3.0]]), data_range=(1.0, -1.0))
