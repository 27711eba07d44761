"""Forward processes: diffusers' beta presets, σ̄ <-> native time, closed forms, derivatives, validation."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import F64, PROCESSES, single_threaded, trig_interpolant  # noqa: F401

from diffkit import EDM, VE, VP, Flow, Interpolant
from diffkit.processes import CosineVP, DiscreteVP, LinearVP, process_from_config

PRESETS = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _time_grid(process, n=101) -> torch.Tensor:
    return torch.linspace(process.t_min, process.t_max, n, dtype=F64)


# -- diffusers' beta presets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("T", [1000, 500])
def test_discrete_presets_match_diffusers(preset, T):
    diffusers = pytest.importorskip("diffusers")
    kw = {"scaled_linear": dict(beta_start=0.00085, beta_end=0.012)}.get(preset, {})
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=preset, **kw)
    p = VP.discrete(preset, num_train_timesteps=T)
    assert p.num_train_timesteps == T and p.t_min == 0 and p.t_max == T - 1
    # diffusers builds its betas in float32: agreement to float32 resolution (a few ulp)
    ref_betas = ref.betas.to(F64)
    assert float(((p.betas - ref_betas).abs() / ref_betas).max()) < 3e-7
    # ... and accumulates alphas_cumprod in float32. For the cosine preset the 0.999-clipped tail amplifies the
    # float32 rounding of beta in 1 - beta by ~1000x, hence the looser (still coefficient-sensitive) bound.
    rtol = 2e-5 if preset == "squaredcos_cap_v2" else 2e-6
    ref_ac = ref.alphas_cumprod.to(F64)
    assert float(((p.alphas_cumprod - ref_ac).abs() / ref_ac).max()) < rtol
    # σ̄ at integer timesteps is sqrt((1 - ᾱ)/ᾱ)
    t = torch.arange(T)
    sb = p.sigma_bar(t)
    assert sb.dtype == F64
    torch.testing.assert_close(sb, ((1 - p.alphas_cumprod) / p.alphas_cumprod).sqrt(), rtol=1e-12, atol=0)


def test_discrete_custom_beta_range_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=200, beta_schedule="linear", beta_start=1e-3, beta_end=0.05)
    p = VP.discrete("linear", num_train_timesteps=200, beta_start=1e-3, beta_end=0.05)
    torch.testing.assert_close(p.alphas_cumprod, ref.alphas_cumprod.to(F64), rtol=2e-6, atol=0)


def test_discrete_explicit_betas():
    betas = torch.linspace(1e-3, 0.2, 50, dtype=F64)
    p = VP.discrete(betas)
    torch.testing.assert_close(p.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-14, atol=0)
    assert p.t_max == 49


# -- σ̄ <-> t -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROCESSES)
def test_sigma_bar_round_trip(name):
    p = PROCESSES[name]()
    t = _time_grid(p)
    if isinstance(p, DiscreteVP):  # fractional timesteps too
        t = torch.cat([t, torch.arange(0, p.t_max, 7.0, dtype=F64) + 0.37])
    sb = p.sigma_bar(t)
    assert sb.dtype == F64 and sb.shape == t.shape
    assert (sb > 0).all() and torch.isfinite(sb).all()
    order = t.argsort()
    assert (sb[order][1:] > sb[order][:-1]).all(), "σ̄(t) must be strictly increasing"
    t_back = p.t_of_sigma_bar(sb)
    torch.testing.assert_close(t_back, t, rtol=0, atol=1e-9 * max(1.0, p.t_max))
    torch.testing.assert_close(p.sigma_bar(t_back), sb, rtol=1e-10, atol=0)
    # and the other way round, from a log-uniform σ̄ grid inside the range
    sb2 = torch.logspace(math.log10(p.sigma_bar_min), math.log10(p.sigma_bar_max), 37, dtype=F64)
    torch.testing.assert_close(p.sigma_bar(p.t_of_sigma_bar(sb2)), sb2, rtol=1e-10, atol=0)
    # the range properties are the ends of the native range
    assert math.isclose(p.sigma_bar_min, float(p.sigma_bar(torch.tensor(p.t_min, dtype=F64))), rel_tol=1e-12)
    assert math.isclose(p.sigma_bar_max, float(p.sigma_bar(torch.tensor(p.t_max, dtype=F64))), rel_tol=1e-12)


@pytest.mark.parametrize("name", PROCESSES)
def test_maps_keep_shape_and_dtype(name):
    p = PROCESSES[name]()
    t = torch.linspace(p.t_min, p.t_max, 6, dtype=F64)[1:-1].reshape(2, 2).to(torch.float32)
    for fn in (p.alpha, p.sigma, p.sigma_bar):
        out = fn(t)
        assert out.shape == (2, 2) and out.dtype == torch.float32
    sb = p.sigma_bar(t)
    back = p.t_of_sigma_bar(sb)
    assert back.shape == (2, 2) and back.dtype == torch.float32
    torch.testing.assert_close(back, t, rtol=1e-4, atol=1e-5 * max(1.0, p.t_max))


def test_discrete_fractional_timesteps_interpolate_log_sigma_bar():
    p = VP.discrete("linear")
    sb = p.sigma_bars
    k = torch.tensor([0, 10, 250, 998])
    # midpoint: geometric mean of the neighbours (log-σ̄ linear rule)
    mid = p.sigma_bar(k.to(F64) + 0.5)
    torch.testing.assert_close(mid, (sb[k] * sb[k + 1]).sqrt(), rtol=1e-13, atol=0)
    # a quarter of the way: log σ̄ = 3/4 log σ̄_k + 1/4 log σ̄_{k+1}
    q = p.sigma_bar(k.to(F64) + 0.25)
    torch.testing.assert_close(q, sb[k] ** 0.75 * sb[k + 1] ** 0.25, rtol=1e-13, atol=0)
    # exact inverse at the geometric mean
    torch.testing.assert_close(p.t_of_sigma_bar((sb[k] * sb[k + 1]).sqrt()), k.to(F64) + 0.5, rtol=0, atol=1e-10)
    # integer timesteps (long tensors) are accepted and give float64
    assert p.sigma_bar(torch.tensor([3, 4])).dtype == F64


def test_closed_forms():
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99], dtype=F64)
    lin = VP.continuous("linear", beta_min=0.1, beta_max=20.0)
    # score-SDE VP: log alpha = -t²(β1-β0)/4 - tβ0/2
    log_a = -(t**2) * (20.0 - 0.1) / 4 - t * 0.1 / 2
    torch.testing.assert_close(lin.alpha(t), log_a.exp(), rtol=1e-14, atol=0)
    torch.testing.assert_close(lin.sigma_bar(t), (torch.exp(-2 * log_a) - 1).sqrt(), rtol=1e-12, atol=0)
    cos = VP.continuous("cosine")
    f = torch.cos((t + 0.008) / 1.008 * math.pi / 2)
    torch.testing.assert_close(cos.alpha(t), f / math.cos(0.008 / 1.008 * math.pi / 2), rtol=1e-14, atol=0)
    flow = Flow()
    torch.testing.assert_close(flow.sigma_bar(t), t / (1 - t), rtol=1e-14, atol=0)
    torch.testing.assert_close(flow.alpha(t), 1 - t, rtol=0, atol=0)
    torch.testing.assert_close(flow.sigma(t), t, rtol=0, atol=0)
    ve = VE(0.002, 80.0)
    s = torch.tensor([0.002, 1.0, 80.0], dtype=F64)
    torch.testing.assert_close(ve.sigma_bar(s), s, rtol=0, atol=0)
    torch.testing.assert_close(ve.alpha(s), torch.ones_like(s), rtol=0, atol=0)
    tri = trig_interpolant()
    torch.testing.assert_close(tri.sigma_bar(t), torch.tan(math.pi * t / 2), rtol=1e-13, atol=0)


def test_flow_shift_warp():
    f3 = Flow(shift=3.0, t_min=0.0 + 1e-12, t_max=1.0 - 1e-12)
    u = torch.tensor([1e-12, 0.25, 0.5, 0.75, 1.0 - 1e-12], dtype=F64)
    # SD3 shift t = s u / (1 + (s-1) u) on the position within [t_min, t_max]: s=3 maps 0.5 -> 0.75
    torch.testing.assert_close(f3.uniform_time_warp(u), 3 * u / (1 + 2 * u), rtol=1e-10, atol=1e-10)
    assert float(f3.uniform_time_warp(torch.tensor(0.5, dtype=F64))) == pytest.approx(0.75, abs=1e-10)
    # on the default range [1e-3, 1 - 1e-3] the ends stay fixed
    fd = Flow(shift=3.0)
    ends = torch.tensor([fd.t_min, fd.t_max], dtype=F64)
    torch.testing.assert_close(fd.uniform_time_warp(ends), ends, rtol=0, atol=1e-15)
    w = (0.5 - fd.t_min) / (fd.t_max - fd.t_min)
    expect = fd.t_min + (fd.t_max - fd.t_min) * 3 * w / (1 + 2 * w)
    assert float(fd.uniform_time_warp(torch.tensor(0.5, dtype=F64))) == pytest.approx(expect, abs=1e-12)
    u = torch.linspace(0.1, 0.9, 5, dtype=F64)
    torch.testing.assert_close(Flow().uniform_time_warp(u), u, rtol=0, atol=1e-15)
    # the shift warps schedules only: σ̄(t) and its inverse are the plain interpolant's
    t = f3.uniform_time_warp(torch.linspace(0.01, 0.99, 33, dtype=F64))
    torch.testing.assert_close(f3.sigma_bar(t), t / (1 - t), rtol=1e-14, atol=0)
    torch.testing.assert_close(f3.t_of_sigma_bar(f3.sigma_bar(t)), t, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", ["vp_discrete_linear", "vp_discrete_cosine", "vp_linear", "vp_cosine",
                                  "interpolant_trig"])
def test_variance_preserving(name):
    p = PROCESSES[name]()
    t = _time_grid(p)
    torch.testing.assert_close(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-12)


# -- derivatives -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROCESSES)
def test_derivatives_match_finite_differences(name):
    p = PROCESSES[name]()
    if isinstance(p, DiscreteVP):
        # piecewise log-linear in t: stay inside one segment
        t, h = torch.arange(1, p.t_max - 1, 37.0, dtype=F64) + 0.4, 1e-4
    else:
        t, h = _time_grid(p, 41)[1:-1], 1e-6 * (p.t_max - p.t_min)
    for d, f in ((p.d_alpha, p.alpha), (p.d_sigma, p.sigma)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        exact = d(t)
        assert exact.shape == t.shape
        scale = float(fd.abs().max())
        assert float((exact - fd).abs().max()) <= 1e-6 * scale + 1e-9, (d.__name__, exact, fd)


def test_interpolant_uses_given_derivatives():
    calls = []

    def da(t):
        calls.append("da")
        return -math.pi / 2 * torch.sin(math.pi * t / 2)

    def ds(t):
        calls.append("ds")
        return math.pi / 2 * torch.cos(math.pi * t / 2)

    p = Interpolant(lambda t: torch.cos(math.pi * t / 2), lambda t: torch.sin(math.pi * t / 2), d_alpha=da,
                    d_sigma=ds)
    auto = trig_interpolant()
    t = torch.linspace(0.05, 0.95, 7, dtype=F64)
    torch.testing.assert_close(p.d_alpha(t), auto.d_alpha(t), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p.d_sigma(t), auto.d_sigma(t), rtol=1e-12, atol=1e-14)
    assert calls == ["da", "ds"]


# -- start of sampling and configs --------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROCESSES)
def test_noise_to_canonical(name):
    p = PROCESSES[name]()
    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    s0 = p.sigma_bar_max
    x = p.noise_to_canonical(noise, s0)
    if isinstance(p, VE):  # x = σ noise
        expected = s0 * noise
    else:  # VP: x_T = noise; Flow: x_1 = noise; interpolant: x = sigma(t) noise; then x̄ = x / alpha
        t = p.t_of_sigma_bar(torch.tensor(s0, dtype=F64))
        scale = 1.0 if isinstance(p, (DiscreteVP, LinearVP, CosineVP, Flow)) else float(p.sigma(t))
        expected = noise * scale / float(p.alpha(t))
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=0)
    if isinstance(p, (DiscreteVP, LinearVP, CosineVP)):  # VP: x̄ = noise sqrt(1 + σ̄²)
        torch.testing.assert_close(x, noise * math.sqrt(1 + s0**2), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", [n for n in PROCESSES if n != "interpolant_trig"])
def test_config_round_trip(name):
    p = PROCESSES[name]()
    q = process_from_config(p.config())
    assert type(q) is type(p) and q.config() == p.config()
    t = _time_grid(p)
    torch.testing.assert_close(q.sigma_bar(t), p.sigma_bar(t), rtol=1e-14, atol=0)
    assert repr(p).startswith(type(p).__name__)


def test_config_round_trip_explicit_betas():
    p = VP.discrete(torch.linspace(1e-3, 0.1, 20, dtype=F64))
    q = process_from_config(p.config())
    torch.testing.assert_close(q.alphas_cumprod, p.alphas_cumprod, rtol=1e-15, atol=0)


# -- validation ------------------------------------------------------------------------------------------------


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as e:
        VP.discrete("cosine_v3")
    for name in PRESETS:
        assert name in str(e.value)
    with pytest.raises(ValueError) as e:
        VP.continuous("quadratic")
    assert "linear" in str(e.value) and "cosine" in str(e.value)
    with pytest.raises(ValueError) as e:
        process_from_config({"type": "Interpolant"})
    for name in ("VP.discrete", "VE", "EDM", "Flow"):
        assert name in str(e.value)


@pytest.mark.parametrize("betas", [
    [0.1, 1.0], [0.0, 0.1], [-0.1, 0.2], [float("nan"), 0.1], [0.1, float("inf")], [0.1], [[0.1, 0.2]], [],
])
def test_bad_betas(betas):
    with pytest.raises(ValueError):
        VP.discrete(torch.tensor(betas, dtype=F64))


@pytest.mark.parametrize("build", [
    lambda: VP.continuous("linear", beta_min=20.0, beta_max=0.1),
    lambda: VP.continuous("linear", beta_min=0.0),
    lambda: VP.continuous("linear", t_min=0.0),
    lambda: VP.continuous("linear", t_min=0.5, t_max=0.4),
    lambda: VP.continuous("cosine", t_max=1.0),
    lambda: VP.continuous("cosine", t_min=0.0),
    lambda: VE(0.0, 80.0),
    lambda: VE(5.0, 1.0),
    lambda: VE(0.1, float("inf")),
    lambda: EDM(sigma_data=0.0),
    lambda: Flow(shift=0.0),
    lambda: Flow(shift=-2.0),
    lambda: Flow(t_max=1.0),
    lambda: Flow(t_min=0.0),
    lambda: Flow(t_min=0.6, t_max=0.5),
], ids=lambda f: "")
def test_invalid_ranges(build):
    with pytest.raises(ValueError):
        build()


@pytest.mark.parametrize("alpha, sigma", [
    (lambda t: torch.ones_like(t), lambda t: torch.sin(math.pi * t)),  # σ̄ rises then falls
    (lambda t: torch.cos(math.pi * t), lambda t: torch.sin(math.pi * t)),  # alpha crosses 0: σ̄ < 0
    (lambda t: 1 - t, lambda t: torch.zeros_like(t)),  # σ̄ = 0
    (lambda t: t, lambda t: 1 - t),  # decreasing σ̄
])
def test_interpolant_must_be_monotone(alpha, sigma):
    with pytest.raises(ValueError):
        Interpolant(alpha, sigma)
