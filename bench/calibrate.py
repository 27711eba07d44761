#!/usr/bin/env python
"""Calibrated solver plans (`diffkit.calibrate`) against the best fixed-schedule diffkit solver and the best
diffusers / k-diffusion configuration (issue 7).

Mixtures: the three testbeds of bench/solvers.py (ring2d EDM, random16d SD-VP, random64d EDM) and two not used while
the calibration methods were developed (grid2d: `GaussianMixture.grid()` under rectified flow; random32d:
`GaussianMixture.random(32, seed=7)` under continuous linear VP). Every contender starts from the same held-out
noises (bench/solvers.py's held-out set) and is scored by `rel_err` against the exact flow map. Plans are calibrated
on 1024 noises selected from 8192 screened ones (`select=1024`) against `solver_teacher(den, nfe=300)`; the exact
flow map is only the evaluation reference. Capacity runs: joint plans on 4096 uniform noises with no effective time
limit where target 1 fails (`CAPACITY`), to separate the limits of the noises, the time and the linear rule class.
Zone runs (`ZONES`): one σ̄ zone at a time solved by a joint plan with k calls, the exact flow map elsewhere, to
show which noise levels decide the mode switches that set the error where target 1 fails.
Digits: the shipped class-conditional model; Fréchet distance and classifier accuracy of 500 samples, a plan at
NFE 6 (8) against anchors at NFE 6, 8, 10, and a paired bootstrap of target 2's FD difference (`fd_bootstrap`).
Writes bench/results/calibrate.json, bench/figures/calibrate.png and the `bench/calibrate.py` block of BENCHMARKS.md.

    python bench/calibrate.py                   # full run (about 30 min on 2 cores)
    python bench/calibrate.py --quick           # smoke run: ring2d, NFE 5, n = 200, prints only (under a minute)
    python bench/calibrate.py --render          # rebuild the report from bench/results/calibrate.json
    python bench/calibrate.py --only-capacity   # rerun the capacity runs alone (about 5 min)
    python bench/calibrate.py --only-zones      # rerun the zone runs alone (about 5 min)
    python bench/calibrate.py --fd-bootstrap    # recompute target 2's bootstrap for the saved JSON (about a minute)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import anchors as A  # noqa: E402
import solvers as S  # noqa: E402

import diffkit  # noqa: E402
from diffkit.checkpoint import atomic_write  # noqa: E402
from diffkit.demo import pyplot, save_figure  # noqa: E402
from diffkit.testbeds import GaussianMixture  # noqa: E402

F64 = torch.float64
START, END = "<!-- bench/calibrate.py:start -->", "<!-- bench/calibrate.py:end -->"

# the two mixtures not used while developing the methods: appended to bench/solvers.py's dict (in this process
# only), so `make_bed` gives them held-out noises from the same seed rule (HELDOUT_SEED + index)
NEW_BEDS = {
    "grid2d": ("2-D grid (16 modes), rectified flow, σ̄ ∈ [0.001, 999] (not used in development)",
               lambda: (GaussianMixture.grid(), diffkit.Flow())),
    "random32d": ("32-D random mixture (seed 7), continuous linear VP, σ̄ ∈ [0.0105, 152] (not used in development)",
                  lambda: (GaussianMixture.random(32, seed=7), diffkit.VP.continuous("linear"))),
}
S.TESTBEDS.update(NEW_BEDS)
KEYS = ("ring2d", "random16d", "random64d", "grid2d", "random32d")
NFES = (4, 5, 6, 8, 10, 12)
TARGET_NFES = (5, 6, 8, 10)
METHOD_KEYS = ("ring2d", "random64d")
CAL_SEED = 3000  # calibration noises: CAL_SEED + testbed index (the evaluation noises are HELDOUT_SEED + index)
N_POOL = 8192  # screened noises; the teacher labels N_CAL of them (`calibrate(select=N_CAL)`)
N_CAL = 1024
ABLATION_NFES = (6, 10)  # joint plans on N_CAL uniform noises (no selection), for comparison
# how far linear plans go: joint plans on many uniform noises with no effective time limit, where target 1 fails
CAPACITY = (("random16d", 10), ("random32d", 10))
CAPACITY_N_CAL, CAPACITY_BUDGET = 4096, 900.0
# where the mode switches are decided: each σ̄ zone alone (exact flow map elsewhere), solved by a joint plan with k calls
ZONES = ("random16d", "random32d")
ZONE_BOUNDS = (2.5, 0.6)  # inner boundaries: zones [σ̄_max, 2.5], [2.5, 0.6], [0.6, σ̄_min]
ZONE_CALLS = (1, 2, 3, 4, 5, 6)
ZONE_BUDGET = 60.0
TEACHER_NFE = 300
BUDGET = {"joint": 60.0}
DEFAULT_BUDGET = 30.0
ANCHOR_LIBS = ("diffusers", "k-diffusion")

# digits
DIGITS_N = 500
DIGITS_SEED = 4000
DIGITS_POOL = 1024
DIGITS_CAL = 256
DIGITS_TEACHER_NFE = 100
DIGITS_NFES = (6, 8, 10)
FD_RESAMPLES = 300  # paired bootstrap of the target-2 FD difference (`fd_bootstrap`)
DIGITS_PLANS = (("joint", 6, 180.0), ("linear_subspace", 6, 60.0), ("evolution", 6, 120.0),
                ("linear_subspace", 8, 60.0))
DIGITS_ANCHORS = (  # a subset of bench/anchors.py's configurations (500 UNet samples per run cost ~1 s per call)
    "diffusers:EDMDPMSolverMultistep(dpmsolver++, order 2, karras)",
    "diffusers:EDMDPMSolverMultistep(dpmsolver++, order 3, karras)",
    "diffusers:EDMDPMSolverMultistep(dpmsolver++, order 2, exponential)",
    "diffusers:EDMDPMSolverMultistep(dpmsolver++, order 3, exponential)",
    "diffusers:EDMEuler(karras)",
    "diffusers:DPMSolverMultistep(dpmsolver++, order 2, karras, VP-reparam)",
    "diffusers:DPMSolverMultistep(dpmsolver++, order 3, karras, VP-reparam)",
    "diffusers:DPMSolverMultistep(dpmsolver++, order 2, lu_lambdas, VP-reparam)",
    "diffusers:UniPCMultistep(bh2, order 2, karras, VP-reparam)",
    "diffusers:UniPCMultistep(bh2, order 3, karras, VP-reparam)",
    "diffusers:DEISMultistep(order 2, karras, VP-reparam)",
    "diffusers:DEISMultistep(order 3, karras, VP-reparam)",
    "k-diffusion:sample_dpmpp_2m(karras)",
    "k-diffusion:sample_dpmpp_2m(exponential)",
    "k-diffusion:sample_heun(karras)",
    "k-diffusion:sample_dpm_fast + final denoise",
)


def fixed_configs() -> list[dict]:
    """The fixed-schedule diffkit contenders: the default and strong configurations of bench/solvers.py."""
    out = [{"name": "default", "solver": None, "schedule": None, "end": "zero", "options": {}}]
    for solver, opts in (("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {}), ("deis", {"coordinate": "log_sigma"})):
        label = solver + ("(coordinate=log_sigma)" if opts else "")
        for schedule in ("karras", "logsnr"):
            for end in ("zero", "sigma_min"):
                out.append({"name": f"{label} / {schedule} / {end}", "solver": solver, "schedule": schedule,
                            "end": end, "options": opts, "label": label})
    out.append({"name": "dpm_solver_3 / logsnr / sigma_min", "solver": "dpm_solver_3", "schedule": "logsnr",
                "end": "sigma_min", "options": {}, "label": "dpm_solver_3"})
    return out


# ------------------------------------------------------------------------------------------------------------
# mixture tasks
# ------------------------------------------------------------------------------------------------------------


def cal_noise(key: str, n: int) -> torch.Tensor:
    dim = S.bed(key, True).mixture.dim
    seed = CAL_SEED + list(S.TESTBEDS).index(key)
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def own_err(rec: dict) -> float:
    """Error against the exact flow map at the configuration's own end level (σ̄_min-ending configurations
    against the flow map to σ̄_min, the others against σ̄ = 0)."""
    if rec.get("end_sigma", 0.0) > 0 and "err_end" in rec:
        return rec["err_end"]
    return rec.get("err", math.inf)


def _plan_task(task):
    """A calibrated plan: on N_POOL screened noises (`select`: the teacher labels N_CAL), or on uniform noises
    (N_CAL, or `n_uniform` for the capacity runs), evaluated on the held-out noises."""
    key, nfe, method, budget, select, *n_uniform = task
    n_cal = n_uniform[0] if n_uniform else G["n_cal"]
    torch.set_num_threads(1)
    b = S.bed(key, True)
    rec = {"kind": "plan" if select else "capacity" if n_uniform else "ablation", "testbed": key,
           "library": "diffkit-calibrated", "n_cal": n_cal,
           "config": f"plan:{method}" + ("" if select else f" ({n_cal} uniform noises)"),
           "method": method, "budget": nfe, "calibration_budget_s": budget, "status": "ok"}
    t0 = time.perf_counter()
    try:
        den = b.mixture.denoiser(b.process, "eps")
        teacher = diffkit.calibrate.solver_teacher(den, nfe=G["teacher_nfe"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            noises = cal_noise(key, G["n_pool"] if select else n_cal)
            plan = diffkit.calibrate(den, nfe, noises=noises, heldout=b.noise, teacher=teacher, method=method,
                                     budget=budget, select=G["n_cal"] if select else None)
        rec["load_after"] = os.getloadavg()[0]
        model = A.Counted(b.mixture.model(b.process, "eps"))
        cden = diffkit.Denoiser(model, b.process, "eps")
        out, info = diffkit.sample(cden, b.noise, plan=plan, return_info=True)
        s_end = float(plan.sigma_end)
        scale = 1.0
        if s_end > 0:
            scale = float(b.process.alpha(b.process.t_of_sigma_bar(torch.tensor(s_end, dtype=F64))))
        ref0 = S.ref_at(key, True, 0.0)
        rec.update(nfe=model.calls, end_sigma=s_end, err=S.rel_err(out, ref0),
                   metrics=plan.metrics, plan={k: v for k, v in plan.to_dict().items() if k != "metrics"})
        rec.update(S.sample_metrics(b, key, True, out / scale, ref0))  # mode switches, median per-sample error
        if s_end > 0:
            rec["err_end"] = S.rel_err(out / scale, S.ref_at(key, True, s_end))
        if model.calls != nfe:
            rec["problems"] = [f"plan made {model.calls} calls for nfe={nfe}"]
        m = plan.metrics
        rec["calibration_seconds"] = m["seconds"] + m["teacher_seconds"]
    except Exception as e:  # noqa: BLE001 - recorded and reported
        rec.update(status="error", message=f"{type(e).__name__}: {e}"[:300],
                   traceback=traceback.format_exc(limit=4)[-1000:])
    rec["seconds"] = time.perf_counter() - t0
    return [rec]


def _zone_task(task):
    """One σ̄ zone [s_lo, s_hi] of a mixture alone: the exact flow map carries the held-out noises to s_hi, a joint
    plan with k calls (fitted on N_CAL uniform noises brought to s_hi the same way, against the exact flow map)
    solves the zone, and the flow map carries its output on to σ̄_min; error and mode switches there."""
    key, zone, k = task
    torch.set_num_threads(1)
    b = S.bed(key, True)
    bounds = (b.s_max, *ZONE_BOUNDS, b.s_min)
    s_hi, s_lo = bounds[zone], bounds[zone + 1]
    rec = {"kind": "zone", "testbed": key, "zone": zone, "s_hi": s_hi, "s_lo": s_lo, "budget": k,
           "config": f"zone {zone}", "calibration_budget_s": ZONE_BUDGET, "status": "ok"}
    t0 = time.perf_counter()
    mix = b.mixture
    cal = b.process.noise_to_canonical(cal_noise(key, G["n_cal"]), b.s_max)
    x_hi, c_hi = ((mix.flow_map(x, b.s_max, s_hi) if zone else x) for x in (b.x_bar0, cal))
    den = mix.denoiser(diffkit.EDM(sigma_min=s_lo, sigma_max=s_hi), "eps")  # the zone as a process of its own
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = diffkit.calibrate(den, k, noises=c_hi / s_hi, heldout=0, teacher=mix.flow_map, method="joint",
                                 budget=ZONE_BUDGET, neighbours=False, end="sigma_min")
    with torch.no_grad():
        x = plan.run(den, x_hi)
    if s_lo > b.s_min:
        x = mix.flow_map(x, s_lo, b.s_min)
    ref = S.ref_at(key, True, b.s_min)
    rec.update(nfe=plan.nfe, err=S.rel_err(x, ref), calibration_error=plan.metrics["error"],
               switched=int((S.modes_of(mix, x) != S.modes_of(mix, ref)).sum()),
               start=plan.metrics["start"].get("candidate"), seconds=time.perf_counter() - t0)
    return [rec]


def _fixed_task(task):
    key, kind, idx, budgets = task
    recs = S._config_task((key, kind, idx, True, budgets))
    for r in recs:
        r["kind"] = kind
    return recs


# ------------------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------------------


class DigitsNet:
    """The digits denoiser dressed as a mixture for bench/anchors.py: `denoise(x̄, σ̄)` with the labels of the
    evaluation batch bound, and `model(process, prediction)` the same adapter the mixtures use (GaussianMixture.model
    only needs `denoise` and `null_cond`)."""

    null_cond = None
    model = GaussianMixture.model

    def __init__(self, den, labels):
        self.den, self.labels = den, labels

    def denoise(self, x_bar, sigma_bar, label=None):
        s = torch.as_tensor(sigma_bar, dtype=torch.float32)
        if s.ndim == 0:
            s = s.expand(x_bar.shape[0])
        with torch.no_grad():
            return self.den(x_bar.to(torch.float32), s.reshape(-1), label=self.labels).to(x_bar.dtype)


def digits_setup():
    if "digits" not in G:
        from diffkit.demo import digits_model

        den = digits_model()
        g = torch.Generator().manual_seed(DIGITS_SEED)
        noise = torch.randn(G["digits_n"], 1, 16, 16, generator=g)
        labels = torch.arange(G["digits_n"]) % 10
        G["digits"] = (den, noise, labels)
    return G["digits"]


def digits_teacher_samples() -> torch.Tensor:
    """The teacher's samples from the reported noises (computed once, in the parent before the workers fork)."""
    if "digits_teacher" not in G:
        den, noise, labels = digits_setup()
        teacher = diffkit.calibrate.solver_teacher(den, nfe=DIGITS_TEACHER_NFE)
        x_bar0 = den.process.noise_to_canonical(noise.to(F64), den.process.sigma_bar_max)
        G["digits_teacher"] = teacher(x_bar0, den.process.sigma_bar_max, 0.0, label=labels)
    return G["digits_teacher"]


def digits_scores(x, labels, teacher: torch.Tensor | None = None) -> dict:
    """FD and accuracy of samples `x`; with `teacher` (the teacher's samples from the same noises) also their
    relative RMS distance to it (`teacher_err`: how closely a contender reproduces the exact ODE solution, sample
    by sample) and the Fréchet distance between their features and the teacher's (`fd_teacher`: how closely it
    reproduces the model's own distribution, the quantity a solver controls; FD to the real digits adds the
    model's own error, which a solver's error can happen to offset)."""
    from diffkit.image_metrics import classifier_accuracy, digit_features, frechet_digits_distance
    from diffkit.metrics import feature_statistics, frechet_distance

    x = x.to(torch.float32)
    if not torch.isfinite(x).all():
        return {"fd": math.inf, "accuracy": 0.0} | ({"teacher_err": math.inf, "fd_teacher": math.inf}
                                                    if teacher is not None else {})
    out = {"fd": frechet_digits_distance(x), "accuracy": classifier_accuracy(x, labels)}
    if teacher is not None:
        out["teacher_err"] = S.rel_err(x, teacher.to(F64))
        out["fd_teacher"] = frechet_distance(feature_statistics(digit_features(x)),
                                             feature_statistics(digit_features(teacher.to(torch.float32))))
    return out


def digits_anchor_samples(name: str, nfe: int) -> tuple[torch.Tensor, str, int]:
    """(samples, library, NFE used) of the anchor configuration `name` driving the digits UNet from the reported
    noises; ValueError for configurations that end at σ̄_min (only those ending at σ̄ = 0 are listed)."""
    den, noise, labels = digits_setup()
    x_bar0 = den.process.noise_to_canonical(noise.to(F64), den.process.sigma_bar_max)
    cfg = next(c for c in A.anchors(DigitsNet(den, labels), den.process, x_bar0) if c.name == name)
    run = cfg.run(nfe)
    if run.end_sigma > 0:
        raise ValueError("ends at sigma_min")
    return run.out / run.scale, cfg.library, run.nfe


def fd_bootstrap(data, resamples: int = FD_RESAMPLES, seed: int = 0) -> dict:
    """How finely the digits FD resolves target 2: a paired bootstrap over the reported noises (the same resampled
    indices for every contender, `resamples` times) of FD(chosen plan at NFE 6) - FD(best anchor at NFE 10), and of
    FD(teacher) - FD(that anchor) as a yardstick: the teacher is what a perfectly fitted plan reproduces; and of
    the same difference for the FD to the teacher's samples (`plan_fd_teacher`, the resampled teacher features as
    the reference). The two contenders' samples are regenerated from their records (the plan from its stored
    JSON)."""
    from diffkit.image_metrics import digit_features, reference_features
    from diffkit.metrics import feature_statistics, frechet_distance

    t2 = targets(data)["2"]
    if t2.get("pass") is None:
        return {}
    den, noise, labels = digits_setup()
    plan_rec = next(r for r in data["records"] if r["kind"] == "digits" and r["config"] == t2["plan"]
                    and r["budget"] == 6 and r["status"] == "ok")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        x_plan = diffkit.sample(den, noise, plan=diffkit.SolverPlan.from_dict(plan_rec["plan"]),
                                cond={"label": labels})
        x_anchor = digits_anchor_samples(t2["anchor"], 10)[0]
    feats = {k: digit_features(x.to(torch.float32))
             for k, x in (("plan", x_plan), ("anchor", x_anchor), ("teacher", digits_teacher_samples()))}
    ref = feature_statistics(reference_features()[0])

    full = {k: frechet_distance(feature_statistics(f), ref) for k, f in feats.items()}
    g = torch.Generator().manual_seed(seed)
    diffs = {"plan": [], "teacher": [], "plan_fd_teacher": []}
    for _ in range(resamples):
        idx = torch.randint(0, len(noise), (len(noise),), generator=g)
        st = {k: feature_statistics(f[idx]) for k, f in feats.items()}
        a = frechet_distance(st["anchor"], ref)
        for k in ("plan", "teacher"):
            diffs[k].append(frechet_distance(st[k], ref) - a)
        diffs["plan_fd_teacher"].append(frechet_distance(st["plan"], st["teacher"])
                                        - frechet_distance(st["anchor"], st["teacher"]))
    out = {"resamples": resamples, "n": len(noise), "plan_config": t2["plan"], "anchor_config": t2["anchor"],
           "fd": full,
           "max_fd_mismatch": max(abs(full["plan"] - t2["plan_fd"]), abs(full["anchor"] - t2["anchor_fd"]))}
    for k, v in diffs.items():
        q = torch.tensor(v, dtype=F64).quantile(torch.tensor([0.025, 0.5, 0.975], dtype=F64)).tolist()
        out[k] = {"median": q[1], "lo": q[0], "hi": q[2], "p_below": sum(x < 0 for x in v) / len(v)}
    return out


def _digits_task(task):
    kind = task[0]
    torch.set_num_threads(1)
    den, noise, labels = digits_setup()
    recs = []
    if kind == "plan":
        _, method, nfe, budget = task
        rec = {"kind": "digits", "library": "diffkit-calibrated", "config": f"plan:{method}", "method": method,
               "budget": nfe, "calibration_budget_s": budget, "status": "ok"}
        t0 = time.perf_counter()
        try:
            g = torch.Generator().manual_seed(DIGITS_SEED + 1)
            # float64 calibration noises: linear_subspace (and joint, which calls it) fails on float32 states
            # (`torch.linalg.solve` of float32 features against the float64 starting coefficients); see the report
            cal = torch.randn(DIGITS_POOL, 1, 16, 16, generator=g, dtype=F64)
            cal_labels = torch.arange(DIGITS_POOL) % 10
            teacher = diffkit.calibrate.solver_teacher(den, nfe=DIGITS_TEACHER_NFE)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plan = diffkit.calibrate(den, nfe, noises=cal, heldout=0, teacher=teacher, method=method,
                                         budget=budget, cond={"label": cal_labels}, select=G["digits_cal"])
                with torch.no_grad():
                    x = diffkit.sample(den, noise, plan=plan, cond={"label": labels})
            rec.update(nfe=plan.nfe, metrics=plan.metrics, plan={k: v for k, v in plan.to_dict().items()
                                                                 if k != "metrics"},
                       **digits_scores(x, labels, digits_teacher_samples()))
            # FD on validation noises (neither calibration nor reported noises): how a user picks among plans
            gv = torch.Generator().manual_seed(DIGITS_SEED + 2)
            val_noise = torch.randn(len(noise), *noise.shape[1:], generator=gv)
            with torch.no_grad():
                xv = diffkit.sample(den, val_noise, plan=plan, cond={"label": labels})
            rec["val_fd"] = digits_scores(xv, labels)["fd"]
            rec["calibration_seconds"] = plan.metrics["seconds"] + plan.metrics["teacher_seconds"]
        except Exception as e:  # noqa: BLE001
            rec.update(status="error", message=f"{type(e).__name__}: {e}"[:300],
                       traceback=traceback.format_exc(limit=4)[-1000:])
        rec["seconds"] = time.perf_counter() - t0
        return [rec]
    _, name, budgets = task
    for nfe in budgets:
        rec = {"kind": "digits", "config": name, "budget": nfe, "status": "ok"}
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name == "default":
                    rec["library"] = "diffkit"
                    with torch.no_grad():
                        x, info = diffkit.sample(den, noise, nfe=nfe, cond={"label": labels}, return_info=True)
                    rec.update(nfe=info["nfe"], resolved=info.get("solver"))
                elif name == "teacher":  # the plans' target: what a perfectly fitted plan would reproduce
                    rec["library"] = "diffkit-teacher"
                    x = digits_teacher_samples()
                else:
                    x, rec["library"], rec["nfe"] = digits_anchor_samples(name, nfe)
            rec.update(digits_scores(x, labels, digits_teacher_samples()))
        except ValueError as e:
            rec.update(status="n/a", message=str(e).splitlines()[0][:200])
        except Exception as e:  # noqa: BLE001
            rec.update(status="error", message=f"{type(e).__name__}: {e}"[:300],
                       traceback=traceback.format_exc(limit=4)[-1000:])
        rec["seconds"] = time.perf_counter() - t0
        recs.append(rec)
    return recs


# ------------------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------------------

G: dict = {}


def _task(task):
    kind = task[0]
    try:
        if kind == "plan":
            return _plan_task(task[1:])
        if kind in ("diffkit", "anchor"):
            return _fixed_task(task[1:])
        if kind == "digits":
            return _digits_task(task[1:])
        if kind == "zone":
            return _zone_task(task[1:])
        raise ValueError(kind)
    except Exception as e:  # noqa: BLE001
        return [{"kind": "crash", "task": repr(task), "status": "error", "message": f"{type(e).__name__}: {e}",
                 "traceback": traceback.format_exc(limit=4)[-1000:]}]


def _ref(args):
    return S._reference_task(args)


def build_tasks(args) -> list[tuple]:
    tasks = []
    keys, nfes = args.keys, args.nfes
    # longest first (calibrations, then the digits samples, then the cheap fixed configurations)
    if args.digits:
        for method, nfe, budget in DIGITS_PLANS:
            tasks.append(("digits", "plan", method, nfe, budget * args.budget_scale))
    for key in keys:
        for nfe in nfes:
            tasks.append(("plan", key, nfe, "joint", BUDGET["joint"] * args.budget_scale, True))
    for key, nfe in args.capacity:
        tasks.insert(0, ("plan", key, nfe, "joint", CAPACITY_BUDGET, False, CAPACITY_N_CAL))
    tasks += [("zone", key, zone, k) for key in args.zones for zone in range(len(ZONE_BOUNDS) + 1)
              for k in ZONE_CALLS]
    for key in keys:
        for nfe in args.ablation_nfes:
            tasks.append(("plan", key, nfe, "joint", BUDGET["joint"] * args.budget_scale, False))
    for key in args.method_keys:
        for nfe in args.method_nfes:
            for method in diffkit.calibrate.methods():
                if method == "joint" and nfe in nfes and key in keys:
                    continue
                b = BUDGET.get(method, DEFAULT_BUDGET) * args.budget_scale
                tasks.append(("plan", key, nfe, method, b, True))
    if args.digits:
        tasks.append(("digits", "fixed", "teacher", (DIGITS_TEACHER_NFE,)))
        for name in ("default",) + DIGITS_ANCHORS:
            tasks.append(("digits", "fixed", name, DIGITS_NFES))
    for key in keys:
        for idx in range(len(S.G["diffkit"])):
            tasks.append(("diffkit", key, "diffkit", idx, nfes))
        for idx in range(len(S.anchor_configs(key, True))):
            tasks.append(("anchor", key, "anchor", idx, nfes))
    return tasks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ring2d, NFE 5, n = 200, short budgets, no files written "
                    "(under a minute)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--n", type=int, default=1000, help="held-out noises per mixture")
    ap.add_argument("--no-digits", dest="digits", action="store_false")
    ap.add_argument("--only-digits", action="store_true", help="rerun only the digits part and replace its records "
                    "in the saved JSON")
    ap.add_argument("--only-capacity", action="store_true", help="rerun only the capacity runs (joint plans on "
                    f"{CAPACITY_N_CAL} uniform noises, budget {CAPACITY_BUDGET:.0f} s; about 6 min) and replace their "
                    "records in the saved JSON")
    ap.add_argument("--only-zones", action="store_true", help="rerun only the zone runs (one σ̄ zone at a time, "
                    "about 5 min) and replace their records in the saved JSON")
    ap.add_argument("--render", action="store_true", help="rebuild the report from the saved JSON")
    ap.add_argument("--fd-bootstrap", action="store_true", help="(re)compute the digits FD bootstrap of target 2 "
                    "for the saved JSON, store it there and rebuild the report (about a minute)")
    ap.add_argument("--json", default=str(HERE / "results" / "calibrate.json"))
    args = ap.parse_args(argv)
    json_path, fig_path, md_path = Path(args.json), HERE / "figures" / "calibrate.png", ROOT / "BENCHMARKS.md"
    if args.render or args.fd_bootstrap:
        data = json.loads(json_path.read_text())
        if args.fd_bootstrap:
            G.update(digits_n=data["meta"]["digits_n"])
            data["fd_bootstrap"] = fd_bootstrap(data)
            data = save(json_path, data)
        report(data, fig_path, md_path)
        return 0
    args.keys, args.nfes, args.method_keys, args.method_nfes = KEYS, NFES, METHOD_KEYS, (6,)
    args.budget_scale, args.ablation_nfes, args.capacity, args.zones = 1.0, ABLATION_NFES, CAPACITY, ZONES
    G.update(n_cal=N_CAL, n_pool=N_POOL, teacher_nfe=TEACHER_NFE, digits_n=DIGITS_N, digits_cal=DIGITS_CAL)
    if args.only_digits:
        args.keys, args.method_keys, args.ablation_nfes, args.digits, args.capacity = (), (), (), True, ()
    if args.only_capacity or args.only_zones:
        args.keys, args.method_keys, args.ablation_nfes, args.digits = (), (), (), False
        args.capacity, args.zones = (args.capacity, ()) if args.only_capacity else ((), args.zones)
    if args.only_digits:
        args.zones = ()
    if args.quick:
        args.n, args.keys, args.nfes, args.method_keys, args.digits = 200, ("ring2d",), (5,), ("ring2d",), False
        args.method_nfes, args.budget_scale, args.ablation_nfes, args.capacity, args.zones = (5,), 0.2, (), (), ()
        G.update(n_cal=256, n_pool=1024)
    S.G.update(n=args.n, quick=False, diffkit=fixed_configs())
    torch.set_num_threads(1)
    t_start, load0 = time.time(), os.getloadavg()
    print(f"load average at start: {load0}", flush=True)

    # exact references (parent, before the pool forks: the workers inherit them)
    ref_keys = list(dict.fromkeys(list(args.keys) + [k for k, _ in args.capacity] + list(args.zones)))
    ref_tasks = [(k, True, s) for k in ref_keys for s in (0.0, S.bed(k, True).s_min)]
    pool = S._pool(args.jobs)
    for k, ref, secs in S._imap(pool, _ref, ref_tasks):
        S.G["refs"][k] = ref
        print(f"  reference {k}: {secs:.1f} s", flush=True)
    if pool is not None:
        pool.close()
        pool.join()

    if args.digits:  # the teacher's digits samples (every digits record's `teacher_err`), inherited by the workers
        t0 = time.time()
        torch.set_num_threads(max(1, args.jobs))
        with torch.no_grad():
            digits_teacher_samples()
        torch.set_num_threads(1)
        print(f"  digits teacher samples: {time.time() - t0:.1f} s", flush=True)

    tasks = build_tasks(args)
    print(f"{len(tasks)} tasks on {args.jobs} workers", flush=True)
    records, loads = [], [load0[0]]
    pool = S._pool(args.jobs)
    done = 0
    for recs in S._imap(pool, _task, tasks):
        done += 1
        records.extend(recs)
        for r in recs:
            if r["kind"] == "zone" and r["status"] == "ok":
                print(f"  [{done}/{len(tasks)} {time.time() - t_start:.0f}s] {r['testbed']} zone [{r['s_lo']:.3g}, "
                      f"{r['s_hi']:.3g}] k={r['budget']}: err {r['err']:.3g}, {r['switched']} switched "
                      f"({r['seconds']:.0f} s)", flush=True)
            elif r["kind"] in ("plan", "capacity", "digits") and "method" in r or r["status"] == "error":
                extra = (f"err {own_err(r):.3g}" if r["kind"] in ("plan", "capacity") and r["status"] == "ok" else
                         f"fd {r.get('fd', float('nan')):.3g}" if r["status"] == "ok" else r.get("message", ""))
                print(f"  [{done}/{len(tasks)} {time.time() - t_start:.0f}s] {r.get('testbed', 'digits')} "
                      f"{r['config']} nfe {r.get('budget')}: {r['status']} {extra} "
                      f"({r.get('seconds', 0):.0f} s)", flush=True)
        if done % 20 == 0:
            loads.append(os.getloadavg()[0])
    if pool is not None:
        pool.close()
        pool.join()
    wall = time.time() - t_start
    meta = {"command": "python bench/calibrate.py" + (" --quick" if args.quick else "") +
            (f" --jobs {args.jobs}" if args.jobs != 2 else ""), "quick": args.quick, "jobs": args.jobs,
            "n": args.n, "n_cal": G["n_cal"], "n_pool": G["n_pool"], "teacher_nfe": G["teacher_nfe"], "wall_s": wall,
            "load_start": list(load0), "load_end": list(os.getloadavg()),
            "load_max_sampled": max(loads), "machine": S.machine(), "revision": S.git_revision(),
            "keys": list(args.keys), "nfes": list(args.nfes), "method_keys": list(args.method_keys),
            "method_nfes": list(args.method_nfes), "titles": {k: S.TESTBEDS[k][0] for k in args.keys},
            "capacity": [list(c) for c in args.capacity], "capacity_n_cal": CAPACITY_N_CAL,
            "capacity_budget_s": CAPACITY_BUDGET, "digits": args.digits, "digits_n": DIGITS_N,
            "digits_cal": DIGITS_CAL, "digits_pool": DIGITS_POOL,
            "digits_teacher_nfe": DIGITS_TEACHER_NFE, "budgets": {"joint": BUDGET["joint"] * args.budget_scale,
                                                                 "others": DEFAULT_BUDGET * args.budget_scale}}
    for r in records:
        r.pop("traceback", None) if r["status"] != "error" else None
    data = {"meta": meta, "records": records}
    print(f"wall {wall:.0f} s", flush=True)
    for part, only in (("digits", args.only_digits), ("capacity", args.only_capacity), ("zone", args.only_zones)):
        if only:
            data = merge_part(json.loads(json_path.read_text()), part, records, meta["revision"], wall)
    if args.quick:
        print(markdown(data, None))
        return 0
    if args.digits:
        data["fd_bootstrap"] = fd_bootstrap(data)
    report(save(json_path, data), fig_path, md_path)
    return 0


def merge_part(old: dict, kind: str, records: list, revision, wall: float) -> dict:
    """A saved run with its records of `kind` replaced by a rerun of that part alone (`--only-digits`,
    `--only-capacity`, `--only-zones`); the other records and results are kept, and the meta notes the part's
    revision and time."""
    old["meta"].update({f"{kind}_revision": revision, f"{kind}_wall_s": wall})
    old["records"] = [r for r in old["records"] if r["kind"] != kind] + records
    return old


def save(json_path: Path, data: dict) -> dict:
    """Write the results JSON atomically; returns the data as stored (rounded), which the report is built from,
    so that `--render` rebuilds the same block."""
    data = S._rounded(data)
    atomic_write(json_path, (json.dumps(data, indent=1) + "\n").encode())
    return data


# ------------------------------------------------------------------------------------------------------------
# analysis and report
# ------------------------------------------------------------------------------------------------------------


def _ok(r):
    return r["status"] == "ok" and math.isfinite(r.get("err", math.inf))


def best(records, key, nfe, kinds, metric=own_err, pred=None):
    c = [r for r in records if r.get("testbed") == key and r["budget"] == nfe and r["kind"] in kinds and _ok(r)
         and (pred is None or pred(r))]
    return min(c, key=lambda r: (metric(r), r["config"])) if c else None


def summarise(records, keys, nfes, metric=own_err):
    out = {}
    for key in keys:
        rows = []
        for nfe in nfes:
            p = best(records, key, nfe, ("plan",), metric)
            d = best(records, key, nfe, ("diffkit",), metric)
            a = best(records, key, nfe, ("anchor",), metric)
            j = best(records, key, nfe, ("plan",), metric, lambda r: r["method"] == "joint")
            dflt = best(records, key, nfe, ("diffkit",), metric, lambda r: r["config"] == "default")
            rows.append({"nfe": nfe, "plan": p, "joint": j, "fixed": d, "anchor": a, "default": dflt})
        out[key] = rows
    return out


def targets(data, metric=own_err):
    recs, meta = data["records"], data["meta"]
    summ = summarise(recs, meta["keys"], meta["nfes"], metric)
    res = {}
    fails, worst = [], 0.0
    for key in meta["keys"]:
        for row in summ[key]:
            if row["nfe"] not in TARGET_NFES:
                continue
            p, a = row["plan"], row["anchor"]
            if p is None or a is None:
                fails.append(f"{key} NFE {row['nfe']}: missing")
                continue
            ratio = metric(p) / metric(a)
            worst = max(worst, ratio)
            if not ratio <= 0.33:
                fails.append(f"{key} NFE {row['nfe']}: {ratio:.2f}")
    res["1"] = {"title": "best calibrated plan ≤ 0.33 × best anchor (held-out) at NFE 5, 6, 8, 10, every mixture",
                "pass": not fails, "worst_ratio": worst, "fails": fails}
    dg = [r for r in recs if r["kind"] == "digits" and r["status"] == "ok"]
    plans6 = [r for r in dg if r["library"] == "diffkit-calibrated" and r["budget"] == 6]
    anch10 = [r for r in dg if r["library"] in ANCHOR_LIBS and r["budget"] == 10]
    if plans6 and anch10:
        by_val = all("val_fd" in r for r in plans6)
        # chosen without looking at the reported noises: by FD on validation noises, else by calibration error
        chosen = min(plans6, key=lambda r: r["val_fd"] if by_val else r["metrics"]["error"])
        by_err = min(plans6, key=lambda r: r["metrics"]["error"])
        a10 = min(anch10, key=lambda r: r["fd"])
        res["2"] = {"title": "digits: calibrated plan at NFE 6 reaches the FD of the best anchor at NFE 10",
                    "pass": chosen["fd"] <= a10["fd"], "plan": chosen["config"], "plan_fd": chosen["fd"],
                    "rule": "validation FD" if by_val else "calibration error",
                    "plan_by_error": by_err["config"], "plan_by_error_fd": by_err["fd"],
                    "anchor": a10["config"], "anchor_fd": a10["fd"],
                    "plan_teacher_err": chosen.get("teacher_err"), "anchor_teacher_err": a10.get("teacher_err"),
                    "plan_fd_teacher": chosen.get("fd_teacher"), "anchor_fd_teacher": a10.get("fd_teacher"),
                    "best_plan_fd_any": min(r["fd"] for r in plans6)}
    else:
        res["2"] = {"title": "digits: calibrated plan at NFE 6 reaches the FD of the best anchor at NFE 10",
                    "pass": None}
    cal = [r for r in recs if r["kind"] == "plan" and r["status"] == "ok"]
    if cal:
        slow = max(cal, key=lambda r: r["calibration_seconds"])
        res["3"] = {"title": "calibration of a testbed plan under 2 minutes on 2 CPU cores",
                    "pass": slow["calibration_seconds"] < 120, "max_s": slow["calibration_seconds"],
                    "max_of": f"{slow['testbed']} {slow['config']} NFE {slow['budget']}",
                    "max_joint_s": max((r["calibration_seconds"] for r in cal if r["method"] == "joint"), default=None)}
    return res


def _e(r, metric=own_err):
    return "—" if r is None else f"{metric(r):.2e}"


def _name(r):
    if r is None:
        return "—"
    n = r["config"].replace("diffusers:", "").replace("k-diffusion:", "kd:")
    if r.get("end_sigma", 0) > 0 and "plan" not in n:
        n += " (σ̄_min end)"
    return n


def _verdict(p):
    return "n/a" if p is None else ("PASS" if p else "FAIL")


def _switched(r) -> str:
    """How many held-out samples a contender sent to another mixture component than the exact flow map did."""
    return "—" if r is None or r.get("switched") is None else str(r["switched"])


def markdown(data, fig_rel) -> str:
    meta, recs = data["meta"], data["records"]
    keys, nfes = meta["keys"], meta["nfes"]
    lines = []
    w = lines.append
    summ = summarise(recs, keys, nfes)
    summ0 = summarise(recs, keys, nfes, metric=lambda r: r.get("err", math.inf))
    tg, tg0 = targets(data), targets(data, metric=lambda r: r.get("err", math.inf))
    w("## Calibrated solver plans vs fixed solvers and anchors (`bench/calibrate.py`)")
    w("")
    w("Reproduce: `.venv/bin/python bench/calibrate.py` "
      "(`--quick`: ring2d, NFE 5, under a minute, prints only; `--jobs N` worker processes, default 2; `--render` "
      "rebuilds this block from `bench/results/calibrate.json`; `--only-digits` reruns the digits section alone, "
      "`--only-capacity` the capacity runs, `--only-zones` the zone runs; `--fd-bootstrap` recomputes the "
      "resolution of target 2 for the saved JSON).  ")
    m = meta["machine"]
    rev, dirty = meta["revision"]
    w(f"Run: {m['cpu']}, {m['cores']} cores shared with other jobs, {meta['jobs']} worker processes, one thread "
      f"each; load average {meta['load_start'][0]:.1f} at start, {meta['load_end'][0]:.1f} at the end, up to "
      f"{meta['load_max_sampled']:.1f} sampled; wall time {meta['wall_s'] / 60:.1f} min. torch {m['torch']}, "
      f"diffusers {m['diffusers']}, k-diffusion {m['k_diffusion']}, commit {rev}"
      + (f" (src files modified in the working tree: {', '.join(dirty)})" if dirty else "") + "."
      + (f" The digits section was rerun alone (`--only-digits`, {meta['digits_wall_s'] / 60:.1f} min) with the "
         f"library (src/) at commit {meta['digits_revision'][0]}." if "digits_revision" in meta else "")
      + (f" The capacity runs were rerun alone (`--only-capacity`, {meta['capacity_wall_s'] / 60:.1f} min) with the "
         f"library (src/) at commit {meta['capacity_revision'][0]}." if "capacity_revision" in meta else "")
      + (f" The zone runs were run alone (`--only-zones`, {meta['zone_wall_s'] / 60:.1f} min) with the library "
         f"(src/) at commit {meta['zone_revision'][0]}." if "zone_revision" in meta else ""))
    w("")
    w("Set-up: every contender starts from the same held-out noises (bench/solvers.py's held-out set, "
      f"N = {meta['n']} per mixture) and calls the exact mixture network; error = RMS distance to the exact flow "
      "map divided by the RMS of the reference, **at the configuration's own end level** (σ̄ = 0, or σ̄_min for "
      "configurations that stop there, e.g. diffkit's default and the plans calibrated from it at NFE ≤ 12, and "
      "k-diffusion's DPM-Solver-fast); the σ̄ = 0 error of every contender is in the JSON and in the second "
      f"verdict line below. Plans: `diffkit.calibrate(den, nfe, noises=<{meta.get('n_pool', meta['n_cal'])} "
      f"standard-normal noises, seed {CAL_SEED}+index>, select={meta['n_cal']}, heldout=<the evaluation noises>, "
      f"teacher=solver_teacher(den, nfe={meta['teacher_nfe']}), method=..., budget=...)` (the teacher labels "
      f"{meta['n_cal']} of the screened noises: the quarter the starting solver gets most wrong and an "
      "importance-weighted uniform sample of the rest, see `diffkit.calibrate.select_noises`) with budget "
      f"{meta['budgets']['joint']:.0f} s for `joint`, "
      f"{meta['budgets']['others']:.0f} s for the other methods; each starts from the best of diffkit's "
      "starting candidates for that NFE (`plan.metrics['start']`). "
      "The exact flow map is only the evaluation reference. Best fixed diffkit: the lowest error over the default "
      f"and {len(fixed_configs()) - 1} configurations (dpmpp_2m, dpmpp_3m, unipc, deis(log σ) × karras / logsnr × "
      "end zero / sigma_min, and dpm_solver_3 / logsnr / sigma_min). Best anchor: the lowest error over all of "
      "bench/anchors.py's diffusers and k-diffusion configurations for that process (VP-reparam included). "
      "\"Best\" is selected on the evaluation noises for the fixed configurations and anchors (an optimistic "
      "choice for them); the plan is the best calibrated method at that NFE (joint for NFE ≠ 6). Mode switches: "
      f"of the {meta['n']} held-out samples, those that end in another mixture component than the exact flow map "
      "sends them to; a single one costs a relative RMS error of a few hundredths, so where the counts are small "
      "they decide the ratios.")
    w("")
    if tg:
        w("### Targets")
        w("")
        t1 = tg["1"]
        w(f"1. {t1['title']}: **{_verdict(t1['pass'])}** — worst plan / anchor ratio {t1['worst_ratio']:.3f}"
          + (f"; failing: {', '.join(t1['fails'])}" if t1["fails"] else "") + ". Against σ̄ = 0 for every "
          f"contender: {_verdict(tg0['1']['pass'])}, worst ratio {tg0['1']['worst_ratio']:.3f}"
          + (f" (failing: {', '.join(tg0['1']['fails'])})" if tg0["1"]["fails"] else "") + ".")
        t2 = tg["2"]
        if t2.get("pass") is not None:
            rule = t2.get("rule", "calibration error")
            how = ("the NFE-6 plan with the lowest FD on 500 validation noises, not the reported ones"
                   if rule == "validation FD" else "the digits plan with the lowest calibration error")
            w(f"2. {t2['title']}: **{_verdict(t2['pass'])}** — {t2['plan']} at NFE 6 ({how}) FD "
              f"{t2['plan_fd']:.3f} vs best anchor at NFE 10 ({_name({'config': t2['anchor']})}) "
              f"FD {t2['anchor_fd']:.3f}; best NFE-6 plan FD of any method {t2['best_plan_fd_any']:.3f}"
              + (f"; the plan with the lowest calibration error ({t2['plan_by_error']}) FD "
                 f"{t2['plan_by_error_fd']:.3f}" if "plan_by_error" in t2 else "")
              + (f". Distance to the teacher's samples: the plan {t2['plan_teacher_err']:.4f}, the anchor "
                 f"{t2['anchor_teacher_err']:.4f}" if t2.get("plan_teacher_err") is not None
                 and t2.get("anchor_teacher_err") is not None else "")
              + (f"; FD to the teacher's samples (the model's own distribution): the plan "
                 f"{t2['plan_fd_teacher']:.3f}, the anchor {t2['anchor_fd_teacher']:.3f}"
                 if t2.get("plan_fd_teacher") is not None and t2.get("anchor_fd_teacher") is not None else "")
              + ".")
            bs = data.get("fd_bootstrap")
            if bs:
                pl, te = bs["plan"], bs["teacher"]
                w(f"   How finely {bs['n']} samples resolve this (`fd_bootstrap`: {bs['resamples']} paired bootstrap "
                  f"resamples of the reported noises, the same indices for both sides): FD(plan) − FD(anchor) median "
                  f"{pl['median']:+.3f}, 95 % interval [{pl['lo']:+.3f}, {pl['hi']:+.3f}], below 0 in "
                  f"{pl['p_below']:.0%} of resamples; the teacher itself against the same anchor "
                  f"{te['median']:+.3f} [{te['lo']:+.3f}, {te['hi']:+.3f}], below 0 in {te['p_below']:.0%}"
                  + (f"; FD to the teacher's samples, plan − anchor {bs['plan_fd_teacher']['median']:+.3f} "
                     f"[{bs['plan_fd_teacher']['lo']:+.3f}, {bs['plan_fd_teacher']['hi']:+.3f}], below 0 in "
                     f"{bs['plan_fd_teacher']['p_below']:.0%}" if "plan_fd_teacher" in bs else "")
                  + ". The "
                  "verdict above is the literal comparison of the two point estimates (the regenerated samples "
                  "reproduce the recorded FDs " + (f"to {bs['max_fd_mismatch']:.0e})." if bs["max_fd_mismatch"]
                                                   else "exactly)."))
        else:
            w(f"2. {t2['title']}: not run.")
        t3 = tg.get("3")
        if t3:
            w(f"3. {t3['title']}: **{_verdict(t3['pass'])}** — slowest {t3['max_s']:.0f} s ({t3['max_of']}; "
              f"slowest joint {t3['max_joint_s']:.0f} s), teacher + optimiser "
              f"(`metrics['teacher_seconds'] + metrics['seconds']`; the teacher time includes the teacher on the "
              f"{meta['n']} held-out noises, which only measure), on a machine with load "
              f"{meta['load_start'][0]:.1f}–{meta['load_max_sampled']:.1f} on 2 cores.")
        w("")
    if fig_rel:
        w(f"![error vs NFE per mixture]({fig_rel})")
        w("")
    for key in keys:
        w(f"### {key}: {meta['titles'][key]}")
        w("")
        w("| NFE | best plan | error | best fixed diffkit | error | diffkit default | best anchor | error "
          "| plan / anchor | plan / anchor at σ̄ = 0 | mode switches (plan / anchor) |")
        w("|---:|---|---:|---|---:|---:|---|---:|---:|---:|---:|")
        for row, row0 in zip(summ[key], summ0[key]):
            p, d, a, df = row["plan"], row["fixed"], row["anchor"], row["default"]
            ratio = f"{own_err(p) / own_err(a):.3f}" if p and a else "—"
            p0, a0 = row0["plan"], row0["anchor"]
            ratio0 = f"{p0['err'] / a0['err']:.3f}" if p0 and a0 else "—"
            w(f"| {row['nfe']} | {_name(p)} | {_e(p)} | {_name(d)} | {_e(d)} | {_e(df)} | {_name(a)} | {_e(a)} | "
              f"{ratio} | {ratio0} | {_switched(p)} / {_switched(a)} |")
        w("")
    ablation = [r for r in recs if r["kind"] == "ablation" and _ok(r)]
    if ablation:
        w("### Stratified calibration noises against uniform ones (joint plans)")
        w("")
        w(f"The same joint calibration (same budget, teacher and held-out noises) on {meta['n_cal']} uniform noises "
          f"(no `select`) and on {meta['n_cal']} selected from {meta.get('n_pool')} screened noises (the plans "
          "above). The relative RMS error of a few-step sampler is dominated by the rare noises it sends to another "
          "mode; the selection puts a quarter of the teacher's labels on them.")
        w("")
        w("| mixture | NFE | selected: held-out error | uniform: held-out error | selected / uniform | "
          "calibration s (selected / uniform) |")
        w("|---|---:|---:|---:|---:|---:|")
        ratios = []
        for key in keys:
            for r in sorted((r for r in ablation if r["testbed"] == key), key=lambda r: r["budget"]):
                m = best(recs, key, r["budget"], ("plan",), pred=lambda q: q["method"] == "joint")
                if m is None:
                    continue
                ratios.append(own_err(m) / own_err(r))
                w(f"| {key} | {r['budget']} | {_e(m)} | {_e(r)} | {ratios[-1]:.2f} | "
                  f"{m['calibration_seconds']:.0f} / {r['calibration_seconds']:.0f} |")
        w("")
        if ratios:
            w(f"The selected noises gave the lower held-out error in {sum(x < 1 for x in ratios)} of {len(ratios)} "
              f"cells (selected / uniform {min(ratios):.2f} to {max(ratios):.2f}); a possible reason, not tested: "
              "once the plan moves away from the starting solver, the noises that solver got most wrong are no longer "
              "its hard ones.")
            w("")
    capacity = [r for r in recs if r["kind"] == "capacity" and _ok(r)]
    if capacity:
        w(markdown_capacity(recs, capacity, meta["n_cal"]))
    zones = [r for r in recs if r["kind"] == "zone" and _ok(r)]
    if zones:
        w(markdown_zones(recs, zones, meta["n_cal"]))
    # methods
    mkeys = meta["method_keys"]
    for nfe in meta["method_nfes"]:
        w(f"### Calibration methods at NFE {nfe}")
        w("")
        w("Held-out error (own end level) of each method's plan, its error on the calibration noises and the "
          "starting solver's, calibration time (teacher + optimiser) and whether it fell back to the start.")
        w("")
        w("| method | " + " | ".join(f"{k} held-out | {k} calibration | {k} s" for k in mkeys) + " |")
        w("|---|" + "---:|---:|---:|" * len(mkeys))
        for method in diffkit.calibrate.methods():
            cells = []
            for k in mkeys:
                r = best(recs, k, nfe, ("plan",), pred=lambda r, m=method: r["method"] == m)
                if r is None:
                    cells += ["—"] * 3
                    continue
                mt = r["metrics"]
                fb = " (start)" if mt.get("fell_back_to_start") and method != "solver" else ""
                cells += [f"{own_err(r):.2e}{fb}", f"{mt['error']:.2e}", f"{r['calibration_seconds']:.0f}"]
            w(f"| {method} | " + " | ".join(cells) + " |")
        w("")
        refs = []
        for k in mkeys:
            a, d = best(recs, k, nfe, ("anchor",)), best(recs, k, nfe, ("diffkit",))
            refs.append(f"{k}: best anchor {_e(a)} ({_name(a)}), best fixed diffkit {_e(d)} ({_name(d)})")
        w("For comparison — " + "; ".join(refs) + ".")
        w("")
    # generalisation and neighbours
    w("### Generalisation, neighbouring budgets and calibration time (joint plans)")
    w("")
    w("`metrics` of each joint plan: relative error against the teacher on the calibration noises (start → plan) "
      "and on the held-out noises (start → plan); held-out / calibration ratio of the plan; the starting solver at "
      "NFE − 1 and NFE + 1 on the plan's grid resampled (`neighbours`, held-out); seconds = teacher + optimiser.")
    w("")
    w("| mixture | NFE | calibration start → plan | held-out start → plan | held-out / calibration | "
      "neighbours (NFE: held-out error) | teacher s | optimiser s | total s |")
    w("|---|---:|---|---|---:|---|---:|---:|---:|")
    for key in keys:
        for nfe in nfes:
            r = best(recs, key, nfe, ("plan",), pred=lambda r: r["method"] == "joint")
            if r is None:
                continue
            mt = r["metrics"]
            nb = ", ".join(f"{k}: {v:.2e}" if isinstance(v, float) else f"{k}: {v}"
                           for k, v in mt.get("neighbours", {}).items())
            w(f"| {key} | {nfe} | {mt['start_error']:.2e} → {mt['error']:.2e} | {mt['heldout_start_error']:.2e} → "
              f"{mt['heldout_error']:.2e} | {mt['heldout_error'] / mt['error']:.2f} | {nb} | "
              f"{mt['teacher_seconds']:.1f} | {mt['seconds']:.1f} | {r['calibration_seconds']:.1f} |")
    w("")
    notes = []
    for key in keys:
        for row in summ[key]:
            j, d = row["joint"], row["fixed"]
            if j and d and own_err(j) > own_err(d):
                notes.append(f"{key} NFE {row['nfe']}: joint plan {own_err(j):.2e} is worse than the best fixed "
                             f"diffkit configuration ({_name(d)}, {own_err(d):.2e}); it starts from the default "
                             f"(held-out {j['metrics']['heldout_start_error']:.2e} against the teacher) and its "
                             f"optimiser used {j['metrics']['seconds']:.0f} s of {j['calibration_budget_s']:.0f} s")
            if j and j["metrics"]["seconds"] < 0.5 * j["calibration_budget_s"] and not j["metrics"].get(
                    "fell_back_to_start"):
                lv = ", ".join(f"{s:.3g}" for s in j["plan"]["sigmas"])
                notes.append(f"{key} NFE {row['nfe']}: the joint optimiser stopped after "
                             f"{j['metrics']['seconds']:.0f} s of {j['calibration_budget_s']:.0f} s (its evaluation "
                             f"cap or convergence, not the budget); call levels {lv}")
    if notes:
        w("Notes (computed from the records):")
        w("")
        for n in notes:
            w(f"- {n}")
        w("")
    # digits
    dg = [r for r in recs if r["kind"] == "digits"]
    if dg:
        w("### Digits model (class-conditional, labels cycling 0..9)")
        w("")
        w(f"{meta['digits_n']} samples from the same noises for every contender; FD = Fréchet distance in the digits "
          "classifier's feature space to the real held-out digits (`frechet_digits_distance`), accuracy = the "
          "classifier's agreement with the label, err = relative RMS distance to the teacher's samples from the "
          "same noises (how closely a contender reproduces the exact ODE solution, sample by sample), FDt = Fréchet "
          "distance in the same feature space to the teacher's samples from the same noises (how closely it "
          "reproduces the model's own distribution; FD to the real digits adds the model's own error, which a "
          "solver's error can happen to offset). Plans: "
          "calibrated on "
          f"{meta['digits_cal']} noises selected (`select`) from {meta.get('digits_pool', meta['digits_cal'])} "
          "other noises (labels cycling) against `solver_teacher(den, nfe="
          f"{meta['digits_teacher_nfe']})`. Anchors: {len(DIGITS_ANCHORS)} of bench/anchors.py's configurations "
          "driving the same UNet (diffusers EDM schedulers, diffusers VP schedulers through the VP-reparam table, "
          "k-diffusion with the canonical denoiser). The digits plans are calibrated from float64 noises (the "
          "model runs in float32 inside; plans fitted from float32 noises work too).")
        w("")
        teach = [r for r in dg if r["config"] == "teacher"]
        dg = [r for r in dg if r["config"] != "teacher"]
        budgets = sorted({r["budget"] for r in dg})
        w("| contender | " + " | ".join(f"FD @ {b} | acc @ {b} | err @ {b} | FDt @ {b}" for b in budgets)
          + " | calibration s |")
        w("|---|" + "---:|---:|---:|---:|" * len(budgets) + "---:|")
        names = []
        for r in dg:
            if r["config"] not in names:
                names.append(r["config"])
        for name in names:
            cells = []
            cs = ""
            for b in budgets:
                r = next((r for r in dg if r["config"] == name and r["budget"] == b), None)
                if r is None or r["status"] != "ok":
                    cells += ["—" if r is None else r["status"], "", "", ""]
                else:
                    cells += [f"{r['fd']:.3f}", f"{r['accuracy']:.3f}",
                              f"{r['teacher_err']:.4f}" if "teacher_err" in r else "—",
                              f"{r['fd_teacher']:.3f}" if "fd_teacher" in r else "—"]
                    if "calibration_seconds" in r:
                        cs = (cs + ", " if cs else "") + f"{r['calibration_seconds']:.0f}"
            label = _name({"config": name})
            if name == "default":
                label = "diffkit default"
            w(f"| {label} | " + " | ".join(cells) + f" | {cs} |")
        w("")
        for b in budgets:
            an = [r for r in dg if r["status"] == "ok" and r["library"] in ANCHOR_LIBS and r["budget"] == b]
            if an:
                a = min(an, key=lambda r: r["fd"])
                w(f"- best anchor at NFE {b}: {_name(a)}, FD {a['fd']:.3f}")
        vals = [r for r in dg if r["status"] == "ok" and "val_fd" in r]
        if vals:
            w("- FD of each plan on 500 validation noises (other than the reported ones; used to choose the plan for "
              "target 2): " + ", ".join(f"{r['config']} @ {r['budget']}: {r['val_fd']:.3f}" for r in vals))
        for r in teach:
            w(f"- the plans' teacher itself (`solver_teacher(den, nfe={r['budget']})`, the samples a perfectly "
              f"fitted plan would reproduce): FD {r['fd']:.3f}, accuracy {r['accuracy']:.3f}")
        w("")
    errs = [r for r in recs if r["status"] == "error"]
    if errs:
        w("### Errors")
        w("")
        for r in errs[:20]:
            w(f"- {r.get('testbed', 'digits')} {r.get('config', r.get('task'))} NFE {r.get('budget')}: "
              f"{r.get('message')}")
        w("")
    return "\n".join(lines) + "\n"


def markdown_capacity(recs, capacity, n_cal: int) -> str:
    """The capacity table: joint plans fitted on many uniform noises with no effective time limit, against the
    benchmark's own plan, the best anchor and what target 1 asks."""
    L = ["### How far linear plans go (joint plans on many noises, no effective time limit)", "",
         "Every plan is a linear rule in the model outputs (README, \"Calibrated solver plans\"), and the rule "
         "class is complete: each network input and the output can be any linear combination of the start and the "
         "earlier outputs. Where target 1 fails, the joint plan was refitted on "
         f"{capacity[0]['n_cal']} uniform noises ({capacity[0]['n_cal'] / n_cal:g}× the plans above) with a budget of "
         f"{capacity[0]['calibration_budget_s']:.0f} s (the optimiser stops at its evaluation cap first), to tell "
         "whether the noises, the time limit or the rule class limits the held-out error.", "",
         "| mixture | NFE | noises | start (`metrics['start']`) | calibration error | held-out error | plan above "
         "(held-out) | best anchor | 0.33 × anchor (target 1) | mode switches (this plan / anchor) | optimiser s |",
         "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    above = 0
    for r in sorted(capacity, key=lambda r: (r["testbed"], r["budget"])):
        key, nfe = r["testbed"], r["budget"]
        m = best(recs, key, nfe, ("plan",))
        a = best(recs, key, nfe, ("anchor",))
        above += bool(a) and r["metrics"]["error"] > 0.33 * own_err(a)
        start = r["metrics"]["start"]
        L.append(f"| {key} | {nfe} | {r['n_cal']} | `{start.get('candidate', start['solver'])}` | "
                 f"{r['metrics']['error']:.2e} | {_e(r)} | {_e(m)} | {_e(a)} | "
                 + (f"{0.33 * own_err(a):.2e}" if a else "—") + f" | {_switched(r)} / {_switched(a)} | "
                 f"{r['metrics']['seconds']:.0f} |")
    L += ["", f"In {above} of {len(capacity)} rows the refitted plan stays above 0.33 × the anchor's error even "
          "on the noises it was fitted to (calibration error, against the teacher, above the target column): from "
          "the start it is given, neither more noises nor more time reach target 1. The optimiser is local (L-BFGS "
          "from the best starting candidate) and keeps roughly the allocation of calls to σ̄ ranges that it starts "
          "from: the start decides much of the result (the focused UniPC grids among the candidates, README "
          "\"Calibrated solver plans\"), so this does not show that no linear rule reaches the target; a search over "
          "allocations of calls, or a per-sample rule, would be the next thing to try.", ""]
    return "\n".join(L)


def markdown_zones(recs, zones, n_cal: int) -> str:
    """The zone table: held-out error and mode switches when only one σ̄ zone is solved (by a k-call joint plan) and
    the exact flow map does the rest; per zone the fewest calls that leave no sample in another mode and the fewest
    that keep the error within target 1 at its largest budget, and their sum against that budget."""
    calls, top = sorted({r["budget"] for r in zones}), max(TARGET_NFES)
    L = ["### Where the mode switches are decided (one σ̄ zone at a time)", "",
         "Where target 1 fails, the error is set by the few held-out samples that a plan sends to another mode. To "
         "see which noise levels decide that, the path is cut into three σ̄ zones; for each, the exact flow map "
         "carries the held-out noises to the top of the zone and on from its bottom, and only the zone itself is "
         f"solved, by a joint plan with k calls (fitted on {n_cal} uniform noises brought to the zone's top the same "
         f"way, against the exact flow map, budget {zones[0]['calibration_budget_s']:.0f} s). Cells: relative "
         "error at σ̄_min (mode switches of the 1000 held-out samples). Target: 0.33 × the best anchor's error at "
         f"NFE {top}, which a whole plan of {top} calls must meet (target 1).", "",
         "| mixture | zone (σ̄) | " + " | ".join(f"k = {k}" for k in calls)
         + " | fewest calls with no switch | fewest calls within the target |",
         "|---|---|" + "---:|" * len(calls) + "---:|---:|"]
    within = {}  # mixture -> (target, fewest calls within it per zone; None: more than max(calls))
    for key in dict.fromkeys(r["testbed"] for r in zones):
        a = best(recs, key, top, ("anchor",))
        target = 0.33 * own_err(a) if a else None
        for zone in sorted({r["zone"] for r in zones if r["testbed"] == key}):
            row = {r["budget"]: r for r in zones if r["testbed"] == key and r["zone"] == zone}
            any_row = next(iter(row.values()))
            fewest = [min((k for k in calls if k in row and ok(row[k])), default=None)
                      for ok in (lambda r: r["switched"] == 0, lambda r: target is not None and r["err"] <= target)]
            within.setdefault(key, (target, []))[1].append(fewest[1])
            L.append(f"| {key} | [{any_row['s_lo']:.3g}, {any_row['s_hi']:.3g}] | "
                     + " | ".join(f"{row[k]['err']:.2e} ({row[k]['switched']})" if k in row else "—" for k in calls)
                     + " | " + " | ".join(str(f) if f is not None else f"> {max(calls)}" for f in fewest) + " |")
    L.append("")
    for key, (target, fewest) in within.items():
        if target is None:
            continue
        total, more = sum(max(calls) + 1 if f is None else f for f in fewest), None in fewest
        L.append(f"- {key} (target {target:.2e}): each zone within the target on its own, from exact states at its "
                 f"top, takes {'at least ' if more else ''}{total} calls together"
                 + (f", more than the {top} a plan has." if total > top else f", within the {top} a plan has."))
    L += ["", "A plan over the whole path pays for all three zones from one budget and carries each zone's error into "
          "the next, which these runs do not; it can also share calls across the zone boundaries, so the counts are "
          "an estimate of what the target asks of a linear plan, not a bound.", ""]
    return "\n".join(L)


def plot(data, path: Path):
    plt = pyplot()

    meta, recs = data["meta"], data["records"]
    keys = meta["keys"]
    summ = summarise(recs, keys, meta["nfes"])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for field, style, label in (("joint", "o-", "calibrated plan (joint)"), ("fixed", "s--", "best fixed diffkit"),
                                    ("default", "x:", "diffkit default"), ("anchor", "^-.", "best anchor")):
            pts = [(row["nfe"], own_err(row[field])) for row in summ[key] if row[field] is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        mpts = [(r["budget"], own_err(r)) for r in recs if r["kind"] == "plan" and r.get("testbed") == key and _ok(r)
                and r["method"] != "joint"]
        if mpts:
            ax.plot(*zip(*mpts), ".", color="0.5", label="other methods")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(meta["nfes"])
        ax.set_xticklabels([str(n) for n in meta["nfes"]])
        ax.minorticks_off()
        ax.set_title(key)
        ax.set_xlabel("NFE")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("relative RMS error (held-out)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def write_markdown(path: Path, section: str):
    """Replace this script's block of BENCHMARKS.md (appended when missing), atomically."""
    from diffkit.benchmark import write_block

    write_block(path, section, "bench/calibrate.py")


def report(data, fig_path: Path, md_path: Path):
    plot(data, fig_path)
    section = markdown(data, fig_path.relative_to(ROOT).as_posix())
    write_markdown(md_path, section)
    print(section)


if __name__ == "__main__":
    sys.exit(main())
