"""diffkit.calibrate: solver plans (probing, JSON, sampling with a plan) and the calibration methods, checked on
Gaussian mixtures where the teacher is the exact flow map."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from helpers import F64, single_threaded  # noqa: F401

import diffkit
from diffkit import EDM, VP, Flow, SolverPlan
from diffkit.calibrate import FOCUS_CENTERS, PlanError, calibrate, methods, plan_error, solver_teacher
from diffkit.calibrate.plan import run_linear
from diffkit.calibrate.probe import linear_solvers, plan_tensors
from diffkit.testbeds import GaussianMixture

MIX = GaussianMixture.ring(n_modes=4, std=0.2)


def gaussian() -> GaussianMixture:
    """One isotropic Gaussian: its flow map is affine in the start, and a plan can represent it exactly."""
    return GaussianMixture(torch.tensor([[0.5, -0.3, 0.2]]), torch.tensor([0.4]))


def noise(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- plans of the library's solvers -----------------------------------------------------------------------------


@pytest.mark.parametrize("process", [EDM(), VP.discrete("scaled_linear"), Flow()], ids=["edm", "vp", "flow"])
@pytest.mark.parametrize("solver", [s for s in linear_solvers() if s != "pndm"] + [None])
def test_probed_plan_reproduces_the_solver(process, solver):
    """Every deterministic solver is a linear rule on its grid: the probed plan gives the solver's samples."""
    den = MIX.denoiser(process, "eps")
    z = noise(16, 2, 0)
    spec, grid, opts, calls = diffkit.solvers.plan(solver, process=process, nfe=8)
    tau, alpha, B = plan_tensors(spec.name, grid, opts, process)
    plan = SolverPlan.from_tensors(tau, alpha, B, sigma_end=float(grid[-1]))
    assert plan.nfe == calls
    expected = diffkit.sample(den, z, solver=solver, nfe=8)
    got = diffkit.sample(den, z, plan=plan)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_plan_respects_budget_and_counts_calls():
    den = MIX.denoiser(EDM(), "eps")
    calls = []
    inner = den.model
    den.model = lambda x, t, **c: (calls.append(len(x)), inner(x, t, **c))[1]
    plan = calibrate(den, 5, noises=noise(32, 2, 1), heldout=0, teacher=MIX.flow_map, method="solver")
    calls.clear()
    _, info = diffkit.sample(den, noise(8, 2, 2), plan=plan, return_info=True)
    assert len(calls) == info["nfe"] == plan.nfe == 5


def test_sample_with_plan_rejects_conflicting_arguments():
    den = MIX.denoiser(EDM(), "eps")
    plan = calibrate(den, 4, noises=noise(16, 2, 1), heldout=0, teacher=MIX.flow_map, method="solver")
    with pytest.raises(ValueError, match="do not also give solver"):
        diffkit.sample(den, noise(4, 2, 0), plan=plan, solver="euler")
    with pytest.raises(PlanError, match="nfe=4"):
        diffkit.sample(den, noise(4, 2, 0), plan=plan, nfe=6)
    with pytest.raises(TypeError, match="SolverPlan"):
        diffkit.sample(den, noise(4, 2, 0), plan={"sigmas": [1.0]})


# -- JSON ---------------------------------------------------------------------------------------------------------


def test_json_round_trip(tmp_path):
    den = MIX.denoiser(EDM(), "eps")
    plan = calibrate(den, 5, noises=noise(32, 2, 1), heldout=noise(32, 2, 2), teacher=MIX.flow_map, method="grid",
                     budget=10)
    path = plan.save(tmp_path / "plan.json")
    back = SolverPlan.load(path)
    assert back.to_dict() == json.loads(json.dumps(plan.to_dict()))
    z = noise(8, 2, 3)
    torch.testing.assert_close(diffkit.sample(den, z, plan=back), diffkit.sample(den, z, plan=plan))


@pytest.mark.parametrize("text, match", [
    ("{not json", "malformed JSON"),
    ('{"format": "something-else"}', "not a diffkit solver plan"),
    ('{"format": "diffkit-solver-plan", "version": 99}', "unsupported solver plan version"),
    ('{"format": "diffkit-solver-plan", "version": 1, "sigmas": [1.0]}', "missing alpha, coeffs"),
    ('{"format": "diffkit-solver-plan", "version": 1, "sigmas": [2.0, 1.0], "alpha": [0.5, 0.0], '
     '"coeffs": [[0.5], [1.0]]}', "row 1 must have 2 entries"),
    ('{"format": "diffkit-solver-plan", "version": 1, "sigmas": [-1.0], "alpha": [0.0], "coeffs": [[1.0]]}',
     "positive"),
    ('{"format": "diffkit-solver-plan", "version": 1, "nfe": 3, "sigmas": [1.0], "alpha": [0.0], '
     '"coeffs": [[1.0]]}', "says nfe 3"),
])
def test_malformed_plan_files(tmp_path, text, match):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(PlanError, match=match):
        SolverPlan.load(path)


def test_plan_for_another_process_or_model_warns():
    den = MIX.denoiser(EDM(), "eps")
    plan = calibrate(den, 4, noises=noise(16, 2, 1), heldout=0, teacher=MIX.flow_map, method="solver")
    other = MIX.denoiser(EDM(sigma_data=0.3), "eps")  # same range, another configuration: runs, with a warning
    with pytest.warns(UserWarning, match="fitted to process"):
        diffkit.sample(other, noise(4, 2, 0), plan=plan)
    with pytest.raises(PlanError, match="plan for another process"):  # levels outside its range
        diffkit.sample(MIX.denoiser(VP.discrete("scaled_linear"), "eps"), noise(4, 2, 0), plan=plan)
    net = torch.nn.Linear(2, 2).double()
    plan.fingerprint = "0123456789abcdef"
    wrapped = diffkit.Denoiser(net_model(net), EDM(), "eps")
    with pytest.warns(UserWarning, match="another model"):
        diffkit.sample(wrapped, noise(4, 2, 0), plan=plan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diffkit.sample(den, noise(4, 2, 0), plan=plan)  # no parameters: nothing to compare


class net_model(torch.nn.Module):  # noqa: N801 - a tiny network with weights, for the fingerprint check
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, **cond):
        return self.net(x)


# -- calibration -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", methods())
def test_calibrated_plan_never_worse_than_its_start(method):
    """On the calibration noises, every method ends at or below the starting plan's error (and records both)."""
    den = MIX.denoiser(EDM(), "eps")
    plan = calibrate(den, 5, noises=noise(48, 2, 1), heldout=noise(32, 2, 2), teacher=MIX.flow_map, method=method,
                     budget=8)
    m = plan.metrics
    assert plan.nfe == 5 and plan.method == method
    assert m["error"] <= m["start_error"] + 1e-12
    assert {"heldout_error", "heldout_start_error", "seconds", "neighbours"} <= set(m)
    assert set(m["neighbours"]) == {"4", "6"}


@pytest.mark.parametrize("method", methods())
def test_unbounded_budget_gives_the_same_plan_run_after_run(method):
    """budget=inf: each method stops at its own limit on loss evaluations, not on the clock, so the plan depends on
    the inputs alone (not on the machine's speed or load): two runs give the same plan, coefficient for
    coefficient."""
    den = MIX.denoiser(EDM(), "eps")

    def run():
        plan = calibrate(den, 5, noises=noise(48, 2, 1), heldout=0, teacher=MIX.flow_map, method=method,
                         budget=math.inf, neighbours=False)
        return {k: v for k, v in plan.to_dict().items() if k != "metrics"}, plan.metrics

    (a, ma), (b, mb) = run(), run()
    assert a == b
    assert ma["error"] == mb["error"] and ma.get("loss_evaluations") == mb.get("loss_evaluations")
    assert ma["error"] <= ma["start_error"] + 1e-12


@pytest.mark.parametrize("method, solver, schedule", [("joint", "euler", "karras"),
                                                      ("linear_subspace", "euler", "karras")])
def test_single_gaussian_calibration_reaches_near_zero_error(method, solver, schedule):
    """The flow map of one isotropic Gaussian is affine in the start; learned coefficients represent it, so
    calibration drives the error to ~0 (from a first-order start), also on held-out noises."""
    g = gaussian()
    den = g.denoiser(EDM(), "eps")
    plan = calibrate(den, 4, noises=noise(64, 3, 1), heldout=noise(64, 3, 2), teacher=g.flow_map, method=method,
                     budget=20, solver=solver, schedule=schedule, end="sigma_min")
    assert plan.metrics["start_error"] > 0.1
    assert plan.metrics["error"] < 1e-4
    assert plan.metrics["heldout_error"] < 1e-4


def test_dpm_solver_v3_statistics_on_a_gaussian():
    """For one Gaussian the EMS slope is l = s²/(s² + σ̄²) and the rescaled residual is its mean: DPM-Solver-v3
    with the measured statistics is nearly exact where the starting solver is far off."""
    g = gaussian()
    den = g.denoiser(EDM(), "eps")
    plan = calibrate(den, 4, noises=noise(64, 3, 1), heldout=0, teacher=g.flow_map, method="dpm_solver_v3",
                     solver="euler", schedule="karras", end="sigma_min")
    assert plan.metrics["error"] < 0.02 < 0.1 * plan.metrics["start_error"]


def test_default_start_is_the_best_candidate():
    """With no solver named, calibration starts from the candidate solver with the smallest calibration loss."""
    den = MIX.denoiser(EDM(), "eps")
    plan = calibrate(den, 6, noises=noise(64, 2, 1), heldout=0, teacher=MIX.flow_map, method="solver")
    cands = plan.metrics["start_candidates"]
    assert len(cands) >= 5 and f"{diffkit.solvers.default_for(6).solver}:default" in cands
    fit_only = calibrate(den, 6, noises=noise(64, 2, 1), heldout=0, teacher=MIX.flow_map, method="solver",
                         solver="deis", schedule="karras", end="sigma_min", validation=False)
    assert plan.metrics["start_error"] <= fit_only.metrics["start_error"] + 1e-12
    assert plan.solver == plan.metrics["start"]["solver"]
    assert plan.metrics["start"]["candidate"] == min(cands, key=cands.get)
    focused = [k for k in cands if "focus" in k]
    assert len(focused) == len(FOCUS_CENTERS), cands  # the focused UniPC grids were tried


def test_schedule_options_reach_the_starting_grid():
    """calibrate(schedule_options=...) starts from that grid (method 'solver' keeps the start as the plan); schedule
    options alone also turn off the search over starting candidates."""
    from diffkit.schedules import get_sigmas

    den = MIX.denoiser(EDM(), "eps")
    plan = calibrate(den, 6, noises=noise(32, 2, 1), heldout=0, teacher=MIX.flow_map, method="solver", solver="unipc",
                     schedule="tuned", schedule_options={"focus": (1.0, 3.0)}, end="sigma_min")
    grid = get_sigmas("tuned", 6, process=EDM(), end="sigma_min", focus=(1.0, 3.0))
    assert plan.sigmas == pytest.approx(grid[:-1].tolist(), rel=1e-12) and plan.sigma_end == pytest.approx(grid[-1])
    assert "start_candidates" not in plan.metrics
    with pytest.raises(TypeError, match="unexpected options"):
        calibrate(den, 6, noises=noise(8, 2, 1), heldout=0, teacher=MIX.flow_map, method="solver", solver="unipc",
                  schedule="karras", schedule_options={"focus": (1.0, 3.0)})


def test_calibration_improves_held_out_error_on_a_mixture():
    den = MIX.denoiser(EDM(), "eps")
    plan = calibrate(den, 5, noises=noise(256, 2, 1), heldout=noise(256, 2, 2), teacher=MIX.flow_map,
                     method="joint", budget=30)
    assert plan.metrics["heldout_error"] < 0.6 * plan.metrics["heldout_start_error"]


def test_solver_teacher_matches_exact_flow_map():
    den = MIX.denoiser(EDM(), "eps")
    x = EDM().noise_to_canonical(noise(32, 2, 0), 80.0)
    teacher = solver_teacher(den, nfe=150)
    ref = MIX.flow_map(x, 80.0, 0.0)
    assert float((teacher(x, 80.0, 0.0) - ref).norm() / ref.norm()) < 1e-3
    mid = MIX.flow_map(x, 80.0, 1.0)
    assert float((teacher(x, 80.0, 1.0) - mid).norm() / mid.norm()) < 1e-3


def test_plan_error_and_run_linear_agree():
    den = MIX.denoiser(EDM(), "eps")
    plan = calibrate(den, 4, noises=noise(16, 2, 1), heldout=0, teacher=MIX.flow_map, method="solver")
    x = EDM().noise_to_canonical(noise(16, 2, 5), plan.sigmas[0])
    out = run_linear(den, x, plan.sigmas, plan.alpha, plan.coeffs)
    assert plan_error(plan, den, x, out) == 0.0


# -- stratified calibration sets (select=) ---------------------------------------------------------------------------


def _start(den, nfe):
    spec, grid, opts, _ = diffkit.solvers.plan("euler", process=den.process, nfe=nfe, schedule="karras")
    return spec, [float(s) for s in grid], opts


def test_select_noises_takes_the_hardest_whole_and_weights_the_rest():
    """The hard stratum is the noises the start solver gets most wrong (against the screening reference), taken
    with weight 1; the rest is a uniform sample weighted (N - h) / (select - h): weights sum to N."""
    den = MIX.denoiser(EDM(), "eps")
    x0 = EDM().noise_to_canonical(noise(400, 2, 3), 80.0)
    idx, w = diffkit.calibrate.select_noises(den, x0, 4, 40, _start(den, 4), hard_fraction=0.25, seed=1)
    sel = x0[idx]
    assert sel.shape == (40, 2) and w.shape == (40,) and len(set(idx.tolist())) == 40
    assert int((w == 1).sum()) == 10
    torch.testing.assert_close(w[w != 1], torch.full((30,), 390 / 30, dtype=F64))
    assert abs(float(w.sum()) - 400) < 1e-9
    # the hard ones are exactly the 10 largest screening errors
    spec, grid, opts = _start(den, 4)
    out = diffkit.sample(den, x0 / 80.0, solver="euler", nfe=4, schedule="karras")
    ref = solver_teacher(den, nfe=24)(x0, grid[0], grid[-1])
    err = (out - ref).pow(2).sum(1)
    top = {tuple(r) for r in x0[err.argsort(descending=True)[:10]].tolist()}
    assert {tuple(r) for r in sel[w == 1].tolist()} == top


def test_select_noises_is_an_unbiased_estimate_of_the_population_mean():
    """Σ w_i f(x_i) / N over the stratified selection averages (over seeds) to the mean of f over all noises, and
    spreads less than a uniform sample of the same size when f is heavy-tailed (the sharp ring at NFE 5, where a
    few samples are far off): the hard stratum holds the tail."""
    mix = GaussianMixture.ring()
    den = mix.denoiser(EDM(), "eps")
    x0 = EDM().noise_to_canonical(noise(300, 2, 4), 80.0)
    spec, grid, opts = _start(den, 5)
    out = diffkit.sample(den, x0 / 80.0, solver="euler", nfe=5, schedule="karras")
    f_all = (out - mix.flow_map(x0, 80.0, grid[-1])).pow(2).sum(1)
    f = dict(zip(map(tuple, x0.tolist()), f_all.tolist()))
    est, uni = [], []
    for seed in range(60):
        idx, w = diffkit.calibrate.select_noises(den, x0, 5, 30, (spec, grid, opts), seed=seed)
        sel = x0[idx]
        est.append(sum(wi * f[tuple(r)] for wi, r in zip(w.tolist(), sel.tolist())) / 300)
        idx = torch.randperm(300, generator=torch.Generator().manual_seed(seed))[:30]
        uni.append(float(f_all[idx].mean()))
    est, uni = torch.tensor(est, dtype=F64), torch.tensor(uni, dtype=F64)
    assert abs(float(est.mean()) - float(f_all.mean())) < 3 * float(est.std()) / 60 ** 0.5
    assert float(est.std()) < 0.7 * float(uni.std())


def test_calibrate_with_selection_records_it_and_never_does_worse():
    den = MIX.denoiser(EDM(), "eps")
    plan = calibrate(den, 5, noises=noise(512, 2, 1), heldout=noise(64, 2, 2), teacher=MIX.flow_map,
                     method="joint", budget=8, select=64)
    m = plan.metrics
    assert m["calibration_noises"] == 64 and m["screened_noises"] == 512 and m["hard_noises"] == 16
    assert m["error"] <= m["start_error"] + 1e-12


def test_selection_slices_per_sample_conditioning():
    """With per-sample labels the selected noises keep their own labels: a plan calibrated on a selection of
    class-conditional starts matches the teacher run on those starts with those labels."""
    mix = GaussianMixture.ring(n_modes=4, std=0.2)
    den = mix.denoiser(EDM(), "eps")
    z = noise(128, 2, 1)
    labels = torch.arange(128) % 4
    teacher = solver_teacher(den, nfe=60)
    plan = calibrate(den, 4, noises=z, heldout=0, teacher=teacher, cond={"label": labels}, select=32,
                     method="linear_subspace", solver="euler", schedule="karras", end="sigma_min")
    idx, w = diffkit.calibrate.select_noises(den, EDM().noise_to_canonical(z, 80.0), 4, 32,
                                             _start(den, 4)[:1] + (plan.metrics["grid"], {}),
                                             cond={"label": labels})
    x0 = EDM().noise_to_canonical(z, 80.0)[idx]
    target = teacher(x0, 80.0, plan.sigma_end, label=labels[idx])
    err = plan_error(plan, den, x0, target, {"label": labels[idx]}, w)
    assert abs(err - plan.metrics["error"]) < 1e-9 and err < plan.metrics["start_error"]


def test_select_bad_input():
    den = MIX.denoiser(EDM(), "eps")
    z = noise(32, 2, 1)
    with pytest.raises(ValueError, match="more than the 32"):
        calibrate(den, 5, noises=z, heldout=0, teacher=MIX.flow_map, select=64)
    with pytest.raises(ValueError, match="select must be an integer >= 2"):
        calibrate(den, 5, noises=z, heldout=0, teacher=MIX.flow_map, select=1)
    with pytest.raises(ValueError, match="hard_fraction"):
        calibrate(den, 5, noises=z, heldout=0, teacher=MIX.flow_map, select=16, hard_fraction=1.0)


# -- memory-bounded calibration (batch_size) ---------------------------------------------------------------------


def _recording(den):
    """The denoiser with its model wrapped to record the batch size of every call."""
    sizes, inner = [], den.model
    den.model = lambda x, t, **c: (sizes.append(len(x)), inner(x, t, **c))[1]
    return sizes


def test_chunked_loss_and_gradient_equal_the_full_batch():
    """Problem.loss in chunks of 5 gives the full-batch value and gradient with respect to τ, α and B (the
    gradient reaching τ through the model's noise-level input), importance weights included."""
    from diffkit.calibrate.fitting import Problem

    den = MIX.denoiser(EDM(), "eps")
    x0 = EDM().noise_to_canonical(noise(23, 2, 4), 80.0)
    grid = diffkit.solvers.plan("dpmpp_2m", process=EDM(), nfe=5)[1]
    target = MIX.flow_map(x0, 80.0, 0.0)
    w = torch.rand(23, generator=torch.Generator().manual_seed(0), dtype=F64) + 0.5
    out = {}
    for bs in (None, 5):
        problem = Problem(den, x0, target, MIX.flow_map, "dpmpp_2m", {}, [float(s) for s in grid], EDM(),
                          weights=w, batch_size=bs)
        tau, alpha, B = (v.clone().requires_grad_(True) for v in problem.base())
        loss = problem.loss(tau, alpha, B)
        loss.backward()
        out[bs] = (loss.detach(), tau.grad, alpha.grad, B.grad)
    assert out[None][0] > 0 and out[None][1].abs().sum() > 0
    for full, chunked in zip(out[None], out[5]):
        torch.testing.assert_close(chunked, full, rtol=1e-10, atol=1e-14)


def test_batch_size_bounds_every_model_call_and_keeps_the_plan():
    """With batch_size the model never sees more samples at once, through screening, teacher, optimiser and
    held-out evaluation, and a deterministic method gives the same plan as without it."""
    plans = {}
    for bs in (None, 7):
        den = MIX.denoiser(EDM(), "eps")
        sizes = _recording(den)
        plans[bs] = calibrate(den, 5, noises=noise(96, 2, 1), heldout=noise(20, 2, 2),
                              teacher=solver_teacher(den, nfe=30), method="linear_subspace", select=32, batch_size=bs)
        assert max(sizes) == (96 if bs is None else bs)
    a, b = plans[None], plans[7]
    assert b.metrics["batch_size"] == 7 and "batch_size" not in a.metrics
    for x, y in ((a.sigmas, b.sigmas), (a.alpha, b.alpha), (sum(a.coeffs, []), sum(b.coeffs, []))):
        torch.testing.assert_close(torch.tensor(y), torch.tensor(x), rtol=1e-8, atol=1e-10)
    assert abs(a.metrics["heldout_error"] - b.metrics["heldout_error"]) < 1e-8


@pytest.mark.parametrize("method", ["joint", "dpm_solver_v3"])
def test_gradient_and_statistics_methods_respect_batch_size(method):
    den = MIX.denoiser(EDM(), "eps")
    sizes = _recording(den)
    plan = calibrate(den, 5, noises=noise(40, 2, 1), heldout=noise(16, 2, 2), teacher=MIX.flow_map, method=method,
                     budget=4, batch_size=6, solver="unipc")
    assert max(sizes) <= 6
    assert plan.metrics["error"] <= plan.metrics["start_error"] + 1e-12


def test_batch_size_slices_per_sample_conditioning():
    """Per-sample labels travel with their chunk: the chunked calibration equals the unchunked one."""
    z, labels = noise(30, 2, 1), torch.arange(30) % 4
    errs = []
    for bs in (None, 4):
        den = MIX.denoiser(EDM(), "eps")
        plan = calibrate(den, 4, noises=z, heldout=0, teacher=solver_teacher(den, nfe=40), cond={"label": labels},
                         method="linear_subspace", solver="euler", schedule="karras", end="sigma_min", batch_size=bs)
        errs.append(plan.metrics["error"])
    assert abs(errs[0] - errs[1]) < 1e-9


# -- bad input ------------------------------------------------------------------------------------------------------


def test_bad_input():
    den = MIX.denoiser(EDM(), "eps")
    z = noise(16, 2, 1)
    with pytest.raises(ValueError, match="unknown calibration method 'nope'; valid: solver, grid"):
        calibrate(den, 5, noises=z, teacher=MIX.flow_map, method="nope")
    with pytest.raises(ValueError, match="same shapes"):
        calibrate(den, 5, noises=z, heldout=0, teacher=lambda x, a, b: x[:, :1])
    with pytest.raises(ValueError, match="stochastic"):
        calibrate(den, 5, noises=z, heldout=0, teacher=MIX.flow_map, solver="euler_ancestral")
    with pytest.raises(ValueError, match="shape="):
        calibrate(den, 5, noises=16, teacher=MIX.flow_map)
    with pytest.raises(ValueError, match="held-out noises have shape"):
        calibrate(den, 5, noises=z, heldout=noise(4, 3, 0), teacher=MIX.flow_map)
    with pytest.raises(ValueError, match="budget"):
        calibrate(den, 5, noises=z, teacher=MIX.flow_map, budget=0)
    with pytest.raises(ValueError, match="heldout_cond"):
        calibrate(den, 5, noises=z, heldout=8, shape=(2,), cond={"label": torch.zeros(16, dtype=torch.long)},
                  teacher=MIX.flow_map)
    with pytest.raises(ValueError, match="process"):
        calibrate(MIX.denoise, 5, noises=z, teacher=MIX.flow_map)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            calibrate(den, 5, noises=z, teacher=MIX.flow_map, batch_size=bad)


@pytest.mark.parametrize("method", ["linear_subspace", "joint"])
def test_float32_models_calibrate(method):
    """Plans fit float32 states (features are solved in float64, states stay in the model's dtype)."""
    den = MIX.denoiser(EDM(), "eps")
    z = noise(32, 2, 1).float()
    plan = calibrate(den, 4, noises=z, heldout=0, teacher=MIX.flow_map, method=method, budget=5)
    assert plan.metrics["error"] <= plan.metrics["start_error"]
    assert diffkit.sample(den, z[:4], plan=plan).dtype == torch.float32
