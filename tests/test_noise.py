"""Noise samplers: per-sample seed streams, Brownian-tree increments, the factory `sample` uses."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import single_threaded  # noqa: F401

from diffkit.noise import BrownianTreeNoise, GaussianNoise, derive_seed, make_noise_sampler, randn

F64 = torch.float64


# -- seeds and streams -------------------------------------------------------------------------------------------


def test_derive_seed_is_deterministic_and_separates_streams():
    assert derive_seed(7, 1) == derive_seed(7, 1)
    values = {derive_seed(s, k) for s in range(20) for k in range(3)}
    assert len(values) == 60
    assert all(0 <= v < 2**63 for v in values)


def test_randn_rows_depend_only_on_their_seed():
    seeds = [11, 5, 42, 0, 9]
    full = randn((5, 3, 2), seeds=seeds, dtype=F64)
    assert full.shape == (5, 3, 2) and full.dtype == F64
    for i, s in enumerate(seeds):
        torch.testing.assert_close(randn((1, 3, 2), seeds=[s], dtype=F64)[0], full[i], rtol=0, atol=0)
    perm = randn((3, 3, 2), seeds=[42, 11, 9], dtype=F64)
    torch.testing.assert_close(perm, full[[2, 0, 4]], rtol=0, atol=0)


def test_randn_is_standard_normal():
    z = randn((4000, 8), seeds=range(4000), dtype=F64)
    assert abs(float(z.mean())) < 0.02
    assert abs(float(z.var()) - 1) < 0.03


def test_step_noise_stream_differs_from_start_stream():
    """Same seed for the start and for the steps must not give the same numbers."""
    x = torch.zeros(3, 4, dtype=F64)
    start = randn((3, 4), seeds=[1, 2, 3], dtype=F64)
    step = GaussianNoise(x, seeds=[1, 2, 3])(1.0, 0.5)
    assert (start - step).abs().min() > 0


def test_gaussian_noise_per_sample_generators_and_seeds():
    x = torch.zeros(4, 2, dtype=F64)
    a = GaussianNoise(x, seeds=[3, 4, 5, 6])
    b = GaussianNoise(x[:2], seeds=[5, 6])
    first_a, first_b = a(1.0, 0.5), b(1.0, 0.5)
    torch.testing.assert_close(first_a[2:], first_b, rtol=0, atol=0)
    second_a, second_b = a(0.5, 0.1), b(0.5, 0.1)
    torch.testing.assert_close(second_a[2:], second_b, rtol=0, atol=0)
    assert (second_a - first_a).abs().min() > 0  # fresh draws each call
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    c = GaussianNoise(x, generator=gens)(1.0, 0.5)
    torch.testing.assert_close(c[1], torch.randn(2, generator=torch.Generator().manual_seed(1), dtype=F64))


def test_gaussian_noise_single_generator_matches_torch():
    x = torch.zeros(3, 2, dtype=F64)
    z = GaussianNoise(x, generator=torch.Generator().manual_seed(9))(1.0, 0.5)
    torch.testing.assert_close(z, torch.randn(3, 2, generator=torch.Generator().manual_seed(9), dtype=F64))


@pytest.mark.parametrize("bad", [
    dict(seeds=[1, 2]),                                   # wrong length
    dict(generator=[torch.Generator()] * 2),              # wrong length
    dict(seeds=[1, 2, 3], generator=torch.Generator()),   # both
])
def test_gaussian_noise_bad_arguments(bad):
    with pytest.raises(ValueError):
        GaussianNoise(torch.zeros(3, 2), **bad)


def test_non_integer_seeds_are_rejected():
    with pytest.raises(TypeError):
        randn((2, 2), seeds=[1.5, 2])
    with pytest.raises(TypeError):
        GaussianNoise(torch.zeros(2, 2), seeds=["a", "b"])


# -- Brownian tree ----------------------------------------------------------------------------------------------


def test_brownian_increments_are_consistent_and_order_free():
    x = torch.zeros(2, 3, dtype=F64)
    b = BrownianTreeNoise(x, 0.0, 10.0, seed=4)
    w = lambda lo, hi: b(hi, lo) * math.sqrt(hi - lo)  # noqa: E731 - raw increment W(hi) - W(lo)
    late = w(2.0, 5.0)
    b2 = BrownianTreeNoise(x, 0.0, 10.0, seed=4)
    early = b2(5.0, 2.0) * 3**0.5  # other query order, other argument order
    torch.testing.assert_close(late, early, rtol=0, atol=1e-12)
    # additivity of the path: W(5) - W(1) = (W(2) - W(1)) + (W(5) - W(2))
    torch.testing.assert_close(w(1.0, 5.0), w(1.0, 2.0) + w(2.0, 5.0), rtol=0, atol=1e-9)


def test_brownian_increments_are_standard_normal_and_independent():
    x = torch.zeros(2000, 2, dtype=F64)
    b = BrownianTreeNoise(x, 0.0, 4.0, seed=0)
    z1, z2 = b(3.0, 2.0), b(2.0, 0.5)
    for z in (z1, z2):
        assert abs(float(z.mean())) < 0.05 and abs(float(z.var()) - 1) < 0.08
    assert abs(float((z1 * z2).mean())) < 0.05  # disjoint intervals: uncorrelated


def test_brownian_per_sample_seeds_are_batch_invariant():
    x = torch.zeros(3, 2, dtype=F64)
    a = BrownianTreeNoise(x, 0.0, 5.0, seeds=[10, 20, 30])
    b = BrownianTreeNoise(x[:1], 0.0, 5.0, seeds=[30])
    torch.testing.assert_close(a(4.0, 1.0)[2:], b(4.0, 1.0), rtol=0, atol=0)


def test_brownian_clamps_to_its_range_and_rejects_empty_intervals():
    x = torch.zeros(2, 2, dtype=F64)
    b = BrownianTreeNoise(x, 0.0, 5.0, seed=1)
    torch.testing.assert_close(b(9.0, 2.0) * 3**0.5, b(5.0, 2.0) * 3**0.5)
    with pytest.raises(ValueError, match="empty interval"):
        b(6.0, 7.0)
    with pytest.raises(ValueError):
        BrownianTreeNoise(x, 1.0, 1.0)


# -- the factory used by sample() ----------------------------------------------------------------------------


def test_make_noise_sampler_kinds():
    x = torch.zeros(2, 2, dtype=F64)
    sig = torch.tensor([10.0, 1.0, 0.0], dtype=F64)
    assert isinstance(make_noise_sampler(None, x, sig), GaussianNoise)
    assert isinstance(make_noise_sampler("gaussian", x, sig, seeds=[1, 2]), GaussianNoise)
    bt = make_noise_sampler("brownian", x, sig, generator=torch.Generator().manual_seed(0))
    assert isinstance(bt, BrownianTreeNoise) and bt.t1 == 20.0
    fn = lambda a, b: torch.ones(2, 2)  # noqa: E731
    assert make_noise_sampler(fn, x, sig) is fn
    with pytest.raises(ValueError, match="unknown noise kind"):
        make_noise_sampler("pink", x, sig)
    with pytest.raises(ValueError):
        make_noise_sampler(fn, x, sig, seeds=[1, 2])
    with pytest.raises(ValueError):
        make_noise_sampler("brownian", x, sig, generator=[torch.Generator(), torch.Generator()])
