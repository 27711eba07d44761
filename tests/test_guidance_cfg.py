"""Classifier-free guidance family on a labelled Gaussian mixture, where D_c, D_u and the conditional flow map are
exact: CFG's formula and its options, one batched call per evaluation, composition with multi-evaluation solvers,
CFG++ as a state move, Adaptive Guidance and LinearAG pass savings."""

from __future__ import annotations

import pytest
import torch
from helpers import F64, single_threaded  # noqa: F401

import diffkit
from diffkit import EDM, Denoiser
from diffkit.guidance import CFG, AdaptiveGuidance, CFGPlusPlus, LinearAG, fit_linear_ag, null_cond
from diffkit.models.mlp import MLP
from diffkit.testbeds import GaussianMixture

SMIN, SMAX = 0.01, 10.0
PROCESS = EDM(SMIN, SMAX)


def labelled_mixture() -> GaussianMixture:
    """Wide 2-D components, two per label for labels 0 and 1, one for label 2."""
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.3], [0.2, 1.2], [-0.5, -1.0], [1.2, 1.0]], dtype=F64)
    return GaussianMixture(means, torch.tensor([0.6, 0.8, 0.5, 0.7, 0.4]),
                           weights=torch.tensor([0.3, 0.2, 0.2, 0.2, 0.1]), labels=[0, 1, 0, 1, 2])


@pytest.fixture(scope="module")
def gm():
    return labelled_mixture()


def points(n=6, seed=0, scale=1.5):
    return scale * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


LABELS = torch.tensor([0, 1, 2, 0, 1, 2])
SIGMAS = torch.tensor([0.05, 0.3, 1.0, 2.5, 7.0, 0.6], dtype=F64)


def exact(gm, x, sigma, label):
    return gm.denoise(x, sigma, label=label)


# -- the labelled testbed -------------------------------------------------------------------------------------


def test_conditional_denoiser_is_the_sub_mixture(gm):
    x = points()
    for y in range(3):
        sub = gm.conditional(y)
        assert torch.allclose(sub.weights.sum(), torch.tensor(1.0, dtype=F64)) and (sub.labels == y).all()
        for s in (0.0, 0.4, 3.0):
            torch.testing.assert_close(gm.denoise(x, s, label=y), sub.denoise(x, s), rtol=1e-13, atol=1e-13)
    per_sample = gm.denoise(x, SIGMAS, label=LABELS)
    for i in range(len(x)):
        ref = gm.conditional(int(LABELS[i])).denoise(x[i:i + 1], SIGMAS[i])
        torch.testing.assert_close(per_sample[i:i + 1], ref, rtol=1e-13, atol=1e-13)
    mixed = torch.tensor([-1, 0, -1, 2, -1, 1])
    out, unc = gm.denoise(x, 0.7, label=mixed), gm.denoise(x, 0.7)
    torch.testing.assert_close(out[mixed < 0], unc[mixed < 0], rtol=0, atol=0)
    # the network and Denoiser of every prediction type pass the label through
    for prediction in ("eps", "x0", "v", "edm"):
        den = gm.denoiser(PROCESS, prediction)
        torch.testing.assert_close(den(x, SIGMAS, label=LABELS), per_sample, rtol=1e-11, atol=1e-12)
    assert gm.null_cond == {"label": -1} and gm.model(PROCESS).null_cond == {"label": -1}


def test_class_log_probs_by_bayes_rule(gm):
    x, s = points(), 0.8
    logp = gm.class_log_probs(x, s)
    assert logp.shape == (6, 3)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(6, dtype=F64), rtol=1e-13, atol=1e-13)
    for y in range(3):  # log p(y | x̄) = log w_y + log p(x̄ | y) - log p(x̄)
        w_y = gm.weights[gm.labels == y].sum().log()
        ref = w_y + gm.conditional(y).log_prob(x, s) - gm.log_prob(x, s)
        torch.testing.assert_close(logp[:, y], ref, rtol=1e-12, atol=1e-12)


def test_label_errors(gm):
    x = points(2)
    with pytest.raises(ValueError, match="no labels"):
        GaussianMixture(torch.zeros(2, 2), torch.ones(2)).denoise(x, 1.0, label=0)
    with pytest.raises(ValueError, match="label"):
        gm.denoise(x, 1.0, label=3)
    with pytest.raises(ValueError, match="label"):
        GaussianMixture(torch.zeros(2, 2), torch.ones(2), labels=[0, 2]).denoise(x, 1.0, label=1)
    with pytest.raises(ValueError, match="no component has label"):
        gm.conditional(5)
    with pytest.raises(ValueError, match="labels must be"):
        GaussianMixture(torch.zeros(2, 2), torch.ones(2), labels=[0, -1])


# -- CFG against its formula ------------------------------------------------------------------------------------


@pytest.mark.parametrize("through", ["mixture", "denoiser"])
def test_cfg_formula(gm, through):
    den = gm if through == "mixture" else gm.denoiser(PROCESS, "eps")
    x = points()
    d_c, d_u = exact(gm, x, SIGMAS, LABELS), gm.denoise(x, SIGMAS)
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(CFG(den, 1.0)(x, SIGMAS, label=LABELS), d_c, **tol)
    torch.testing.assert_close(CFG(den, 0.0)(x, SIGMAS, label=LABELS), d_u, **tol)
    torch.testing.assert_close(CFG(den, 3.5)(x, SIGMAS, label=LABELS), d_u + 3.5 * (d_c - d_u), **tol)
    # a scale that depends on σ̄, per sample
    w = 1 + SIGMAS
    torch.testing.assert_close(CFG(den, lambda s: 1 + s)(x, SIGMAS, label=LABELS),
                               d_u + w[:, None] * (d_c - d_u), **tol)
    # negative conditioning: the unconditional pass conditioned on label 2
    d_neg = exact(gm, x, SIGMAS, 2)
    torch.testing.assert_close(CFG(den, 2.0, uncond={"label": 2})(x, SIGMAS, label=LABELS),
                               d_neg + 2.0 * (d_c - d_neg), **tol)


def test_cfg_rescale(gm):
    x, s = points(), 0.9
    d_c, d_u = exact(gm, x, s, LABELS), gm.denoise(x, s)
    d_w = d_u + 4.0 * (d_c - d_u)
    plain = CFG(gm, 4.0)(x, s, label=LABELS)
    torch.testing.assert_close(plain, d_w, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(CFG(gm, 4.0, rescale=0.0)(x, s, label=LABELS), plain, rtol=0, atol=0)
    full = CFG(gm, 4.0, rescale=1.0)(x, s, label=LABELS)
    torch.testing.assert_close(full.std(1), d_c.std(1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(full, d_w * (d_c.std(1) / d_w.std(1))[:, None], rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(CFG(gm, 4.0, rescale=0.3)(x, s, label=LABELS), 0.3 * full + 0.7 * d_w,
                               rtol=1e-12, atol=1e-13)


def test_cfg_interval(gm):
    x = points()
    g = CFG(gm, 3.0, interval=(0.2, 1.0))
    inside = (SIGMAS > 0.2) & (SIGMAS <= 1.0)
    out = g(x, SIGMAS, label=LABELS)
    d_c, d_u = exact(gm, x, SIGMAS, LABELS), gm.denoise(x, SIGMAS)
    torch.testing.assert_close(out[~inside], d_c[~inside], rtol=0, atol=0)
    torch.testing.assert_close(out[inside], (d_u + 3.0 * (d_c - d_u))[inside], rtol=1e-13, atol=1e-13)
    assert g.passes == {"cond": 1, "uncond": 1}
    g.passes.clear()
    for s in (0.1, 0.2, 5.0):  # outside: the conditional model alone, one pass
        torch.testing.assert_close(g(x, s, label=LABELS), exact(gm, x, s, LABELS), rtol=0, atol=0)
    g(x, 1.0, label=LABELS)  # σ_hi is inside
    assert g.passes == {"cond": 4, "uncond": 1}
    assert g.saved_fraction == pytest.approx(1 - 5 / 8)


def test_one_batched_call_per_evaluation(gm):
    net, batches = gm.model(PROCESS, "eps"), []

    def counted(x_t, t, **cond):
        batches.append(x_t.shape[0])
        return net(x_t, t, **cond)

    g = CFG(Denoiser(counted, PROCESS, "eps"), 2.5, uncond={"label": -1})
    x = points()
    out = g(x, SIGMAS, label=LABELS)
    assert batches == [12] and g.passes == {"cond": 1, "uncond": 1}
    for i in range(len(x)):  # the batch equals sample-by-sample evaluation
        one = g(x[i:i + 1], SIGMAS[i:i + 1], label=LABELS[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], one, rtol=1e-14, atol=1e-14)
    batches.clear()
    diffkit.sample(g, torch.randn(6, 2, dtype=F64), solver="heun", nfe=9, cond={"label": LABELS})
    assert batches == [12] * 9 and g.passes == {"cond": 9, "uncond": 9}


@pytest.mark.parametrize("solver,nfe,tol", [("heun", 160, 2e-3), ("dpm_solver_3", 60, 3e-4)])
def test_guided_ode_at_scale_one_is_the_conditional_flow(gm, solver, nfe, tol):
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    g = CFG(gm.denoiser(PROCESS, "eps"), 1.0)
    kw = dict(solver=solver, nfe=nfe, schedule="logsnr", end="sigma_min")
    out, info = diffkit.sample(g, noise, cond={"label": LABELS}, return_info=True, **kw)
    assert info["nfe"] <= nfe and g.passes == {"cond": info["nfe"], "uncond": info["nfe"]}
    for y in range(3):
        sel, sub = LABELS == y, gm.conditional(y)
        # the same solver on the conditional mixture, and the exact flow map of the conditional ODE
        torch.testing.assert_close(out[sel], diffkit.sample(sub.denoiser(PROCESS, "eps"), noise[sel], **kw),
                                   rtol=1e-11, atol=1e-11)
        err = float((out[sel] - sub.flow_map(SMAX * noise[sel], SMAX, SMIN)).abs().max())
        assert err < tol, (solver, y, err)


# -- CFG++ ------------------------------------------------------------------------------------------------------


def test_cfgpp_is_the_cfgpp_ddim_loop(gm):
    lam, steps = 0.6, 12
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    out = diffkit.sample(CFGPlusPlus(gm.denoiser(PROCESS, "eps"), lam), noise, solver="euler", steps=steps,
                         schedule="logsnr", cond={"label": LABELS})
    sigmas = diffkit.get_sigmas("logsnr", steps, process=PROCESS).tolist()
    x = SMAX * noise
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):  # Chung et al. 2024, Alg. 1: x' = D_λ + σ' ε̂_u
        d_c, d_u = exact(gm, x, s, LABELS), gm.denoise(x, s)
        x = d_u + lam * (d_c - d_u) + s_next * (x - d_u) / s
    torch.testing.assert_close(out, x, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "dpm_solver_3", "unipc"])
def test_cfgpp_with_every_solver(gm, solver):
    den = gm.denoiser(PROCESS, "eps")
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    kw = dict(solver=solver, nfe=12, schedule="logsnr", cond={"label": LABELS})
    # λ = 0 moves nothing: unconditional sampling
    torch.testing.assert_close(diffkit.sample(CFGPlusPlus(den, 0.0), noise, **kw),
                               diffkit.sample(den, noise, **{**kw, "cond": {"label": -1}}), rtol=1e-12, atol=1e-12)
    g = CFGPlusPlus(den, 0.4)
    out, info = diffkit.sample(g, noise, return_info=True, **kw)
    assert torch.isfinite(out).all() and g.passes == {"cond": info["nfe"], "uncond": info["nfe"]}
    # the state moves, so CFG++ is not CFG with the same scale
    assert (out - diffkit.sample(CFG(den, 0.4), noise, **kw)).abs().max() > 1e-3


def test_cfgpp_lambda_range(gm):
    with pytest.raises(ValueError, match=r"lambda in \[0, 1\]"):
        CFGPlusPlus(gm, 1.5)
    with pytest.raises(ValueError, match=r"lambda in \[0, 1\]"):
        CFGPlusPlus(gm, lambda s: -0.1)(points(), 1.0, label=LABELS)


# -- Adaptive Guidance and LinearAG -----------------------------------------------------------------------------


def _run(g, seed=4, steps=16, solver="euler"):
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return diffkit.sample(g, noise, solver=solver, steps=steps, schedule="logsnr", cond={"label": LABELS})


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_adaptive_guidance_limits(gm, solver):
    den = gm.denoiser(PROCESS, "eps")
    never = AdaptiveGuidance(den, 3.0, threshold=1.0)
    torch.testing.assert_close(_run(never, solver=solver), _run(CFG(den, 3.0), solver=solver), rtol=0, atol=0)
    n = never.passes["cond"]
    assert never.passes["uncond"] == n and len(never.similarities) == n and never.saved_fraction == 0
    # γ̄ = -1: guided first evaluation, then the conditional model alone
    first = AdaptiveGuidance(den, 3.0, threshold=-1.0)
    out = _run(first, solver=solver)
    assert first.passes == {"cond": n, "uncond": 1} and first.saved_fraction == pytest.approx(1 - (n + 1) / (2 * n))
    s0 = float(diffkit.get_sigmas("logsnr", 16, process=PROCESS)[0])
    same = CFG(den, lambda s: 3.0 if s == s0 else 1.0)
    torch.testing.assert_close(out, _run(same, solver=solver), rtol=1e-13, atol=1e-13)
    # the state resets per trajectory
    torch.testing.assert_close(_run(first, solver=solver), out, rtol=0, atol=0)
    assert first.passes == {"cond": n, "uncond": 1}


def test_adaptive_guidance_drops_at_the_threshold(gm):
    den = gm.denoiser(PROCESS, "eps")
    probe = AdaptiveGuidance(den, 3.0, threshold=1.0)
    _run(probe, steps=24)
    gammas = probe.similarities
    k = len(gammas) // 2
    threshold = max(gammas[:k])  # the first evaluation past it drops the unconditional pass
    g = AdaptiveGuidance(den, 3.0, threshold=threshold)
    _run(g, steps=24)
    j = next(i for i, v in enumerate(gammas) if v > threshold)
    assert g.similarities == gammas[:j + 1] and g.passes == {"cond": 24, "uncond": j + 1}
    assert 0 < g.saved_fraction < 0.5


def test_fit_linear_ag_recovers_exact_coefficients():
    gen = torch.Generator().manual_seed(5)
    n, true = 6, torch.randn(6, 3, generator=gen, dtype=F64)
    eps_c = [torch.randn(8, 3, generator=gen, dtype=F64) for _ in range(n)]
    eps_u = [torch.randn(8, 3, generator=gen, dtype=F64)]
    for i in range(1, n):
        a, b, c = true[i]
        eps_u.append(a * eps_c[i] + b * eps_c[i - 1] + c * eps_u[i - 1])
    coef = fit_linear_ag(eps_c, eps_u)
    assert coef.shape == (n, 3) and coef[0].isnan().all()
    torch.testing.assert_close(coef[1:], true[1:], rtol=1e-10, atol=1e-10)


def test_linear_ag_saves_calls_and_tracks_cfg(gm):
    den = gm.denoiser(PROCESS, "eps")
    calib = torch.randn(64, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    g = LinearAG(den, 3.0)
    with pytest.raises(ValueError, match="calibrate"):
        _run(g)
    labels = torch.arange(64) % 3
    g.calibrate(calib, solver="euler", steps=16, schedule="logsnr", cond={"label": labels})
    assert g.coefficients.shape == (16, 3)
    out, ref = _run(g), _run(CFG(den, 3.0))
    assert g.passes == {"cond": 16, "uncond": 8} and g.saved_fraction == 0.25
    # better than the naive estimates on the same evaluations: ε̂_u ≈ ε̂_c (no guidance) or ε̂_u ≈ previous ε̂_u
    err = float((out - ref).abs().max())
    for naive in ([1.0, 0.0, 0.0], [0.0, 0.0, 1.0]):
        worse = float((_run(LinearAG(den, 3.0, torch.tensor([naive] * 16, dtype=F64))) - ref).abs().max())
        assert err < worse / 3, (naive, err, worse)
    with pytest.raises(ValueError, match="calibrated for 16"):
        _run(g, steps=20)


# -- errors -----------------------------------------------------------------------------------------------------


def test_unconditional_path_required_or_derived():
    with pytest.raises(ValueError, match="uncond"):
        CFG(lambda x, s: x, 2.0)
    with pytest.raises(ValueError, match="uncond"):
        CFG(GaussianMixture(torch.zeros(2, 2), torch.ones(2)), 2.0)
    with pytest.raises(ValueError, match="uncond"):
        AdaptiveGuidance(Denoiser(MLP(dim=2, hidden=8, depth=1), PROCESS, "eps"), 2.0)
    den = Denoiser(MLP(dim=2, hidden=8, depth=1, num_classes=3).double(), PROCESS, "eps")
    assert null_cond(den) == {"label": -1} and null_cond(CFG(den, 2.0)) == {"label": -1}
    g = CFG(den, 2.0)
    with torch.no_grad():
        out = g(points(), SIGMAS, label=LABELS)
        d_c, d_u = den(points(), SIGMAS, label=LABELS), den(points(), SIGMAS, label=-1)
    torch.testing.assert_close(out, d_u + 2.0 * (d_c - d_u), rtol=1e-12, atol=1e-12)


def test_option_errors(gm):
    with pytest.raises(ValueError, match="same keys"):
        CFG(gm, 2.0, uncond={"prompt": 0})(points(), 1.0, label=LABELS)
    with pytest.raises(ValueError, match="same keys"):
        CFG(gm, 2.0)(points(), 1.0)
    with pytest.raises(ValueError, match="rescale"):
        CFG(gm, 2.0, rescale=1.5)
    with pytest.raises(ValueError, match="interval"):
        CFG(gm, 2.0, interval=(1.0, 0.5))


def test_adaptive_guidance_spaces(gm):
    """space='eps' compares ε̂_c, ε̂_u (the paper's rule), 'x0' compares D_c, D_u; an unknown space is an error."""
    den = gm.denoiser(PROCESS, "eps")
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2.0
    lab = {"label": LABELS[:6] if len(LABELS) >= 6 else torch.zeros(6, dtype=torch.long)}
    for space in ("x0", "eps"):
        g = AdaptiveGuidance(den, 3.0, threshold=1.0, space=space)
        g(x, 2.0, **lab)
        d_c, d_u = den(x, 2.0, **lab), den(x, 2.0, label=torch.full((6,), -1))
        a, b = (d_c, d_u) if space == "x0" else (x - d_c, x - d_u)
        expected = float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())
        assert g.similarities == [pytest.approx(expected, abs=1e-12)]
    with pytest.raises(ValueError, match="unknown space 'v'; valid: x0, eps"):
        AdaptiveGuidance(den, 3.0, space="v")
