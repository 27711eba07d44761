"""The step-density schedules: `density_levels` (equidistribution), the shipped `tuned` table, and the tuner."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffkit
from diffkit.calibrate import step_density as SD
from diffkit.schedules import DENSITY_KNOTS, density_levels, exponential, focus_factor, get_sigmas, tuned_table


def test_constant_density_is_uniform_in_log_snr():
    got = density_levels(7, 0.002, 80.0, [0.3] * 13)
    torch.testing.assert_close(got, exponential(7, 0.002, 80.0), rtol=1e-9, atol=0)


def test_levels_equidistribute_the_density():
    """Every interval holds the same mass of ρ = exp(piecewise-linear log ρ) (checked by fine quadrature)."""
    ld = np.sin(np.arange(13)) * 1.5
    lv = density_levels(9, 0.0292, 14.6, ld).numpy()
    assert lv[0] == 14.6 and lv[-1] == 0.0292 and (np.diff(lv) < 0).all()
    s = np.log(lv)

    def mass(a, b):
        x = np.linspace(a, b, 20001)
        return np.trapezoid(np.exp(np.interp(x, DENSITY_KNOTS, ld)), x)

    masses = [mass(s[i + 1], s[i]) for i in range(8)]
    assert max(masses) / min(masses) < 1 + 1e-3


def test_density_concentrates_levels_where_it_is_high():
    ld = [0.0] * 13
    ld[6] = 3.0  # a bump at σ̄ = 1
    lv = density_levels(12, 0.002, 80.0, ld)
    near = ((lv > 0.3) & (lv < 3.0)).sum()
    uniform = ((exponential(12, 0.002, 80.0) > 0.3) & (exponential(12, 0.002, 80.0) < 3.0)).sum()
    assert near > uniform + 2


@pytest.mark.parametrize("end", ["zero", "sigma_min", "replace"])
@pytest.mark.parametrize("process", [diffkit.EDM(), diffkit.VP.discrete("scaled_linear"), diffkit.Flow()],
                         ids=["edm", "sd_vp", "flow"])
def test_tuned_schedule_is_a_valid_grid_on_every_process(process, end):
    for steps in (3, 5, 8, 12, 20, 40):
        g = get_sigmas("tuned", steps, process=process, end=end)
        assert len(g) == steps + 1
        assert math.isclose(float(g[0]), process.sigma_bar_max)
        assert float(g[-1]) == (process.sigma_bar_min if end == "sigma_min" else 0.0)


def test_tuned_table_is_well_formed_and_nearest_budget_is_used():
    t = tuned_table()
    assert t["format"] == "diffkit-step-density" and t["knots"] == pytest.approx(list(DENSITY_KNOTS))
    assert t["log_density"] and all(len(v) == 13 for v in t["log_density"].values())
    m = int(min(t["log_density"], key=int))
    torch.testing.assert_close(get_sigmas("tuned", m - 1, sigma_min=0.01, sigma_max=50.0, end="sigma_min"),
                               density_levels(m, 0.01, 50.0, t["log_density"][str(m)]))


def test_bad_density_input():
    with pytest.raises(ValueError, match="13 values"):
        density_levels(5, 0.01, 10.0, [0.0] * 3)
    with pytest.raises(ValueError, match="finite"):
        density_levels(5, 0.01, 10.0, [0.0] * 12 + [float("nan")])
    with pytest.raises(TypeError, match="unexpected options: rho"):
        get_sigmas("tuned", 5, process=diffkit.EDM(), rho=7)


def test_tuner_loss_is_the_solver_error_on_the_density_grid():
    """The tuner's case loss equals the log error of `diffkit.sample` on the same grid (uniform density =
    logsnr), and a short fit lowers the loss of a small family."""
    fam = SD.FAMILY[:1]
    case = SD.build_cases("sigma_min", n=32, family=fam)[0]
    loss = SD.case_loss(case, "deis", {"coordinate": "log_sigma"}, 6, "sigma_min", [0.0] * 13)
    p = case.den.process
    noise = case.x0 / float(p.noise_to_canonical(torch.ones(1, dtype=torch.float64), case.sigma_max))
    x = diffkit.sample(case.den, noise, solver="deis", options={"coordinate": "log_sigma"}, nfe=6,
                       schedule="logsnr", end="sigma_min")
    alpha_end = float(p.alpha(p.t_of_sigma_bar(torch.tensor(case.sigma_min, dtype=torch.float64))))
    err = float((x / alpha_end - case.ref).pow(2).mean().sqrt() / case.ref.pow(2).mean().sqrt())
    assert loss == pytest.approx(math.log(err), abs=1e-6)


def test_short_fit_lowers_the_family_loss(monkeypatch):
    monkeypatch.setattr(SD, "_CASES", {})
    r = SD.fit(("unipc", {}, 5, True, 40))
    assert r["loss"] < r["uniform_logsnr_loss"] - 0.3
    assert len(r["log_density"]) == 13 and max(r["log_density"]) == 0.0


def test_roughness_penalty_and_family_are_disjoint_from_the_testbeds():
    assert SD.roughness([0.0, 1.0, 2.0, 3.0]) == 0.0
    assert SD.roughness([0.0, 1.0, 0.0]) == pytest.approx(4.0)
    names = [f[0] for f in SD.FAMILY]
    assert len(set(names)) == len(names) >= 16
    assert all(len(set(f[2])) == 2 and set(f[2]) <= set(SD.PROCESSES) for f in SD.FAMILY)
    assert not {seed for _, seed in SD._RANDOM} & {1, 2, 7}  # bench/solvers.py's and bench/calibrate.py's seeds


def test_tuned_defaults_use_the_tuning_winners():
    """Where the default uses the tuned schedule within the tuned budgets, its solver is the one that won the
    tuning at that budget (the density was fitted for that solver)."""
    from diffkit.solvers import default_for

    t = tuned_table()
    used = 0
    for w in t["winners"].values():
        c = default_for(w["nfe"])
        if c.schedule == "tuned":
            used += 1
            assert (c.solver, c.end, c.options) == (w["solver"], w["end"], w["options"])
    assert used >= 2


def test_focus_puts_more_levels_around_its_center():
    """tuned × focus_factor: more levels within a factor 1.8 of σ̄_c than the plain tuned grid, gain 0 changes
    nothing, and the ends stay where they were."""
    plain = get_sigmas("tuned", 10, sigma_min=0.0292, sigma_max=14.6, end="sigma_min")
    for center in (0.7, 1.0, 2.0):
        focused = get_sigmas("tuned", 10, sigma_min=0.0292, sigma_max=14.6, end="sigma_min", focus=(center, 3.0))
        near = [int(((g > center / 1.8) & (g < center * 1.8)).sum()) for g in (plain, focused)]
        assert near[1] > near[0], (center, plain, focused)
        assert float(focused[0]) == 14.6 and abs(float(focused[-1]) - 0.0292) < 1e-12
    torch.testing.assert_close(get_sigmas("tuned", 10, sigma_min=0.0292, sigma_max=14.6, focus=(1.0, 0.0)),
                               get_sigmas("tuned", 10, sigma_min=0.0292, sigma_max=14.6), rtol=1e-12, atol=0)
    f = focus_factor(DENSITY_KNOTS, 1.0, 3.0)
    assert f[DENSITY_KNOTS.index(0.0)] == 4.0 and min(f) >= 1.0


@pytest.mark.parametrize("bad", [(0.0, 3.0), (-1.0, 3.0), (1.0, -1.0), (float("nan"), 1.0), (1.0, float("inf")),
                                 1.0, (1.0,), (1.0, 2.0, 3.0), "1,3"])
def test_focus_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="focus"):
        get_sigmas("tuned", 6, sigma_min=0.01, sigma_max=10.0, focus=bad)
