"""Stochastic samplers: exact agreement with the reference implementations for the same noise, exactness of the
multistep coefficients, convergence in distribution on a Gaussian mixture (with tolerances that a wrong noise
coefficient breaks), per-seed batch invariance, Brownian-tree convergence, NFE budgets and bad input."""

from __future__ import annotations

import importlib.util
import math
import sys
import types
import warnings

import pytest
import torch
from helpers import single_threaded  # noqa: F401
from scipy.integrate import quad

import diffkit
from diffkit import metrics
from diffkit.noise import randn
from diffkit.solvers import get_solver, plan
from diffkit.solvers.dpm import dpmpp_2s
from diffkit.solvers.euler import euler
from diffkit.solvers.stochastic import (
    ancestral_split,
    ddim_eta,
    ddpm,
    dpmpp_2s_sde,
    dpmpp_sde,
    edm_sde,
    euler_ancestral,
    euler_maruyama,
    exp_lagrange_weights,
    exp_moments,
    pc,
    sa_solver,
    ts_sampler,
)
from diffkit.testbeds import GaussianMixture

F64 = torch.float64
STOCHASTIC = [n for n in diffkit.solvers() if get_solver(n).stochastic]


def mixture() -> GaussianMixture:
    """Three anisotropic components with unequal weights (2-D)."""
    cov = torch.tensor([[[0.30, 0.12], [0.12, 0.10]], [[0.05, -0.02], [-0.02, 0.20]], [[0.08, 0.0], [0.0, 0.08]]],
                       dtype=F64)
    return GaussianMixture(torch.tensor([[-1.2, 0.6], [1.1, -0.5], [0.3, 1.4]]), weights=torch.tensor([0.3, 0.5, 0.2]),
                           covariances=cov)


class Replay:
    """A noise sampler replaying one generator's standard normal stream (so two samplers see the same draws)."""

    def __init__(self, seed: int, shape):
        self.g, self.shape = torch.Generator().manual_seed(seed), tuple(shape)

    def __call__(self, sigma, sigma_next):
        return torch.randn(self.shape, generator=self.g, dtype=F64)


def k_diffusion_sampling():
    """k_diffusion.sampling without the package __init__ (which needs torchvision): empty torchvision stubs and a
    bare package module."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed")
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["k_diffusion"] = pkg
    import k_diffusion.sampling as sampling

    return sampling


# -- same noise, same answer as the reference implementations ---------------------------------------------------


@pytest.fixture(scope="module")
def ring():
    return GaussianMixture.ring(8, 1.0, 0.1)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_eta_equals_diffusers_ddim(ring, eta):
    """diffusers' DDIMScheduler(eta) with the same variance noise: DDIM Eq. 12 in native VP space."""
    diffusers = pytest.importorskip("diffusers")
    proc = diffkit.VP.discrete("scaled_linear")
    model = ring.model(proc, "eps")
    den = diffkit.Denoiser(model, proc, "eps")
    n = 6
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    sch = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                  set_alpha_to_one=True, timestep_spacing="trailing")
    sch.set_timesteps(10)
    zs = torch.randn(len(sch.timesteps), n, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    x = x_T.clone()
    for k, t in enumerate(sch.timesteps):
        x = sch.step(model(x, torch.full((n,), float(t))), t, x, eta=eta, variance_noise=zs[k]).prev_sample
    ts = sch.timesteps.to(F64)
    sig = torch.cat([proc.sigma_bar(ts), torch.zeros(1, dtype=F64)])
    it = iter(zs)
    ours = ddim_eta(den, x_T / float(proc.alpha(ts[0])), sig, eta=eta, noise=lambda a, b: next(it))
    torch.testing.assert_close(ours, x, rtol=0, atol=5e-6)  # diffusers keeps alphas_cumprod in float32


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_equals_diffusers_ddpm(ring, variance):
    diffusers = pytest.importorskip("diffusers")
    proc = diffkit.VP.discrete("scaled_linear")
    model = ring.model(proc, "eps")
    den = diffkit.Denoiser(model, proc, "eps")
    n = 6
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    # 'leading' spacing ends at t = 0, where diffusers adds no noise (with 'trailing' it would add noise of
    # variance beta on the final step of fixed_large)
    sch = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, timestep_spacing="leading", variance_type=variance)
    sch.set_timesteps(10)
    g = torch.Generator().manual_seed(5)
    x = x_T.clone()
    for t in sch.timesteps:
        x = sch.step(model(x, torch.full((n,), float(t))), t, x, generator=g).prev_sample
    ts = sch.timesteps.to(F64)
    sig = torch.cat([proc.sigma_bar(ts), torch.zeros(1, dtype=F64)])
    ours = ddpm(den, x_T / float(proc.alpha(ts[0])), sig, variance="small" if variance == "fixed_small" else "large",
                noise=Replay(5, (n, 2)))
    torch.testing.assert_close(ours, x, rtol=0, atol=5e-6)


KD_CASES = {
    "euler_ancestral": (lambda m, x, s, z: euler_ancestral(m, x, s, noise=z),
                        lambda K, m, x, s, z: K.sample_euler_ancestral(m, x, s, noise_sampler=z, disable=True)),
    "euler_ancestral_eta": (lambda m, x, s, z: euler_ancestral(m, x, s, noise=z, eta=0.6, s_noise=0.9),
                            lambda K, m, x, s, z: K.sample_euler_ancestral(m, x, s, noise_sampler=z, eta=0.6,
                                                                           s_noise=0.9, disable=True)),
    "2m_sde_midpoint": (lambda m, x, s, z: dpmpp_sde(m, x, s, noise=z, lower_order_final=False),
                        lambda K, m, x, s, z: K.sample_dpmpp_2m_sde(m, x, s, noise_sampler=z, disable=True)),
    "2m_sde_heun": (lambda m, x, s, z: dpmpp_sde(m, x, s, noise=z, solver_type="heun", lower_order_final=False),
                    lambda K, m, x, s, z: K.sample_dpmpp_2m_sde(m, x, s, noise_sampler=z, solver_type="heun",
                                                                disable=True)),
    "2m_sde_eta": (lambda m, x, s, z: dpmpp_sde(m, x, s, noise=z, eta=0.4, lower_order_final=False),
                   lambda K, m, x, s, z: K.sample_dpmpp_2m_sde(m, x, s, noise_sampler=z, eta=0.4, disable=True)),
}


@pytest.mark.parametrize("case", sorted(KD_CASES))
def test_equals_k_diffusion_for_the_same_noise(ring, case):
    K = k_diffusion_sampling()
    ours_fn, theirs_fn = KD_CASES[case]
    x = 80.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    sig = diffkit.get_sigmas("karras", 12, sigma_min=0.002, sigma_max=80.0)

    def model(y, s, **kw):
        return ring.denoise(y, s)

    ours = ours_fn(ring.denoise, x, sig, Replay(1, x.shape))
    theirs = theirs_fn(K, model, x, sig, Replay(1, x.shape))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_edm_sde_equals_k_diffusion_heun_with_churn(ring):
    K = k_diffusion_sampling()
    x = 80.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    sig = diffkit.get_sigmas("karras", 12, sigma_min=0.002, sigma_max=80.0)
    torch.manual_seed(3)  # both draw their churn noise from the global generator, one draw per step
    ours = edm_sde(ring.denoise, x, sig, s_churn=5.0, s_noise=1.01)
    torch.manual_seed(3)
    theirs = K.sample_heun(lambda y, s, **kw: ring.denoise(y, s), x, sig, s_churn=5.0, s_noise=1.01, disable=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_ancestral_family_coincides_in_canonical_variables(ring):
    """DDPM (posterior variance), DDIM with eta = 1 and Euler-ancestral are one update in x̄; eta = 0 is DDIM."""
    x = 10.0 * torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    sig = diffkit.get_sigmas("karras", 9, sigma_min=0.01, sigma_max=10.0)
    a = ddpm(ring.denoise, x, sig, noise=Replay(2, x.shape))
    b = ddim_eta(ring.denoise, x, sig, noise=Replay(2, x.shape), eta=1.0)
    c = euler_ancestral(ring.denoise, x, sig, noise=Replay(2, x.shape))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-12)
    torch.testing.assert_close(ddim_eta(ring.denoise, x, sig, eta=0.0), euler(ring.denoise, x, sig), rtol=0,
                               atol=1e-12)


def test_ancestral_split_is_the_ddpm_posterior():
    down, up = ancestral_split(2.0, 0.5, 1.0)
    assert math.isclose(up**2, 0.5**2 * (2.0**2 - 0.5**2) / 2.0**2)
    assert math.isclose(down, 0.5**2 / 2.0)
    assert ancestral_split(2.0, 0.5, 0.0) == (0.5, 0.0)
    assert ancestral_split(2.0, 0.0, 1.0) == (0.0, 0.0)
    down, up = ancestral_split(2.0, 1.9, 50.0)  # capped at sigma_next
    assert up == 1.9 and down == 0.0


# -- exactness of the exponential-integrator coefficients ------------------------------------------------------


def test_exp_moments_match_quadrature_on_both_branches():
    for H in (1e-4, 0.3, 0.999, 1.0, 1.001, 4.0, 40.0):
        got = exp_moments(H, 4)
        for k in range(5):
            want = quad(lambda v: H * math.exp(-H * (1 - v)) * v**k, 0, 1, epsabs=1e-15, epsrel=1e-13)[0]
            assert math.isclose(got[k], want, rel_tol=1e-10, abs_tol=1e-15), (H, k, got[k], want)


def _quadratic_denoiser(c0, c1, c2):
    """D(x̄, σ̄) = c0 + c1 λ + c2 λ², independent of x̄."""
    def den(x, s):
        lam_ = -math.log(float(s))
        return torch.full_like(x, c0 + c1 * lam_ + c2 * lam_**2)
    return den


def _last_step_increment(run, sig, kappa):
    """x̄_N - e^{-κh} x̄_{N-1} of a run, from the callback's states (D does not depend on x̄)."""
    states = []
    out = run(lambda info: states.append(info["x"].clone()))
    h = math.log(sig[-2] / sig[-1])
    return float(out - math.exp(-kappa * h) * states[-1])


def _exact_increment(sig, kappa, coef):
    ls, lt = -math.log(sig[-2]), -math.log(sig[-1])
    f = lambda lam_: coef[0] + coef[1] * lam_ + coef[2] * lam_**2  # noqa: E731
    return quad(lambda lam_: kappa * math.exp(-kappa * (lt - lam_)) * f(lam_), ls, lt, epsabs=1e-14)[0]


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_3m_sde_integrates_a_quadratic_exactly(eta):
    """Third order means the step is exact when D is quadratic in λ (here with the noise switched off). The
    reference DPM-Solver++(3M) code (and k-diffusion's 3M-SDE) weight the second divided difference by half of
    the exact integral, which is not exact (and is second order globally)."""
    coef = (0.3, -0.7, 0.45)
    sig = [5.0, 3.0, 1.2, 0.5]
    den = _quadratic_denoiser(*coef)
    x, s = torch.zeros(1, 1, dtype=F64), torch.tensor(sig, dtype=F64)
    got = _last_step_increment(lambda cb: dpmpp_sde(den, x, s, order=3, eta=eta, s_noise=0.0, lower_order_final=False,
                                                    callback=cb), sig, 1 + eta)
    assert math.isclose(got, _exact_increment(sig, 1 + eta, coef), rel_tol=1e-12)


def test_2m_sde_heun_integrates_a_line_exactly_and_midpoint_does_not():
    coef = (0.3, -0.7, 0.0)
    sig = [5.0, 2.0, 0.7]
    den = _quadratic_denoiser(*coef)
    exact = _exact_increment(sig, 2.0, coef)
    res = {}
    x, s = torch.zeros(1, 1, dtype=F64), torch.tensor(sig, dtype=F64)
    for st in ("heun", "midpoint"):
        res[st] = _last_step_increment(lambda cb, st=st: dpmpp_sde(den, x, s, order=2, solver_type=st, s_noise=0.0,
                                                                   lower_order_final=False, callback=cb), sig, 2.0)
    assert math.isclose(res["heun"], exact, rel_tol=1e-12)
    assert abs(res["midpoint"] - exact) > 1e-3


def test_2s_sde_reduces_to_dpmpp_2s_and_heun_integrates_a_line_exactly(ring):
    x = 10 * torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    sig = diffkit.get_sigmas("logsnr", 6, sigma_min=0.01, sigma_max=10.0)
    torch.testing.assert_close(dpmpp_2s_sde(ring.denoise, x, sig, eta=0.0), dpmpp_2s(ring.denoise, x, sig), rtol=0,
                               atol=1e-12)
    coef = (0.3, -0.7, 0.0)
    sig = [5.0, 0.7]
    den = _quadratic_denoiser(*coef)
    s = torch.tensor(sig, dtype=F64)
    for eta in (0.0, 0.6):
        got = _last_step_increment(lambda cb, e=eta: dpmpp_2s_sde(den, torch.zeros(1, 1, dtype=F64), s, eta=e,
                                                                 solver_type="heun", s_noise=0.0, callback=cb),
                                   sig, 1 + eta)
        assert math.isclose(got, _exact_increment(sig, 1 + eta, coef), rel_tol=1e-12)


# one step from x̄ = 0 with D = 0: the output is pure noise, of the variance each sampler's derivation gives
_S, _T = 2.0, 0.8
_H = math.log(_S / _T)
ONE_STEP_VARIANCE = {
    "ddpm": _T**2 * (1 - (_T / _S) ** 2),
    "ddim_eta": (0.5 * _T) ** 2 * (1 - (_T / _S) ** 2),
    "euler_ancestral": 1.1**2 * _T**2 * (1 - (_T / _S) ** 2),
    "dpmpp_sde": _T**2 * -math.expm1(-2 * 0.7 * _H),
    "dpmpp_2s_sde": _T**2 * -math.expm1(-2 * 0.7 * _H),
    "sa_solver": _T**2 * -math.expm1(-2 * 0.49 * _H),
    "euler_maruyama": 2 * _S * (_S - _T),
    "edm_sde": 2 * _S**2 - _S**2,  # churn only: one step, γ = min(S_churn/1, √2 - 1), σ̂ = √2 σ̄, noise σ̂² - σ̄²
}
ONE_STEP_OPTIONS = {"ddim_eta": {"eta": 0.5}, "euler_ancestral": {"s_noise": 1.1}, "dpmpp_sde": {"eta": 0.7},
                    "dpmpp_2s_sde": {"eta": 0.7}, "sa_solver": {"tau": 0.7}, "euler_maruyama": {"time": "sigma"},
                    "edm_sde": {"s_churn": 5.0}}
_FNS = {"ddpm": ddpm, "ddim_eta": ddim_eta, "euler_ancestral": euler_ancestral, "dpmpp_sde": dpmpp_sde,
        "dpmpp_2s_sde": dpmpp_2s_sde, "sa_solver": sa_solver, "euler_maruyama": euler_maruyama, "edm_sde": edm_sde}


@pytest.mark.parametrize("name", sorted(ONE_STEP_VARIANCE))
def test_one_step_noise_variance(name):
    """The injected noise of one step, alone: a missing square root or a wrong exponent changes it by far more
    than the 3% tolerance (20000 samples: relative standard error 1%)."""
    n = 20000
    x = torch.zeros(n, 1, dtype=F64)
    sig = torch.tensor([_S, _T], dtype=F64)
    opts = ONE_STEP_OPTIONS.get(name, {})
    out = _FNS[name](lambda y, s: torch.zeros_like(y), x, sig, noise=Replay(0, x.shape), **opts)
    var = float(out.var())
    want = ONE_STEP_VARIANCE[name]
    if name == "edm_sde":  # the churned state goes through a Heun step of dx̄/dσ̄ = x̄/σ̄ with D = 0: x̄ scales by σ̄'/σ̂
        want *= (_T / (_S * (2**0.5))) ** 2
    assert abs(var / want - 1) < 0.03, (name, var, want)


def test_sa_solver_predictor_and_corrector_are_exact_for_polynomials():
    """Predictor of order 3 is exact for a quadratic D; the corrector (order 3, including the new point) too."""
    coef = (0.2, 0.5, -0.3)
    sig = [6.0, 3.0, 1.5, 0.6]
    den = _quadratic_denoiser(*coef)
    x, s = torch.zeros(1, 1, dtype=F64), torch.tensor(sig, dtype=F64)
    for use_corrector in (False, True):
        got = _last_step_increment(lambda cb, u=use_corrector: sa_solver(den, x, s, tau=0.8, s_noise=0.0,
                                                                        use_corrector=u, lower_order_final=False,
                                                                        callback=cb), sig, 1 + 0.64)
        assert math.isclose(got, _exact_increment(sig, 1.64, coef), rel_tol=1e-11)
    w = exp_lagrange_weights([0.0, -0.5, -1.2], 1.3)
    assert math.isclose(w.sum(), exp_moments(1.3, 0)[0], rel_tol=1e-12)  # the weights reproduce constants


# -- convergence in distribution on a mixture ----------------------------------------------------------------

N_DIST = 4000
# steps per sampler: enough for its discretization error to fall well below the tolerances
DIST_STEPS = {"ddpm": 200, "ddim_eta": 200, "euler_ancestral": 200, "edm_sde": 60, "dpmpp_2m_sde": 60,
              "dpmpp_2m_sde_heun": 60, "dpmpp_3m_sde": 60, "dpmpp_2s_sde": 30, "dpmpp_2s_sde_heun": 30,
              "sa_solver": 60, "euler_maruyama": 150, "pc": 80}
# exact samples of this size give weight errors ~0.01, mean errors ~0.04, covariance errors ~0.06-0.09;
# a noise scale off by 15% (s_noise = 1.15 or 0.85) gives covariance errors above 0.2
TOL = {"mode_weight_error": 0.03, "mean_error": 0.1, "cov_error": 0.16}


@pytest.fixture(scope="module")
def dist_setup():
    mix = mixture()
    proc = diffkit.EDM(0.002, 80.0, 0.5)
    den = mix.denoiser(proc, "edm")
    z = torch.randn(N_DIST, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    return mix, den, z


def _distribution_errors(dist_setup, name, steps, options=None):
    mix, den, z = dist_setup
    x = diffkit.sample(den, z, solver=name, steps=steps, options=options, generator=torch.Generator().manual_seed(1))
    return metrics.mixture_report(x, mix)


@pytest.mark.parametrize("name", sorted(DIST_STEPS))
def test_converges_in_distribution(dist_setup, name):
    rep = _distribution_errors(dist_setup, name, DIST_STEPS[name])
    for key, tol in TOL.items():
        assert rep[key] < tol, (name, key, rep)


@pytest.mark.parametrize("name,s_noise", [("euler_ancestral", 1.15), ("dpmpp_2m_sde", 1.15), ("dpmpp_2m_sde", 0.85),
                                          ("sa_solver", 0.85)])
def test_tolerances_catch_a_wrong_noise_scale(dist_setup, name, s_noise):
    rep = _distribution_errors(dist_setup, name, DIST_STEPS[name], {"s_noise": s_noise})
    assert rep["cov_error"] > TOL["cov_error"] + 0.04, rep


def test_time_shift_sampler_converges_in_high_dimension():
    """The time-shift sampler reads the noise level off the variance over features, so it is tested where that
    estimate is meaningful: 64 features. Mode weights and the per-component variance (trace of the whitened
    covariance / d) must match; at few steps it must shrink the variance less than the sampler it shifts
    (the exposure bias it is meant to alleviate)."""
    mix, z = _high_dim_mixture()
    for name in ("ts_ddpm", "ts_ddim"):
        x = _run_high_dim(mix, z, name, 400, {"data_var": 0.09})
        assert metrics.mode_weight_error(x, mix) < 0.03
        for k, rel_var in enumerate(_relative_variances(x, mix)):
            assert abs(rel_var - 1) < 0.05, (name, k, rel_var)
    base = _relative_variances(_run_high_dim(mix, z, "ddpm", 30, {}), mix)
    shifted = _relative_variances(_run_high_dim(mix, z, "ts_ddpm", 30, {"data_var": 0.09, "cutoff_sigma": 0.3}), mix)
    assert all(b < s < 1.0 for b, s in zip(base, shifted)), (base, shifted)


def _high_dim_mixture():
    d = 64
    mix = GaussianMixture(torch.stack([0.5 * torch.ones(d), -0.5 * torch.ones(d)]).to(F64),
                          torch.tensor([0.3, 0.3], dtype=F64), weights=torch.tensor([0.4, 0.6], dtype=F64))
    return mix, torch.randn(1000, d, generator=torch.Generator().manual_seed(0), dtype=F64)


def _run_high_dim(mix, z, name, steps, options):
    return diffkit.sample(mix.denoise, z, solver=name, steps=steps, schedule="karras", sigma_min=0.002,
                          sigma_max=80.0, options=options, generator=torch.Generator().manual_seed(1))


def _relative_variances(x, mix):
    """Per component: mean of the diagonal of the estimated covariance over the true variance 0.09."""
    ce = metrics.component_errors(x, mix)
    return [float(torch.diagonal(ce["covariances"][k]).mean() / 0.09) for k in range(mix.K)]


def test_time_shift_reads_the_noise_level_off_the_state():
    """A state noised 15% more than its nominal level is denoised at (about) its true level, within the window."""
    d = 256
    x0 = 0.3 * torch.randn(64, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    state = x0 + 1.15 * 2.0 * torch.randn(64, d, generator=torch.Generator().manual_seed(1), dtype=F64)
    sig = torch.tensor([4.0, 2.0, 1.5, 0.0], dtype=F64)
    seen = []

    def den(x, s):  # D = 0: the first DDIM step (eta = 0) is x̄ -> (σ̄_1/σ̄_0) x̄, which lands on `state`
        seen.append(torch.as_tensor(s, dtype=F64).clone())
        return torch.zeros_like(x)

    ts_sampler(den, state * 2.0, sig, window=0.9, cutoff_sigma=0.5, data_var=0.09)
    assert torch.equal(seen[0], torch.full((64,), 4.0, dtype=F64))  # no shift at the first step
    est = seen[1]
    lo, hi = 2.0**0.1 * 1.5**0.9, 2.0**0.1 * 4.0**0.9
    assert est.shape == (64,) and float(est.min()) >= lo - 1e-12 and float(est.max()) <= hi + 1e-12
    assert abs(float(est.mean()) / 2.3 - 1) < 0.03  # the true level 1.15 * 2.0
    assert torch.equal(seen[2], torch.full((64,), 1.5, dtype=F64))  # below the cutoff of the last step: none


def test_euler_maruyama_native_equals_sigma_on_ve_and_runs_on_vp(ring):
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    ve = diffkit.VE(0.01, 20.0)
    den = ring.denoiser(ve, "eps")
    sig = diffkit.get_sigmas("karras", 10, process=ve)
    a = euler_maruyama(den, 20 * x, sig, noise=Replay(0, x.shape))
    b = euler_maruyama(den, 20 * x, sig, noise=Replay(0, x.shape), time="sigma")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    vp = diffkit.VP.continuous("linear")
    den = ring.denoiser(vp, "eps")
    sig = diffkit.get_sigmas("logsnr", 10, process=vp)
    c = euler_maruyama(den, x * float(sig[0]), sig, noise=Replay(0, x.shape))
    d = euler_maruyama(den, x * float(sig[0]), sig, noise=Replay(0, x.shape), time="sigma")
    assert torch.isfinite(c).all() and (c - d).abs().max() > 1e-3  # a different discretization of the same SDE


# -- seeds: batch invariance --------------------------------------------------------------------------------------


# Brownian noise with seeds keeps one torchsde tree per sample (one query per sample per draw): a few suffice
SEED_CASES = [(n, "gaussian") for n in STOCHASTIC] + [
    (n, "brownian") for n in ("euler_ancestral", "dpmpp_2m_sde", "edm_sde", "sa_solver")]


@pytest.mark.parametrize("name,kind", SEED_CASES)
def test_sample_i_depends_only_on_seed_i(ring, name, kind):
    proc = diffkit.EDM(0.002, 80.0, 0.5)
    den = ring.denoiser(proc, "edm")
    opts = {"norm": "sample"} if name == "pc" else {}
    if name.startswith("ts_"):
        opts = {"cutoff_sigma": 0.0}  # shifts on every step (still per sample)
    seeds = [7, 3, 11, 5]

    def run(ss):
        return diffkit.sample(den, randn((len(ss), 2), seeds=ss, dtype=F64), solver=name, steps=6, seeds=ss,
                              noise_kind=kind, options=opts)

    full = run(seeds)
    part = run([11, 7])
    torch.testing.assert_close(part, full[[2, 0]], rtol=0, atol=1e-12)
    assert (full[0] - full[1]).abs().max() > 1e-3


def test_generator_makes_runs_reproducible_and_deterministic_solvers_ignore_it(ring):
    den = ring.denoiser(diffkit.EDM(0.002, 80.0, 0.5), "edm")
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    a = diffkit.sample(den, z, solver="dpmpp_2m_sde", steps=8, generator=torch.Generator().manual_seed(4))
    b = diffkit.sample(den, z, solver="dpmpp_2m_sde", steps=8, generator=torch.Generator().manual_seed(4))
    c = diffkit.sample(den, z, solver="dpmpp_2m_sde", steps=8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    d = diffkit.sample(den, z, solver="euler", steps=8, generator=torch.Generator().manual_seed(4), seeds=range(5))
    torch.testing.assert_close(d, diffkit.sample(den, z, solver="euler", steps=8), rtol=0, atol=0)


# -- Brownian-tree noise: outputs converge as the steps grow -----------------------------------------------------


@pytest.mark.parametrize("name,options", [("euler_ancestral", {}), ("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {}),
                                          ("sa_solver", {}), ("euler_maruyama", {}), ("edm_sde", {"s_churn": 4.0}),
                                          ("dpmpp_2s_sde", {})])
def test_brownian_noise_converges_as_steps_grow(name, options):
    mix = mixture()
    den = mix.denoiser(diffkit.EDM(0.002, 80.0, 0.5), "edm")
    z = torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=F64)

    def gaps(kind):
        outs = [diffkit.sample(den, z, solver=name, steps=n, options=options, noise_kind=kind,
                               generator=torch.Generator().manual_seed(3)) for n in (16, 32, 64, 128)]
        return [float((outs[i + 1] - outs[i]).pow(2).mean().sqrt()) for i in range(3)]

    brown, gauss = gaps("brownian"), gaps("gaussian")
    assert brown[-1] < 0.6 * brown[0] and brown[-1] < 0.3, brown
    assert min(gauss) > 0.7, gauss  # independent noise per grid: the samples differ completely


# -- NFE accounting -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STOCHASTIC)
@pytest.mark.parametrize("end", ["zero", "sigma_min"])
def test_budgets_are_never_exceeded(ring, name, end):
    den = ring.denoiser(diffkit.EDM(0.002, 80.0, 0.5), "edm")
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    for nfe in (2, 3, 7, 10, 15):
        if nfe < get_solver(name).min_nfe:
            continue
        _, _, _, calls = plan(name, process=den.process, nfe=nfe, end=end)
        _, info = diffkit.sample(den, z, solver=name, nfe=nfe, end=end, return_info=True,
                                 generator=torch.Generator().manual_seed(0))
        assert info["nfe"] == calls <= nfe, (name, end, nfe, info["nfe"], calls)
        assert info["nfe"] >= nfe - 2, (name, end, nfe, info["nfe"])  # the budget is used, not wasted


def test_callback_sees_every_step(ring):
    seen = []
    sig = diffkit.get_sigmas("karras", 7, sigma_min=0.01, sigma_max=10.0)
    x = 10 * torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    for fn in (ddpm, ddim_eta, euler_ancestral, edm_sde, dpmpp_sde, dpmpp_2s_sde, sa_solver, euler_maruyama, pc,
               ts_sampler):
        seen.clear()
        fn(ring.denoise, x, sig, callback=lambda info: seen.append(info["i"]))
        assert seen == list(range(7)), fn.__name__


# -- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn,kwargs,match", [
    (ddim_eta, {"eta": -0.1}, "eta"),
    (euler_ancestral, {"eta": -1.0}, "eta"),
    (euler_ancestral, {"s_noise": -1.0}, "s_noise"),
    (dpmpp_sde, {"eta": -0.5}, "eta"),
    (dpmpp_sde, {"eta": float("nan")}, "eta"),
    (dpmpp_sde, {"order": 4}, "order"),
    (dpmpp_sde, {"solver_type": "rk4"}, "solver_type"),
    (dpmpp_2s_sde, {"eta": -1.0}, "eta"),
    (dpmpp_2s_sde, {"r": 1.0}, "r must"),
    (dpmpp_2s_sde, {"solver_type": "rk"}, "solver_type"),
    (edm_sde, {"s_churn": -1.0}, "s_churn"),
    (edm_sde, {"s_noise": -0.1}, "s_noise"),
    (edm_sde, {"s_tmin": 5.0, "s_tmax": 1.0}, "s_tmin"),
    (edm_sde, {"s_tmin": -1.0}, "s_tmin"),
    (edm_sde, {"s_churn": float("inf")}, "s_churn"),
    (ddpm, {"variance": "huge"}, "variance"),
    (sa_solver, {"tau": -1.0}, "tau"),
    (sa_solver, {"predictor_order": 5}, "predictor_order"),
    (euler_maruyama, {"time": "lambda"}, "time"),
    (pc, {"snr": -0.1}, "snr"),
    (pc, {"n_corrector": -1}, "n_corrector"),
    (pc, {"predictor": "heun"}, "predictor"),
    (pc, {"norm": "l1"}, "norm"),
    (ts_sampler, {"window": 1.0}, "window"),
    (ts_sampler, {"eta": -1.0}, "eta"),
    (ts_sampler, {"data_var": -0.5}, "data_var"),
])
def test_bad_options_raise_clear_errors(ring, fn, kwargs, match):
    x = torch.randn(4, 2, dtype=F64)
    sig = torch.tensor([10.0, 1.0, 0.0], dtype=F64)
    with pytest.raises(ValueError, match=match):
        fn(ring.denoise, x, sig, **kwargs)


def test_bad_options_through_sample(ring):
    den = ring.denoiser(diffkit.EDM(0.002, 80.0, 0.5), "edm")
    z = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="eta"):
        diffkit.sample(den, z, solver="ddim_eta", steps=4, options={"eta": -1.0})
    with pytest.raises(ValueError, match="s_churn"):
        diffkit.sample(den, z, solver="edm_sde", steps=4, options={"s_churn": -3.0})
    with pytest.raises(ValueError, match="seeds"):
        diffkit.sample(den, z, solver="ddpm", steps=4, seeds=[1, 2])
    with pytest.raises(ValueError, match="noise kind"):
        diffkit.sample(den, z, solver="ddpm", steps=4, noise_kind="pink")
    with pytest.raises(ValueError, match="shape"):
        diffkit.sample(den, z, solver="ddpm", steps=4, noise_kind=lambda a, b: torch.zeros(2, 2, dtype=F64))
    with pytest.raises(ValueError, match="euler_maruyama|native|process"):
        euler_maruyama(mixture().denoise, z, torch.tensor([10.0, 1.0, 0.0], dtype=F64), time="native")
    with pytest.raises(ValueError, match="features"):
        ts_sampler(lambda x, s: x, torch.zeros(3, 1, dtype=F64), torch.tensor([10.0, 1.0, 0.0], dtype=F64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diffkit.sample(den, z, solver="ddpm", steps=4)  # and nothing warns on the good path
