"""Fit the step density of diffkit's `tuned` schedule (`diffkit.schedules.tuned`) and write its table.

A schedule is tuned for nobody's model in particular; this one is tuned for a family: 20 Gaussian mixtures in 2 to 64
dimensions with sharp components (rings, grids, random anisotropic mixtures; other instances than the testbeds of
bench/solvers.py and bench/calibrate.py), each under two of four σ̄ ranges (EDM [0.002, 80], Stable Diffusion's VP
[0.0292, 14.6], linear VP [0.0105, 152], rectified flow [0.001, 999]). For each budget and candidate solver, the
13 values θ of the log step density (`DENSITY_KNOTS`, half a decade apart) minimise

    L(θ) = mean over the family of log(relative RMS error against the exact flow map)
           + λ Σ_k (θ_{k-1} - 2 θ_k + θ_{k+1})²          (smoothness, λ = SMOOTHNESS)

by Nelder–Mead from the uniform-in-log-SNR density; the solver with the lowest loss wins the budget. Like Align Your
Steps (Sabour et al. 2024) the result is a fixed schedule, but as a density it fits any σ̄ range and budget.
What generalises to other mixtures is breadth: a fit to 8 mixtures × 192 noises learned their mode boundaries (its
8-20-call densities did worse on the testbeds than the log-SNR and Karras grids), densities fitted per σ̄ range
(fewer mixtures each) did worse at 5-6 calls; 20 mixtures × 64 noises with the smoothness penalty is the table
shipped (BENCHMARKS.md, "Candidate defaults").

    python -m diffkit.calibrate.step_density            # about 33 min on 2 cores (--jobs); writes the asset
    python -m diffkit.calibrate.step_density --quick    # NFE 5 only, small family; prints, writes nothing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

from ..processes import EDM, VP, Flow
from ..schedules import DENSITY_KNOTS
from ..solvers import plan
from ..testbeds import GaussianMixture

F64 = torch.float64
Tensor = torch.Tensor
ASSET = Path(__file__).resolve().parent.parent / "assets" / "step_density" / "step_density.json"

PROCESSES: dict[str, Callable] = {"edm": EDM, "sd_vp": lambda: VP.discrete("scaled_linear"),
                                  "linear_vp": lambda: VP.continuous("linear"), "flow": Flow}
# (name, mixture, processes it is solved under): many instances with few noises each, because a density fitted to a
# few mixtures learns their particular mode boundaries and generalises worse than one fitted to many
_RANDOM = ((8, 11), (12, 16), (16, 12), (16, 17), (20, 18), (24, 13), (24, 19), (32, 14), (32, 20), (40, 21),
           (48, 15), (48, 22), (64, 23), (64, 24))  # (dim, seed); the testbeds use seeds 1, 2 and 7
_PROCESS_CYCLE = ("edm", "sd_vp", "linear_vp", "flow")


def _family() -> tuple:
    fam = [("ring6", lambda: GaussianMixture.ring(n_modes=6, radius=1.0, std=0.1), ("edm", "sd_vp")),
           ("ring10", lambda: GaussianMixture.ring(n_modes=10, radius=1.3, std=0.05), ("linear_vp", "flow")),
           ("ring5", lambda: GaussianMixture.ring(n_modes=5, radius=0.9, std=0.12), ("sd_vp", "flow")),
           ("ring12", lambda: GaussianMixture.ring(n_modes=12, radius=1.5, std=0.04), ("edm", "linear_vp")),
           ("grid3", lambda: GaussianMixture.grid(side=3, spacing=0.8, std=0.08), ("edm", "sd_vp")),
           ("grid5", lambda: GaussianMixture.grid(side=5, spacing=0.5, std=0.05), ("flow", "linear_vp"))]
    for i, (dim, seed) in enumerate(_RANDOM):
        n = 12 if seed % 3 == 0 else 8
        procs = (_PROCESS_CYCLE[i % 4], _PROCESS_CYCLE[(i + 1 + (i // 4) % 3) % 4])
        fam.append((f"random{dim}s{seed}", lambda dim=dim, seed=seed, n=n: GaussianMixture.random(
            dim, n_components=n, seed=seed), procs))
    return tuple(fam)


FAMILY: tuple[tuple[str, Callable, tuple[str, ...]], ...] = _family()
# candidate solvers (name, options); the end of the grid per budget as in diffkit's defaults
CANDIDATES: tuple[tuple[str, dict], ...] = (("deis", {"coordinate": "log_sigma"}), ("unipc", {}), ("ipndm", {}))
NFES = (5, 6, 8, 10, 12, 15, 20)
N_NOISE, SEED = 64, 5000
SMOOTHNESS = 0.02  # λ of the roughness penalty


def end_for(nfe: int) -> str:
    return "sigma_min" if nfe <= 12 else "zero"


@dataclass
class Case:
    """One mixture under one process: starts, the exact flow map to the grid's end, the denoiser."""

    name: str
    den: Callable
    x0: Tensor
    ref: Tensor
    sigma_min: float
    sigma_max: float


def build_cases(end: str, n: int = N_NOISE, family=FAMILY) -> list[Case]:
    cases = []
    for i, (name, mix_fn, procs) in enumerate(family):
        mix = mix_fn()
        for j, pname in enumerate(procs):
            proc = PROCESSES[pname]()
            lo, hi = float(proc.sigma_bar_min), float(proc.sigma_bar_max)
            g = torch.Generator().manual_seed(SEED + 10 * i + j)
            x0 = proc.noise_to_canonical(torch.randn(n, mix.dim, generator=g, dtype=F64), hi)
            ref = mix.flow_map(x0, hi, lo if end == "sigma_min" else 0.0)
            cases.append(Case(f"{name}/{pname}", mix.denoiser(proc, "eps"), x0, ref, lo, hi))
    return cases


def density_grid(solver: str, options: dict, nfe: int, end: str, sigma_min: float, sigma_max: float,
                 log_density) -> tuple:
    """(solver spec, σ̄ grid, solver options) that `diffkit.sample` runs for this budget on the `tuned` schedule
    with the given density (`diffkit.solvers.plan`: the solver's own budget rule and the schedule's end)."""
    spec, grid, opts, _ = plan(solver, nfe=nfe, schedule="tuned", end=end, options=options,
                               schedule_options={"log_density": list(log_density)}, sigma_min=sigma_min,
                               sigma_max=sigma_max)
    return spec, grid, opts


def case_loss(case: Case, solver: str, options: dict, nfe: int, end: str, log_density) -> float:
    """log relative RMS error of the solver on the density's grid (solvers called on canonical states)."""
    spec, grid, opts = density_grid(solver, options, nfe, end, case.sigma_min, case.sigma_max, log_density)
    with torch.no_grad():
        out = spec.fn(case.den, case.x0.clone(), grid, cond={}, **opts)
    err = float((out - case.ref).pow(2).mean().sqrt() / case.ref.pow(2).mean().sqrt())
    return math.log(err) if err > 0 and math.isfinite(err) else 50.0


def roughness(theta) -> float:
    """Σ_k (θ_{k-1} - 2 θ_k + θ_{k+1})²: the penalty λ·roughness keeps the fitted log density smooth."""
    return float(np.sum(np.diff(np.asarray(theta, dtype=np.float64), 2) ** 2))


_CASES: dict = {}


def fit(task) -> dict:
    solver, options, nfe, quick, maxfev = task
    torch.set_num_threads(1)
    end = end_for(nfe)
    key = (end, quick)
    if key not in _CASES:  # per worker process: the exact references are the expensive part
        _CASES[key] = build_cases(end, n=64 if quick else N_NOISE, family=FAMILY[:3] if quick else FAMILY)
    cases = _CASES[key]
    t0 = time.time()

    def loss(theta):
        return float(np.mean([case_loss(c, solver, options, nfe, end, theta) for c in cases]))

    def objective(theta):
        return loss(theta) + SMOOTHNESS * roughness(theta)

    x0 = np.zeros(len(DENSITY_KNOTS))
    base = loss(x0)
    simplex = np.vstack([x0] + [x0 + 0.7 * e for e in np.eye(len(x0))])
    res = minimize(objective, x0, method="Nelder-Mead",
                   options={"maxfev": maxfev, "initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-4})
    theta = res.x - res.x.max()
    per_case = {c.name: case_loss(c, solver, options, nfe, end, theta) for c in cases}
    return {"solver": solver, "options": options, "nfe": nfe, "end": end, "log_density": theta.round(4).tolist(),
            "loss": float(np.mean(list(per_case.values()))), "roughness": roughness(theta),
            "uniform_logsnr_loss": base, "evals": int(res.nfev),
            "per_case_log_error": {k: round(v, 4) for k, v in per_case.items()}, "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="NFE 5, three mixtures, 64 noises; prints only")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default: %(default)s)")
    ap.add_argument("--maxfev", type=int, default=400, help="loss evaluations per fit (default: %(default)s)")
    ap.add_argument("--out", default=str(ASSET), help="table to write (default: the shipped asset)")
    args = ap.parse_args(argv)
    nfes = (5,) if args.quick else NFES
    tasks = [(s, o, n, args.quick, 60 if args.quick else args.maxfev) for n in nfes for s, o in CANDIDATES]
    t0 = time.time()
    if args.jobs > 1:
        with get_context("fork").Pool(args.jobs) as pool:
            fits = []
            for r in pool.imap_unordered(fit, tasks):
                fits.append(r)
                _report(r, t0)
    else:
        fits = []
        for t in tasks:
            fits.append(fit(t))
            _report(fits[-1], t0)
    table = {"format": "diffkit-step-density", "version": 1, "knots": list(DENSITY_KNOTS),
             "command": "python -m diffkit.calibrate.step_density", "family": [f[0] + ":" + "+".join(f[2])
                                                                                for f in FAMILY],
             "noises": N_NOISE, "smoothness": SMOOTHNESS, "maxfev": args.maxfev, "log_density": {},
             "fits": sorted(fits, key=lambda r: (r["nfe"], r["solver"]))}
    for nfe in nfes:
        best = min((r for r in fits if r["nfe"] == nfe), key=lambda r: r["loss"])
        _, grid, _ = density_grid(best["solver"], best["options"], nfe, best["end"], 0.01, 10.0, best["log_density"])
        m = int((grid > 0).sum())  # the table is keyed by the number of positive levels
        table["log_density"][str(m)] = best["log_density"]
        table.setdefault("winners", {})[str(m)] = {k: best[k] for k in ("solver", "options", "nfe", "end", "loss",
                                                                       "uniform_logsnr_loss")}
    print(json.dumps(table["winners"], indent=1))
    if args.quick:
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out} ({time.time() - t0:.0f} s)")
    return 0


def _report(r: dict, t0: float) -> None:
    print(f"[{time.time() - t0:5.0f} s] {r['solver']} nfe {r['nfe']} ({r['end']}): mean log error "
          f"{r['uniform_logsnr_loss']:.3f} (logsnr) -> {r['loss']:.3f} in {r['evals']} evaluations, "
          f"{r['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
