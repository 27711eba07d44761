"""Step schedules: shape and end of every family, closed forms, diffusers' timestep spacings, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import F64, PROCESSES, single_threaded  # noqa: F401

import diffkit
from diffkit import EDM, VP, get_sigmas
from diffkit.schedules import ENDS, exponential, karras, loglinear_interp, polyexponential, schedules, validate_sigmas

SCHEDULE_PROCESSES = ["vp_discrete_linear", "vp_discrete_scaled", "vp_linear", "vp_cosine", "ve", "edm", "flow",
                      "flow_shift3", "interpolant_trig"]
# families whose non-zero levels span exactly [σ̄_min, σ̄_max] (module docstring)
SPANNING = ["karras", "exponential", "logsnr", "polyexponential", "linspace", "time_quadratic", "loglinear"]



def _kwargs(name: str, process, steps: int, end: str) -> dict:
    """Extra options for the list-based schedules: a list spanning the process's range."""
    lo, hi = process.sigma_bar_min, process.sigma_bar_max
    if name == "loglinear":
        return {"sigmas": karras(10, lo, hi).tolist()}
    if name == "list":
        body = karras(steps if end == "zero" else steps + 1, lo, hi).tolist()
        if end == "replace":
            body[-1] = 0.0
        return {"sigmas": body + ([0.0] if end == "zero" else [])}
    return {}


def test_registry():
    names = schedules()
    assert names == sorted(names)
    assert set(names) == {"karras", "exponential", "logsnr", "polyexponential", "linspace", "time_quadratic",
                          "trailing", "leading", "loglinear", "list", "tuned"}
    assert ENDS == ("zero", "sigma_min", "replace")


@pytest.mark.parametrize("end", ENDS)
@pytest.mark.parametrize("name", schedules())
@pytest.mark.parametrize("pname", SCHEDULE_PROCESSES)
def test_grid_shape_and_end(pname, name, end):
    process = PROCESSES[pname]()
    for steps in (1, 2, 7, 20):
        s = get_sigmas(name, steps, process=process, end=end, **_kwargs(name, process, steps, end))
        assert s.dtype == F64 and s.ndim == 1
        assert len(s) == steps + 1, (steps, s)
        assert (s[1:] < s[:-1]).all(), s
        assert torch.isfinite(s).all() and (s[:-1] > 0).all()
        if end in ("zero", "replace"):
            assert s[-1] == 0
        else:
            assert s[-1] > 0
            if name not in ("loglinear", "list"):  # those end where their list ends (here σ̄_min too)
                assert float(s[-1]) == pytest.approx(process.sigma_bar_min, rel=1e-9)


@pytest.mark.parametrize("end", ENDS)
@pytest.mark.parametrize("name", SPANNING)
@pytest.mark.parametrize("pname", SCHEDULE_PROCESSES)
def test_spanning_grids_include_both_ends(pname, name, end):
    process = PROCESSES[pname]()
    for steps in (2, 7, 20):
        s = get_sigmas(name, steps, process=process, end=end, **_kwargs(name, process, steps, end))
        positive = s[s > 0]
        assert float(positive[0]) == pytest.approx(process.sigma_bar_max, rel=1e-9)
        if end == "replace":  # the sigma_min grid with its last level set to 0
            full = get_sigmas(name, steps, process=process, end="sigma_min", **_kwargs(name, process, steps, end))
            torch.testing.assert_close(s[:-1], full[:-1], rtol=0, atol=0)
            assert s[-1] == 0 and float(positive[-1]) > process.sigma_bar_min * (1 + 1e-9)
        else:
            assert float(positive[-1]) == pytest.approx(process.sigma_bar_min, rel=1e-9)


@pytest.mark.parametrize("pname", SCHEDULE_PROCESSES)
def test_trailing_starts_at_sigma_max(pname):
    """diffusers' 'trailing' spacing starts at the last training time, i.e. σ̄_max."""
    process = PROCESSES[pname]()
    for steps in (1, 5, 20):
        s = get_sigmas("trailing", steps, process=process)
        assert float(s[0]) == pytest.approx(process.sigma_bar_max, rel=1e-9)


@pytest.mark.parametrize("name", SPANNING)
def test_one_step_starts_at_sigma_max(name):
    """A one-step grid ending at zero is [σ̄_max, 0]: sampling must start from the noisiest level."""
    process = EDM()
    s = get_sigmas(name, 1, process=process, **_kwargs(name, process, 1, "zero"))
    torch.testing.assert_close(s, torch.tensor([80.0, 0.0], dtype=F64), rtol=1e-12, atol=0)


# -- closed forms ----------------------------------------------------------------------------------------------


def test_karras_eq5_hand_computed():
    # σ_i = (σ_max^{1/ρ} + i/(n-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, evaluated with 40-digit decimals
    s = karras(4, 0.002, 80.0, rho=7.0)
    expected = torch.tensor([80.0, 9.7232013552601265350, 0.46997905799774678669, 0.002], dtype=F64)
    torch.testing.assert_close(s, expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(karras(3, 0.002, 80.0)[1], torch.tensor(2.5152189761471585788, dtype=F64),
                               rtol=1e-13, atol=0)
    torch.testing.assert_close(karras(5, 1.0, 5.0, rho=1.0), torch.tensor([5.0, 4, 3, 2, 1], dtype=F64),
                               rtol=1e-14, atol=0)
    # through get_sigmas, with the process's range and the rho option
    g = get_sigmas("karras", 3, process=EDM(), end="sigma_min")
    torch.testing.assert_close(g, expected, rtol=1e-13, atol=0)
    g = get_sigmas("karras", 3, process=EDM(), rho=1.0)
    torch.testing.assert_close(g, torch.tensor([80.0, 40.001, 0.002, 0.0], dtype=F64), rtol=1e-11, atol=0)


def test_exponential_is_uniform_in_log_sigma():
    s = exponential(9, 0.01, 100.0)
    ratios = s[1:] / s[:-1]
    torch.testing.assert_close(ratios, torch.full((8,), 10 ** (-0.5), dtype=F64), rtol=1e-13, atol=0)
    torch.testing.assert_close(get_sigmas("logsnr", 8, sigma_min=0.01, sigma_max=100.0),
                               get_sigmas("exponential", 8, sigma_min=0.01, sigma_max=100.0), rtol=0, atol=0)
    torch.testing.assert_close(polyexponential(9, 0.01, 100.0, rho=1.0), s, rtol=1e-13, atol=0)
    # rho = 2: log σ_i = log σ_min + (1 - i/(n-1))² (log σ_max - log σ_min)
    p2 = polyexponential(5, 0.01, 100.0, rho=2.0)
    expected = torch.tensor([math.exp(math.log(0.01) + (1 - i / 4) ** 2 * math.log(1e4)) for i in range(5)],
                            dtype=F64)
    torch.testing.assert_close(p2, expected, rtol=1e-13, atol=0)


def test_explicit_range_overrides_process():
    s = get_sigmas("karras", 5, process=EDM(), sigma_min=0.1, sigma_max=10.0, end="sigma_min")
    assert float(s[0]) == pytest.approx(10.0, rel=1e-14) and float(s[-1]) == pytest.approx(0.1, rel=1e-14)
    s = get_sigmas("exponential", 4, sigma_min=0.1, sigma_max=10.0)  # no process needed
    assert len(s) == 5 and s[-1] == 0 and float(s[0]) == pytest.approx(10.0)


def test_time_spacings_on_continuous_processes():
    vp = VP.continuous("linear")
    s = get_sigmas("linspace", 4, process=vp, end="sigma_min")
    t = torch.linspace(vp.t_max, vp.t_min, 5, dtype=F64)
    torch.testing.assert_close(s, vp.sigma_bar(t), rtol=1e-12, atol=0)
    s = get_sigmas("time_quadratic", 4, process=vp, end="sigma_min")
    t = torch.linspace(math.sqrt(vp.t_max), math.sqrt(vp.t_min), 5, dtype=F64) ** 2
    torch.testing.assert_close(s, vp.sigma_bar(t), rtol=1e-12, atol=0)
    s = get_sigmas("trailing", 4, process=vp)  # t_min + (t_max - t_min)(1 - i/n), then 0
    t = vp.t_min + (vp.t_max - vp.t_min) * (1 - torch.arange(4, dtype=F64) / 4)
    torch.testing.assert_close(s[:-1], vp.sigma_bar(t), rtol=1e-12, atol=0)


# -- diffusers' timestep spacings on discrete VP -------------------------------------------------------------


def _diffkit_timesteps(process, sigmas):
    return process.t_of_sigma_bar(sigmas[sigmas > 0])


@pytest.mark.parametrize("spacing, steps, offset", [
    ("trailing", 10, 0), ("trailing", 7, 0), ("trailing", 25, 0),
    ("leading", 10, 0), ("leading", 7, 0), ("leading", 25, 1),
    ("linspace", 10, 0), ("linspace", 4, 0),  # (T-1)/(n-1) integer: diffusers' timesteps are integers
])
@pytest.mark.parametrize("preset", ["linear", "scaled_linear"])
def test_discrete_spacings_match_diffusers(spacing, steps, offset, preset):
    diffusers = pytest.importorskip("diffusers")
    kw = {"scaled_linear": dict(beta_start=0.00085, beta_end=0.012)}.get(preset, {})
    process = VP.discrete(preset)
    opts = {"offset": offset} if offset else {}
    ours = get_sigmas(spacing, steps, process=process, **opts)
    euler = diffusers.EulerDiscreteScheduler(beta_schedule=preset, timestep_spacing=spacing, steps_offset=offset,
                                             **kw)
    # diffusers' float32 alphas_cumprod loses ~1e-4 of σ̄ near t = 0 (1 - ᾱ cancels); the presets themselves are
    # compared in test_processes, so hand it the float64 table: only the spacing logic is compared here
    euler.alphas_cumprod = process.alphas_cumprod.clone()
    euler.set_timesteps(steps)
    # same timesteps (diffkit's grid mapped back to native time) ...
    np.testing.assert_allclose(_diffkit_timesteps(process, ours).numpy(), euler.timesteps.numpy(), rtol=0,
                               atol=1e-6)
    # ... and the same σ̄ grid including the final 0 (diffusers rounds it to float32 at the end)
    np.testing.assert_allclose(ours.numpy(), euler.sigmas.double().numpy(), rtol=2e-7, atol=0)
    if spacing != "linspace":  # DDIM agrees on the integer timesteps (it rounds linspace)
        ddim = diffusers.DDIMScheduler(beta_schedule=preset, timestep_spacing=spacing, steps_offset=offset, **kw)
        ddim.set_timesteps(steps)
        np.testing.assert_allclose(_diffkit_timesteps(process, ours).numpy(), ddim.timesteps.numpy(), rtol=0,
                                   atol=1e-6)


@pytest.mark.parametrize("steps", [10, 7])
def test_trailing_sigma_min_matches_diffusers(steps):
    diffusers = pytest.importorskip("diffusers")
    process = VP.discrete("linear")
    ours = get_sigmas("trailing", steps, process=process, end="sigma_min")
    euler = diffusers.EulerDiscreteScheduler(timestep_spacing="trailing", final_sigmas_type="sigma_min")
    euler.alphas_cumprod = process.alphas_cumprod.clone()
    euler.set_timesteps(steps)
    np.testing.assert_allclose(ours.numpy(), euler.sigmas.double().numpy(), rtol=2e-7, atol=0)
    assert float(ours[-1]) == pytest.approx(process.sigma_bar_min, rel=1e-12)


# -- lists ------------------------------------------------------------------------------------------------------


def test_loglinear_reproduces_list():
    lst = karras(10, 0.03, 20.0)
    torch.testing.assert_close(loglinear_interp(lst.tolist(), 10), lst, rtol=1e-13, atol=0)
    torch.testing.assert_close(loglinear_interp(lst.tolist() + [0.0], 10), lst, rtol=1e-13, atol=0)  # 0 ignored
    s = get_sigmas("loglinear", 10, sigmas=lst.tolist())
    torch.testing.assert_close(s, torch.cat([lst, torch.zeros(1, dtype=F64)]), rtol=1e-13, atol=0)
    s = get_sigmas("loglinear", 9, sigmas=lst.tolist(), end="sigma_min")
    torch.testing.assert_close(s, lst, rtol=1e-13, atol=0)
    # at twice the resolution the new points are the geometric means of their neighbours
    fine = loglinear_interp(lst.tolist(), 19)
    torch.testing.assert_close(fine[::2], lst, rtol=1e-13, atol=0)
    torch.testing.assert_close(fine[1::2], (lst[1:] * lst[:-1]).sqrt(), rtol=1e-13, atol=0)


def test_list_schedule():
    s = get_sigmas("list", 3, sigmas=[5.0, 1.0, 0.2, 0.0])
    torch.testing.assert_close(s, torch.tensor([5.0, 1.0, 0.2, 0.0], dtype=F64), rtol=0, atol=0)


def test_list_length_must_match_steps():
    with pytest.raises(ValueError):
        get_sigmas("list", 5, sigmas=[5.0, 1.0, 0.2, 0.0])


# -- validation --------------------------------------------------------------------------------------------------


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError) as e:
        get_sigmas("cosine", 10, process=EDM())
    for name in schedules():
        assert name in str(e.value)
    with pytest.raises(ValueError) as e:
        get_sigmas("karras", 10, process=EDM(), end="one")
    for end in ENDS:
        assert end in str(e.value)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "10", None])
def test_bad_steps(steps):
    with pytest.raises(ValueError):
        get_sigmas("karras", steps, process=EDM())


@pytest.mark.parametrize("sigmas", [
    [1.0, 2.0, 0.0],  # increasing
    [2.0, 2.0, 0.0],  # repeated level
    [2.0, 1.0, -0.5],  # negative
    [2.0, -1.0, 0.0],
    [float("nan"), 1.0, 0.0],
    [float("inf"), 1.0, 0.0],
    [2.0, 0.0, 0.0],  # zero before the end
    [3.0],  # a single level
    [[3.0, 1.0]],  # not 1-D
])
def test_bad_explicit_grids(sigmas):
    with pytest.raises(ValueError):
        validate_sigmas(sigmas)
    with pytest.raises(ValueError):
        get_sigmas("list", 2, sigmas=sigmas)
    if np.ndim(sigmas) == 1 and len(sigmas) > 1 and sigmas[-1] >= 0 and np.isfinite(sigmas).all() \
            and (np.asarray(sigmas)[:-1] > 0).all():
        with pytest.raises(ValueError):
            get_sigmas("loglinear", 4, sigmas=sigmas)


def test_validate_accepts_good_grids():
    for good in ([2.0, 1.0, 0.0], [2.0, 1.0], torch.tensor([5.0, 1e-3])):
        s = validate_sigmas(good)
        assert s.dtype == F64


def test_missing_or_bad_ranges():
    with pytest.raises(ValueError):
        get_sigmas("karras", 5)  # no process and no range
    with pytest.raises(ValueError):
        get_sigmas("karras", 5, sigma_min=1.0)
    with pytest.raises(ValueError):
        get_sigmas("karras", 5, sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError):
        get_sigmas("karras", 5, sigma_min=0.0, sigma_max=1.0)
    with pytest.raises(ValueError):
        get_sigmas("linspace", 5, sigma_min=0.1, sigma_max=1.0)  # uniform in native time: needs a process
    with pytest.raises(ValueError):
        get_sigmas("trailing", 5)
    with pytest.raises(TypeError):
        get_sigmas("linspace", 5, process=EDM(), rho=7.0)  # option of another family


def test_schedules_registry_matches_sample():
    """Every schedule name is accepted by sample() with a process (smoke test of the wiring)."""
    process = EDM()
    den = diffkit.Denoiser(lambda x, t: x / (1 + t[:, None] ** 2), process, "x0")
    noise = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    for name in schedules():
        if name in ("loglinear", "list"):
            continue
        out, info = diffkit.sample(den, noise, solver="euler", steps=4, schedule=name, return_info=True)
        assert out.shape == noise.shape and torch.isfinite(out).all()
        torch.testing.assert_close(info["sigmas"], get_sigmas(name, 4, process=process), rtol=0, atol=0)
