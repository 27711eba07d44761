"""Denoiser: every prediction type of every process converts to the exact Tweedie denoiser D(x̄, σ̄)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import F64, PROCESSES, anisotropic_mixture, predictions_for, single_threaded  # noqa: F401

import diffkit
from diffkit import EDM, PREDICTIONS, VE, Denoiser, Flow
from diffkit.denoiser import convert, from_x0, to_x0
from diffkit.testbeds import GaussianMixture

DENOISER_PROCESSES = ["vp_discrete_linear", "vp_linear", "vp_cosine", "ve", "edm", "flow", "flow_shift3",
                      "interpolant_trig"]


def _cases():
    for name in DENOISER_PROCESSES:
        for pred in predictions_for(PROCESSES[name]()):
            yield name, pred


def _levels(process) -> list[float]:
    """Noise levels across the process's range (ends included, where conversions are least benign)."""
    lo, hi = process.sigma_bar_min, process.sigma_bar_max
    return [lo, lo * 1.7, math.sqrt(lo * hi), 0.8, 3.0, hi / 1.3, hi]


def _points(n=6, seed=0, scale=2.0):
    return scale * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- independent native-space networks, written from first principles ------------------------------------------


def _native_net(gm: GaussianMixture, process, prediction: str):
    """The exact network of `process` predicting `prediction`, built from the mixture's canonical closed forms
    (denoise, eps, score) and the definitions of each prediction type, not from diffkit.denoiser."""
    if prediction == "edm":
        sd = process.sigma_data

        def edm_net(x_in, c_noise):
            sb = torch.exp(4 * c_noise.to(F64))[:, None]  # c_noise = ln(σ̄)/4
            xb = x_in * torch.sqrt(sb**2 + sd**2)  # c_in = 1/sqrt(σ̄² + σ_d²)
            c_skip = sd**2 / (sb**2 + sd**2)
            c_out = sb * sd / torch.sqrt(sb**2 + sd**2)
            return (gm.denoise(xb, sb[:, 0]) - c_skip * xb) / c_out

        return edm_net

    def net(x_t, t):
        t = t.to(F64)
        a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
        xb, sb = x_t / a, process.sigma_bar(t)
        if prediction == "x0":
            return gm.denoise(xb, sb)
        if prediction == "eps":
            return gm.eps(xb, sb)
        if prediction == "v":  # Salimans & Ho 2022: v = a eps - s x0
            return a * gm.eps(xb, sb) - s * gm.denoise(xb, sb)
        if prediction == "score":  # p_t(x) = p̄(x/a)/a^d, so ∇_x log p_t = ∇ log p̄(x̄) / a
            return gm.score(xb, sb) / a
        if prediction == "flow":  # dx_t/dt = a' x0 + s' eps
            da, ds = process.d_alpha(t)[:, None], process.d_sigma(t)[:, None]
            return da * gm.denoise(xb, sb) + ds * gm.eps(xb, sb)
        raise AssertionError(prediction)

    return net


@pytest.mark.parametrize("name, prediction", list(_cases()))
def test_independent_network_gives_exact_denoiser(name, prediction):
    process = PROCESSES[name]()
    gm = anisotropic_mixture()
    den = Denoiser(_native_net(gm, process, prediction), process, prediction)
    x = _points()
    for sb in _levels(process):
        torch.testing.assert_close(den(x * max(1.0, sb), sb), gm.denoise(x * max(1.0, sb), sb),
                                   rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name, prediction", list(_cases()))
def test_mixture_network_round_trip(name, prediction):
    """`mixture.denoiser(process, prediction)` (from_x0 in the network, to_x0 in the Denoiser) is exact."""
    process = PROCESSES[name]()
    gm = anisotropic_mixture()
    den = gm.denoiser(process, prediction)
    assert isinstance(den, Denoiser) and den.process is process and den.prediction == prediction
    x = _points(seed=1)
    for sb in _levels(process):
        xb = x * max(1.0, sb)
        torch.testing.assert_close(den(xb, sb), gm.denoise(xb, sb), rtol=1e-9, atol=1e-10)


# -- conversions at the level of one (x0, eps) pair ---------------------------------------------------------


def _targets(process, x0, eps, t):
    """Every prediction type's value for a known (x0, eps) at native time t, from its definition."""
    a, s = process.alpha(t), process.sigma(t)
    da, ds = process.d_alpha(t), process.d_sigma(t)
    x = a * x0 + s * eps
    out = {"x0": x0, "eps": eps, "v": a * eps - s * x0, "score": -eps / s, "flow": da * x0 + ds * eps}
    if isinstance(process, EDM):
        sb, sd = process.sigma_bar(t), process.sigma_data
        c_skip, c_out = sd**2 / (sb**2 + sd**2), sb * sd / torch.sqrt(sb**2 + sd**2)
        out["edm"] = (x0 - c_skip * x / a) / c_out
    return x, out


@pytest.mark.parametrize("name", DENOISER_PROCESSES)
def test_conversion_formulas(name):
    process = PROCESSES[name]()
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    for u in (0.1, 0.5, 0.9):
        t = torch.tensor(process.t_min + u * (process.t_max - process.t_min), dtype=F64)
        x, targets = _targets(process, x0, eps, t)
        for pred, target in targets.items():
            torch.testing.assert_close(to_x0(target, x, t, process, pred), x0, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(from_x0(x0, x, t, process, pred), target, rtol=1e-9, atol=1e-9)
        # every pair, both ways
        for src, dst in itertools.permutations(targets, 2):
            torch.testing.assert_close(convert(targets[src], x, t, process, src, dst), targets[dst],
                                       rtol=1e-8, atol=1e-8)


def test_rectified_flow_velocity_is_eps_minus_x0():
    p = Flow()
    x0, eps = torch.tensor([[1.0, -2.0]], dtype=F64), torch.tensor([[0.5, 0.25]], dtype=F64)
    t = torch.tensor(0.3, dtype=F64)
    x = (1 - t) * x0 + t * eps
    torch.testing.assert_close(from_x0(x0, x, t, p, "flow"), eps - x0, rtol=1e-14, atol=1e-14)


def test_conversions_per_sample_times():
    """t of shape (batch,) broadcasts per sample."""
    process = PROCESSES["vp_linear"]()
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(4, 2, 3, generator=g, dtype=F64), torch.randn(4, 2, 3, generator=g, dtype=F64)
    t = torch.tensor([0.05, 0.3, 0.6, 0.95], dtype=F64)
    a, s = process.alpha(t)[:, None, None], process.sigma(t)[:, None, None]
    x = a * x0 + s * eps
    torch.testing.assert_close(from_x0(x0, x, t, process, "v"), a * eps - s * x0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(to_x0(eps, x, t, process, "eps"), x0, rtol=1e-10, atol=1e-10)


# -- the Denoiser call ---------------------------------------------------------------------------------------


class Recorder:
    """A model that records what it is called with and returns a fixed affine map of its input."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, **kwargs):
        self.calls.append((x, t, kwargs))
        return 0.5 * x


def test_batched_sigma():
    process = PROCESSES["vp_discrete_linear"]()
    gm = anisotropic_mixture()
    den = gm.denoiser(process, "eps")
    x = _points(n=4, seed=5)
    sb = torch.tensor([0.05, 0.7, 3.0, 40.0], dtype=F64)
    out = den(x, sb)
    torch.testing.assert_close(out, gm.denoise(x, sb), rtol=1e-9, atol=1e-10)
    for i in range(4):  # same as one call per sample
        torch.testing.assert_close(out[i:i + 1], den(x[i:i + 1], float(sb[i])), rtol=1e-12, atol=1e-12)
    # scalar forms agree
    torch.testing.assert_close(den(x, 0.7), den(x, torch.tensor(0.7, dtype=F64)), rtol=0, atol=0)
    torch.testing.assert_close(den(x, 0.7), den(x, torch.full((4,), 0.7, dtype=F64)), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError):
        den(x, torch.ones(5, dtype=F64))
    with pytest.raises(ValueError):
        den(x, torch.ones(4, 1, dtype=F64))


def test_model_receives_native_inputs():
    process = PROCESSES["vp_discrete_linear"]()
    rec = Recorder()
    den = Denoiser(rec, process, "eps")
    x = _points(n=3, seed=6)
    sb = float(process.sigma_bar(torch.tensor(500.0, dtype=F64)))
    den(x, sb)
    x_t, t, _ = rec.calls[-1]
    assert t.shape == (3,)
    torch.testing.assert_close(t, torch.full((3,), 500.0, dtype=F64), rtol=0, atol=1e-9)
    torch.testing.assert_close(x_t, x * float(process.alpha(torch.tensor(500.0, dtype=F64))), rtol=1e-12, atol=0)
    xn, tn = den.native(x, sb)
    torch.testing.assert_close(xn, x_t, rtol=1e-12, atol=0)
    torch.testing.assert_close(tn.to(F64), t.to(F64), rtol=0, atol=1e-9)
    # Flow with a shift: the network still receives the interpolant time t = σ̄ / (1 + σ̄)
    rec2 = Recorder()
    Denoiser(rec2, Flow(shift=3.0), "flow")(x, 3.0)
    torch.testing.assert_close(rec2.calls[-1][1], torch.full((3,), 0.75, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(rec2.calls[-1][0], x * 0.25, rtol=1e-12, atol=0)


def test_edm_network_receives_preconditioned_inputs():
    process = EDM(sigma_data=0.5)
    rec = Recorder()
    den = Denoiser(rec, process, "edm")
    x = _points(n=3, seed=7)
    sb = torch.tensor([0.1, 1.0, 20.0], dtype=F64)
    out = den(x, sb)
    x_in, c_noise, _ = rec.calls[-1]
    torch.testing.assert_close(c_noise.to(F64), sb.log() / 4, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x_in, x / torch.sqrt(sb**2 + 0.25)[:, None], rtol=1e-12, atol=0)
    c_skip = 0.25 / (sb**2 + 0.25)
    c_out = sb * 0.5 / torch.sqrt(sb**2 + 0.25)
    torch.testing.assert_close(out, c_skip[:, None] * x + c_out[:, None] * 0.5 * x_in, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("prediction", ["eps", "v", "flow"])
def test_dtype_and_device_kept(prediction):
    process = PROCESSES["vp_linear"]()
    gm = anisotropic_mixture()
    den = gm.denoiser(process, prediction)
    x64 = _points(n=5, seed=8)
    for sb in (0.3, torch.tensor([0.1, 0.5, 1.0, 5.0, 50.0], dtype=F64)):
        out32 = den(x64.float(), sb)
        assert out32.dtype == torch.float32 and out32.device == x64.device and out32.shape == x64.shape
        torch.testing.assert_close(out32.double(), gm.denoise(x64, sb), rtol=2e-4, atol=2e-5)
        out64 = den(x64, sb)
        assert out64.dtype == F64


def test_float32_model_gets_float32_inputs():
    rec = Recorder()
    den = Denoiser(rec, PROCESSES["vp_discrete_linear"](), "eps")
    x = _points(n=2).float()
    for sb in (1.0, torch.tensor([1.0, 2.0])):
        den(x, sb)
        x_t, t, _ = rec.calls[-1]
        assert x_t.dtype == torch.float32 and t.dtype == torch.float32 and t.shape == (2,)


@pytest.mark.parametrize("prediction", ["eps", "edm"])
def test_conditioning_passed_through_untouched(prediction):
    process = EDM()
    rec = Recorder()
    den = Denoiser(rec, process, prediction)
    label, emb = torch.tensor([3, 1]), torch.randn(2, 7)
    extra = {"nested": [1, 2]}
    x = _points(n=2)
    den(x, 1.5, class_labels=label, embedding=emb, extra=extra, guidance_scale=7.5)
    den(x, torch.tensor([1.5, 0.2], dtype=F64), class_labels=label)
    _, _, kw = rec.calls[0]
    assert set(kw) == {"class_labels", "embedding", "extra", "guidance_scale"}
    assert kw["class_labels"] is label and kw["embedding"] is emb and kw["extra"] is extra
    assert kw["guidance_scale"] == 7.5
    assert rec.calls[1][2]["class_labels"] is label
    assert torch.equal(label, torch.tensor([3, 1]))  # not modified in place
    # and through sample()
    rec.calls.clear()
    diffkit.sample(den, torch.randn(2, 2, dtype=F64), solver="heun", steps=3, cond={"class_labels": label})
    assert len(rec.calls) == 5 and all(c[2] == {"class_labels": label} for c in rec.calls)
    assert all(c[2]["class_labels"] is label for c in rec.calls)


def test_unknown_prediction_lists_valid_names():
    process = PROCESSES["vp_linear"]()
    for call in (lambda: Denoiser(lambda x, t: x, process, "noise"),
                 lambda: to_x0(torch.zeros(1, 2), torch.zeros(1, 2), 0.5, process, "noise"),
                 lambda: from_x0(torch.zeros(1, 2), torch.zeros(1, 2), 0.5, process, "noise"),
                 lambda: convert(torch.zeros(1, 2), torch.zeros(1, 2), 0.5, process, "eps", "noise")):
        with pytest.raises(ValueError) as e:
            call()
        for name in PREDICTIONS:
            assert name in str(e.value)


def test_edm_prediction_needs_sigma_data():
    with pytest.raises(ValueError, match="sigma_data"):
        Denoiser(lambda x, t: x, VE(), "edm")
    with pytest.raises(ValueError):
        anisotropic_mixture().model(Flow(), "edm")


def test_bad_models():
    process = PROCESSES["vp_linear"]()
    x = _points(n=3)
    with pytest.raises(ValueError, match="shape"):
        Denoiser(lambda x, t: x[:, :1], process, "eps")(x, 1.0)
    with pytest.raises(ValueError, match="shape"):
        Denoiser(lambda x, t: x[:2], process, "eps")(x, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="shape"):
        Denoiser(lambda x, t: x[:, None], EDM(), "edm")(x, 1.0)
    with pytest.raises(TypeError):
        Denoiser(lambda x, t: x.numpy(), process, "eps")(x, 1.0)
    with pytest.raises(TypeError):
        Denoiser(lambda x, t: (x,), process, "eps")(x, 1.0)
    with pytest.raises(TypeError):
        Denoiser("not a model", process, "eps")
    with pytest.raises(TypeError):
        Denoiser(lambda x, t: x, "VP", "eps")


def test_network_of_finds_the_weights_under_wrappers():
    """`network_of` / `network_device` look through a Denoiser and a guidance transform to the torch network (used
    for plan fingerprints and for the default device of `sample_sharded`); closed-form callables have none."""
    from diffkit.denoiser import network_device, network_of
    from diffkit.guidance import CFG
    from diffkit.models import MLP

    net = MLP(dim=2, hidden=8, depth=1, num_classes=2).to(F64)
    den = Denoiser(net, EDM(), "eps")
    assert network_of(den) is net and network_of(CFG(den, 2.0)) is net
    assert network_device(CFG(den, 2.0)) == torch.device("cpu")
    exact = anisotropic_mixture().denoiser(EDM(), "eps")
    assert network_of(exact) is None and network_device(exact) is None
    assert network_device(Denoiser(torch.nn.Identity(), EDM(), "x0")) is None  # no weights: unknown


def test_testbed_results_keep_the_input_dtype_and_shape():
    """The closed forms run in float64; results come back as the input (dtype, shape; device, see test_cuda.py)."""
    mix = anisotropic_mixture()
    x = torch.randn(5, 1, mix.dim, dtype=torch.float32)
    for out in (mix.denoise(x, 0.7), mix.eps(x, 0.7), mix.score(x, 0.7), mix.flow_map(x, 0.7, 0.1)):
        assert out.shape == x.shape and out.dtype == torch.float32
    assert mix.log_prob(x, 0.7).dtype == F64
