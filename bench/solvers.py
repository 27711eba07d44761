#!/usr/bin/env python
"""Deterministic solvers of diffkit against diffusers and k-diffusion on exact Gaussian-mixture testbeds.

For each testbed the probability-flow ODE is solved from the same canonical start x̄_0 = noise_to_canonical(noise,
σ̄_max) by every diffkit solver × schedule × end (and option variants) and by the anchors of bench/anchors.py, all
calling the same exact mixture network (float64); the error is the RMS distance to the exact flow map
x̄(σ̄_max -> 0) divided by the RMS of the reference samples, at fixed budgets of model calls (NFE), counted by a
wrapper around the model for every library. A second part times the per-step overhead of the sampling loops
with a near-free model. Results go to bench/results/solvers.json, bench/figures/solvers_error_vs_nfe.png and
the `bench/solvers.py` section of BENCHMARKS.md.

    python bench/solvers.py            # full run (N = 1000 samples per testbed)
    python bench/solvers.py --quick    # smoke run: N = 200, NFE 5/10/20, fewer configurations, no BENCHMARKS.md
    python bench/solvers.py --overhead-only --device cuda   # overhead on a GPU: bench/results/overhead_cuda.json
    python bench/solvers.py --from-json bench/results/solvers.json   # re-render BENCHMARKS.md (adds the GPU table)
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import multiprocessing as mp
import os
import platform
import random
import resource
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import anchors as A  # noqa: E402

import diffkit  # noqa: E402
from diffkit.checkpoint import atomic_write  # noqa: E402
from diffkit.demo import pyplot, save_figure  # noqa: E402
from diffkit.solvers import default_for, get_solver  # noqa: E402
from diffkit.testbeds import GaussianMixture  # noqa: E402

F64 = torch.float64
START, END = "<!-- bench/solvers.py:start -->", "<!-- bench/solvers.py:end -->"
NFES = (5, 6, 8, 10, 15, 20, 50)
QUICK_NFES = (5, 10, 20)
# (label, schedule name, schedule options)
SCHEDULES = (("karras", "karras", {}), ("logsnr", "logsnr", {}), ("polyexponential(rho=2)", "polyexponential",
             {"rho": 2.0}), ("time_quadratic", "time_quadratic", {}), ("trailing", "trailing", {}),
             ("linspace", "linspace", {}), ("tuned", "tuned", {}))
QUICK_SCHEDULES = SCHEDULES[:2]
ENDS = tuple(getattr(diffkit.schedules, "ENDS", ("zero", "sigma_min")))  # every end the library offers
VARIANT_SCHEDULES = ("karras", "logsnr", "polyexponential(rho=2)", "trailing", "tuned")  # for the option variants

# key: (title, builder); the mixture/process pairs of the issue
TESTBEDS = {
    "ring2d": ("2-D ring (8 modes), EDM, σ̄ ∈ [0.002, 80]",
               lambda: (GaussianMixture.ring(), diffkit.EDM())),
    "random16d": ("16-D random mixture (seed 1), Stable-Diffusion VP (scaled_linear, 1000 steps), σ̄ ∈ [0.0292, 14.6]",
                  lambda: (GaussianMixture.random(16, seed=1), diffkit.VP.discrete("scaled_linear"))),
    "random64d": ("64-D random mixture (seed 2), EDM, σ̄ ∈ [0.002, 80]",
                  lambda: (GaussianMixture.random(64, seed=2), diffkit.EDM())),
}
NOISE_SEED, HELDOUT_SEED = 1000, 2000
OVERHEAD_SHAPE = (8, 4, 32, 32)  # batch of the per-step overhead loops


# ------------------------------------------------------------------------------------------------------------
# testbeds and references
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Bed:
    key: str
    mixture: GaussianMixture
    process: diffkit.Process
    noise: torch.Tensor
    x_bar0: torch.Tensor
    s_min: float
    s_max: float


def make_bed(key: str, n: int, heldout: bool = False) -> Bed:
    mixture, process = TESTBEDS[key][1]()
    seed = (HELDOUT_SEED if heldout else NOISE_SEED) + list(TESTBEDS).index(key)
    noise = torch.randn(n, mixture.dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    s_max = process.sigma_bar_max
    return Bed(key, mixture, process, noise, process.noise_to_canonical(noise, s_max), process.sigma_bar_min, s_max)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.to(F64) - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def _skey(sigma: float) -> str:
    return f"{sigma:.9g}"


# worker state (set before the pools fork)
G: dict = {"n": 1000, "quick": False, "refs": {}, "beds": {}, "anchors": {}, "diffkit": []}


def bed(key: str, heldout: bool) -> Bed:
    k = (key, heldout)
    if k not in G["beds"]:
        G["beds"][k] = make_bed(key, G["n"], heldout)
    return G["beds"][k]


def ref_at(key: str, heldout: bool, sigma_to: float) -> torch.Tensor:
    k = (key, heldout, _skey(sigma_to))
    if k not in G["refs"]:
        b = bed(key, heldout)
        G["refs"][k] = b.mixture.flow_map(b.x_bar0, b.s_max, sigma_to)
    return G["refs"][k]


def modes_of(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """Most responsible component at σ̄ = 0 (which mode a sample landed in)."""
    return mixture.responsibilities(x, 0.0).argmax(1)


def sample_metrics(b: Bed, key: str, heldout: bool, x_bar: torch.Tensor, ref: torch.Tensor) -> dict:
    """Diagnostics beside the RMS error: samples that landed in another mode than their reference, and the
    median per-sample error (both relative to the RMS norm of the reference samples)."""
    k = (key, heldout, "modes")
    if k not in G["refs"]:
        G["refs"][k] = modes_of(b.mixture, ref)
    per = (x_bar.to(F64) - ref).pow(2).sum(1).sqrt() / ref.pow(2).sum(1).mean().sqrt()
    return {"switched": int((modes_of(b.mixture, x_bar) != G["refs"][k]).sum()), "median_err": float(per.median())}


def _reference_task(args):
    key, heldout, sigma_to = args
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    return (key, heldout, _skey(sigma_to)), ref_at(key, heldout, sigma_to), time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------------------------


def diffkit_configs(quick: bool) -> list[dict]:
    """diffkit configurations: every registered solver × schedule × end, UniPC and DEIS option variants, and
    the default (no solver named)."""
    schedules = QUICK_SCHEDULES if quick else SCHEDULES
    if "schedule_options" not in inspect.signature(diffkit.sample).parameters:
        schedules = [s for s in schedules if not s[2]]
    ends = tuple(e for e in ENDS if e in ("zero", "replace")) if quick else ENDS
    variants = [(s, {}) for s in deterministic_solvers()]
    if quick:
        variants += [("unipc", {"order": 2, "variant": "bh2", "corrector": c}) for c in (True, False)]
    else:
        for order in (1, 2, 3):
            for variant in ("bh1", "bh2"):
                for corrector in (True, False):
                    if order == 3 and corrector:  # the registered 'unipc' (bh2) and 'unipc_bh1'
                        continue
                    variants.append(("unipc", {"order": order, "variant": variant, "corrector": corrector}))
    variants.append(("deis", {"coordinate": "log_sigma"}))
    out = [{"name": "default", "solver": None, "schedule": None, "end": "zero", "options": {}}]
    for solver, opts in variants:
        label = solver
        if opts:
            label += "(" + ", ".join(_opt_label(k, v) for k, v in opts.items()) + ")"
        for slabel, schedule, sopts in schedules:
            if opts and not quick and slabel not in VARIANT_SCHEDULES:
                continue
            for end in ends:
                out.append({"name": f"{label} / {slabel} / {end}", "solver": solver, "schedule": schedule,
                            "schedule_options": sopts, "end": end, "options": opts, "label": label})
    return out


def deterministic_solvers() -> list[str]:
    """Registered solvers of the probability-flow ODE (stochastic samplers draw SDE samples: no per-sample exact
    answer to compare with)."""
    return [s for s in diffkit.solvers() if not getattr(get_solver(s), "stochastic", False)]


def stochastic_solvers() -> list[str]:
    return [s for s in diffkit.solvers() if getattr(get_solver(s), "stochastic", False)]


def _opt_label(k, v):
    if k == "corrector":
        return "UniC" if v else "no UniC"
    if k == "variant":
        return v
    return f"{k}={v}"


def anchor_configs(key: str, heldout: bool) -> list[A.Config]:
    k = (key, heldout)
    if k not in G["anchors"]:
        b = bed(key, heldout)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            G["anchors"][k] = A.anchors(b.mixture, b.process, b.x_bar0, quick=G["quick"])
    return G["anchors"][k]


# ------------------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------------------


def run_diffkit(b: Bed, cfg: dict, nfe: int) -> tuple[A.Run, list[str], dict]:
    """One diffkit.sample call through a counted copy of the exact network, as `mixture.denoiser(process, 'eps')`
    builds it."""
    model = A.Counted(b.mixture.model(b.process, "eps"))
    den = diffkit.Denoiser(model, b.process, "eps")
    kw = {}
    if cfg["solver"] is not None:
        kw = dict(solver=cfg["solver"], schedule=cfg["schedule"], end=cfg["end"], options=dict(cfg["options"]))
        if cfg.get("schedule_options"):
            kw["schedule_options"] = dict(cfg["schedule_options"])
    out, info = diffkit.sample(den, b.noise, nfe=nfe, return_info=True, **kw)
    sig = info["sigmas"]
    s_end = float(sig[-1])
    problems = []
    if model.calls != info["nfe"]:
        problems.append(f"counted {model.calls} model calls but info['nfe'] = {info['nfe']}")
    if abs(float(sig[0]) / b.s_max - 1) > 1e-9:
        problems.append(f"grid starts at {float(sig[0]):.6g}, not sigma_max {b.s_max:.6g}")
    scale = 1.0
    if s_end > 0:
        scale = float(b.process.alpha(b.process.t_of_sigma_bar(torch.tensor(s_end, dtype=F64))))
    return A.Run(out, model.calls, len(sig) - 1, s_end, scale), problems, info


def _config_task(task):
    key, kind, idx, heldout, budgets = task
    torch.set_num_threads(1)
    b = bed(key, heldout)
    if kind == "diffkit":
        cfg = G["diffkit"][idx]
        name, library, note = cfg["name"], "diffkit", ""

        def runner(nfe):
            return run_diffkit(b, cfg, nfe)
    else:
        c = anchor_configs(key, heldout)[idx]
        name, library, note = c.name, c.library, c.note

        def runner(nfe):
            return c.run(nfe), [], {}
    ref0 = ref_at(key, heldout, 0.0)
    records = []
    for nfe in budgets:
        rec = {"testbed": key, "library": library, "config": name, "index": idx, "budget": nfe,
               "heldout": heldout, "status": "ok", "note": note}
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run, problems, info = runner(nfe)
        except ValueError as e:
            rec.update(status="n/a", message=str(e).splitlines()[0][:200])
        except Exception as e:  # noqa: BLE001 - recorded and reported as a defect
            rec.update(status="error", message=f"{type(e).__name__}: {e}"[:300],
                       traceback=traceback.format_exc(limit=3)[-800:])
        else:
            rec.update(nfe=run.nfe, steps=run.steps, end_sigma=run.end_sigma, problems=problems)
            if run.nfe > nfe:
                problems.append(f"used {run.nfe} calls, above the budget of {nfe}")
            if not torch.isfinite(run.out).all():
                rec.update(err=math.inf)
            else:
                rec["err"] = rel_err(run.out, ref0)
                rec.update(sample_metrics(b, key, heldout, run.out / run.scale, ref0))
                if run.end_sigma > 0:
                    rec["err_end"] = rel_err(run.out / run.scale, ref_at(key, heldout, run.end_sigma))
            if kind == "diffkit" and info.get("solver"):
                rec["resolved"] = info["solver"]
        rec["seconds"] = time.perf_counter() - t0
        records.append(rec)
    return records


def _pool(jobs: int):
    return mp.get_context("fork").Pool(jobs) if jobs > 1 else None


def _imap(pool, fn, tasks):
    if pool is None:
        return map(fn, tasks)
    return pool.imap_unordered(fn, tasks)


# ------------------------------------------------------------------------------------------------------------
# per-step overhead
# ------------------------------------------------------------------------------------------------------------


def overhead(nfes=(20, 50), repeats: int = 30, shape=OVERHEAD_SHAPE, device: str = "cpu") -> list[dict]:
    """Wall time of whole sampling loops with a near-free model (x -> 0.5 x), median over repeats, all loops
    interleaved in one process on one thread. On a GPU every loop is timed up to a device synchronisation (the
    loops' kernel launches and host-side work: what the library adds to a fast network)."""
    import diffusers

    K = A.import_k_diffusion_sampling()
    torch.set_num_threads(1)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    process = diffkit.VP.discrete("scaled_linear")
    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
              prediction_type="epsilon")

    def model(x, t, **_):
        return x * 0.5

    den = diffkit.Denoiser(model, process, "eps")
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(dev)
    s_min, s_max = process.sigma_bar_min, process.sigma_bar_max
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sch = {
            "EulerDiscrete": diffusers.EulerDiscreteScheduler(**sd),
            "DPMSolverMultistep(order 2)": diffusers.DPMSolverMultistepScheduler(**sd, solver_order=2),
            "UniPCMultistep(order 3)": diffusers.UniPCMultistepScheduler(**sd, solver_order=3),
        }
    loops = {
        ("diffkit", "euler"): lambda k: diffkit.sample(den, noise, solver="euler", nfe=k),
        ("diffkit", "dpmpp_2m"): lambda k: diffkit.sample(den, noise, solver="dpmpp_2m", nfe=k),
        ("diffkit", "unipc"): lambda k: diffkit.sample(den, noise, solver="unipc", nfe=k),
        ("diffusers", "EulerDiscrete"): lambda k: A.diffusers_loop(sch["EulerDiscrete"], model, noise, k),
        ("diffusers", "DPMSolverMultistep(order 2)"):
            lambda k: A.diffusers_loop(sch["DPMSolverMultistep(order 2)"], model, noise, k),
        ("diffusers", "UniPCMultistep(order 3)"):
            lambda k: A.diffusers_loop(sch["UniPCMultistep(order 3)"], model, noise, k),
        ("k-diffusion", "sample_euler"):
            lambda k: K.sample_euler(model, noise * s_max, K.get_sigmas_karras(k, s_min, s_max, device=dev),
                                     disable=True),
        ("k-diffusion", "sample_dpmpp_2m"):
            lambda k: K.sample_dpmpp_2m(model, noise * s_max, K.get_sigmas_karras(k, s_min, s_max, device=dev),
                                        disable=True),
    }
    rows = []
    rng = random.Random(0)
    for k in nfes:
        times = {name: [] for name in loops}
        for fn in loops.values():  # warm-up
            fn(k)
        sync()
        for _ in range(repeats):
            order = list(loops)
            rng.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                loops[name](k)
                sync()
                times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(200):
            model(noise, None)
        sync()
        model_us = (time.perf_counter() - t0) / 200 * 1e6
        for (lib, name), ts in times.items():
            med = statistics.median(ts)
            rows.append({"library": lib, "loop": name, "nfe": k, "median_s": med, "us_per_step": med / k * 1e6,
                         "model_us_per_call": model_us, "repeats": repeats, "device": str(dev)})
    pairs = {"euler": "EulerDiscrete", "dpmpp_2m": "DPMSolverMultistep(order 2)",
             "unipc": "UniPCMultistep(order 3)"}
    for r in rows:
        if r["library"] == "diffkit":
            d = next(x for x in rows if x["library"] == "diffusers" and x["loop"] == pairs[r["loop"]]
                     and x["nfe"] == r["nfe"])
            r["vs"] = d["loop"]
            r["ratio_vs_diffusers"] = r["us_per_step"] / d["us_per_step"]
    return rows


# ------------------------------------------------------------------------------------------------------------
# consistency: diffkit solvers against the same algorithm in the anchors
# ------------------------------------------------------------------------------------------------------------

CONSISTENCY = [  # (diffkit solver, schedule, end, anchor config name, testbeds or None for all)
    ("euler", "karras", "zero", "k-diffusion:sample_euler(karras)", None),
    ("euler", "logsnr", "zero", "k-diffusion:sample_euler(exponential)", None),
    ("heun", "karras", "zero", "k-diffusion:sample_heun(karras)", None),
    ("lms", "karras", "zero", "k-diffusion:sample_lms(karras)", None),
    ("dpmpp_2m", "karras", "zero", "k-diffusion:sample_dpmpp_2m(karras)", None),
    ("dpm_solver_3", "logsnr", "sigma_min", "k-diffusion:sample_dpm_fast", None),
    ("dpmpp_2m", "karras", "zero", "diffusers:EDMDPMSolverMultistep(dpmsolver++, order 2, karras)", None),
    ("euler", "karras", "zero", "diffusers:EDMEuler(karras)", None),
    ("ddim", "trailing", "zero", "diffusers:DDIM(trailing)", ("random16d",)),
    ("euler", "trailing", "zero", "diffusers:EulerDiscrete(trailing)", ("random16d",)),
    ("dpmpp_2m", "trailing", "zero", "diffusers:DPMSolverMultistep(dpmsolver++, order 2, trailing)", ("random16d",)),
    ("dpmpp_3m", "trailing", "zero", "diffusers:DPMSolverMultistep(dpmsolver++, order 3, trailing)", ("random16d",)),
    ("unipc", "trailing", "zero", "diffusers:UniPCMultistep(bh2, order 3, trailing)", ("random16d",)),
]


def consistency(keys, budgets=(10, 20)) -> list[dict]:
    """RMS difference between diffkit and the same algorithm in an anchor, relative to the reference RMS."""
    torch.set_num_threads(1)
    rows = []
    for key in keys:
        b = bed(key, False)
        ref0 = ref_at(key, False, 0.0)
        names = {c.name: c for c in anchor_configs(key, False)}
        for solver, schedule, end, aname, only in CONSISTENCY:
            if (only and key not in only) or aname not in names:
                continue
            for nfe in budgets:
                cfg = {"solver": solver, "schedule": schedule, "end": end, "options": {}}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    run, _, _ = run_diffkit(b, cfg, nfe)
                    arun = names[aname].run(nfe)
                x, y = run.out / run.scale, arun.out / arun.scale
                rows.append({"testbed": key, "diffkit": f"{solver} / {schedule} / {end}", "anchor": aname,
                             "budget": nfe, "nfe": [run.nfe, arun.nfe],
                             "diff": float((x - y).pow(2).mean().sqrt() / ref0.pow(2).mean().sqrt()),
                             "err": [rel_err(run.out, ref0), rel_err(arun.out, ref0)]})
    return rows


# ------------------------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------------------------


def _ok(r):
    return r["status"] == "ok" and math.isfinite(r.get("err", math.inf))


def best(records, key, budget, libraries, pred=None, metric="err"):
    cands = [r for r in records if r["testbed"] == key and r["budget"] == budget and r["library"] in libraries
             and not r["heldout"] and _ok(r) and (pred is None or pred(r))]
    return min(cands, key=lambda r: (r[metric], r["library"], r["config"])) if cands else None


ANCHOR_LIBS = ("diffusers", "k-diffusion")


def analyse(records, keys, budgets, metric="err"):
    summary = {}
    for key in keys:
        rows = []
        for nfe in budgets:
            bd = best(records, key, nfe, ("diffkit",), metric=metric)
            ba = best(records, key, nfe, ANCHOR_LIBS, metric=metric)
            dflt = next((r for r in records if r["testbed"] == key and r["budget"] == nfe and r["library"] ==
                         "diffkit" and r["config"] == "default" and not r["heldout"]), None)
            rows.append({"budget": nfe, "best_diffkit": bd, "best_anchor": ba, "default": dflt,
                         "best_diffusers": best(records, key, nfe, ("diffusers",), metric=metric),
                         "best_kdiffusion": best(records, key, nfe, ("k-diffusion",), metric=metric)})
        summary[key] = rows
    return summary


def targets(summary, over, budgets, metric="err"):
    res = {}
    cells, fails = 0, []
    for key, rows in summary.items():
        for row in rows:
            if row["budget"] > 20:
                continue
            d, a = row["default"], row["best_anchor"]
            cells += 1
            if not (d and a and _ok(d) and d[metric] <= a[metric]):
                fails.append(f"{key} NFE {row['budget']}: default {_fmt(d, metric=metric)} vs best anchor "
                             f"{_fmt(a, metric=metric)}")
    res["i"] = {"title": "diffkit default at every NFE 5..20 at least as accurate as the best anchor, every mixture",
                "pass": cells > 0 and not fails, "cells": cells, "failures": fails}
    cells, fails = 0, []
    for key, rows in summary.items():
        for row in rows:
            if row["budget"] > 10:
                continue
            d, a = row["best_diffkit"], row["best_anchor"]
            cells += 1
            if not (d and a and d[metric] <= 0.7 * a[metric]):
                ratio = d[metric] / a[metric] if d and a else float("nan")
                fails.append(f"{key} NFE {row['budget']}: best diffkit / best anchor = {ratio:.2f}")
    res["ii"] = {"title": "best diffkit solver ≤ 0.7 × best anchor error at NFE ≤ 10, every mixture",
                 "pass": cells > 0 and not fails, "cells": cells, "failures": fails}
    ratios = [r for r in over if r["library"] == "diffkit"]
    fails = [f"{r['loop']} vs {r['vs']} at NFE {r['nfe']}: {r['ratio_vs_diffusers']:.2f}x" for r in ratios
             if r["ratio_vs_diffusers"] > 0.5]
    res["iii"] = {"title": "per-step overhead of diffkit ≤ 0.5 × diffusers (every matched loop and NFE)",
                  "pass": (not fails) if ratios else None, "cells": len(ratios), "failures": fails}
    return res


def _verdict(t) -> str:
    return "NOT RUN" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")


def suspicious(records, keys, budgets):
    """diffkit configurations whose error grows with NFE, errors raised, and counting problems."""
    out = []
    by = {}
    for r in records:
        if r["library"] == "diffkit" and not r["heldout"]:
            by.setdefault((r["testbed"], r["config"]), []).append(r)
    for (key, name), rs in by.items():
        rs = sorted(rs, key=lambda r: r["budget"])
        for r in rs:
            if r["status"] == "error":
                out.append({"kind": "error", "testbed": key, "config": name, "budget": r["budget"],
                            "detail": r["message"]})
            for p in r.get("problems", []):
                out.append({"kind": "counting", "testbed": key, "config": name, "budget": r["budget"], "detail": p})
        ok = [r for r in rs if _ok(r)]
        worst = None
        for a, b in zip(ok, ok[1:]):
            if b["err"] > 1.5 * a["err"] and b["err"] > 1e-3:
                f = b["err"] / a["err"]
                if worst is None or f > worst[0]:
                    worst = (f, a, b)
        if worst:
            f, a, b = worst
            out.append({"kind": "worse with more NFE", "testbed": key, "config": name, "budget": b["budget"],
                        "factor": f, "detail": f"NFE {a['nfe']}: {a['err']:.2e} -> NFE {b['nfe']}: {b['err']:.2e}"})
    return out


def candidates(records, summary, keys, budgets, top=3):
    """Per budget, the diffkit configurations with the smallest worst-case (over testbeds) ratio of their error
    to the best anchor's: what a DEFAULTS row would need to meet target (i)."""
    out = {}
    for nfe in budgets:
        anchor = {k: next(row["best_anchor"] for row in summary[k] if row["budget"] == nfe) for k in keys}
        if any(a is None for a in anchor.values()):
            continue
        per = {}
        for r in records:
            if (r["library"] == "diffkit" and r["budget"] == nfe and not r["heldout"] and r["testbed"] in keys
                    and r["config"] != "default" and _ok(r)):
                per.setdefault((r["config"], r["index"]), {})[r["testbed"]] = r["err"] / anchor[r["testbed"]]["err"]
        scored = sorted(((max(v.values()), name, idx, v) for (name, idx), v in per.items() if len(v) == len(keys)),
                        key=lambda t: t[0])
        out[nfe] = [{"config": name, "index": idx, "max_ratio": m, "ratios": v} for m, name, idx, v in scored[:top]]
    return out


def attach_heldout(records, summary, cands, keys):
    """Held-out ratios of the selected configurations (from the held-out records)."""
    for key in keys:
        for row in summary[key]:
            d, a = row["best_diffkit"], row["best_anchor"]
            if d is None or a is None:
                continue

            def find(r, nfe=row["budget"]):
                return next((x for x in records if x["heldout"] and x["testbed"] == key and x["budget"] == nfe
                             and x["library"] == r["library"] and x["config"] == r["config"] and _ok(x)), None)

            hd, ha = find(d), find(a)
            if hd and ha:
                row["heldout_ratio"] = hd["err"] / ha["err"]
    for nfe, cs in cands.items():
        if not cs:
            continue
        ratios = []
        for key in keys:
            a = next(row["best_anchor"] for row in summary[key] if row["budget"] == nfe)
            ha = next((x for x in records if x["heldout"] and x["testbed"] == key and x["budget"] == nfe
                       and x["library"] == a["library"] and x["config"] == a["config"] and _ok(x)), None)
            hc = next((x for x in records if x["heldout"] and x["testbed"] == key and x["budget"] == nfe
                       and x["library"] == "diffkit" and x["config"] == cs[0]["config"] and _ok(x)), None)
            if ha and hc:
                ratios.append(hc["err"] / ha["err"])
        if len(ratios) == len(keys):
            cs[0]["heldout_max_ratio"] = max(ratios)


# ------------------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------------------


def _fmt(r, with_nfe=False, metric="err"):
    if r is None:
        return "—"
    if r["status"] != "ok":
        return r["status"]
    s = f"{r[metric]:.2e}"
    if with_nfe and r.get("nfe") is not None and r["nfe"] != r["budget"]:
        s += f" ({r['nfe']})"
    return s


def _cfgname(r):
    if r is None:
        return "—"
    name = r["config"]
    if r["library"] == "diffkit" and name == "default":
        name += f" (= {r.get('resolved', '?')})"
    return f"`{name}`"


def plot(records, summary, keys, budgets, path: Path):
    plt = pyplot()

    named = ["euler / karras / zero", "heun / karras / zero", "dpmpp_2m / logsnr / zero",
             "dpmpp_3m / logsnr / zero", "unipc / logsnr / zero", "deis / logsnr / zero"]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 5.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        rows = summary[key]

        def env(field):
            xs, ys = [], []
            for row in rows:
                r = row[field]
                if r is not None and _ok(r):
                    xs.append(row["budget"])
                    ys.append(r["err"])
            return xs, ys

        ax.plot(*env("best_diffkit"), "o-", color="C0", lw=2.5, label="best diffkit config")
        ax.plot(*env("default"), "s--", color="C3", lw=2, label="diffkit default")
        for i, name in enumerate(named):
            pts = sorted((r["budget"], r["err"]) for r in records if r["testbed"] == key and r["config"] == name
                         and not r["heldout"] and _ok(r))
            if pts:
                ax.plot(*zip(*pts), "-", lw=1, alpha=0.7, color=f"C{4 + i}", label=name)
        ax.plot(*env("best_anchor"), "k^:", lw=2.5, label="best anchor config")
        ax.plot(*env("best_diffusers"), "-", color="0.5", lw=1, label="best diffusers")
        ax.plot(*env("best_kdiffusion"), "--", color="0.5", lw=1, label="best k-diffusion")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(list(budgets))
        ax.set_xticklabels([str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("model calls (NFE budget)")
        ax.set_ylabel("RMS error / RMS(reference)")
        ax.set_title(key, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    save_figure(fig, path, dpi=120)


def markdown(meta, records, summary, tg, over, cons, sus, keys, budgets, fig_rel, tg_med=None,
             cands=None) -> str:
    L = []
    w = L.append
    w("## Deterministic solvers: diffkit vs diffusers and k-diffusion (`bench/solvers.py`)")
    w("")
    w(f"Reproduce: `{meta['command']}`" + ("" if "--quick" in meta["command"] else " (or `make bench`)")
      + ". Quick smoke run (N = 200, NFE 5/10/20, fewer configurations, about a minute): `.venv/bin/python "
      "bench/solvers.py --quick`.  ")
    w(f"Machine: {meta['cpu']}, {meta['cores']} cores, {meta['jobs']} worker processes × 1 torch thread; "
      f"Python {meta['python']}, torch {meta['torch']}, diffusers {meta['diffusers']}, k-diffusion "
      f"{meta['k_diffusion']}; diffkit at commit {meta['commit']}"
      + (f" (with uncommitted changes in {', '.join(meta['dirty'])})" if meta.get("dirty") else "")
      + f". Wall time of this run: "
      f"{meta['runtime_s'] / 60:.1f} min ({meta['cpu_s'] / 60:.1f} CPU-min over all processes; load average at "
      f"the end {meta['load_avg'][0]:.1f} on {meta['cores']} cores, the machine being shared).")
    w("")
    w(f"**Setup.** N = {meta['n']} samples per testbed, float64 throughout. The start is x̄₀ = "
      "`process.noise_to_canonical(noise, σ̄_max)` for fixed standard-normal noise; the reference is the exact "
      "probability-flow map `mixture.flow_map(x̄₀, σ̄_max, 0)` (DOP853, rtol = atol = 1e-10). "
      "Error = RMS(sample − reference) / RMS(reference), with the sample as the library returns it. Every library "
      "calls the same exact mixture network through a call counter; each configuration gets a budget of model "
      "calls and uses the largest step count that fits (the NFE it actually used is recorded; a number in "
      "parentheses in the full tables is that actual NFE when it is below the budget). diffkit configurations "
      "that `sample` rejects with ValueError (budget below the solver's minimum) are n/a. Two diagnostics sit "
      "beside the RMS error: *mode switches*, the number of samples whose most responsible mixture component "
      "differs from their reference's (near a separatrix of the flow a small solver error sends a sample to another "
      "mode, and one such sample dominates the RMS error), and the median per-sample error ‖x − x_ref‖ / "
      "RMS‖x_ref‖.")
    w("")
    w("Testbeds: " + "; ".join(f"**{k}**: {TESTBEDS[k][0]}" for k in keys) + ".")
    w("")
    w("**Anchors.** diffusers (VP schedulers DPMSolverMultistep (dpmsolver++, order 2/3), UniPCMultistep "
      "(bh2, order 2/3), DEISMultistep (order 2/3), DDIM, EulerDiscrete, PNDM (PLMS, skip_prk_steps) with "
      "timestep_spacing linspace/trailing and, where supported, Karras / exponential / Lu-lambda sigmas; EDM "
      "schedulers EDMEuler and EDMDPMSolverMultistep (order 2/3) with Karras and exponential sigmas) and "
      "k-diffusion (`sample_euler`, `sample_heun`, `sample_lms`, `sample_dpm_2`, `sample_dpmpp_2m` on "
      "`get_sigmas_karras` / `get_sigmas_exponential`; `sample_dpm_fast`; `sample_dpm_adaptive` with a sweep of "
      "rtol). Notes:")
    w("- VP schedulers on the SD testbed use the same betas (scaled_linear 0.00085..0.012, 1000 steps, epsilon) and "
      "start from x_T = α(T) x̄₀ (= the noise; `init_noise_sigma` = 1). On the EDM testbeds they run the same ODE "
      "through an equivalent discrete VP whose 1000 levels are log-uniform in σ̄ on [0.002, 80] (`trained_betas`; "
      "tagged *VP-reparam*): no diffusers VP scheduler can take an EDM/VE process directly.")
    w("- EDM schedulers call the network with EDM preconditioning (input c_in·x̄, timestep c_noise = ¼ log σ, output "
      "F with D = c_skip x̄ + c_out F; their prediction_type 'epsilon' is EDM's F). Their `init_noise_sigma` is "
      "√(σ_max²+1), not σ_max, and EulerDiscrete's (linspace/trailing) is σ_max, not √(σ_max²+1) = 1/α(T): all "
      "are started from x̄₀ exactly instead.")
    w("- diffusers VP schedulers with Karras/exponential/Lu sigmas feed the model rounded integer timesteps, so the "
      "network is evaluated at a slightly different noise level than the solver assumes; that is measured as is.")
    w("- k-diffusion's `sample_dpm_fast` and `sample_dpm_adaptive` stop at σ_min = σ̄_min (no final denoising "
      "call); they are listed as is and with one extra final call x̄ ← D(x̄, σ_min) (\"+ final denoise\"). "
      "`sample_dpm_adaptive` picks its own NFE (≥ ~30 here): it appears only at budgets ≥ its NFE.")
    if meta.get("stochastic_excluded"):
        w("- diffkit solvers swept: every registered deterministic solver (" + ", ".join(
            f"`{x}`" for x in meta["deterministic"]) + "); the stochastic samplers (" + ", ".join(
            f"`{x}`" for x in meta["stochastic_excluded"]) + ") draw samples of the reverse SDE, which have no "
            "per-sample exact answer in the probability-flow map, and are left to a distributional benchmark.")
    w("- Schedules swept: karras (ρ = 7), logsnr (uniform in log σ̄; = polyexponential with ρ = 1), polyexponential "
      "with ρ = 2, time_quadratic, trailing and linspace (uniform in native time: σ itself for EDM), and tuned "
      "(diffkit's step density fitted by `python -m diffkit.calibrate.step_density` on a family of other "
      "mixtures: none of the testbeds here is in it).")
    w("")
    w("### Targets")
    w("")
    for k, t in tg.items():
        w(f"- **({k}) {_verdict(t)}** — {t['title']} ({t['cells'] - len(t['failures'])}/"
          f"{t['cells']} cells meet it).")
        for f in t["failures"][:12]:
            w(f"  - {f}")
        if len(t["failures"]) > 12:
            w(f"  - … {len(t['failures']) - 12} more")
    w("")
    if tg_med:
        w("")
        w("The same two accuracy targets judged by the median per-sample error instead of the RMS error (the RMS "
          "is dominated by the few samples that a solver sends to another mode than the exact flow does; see "
          "\"mode switches\" below): " + "; ".join(
              f"({k}) {_verdict(t)} {t['cells'] - len(t['failures'])}/{t['cells']}"
              for k, t in tg_med.items() if k in ("i", "ii")) + ".")
    w("")
    w(f"![error vs NFE]({fig_rel})")
    w("")
    w("\"best\" = the lowest error over all configurations of that side at that budget (selected on this noise "
      "seed). The held-out ratio reruns the two selected configurations on fresh noise (another seed, its own "
      "reference) to show the selection is not a fluke of one seed.")
    for key in keys:
        w("")
        w(f"### {key}: {TESTBEDS[key][0]}")
        w("")
        w("| NFE | best diffkit config | error | best anchor config | error | diffkit / anchor | held-out ratio "
          "| mode switches (diffkit / anchor) | median per-sample error (diffkit / anchor) |")
        w("|---:|---|---:|---|---:|---:|---:|---:|---:|")
        for row in summary[key]:
            d, a = row["best_diffkit"], row["best_anchor"]
            ratio = f"{d['err'] / a['err']:.2f}" if d and a else "—"
            ho = row.get("heldout_ratio")
            sw = f"{d['switched']} / {a['switched']}" if d and a else "—"
            md = f"{d['median_err']:.1e} / {a['median_err']:.1e}" if d and a else "—"
            w(f"| {row['budget']} | {_cfgname(d)} | {_fmt(d, True)} | {_cfgname(a)} | {_fmt(a, True)} | {ratio} | "
              f"{'—' if ho is None else f'{ho:.2f}'} | {sw} | {md} |")
        w("")
        w("| NFE | diffkit default | error | best anchor error | default / anchor | best diffusers "
          "| best k-diffusion |")
        w("|---:|---|---:|---:|---:|---:|---:|")
        for row in summary[key]:
            d, a = row["default"], row["best_anchor"]
            ratio = f"{d['err'] / a['err']:.2f}" if d and a and _ok(d) else "—"
            dname = "—" if d is None else default_desc(row["budget"])
            w(f"| {row['budget']} | {dname} | {_fmt(d)} | {_fmt(a)} | {ratio} | {_fmt(row['best_diffusers'])} | "
              f"{_fmt(row['best_kdiffusion'])} |")
    # candidate defaults
    if cands:
        w("")
        w("### Candidate defaults")
        w("")
        w("Target (i) asks one configuration per budget (a `DEFAULTS` row) to be at least as accurate as the best "
          "anchor on every testbed. Per budget, the diffkit configurations with the smallest worst-case ratio "
          "error / best-anchor error over the testbeds (≤ 1 would meet the target there); selected on this noise "
          "seed, so the held-out column reruns the first candidate and the selected anchors on fresh noise.")
        w("")
        w("| NFE | rank | configuration | worst ratio | " + " | ".join(keys) + " | held-out worst ratio |")
        w("|---:|---:|---|---:|" + "---:|" * len(keys) + "---:|")
        for nfe, cs in cands.items():
            for i, c in enumerate(cs):
                ho = c.get("heldout_max_ratio")
                w(f"| {nfe} | {i + 1} | `{c['config']}` | {c['max_ratio']:.2f} | "
                  + " | ".join(f"{c['ratios'][k]:.2f}" for k in keys)
                  + f" | {'' if ho is None else f'{ho:.2f}'} |")
        w("")
        w("For comparison, the current default's worst-case ratio per NFE: "
          + ", ".join(f"{nfe}: {_default_worst(summary, keys, nfe):.2f}" for nfe in cands) + ".")
    # end comparison
    w("")
    ends = [e for e in ENDS if any(r["config"].endswith(f"/ {e}") for r in records)]
    others = [e for e in ends if e != "zero"]
    w("### Schedule ends (diffkit): " + ", ".join(f'end="{e}"' for e in ends))
    w("")
    w("`zero` spends the last call on the step from σ̄_min to 0; `sigma_min` stops at σ̄_min (one more level on the "
      "grid, the residual noise stays); `replace` (when the library has it) is the `sigma_min` grid with its last "
      "level set to 0, as diffusers' trailing spacing ends. Best diffkit error over all solvers and schedules with "
      "each end, against the σ̄ = 0 reference; for `sigma_min` also against the exact flow map to σ̄_min (the "
      "solver's own target); and the median over matched configurations (same solver, schedule, options) of "
      "error(end) / error(zero).")
    w("")
    w("| testbed | NFE | " + " | ".join(f"best {e}" for e in ends)
      + (" | best sigma_min vs flow map to σ̄_min" if "sigma_min" in ends else "")
      + "".join(f" | median {e} / zero" for e in others) + " |")
    w("|---|---:|" + "---:|" * (len(ends) + ("sigma_min" in ends) + len(others)))
    for key in keys:
        for nfe in budgets:
            bests = {e: best(records, key, nfe, ("diffkit",), lambda r, e=e: r["config"].endswith(f"/ {e}"))
                     for e in ends}
            pairs = {}
            for r in records:
                if (r["testbed"] == key and r["budget"] == nfe and r["library"] == "diffkit" and not r["heldout"]
                        and _ok(r) and " / " in r["config"]):
                    base, end = r["config"].rsplit(" / ", 1)
                    pairs.setdefault(base, {})[end] = r["err"]
            cells = [_fmt(bests[e]) for e in ends]
            if "sigma_min" in ends:
                sm = bests["sigma_min"]
                cells.append(f"{sm['err_end']:.2e}" if sm and "err_end" in sm else "—")
            for e in others:
                rs = [p[e] / p["zero"] for p in pairs.values() if "zero" in p and e in p]
                cells.append(f"{statistics.median(rs):.2f}" if rs else "—")
            w(f"| {key} | {nfe} | " + " | ".join(cells) + " |")
    # consistency
    if cons:
        w("")
        w("### Cross-library consistency")
        w("")
        w("The same algorithm on the same grid in diffkit and in an anchor: RMS(difference) / RMS(reference). "
          "Round-off-level differences confirm that both sides are driven identically; larger ones come from the "
          "anchor's float32 tables, rounded timesteps, or a different algorithm detail (noted).")
        w("")
        w("| testbed | diffkit | anchor | NFE | difference | diffkit error | anchor error |")
        w("|---|---|---|---:|---:|---:|---:|")
        for c in cons:
            w(f"| {c['testbed']} | `{c['diffkit']}` | `{c['anchor']}` | {c['budget']} | {c['diff']:.1e} | "
              f"{c['err'][0]:.2e} | {c['err'][1]:.2e} |")
    # overhead
    w("")
    w("### Per-step overhead")
    w("")
    w("Whole sampling loops with a near-free model (x ↦ 0.5 x, the same for all) on a batch of shape "
      f"{tuple(meta['overhead_shape'])} float32, one thread, median of {meta['overhead_repeats']} interleaved "
      "repeats in one process. diffkit: `Denoiser` (SD VP, eps) + `sample(solver=..., nfe=k)`; diffusers: "
      "`set_timesteps` + the standard `scale_model_input` / model / `step` loop; k-diffusion: Karras grid + sampler "
      "on the canonical model (no native-space conversion). The model itself costs "
      f"{over[0]['model_us_per_call']:.0f} µs per call." if over else "(not run)")
    w("")
    if over:
        overhead_table(w, over)
    gpu_overhead_markdown(w)
    # suspicious
    w("")
    w("### Things to look at")
    w("")
    if not sus:
        w("Nothing flagged: no diffkit configuration raised an error other than a budget ValueError, every call "
          "count matched `info['nfe']`, and no configuration's error grew by more than 1.5× when the budget grew.")
    else:
        w("Flagged automatically: errors other than the budget ValueError, call-count mismatches, and diffkit "
          "configurations whose error grows by more than 1.5× from one budget to the next (the worst step each).")
        w("")
        w("| kind | solver | testbeds | configurations | worst case |")
        w("|---|---|---|---:|---|")
        groups = {}
        for s in sus:
            groups.setdefault((s["kind"], s["config"].split(" / ")[0]), []).append(s)
        for (kind, solver), ss in sorted(groups.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
            worst = max(ss, key=lambda s: (float(f"{s.get('factor', 0):.4g}"), s["testbed"], s["config"]))
            tbs = ", ".join(sorted({s["testbed"] for s in ss}))
            w(f"| {kind} | `{solver}` | {tbs} | {len({(s['testbed'], s['config']) for s in ss})} | "
              f"{worst['testbed']} `{worst['config']}`: {worst['detail']} |")
        w("")
        w("Every flagged item is in `suspicious` in bench/results/solvers.json.")
    # full tables
    w("")
    w("### All configurations")
    for key in keys:
        w("")
        w(f"<details><summary>{key}: every configuration × NFE budget (error; actual NFE in parentheses when "
          "below the budget)</summary>")
        w("")
        w("| config | " + " | ".join(str(b) for b in budgets) + " |")
        w("|---|" + "---:|" * len(budgets))
        cfgs = {}
        for r in records:
            if r["testbed"] == key and not r["heldout"]:
                cfgs.setdefault((r["library"], r["config"]), {})[r["budget"]] = r
        ref_b = 10 if 10 in budgets else budgets[len(budgets) // 2]

        def sort_key(item):
            (lib, name), rs = item
            r = rs.get(ref_b)
            e = r["err"] if r is not None and _ok(r) else math.inf
            return (lib != "diffkit", float(f"{e:.3g}"), name)  # as displayed: exact ties sort by name

        for (_lib, name), rs in sorted(cfgs.items(), key=sort_key):
            w(f"| {name} | " + " | ".join(_fmt(rs.get(b), True) if b in rs else "" for b in budgets) + " |")
        w("")
        w("</details>")
    return "\n".join(L) + "\n"


def _default_worst(summary, keys, nfe) -> float:
    ratios = []
    for k in keys:
        row = next(r for r in summary[k] if r["budget"] == nfe)
        d, a = row["default"], row["best_anchor"]
        ratios.append(d["err"] / a["err"] if d and a and _ok(d) else math.inf)
    return max(ratios)


def default_choice(nfe: int) -> dict:
    """diffkit's default configuration for a budget (a `Choice`, or an older (solver, schedule, options) tuple)."""
    c = default_for(nfe)
    if isinstance(c, tuple):
        return {"solver": c[0], "schedule": c[1], "options": dict(c[2]), "end": "zero", "schedule_options": {}}
    return {"solver": c.solver, "schedule": c.schedule, "end": getattr(c, "end", "zero"),
            "options": dict(getattr(c, "options", {}) or {}),
            "schedule_options": dict(getattr(c, "schedule_options", {}) or {})}


def default_desc(nfe: int) -> str:
    c = default_choice(nfe)
    sched = c["schedule"] + (f"({_kv(c['schedule_options'])})" if c["schedule_options"] else "")
    solver = c["solver"] + (f"({_kv(c['options'])})" if c["options"] else "")
    return f"`{solver} / {sched} / {c['end']}`"


def _kv(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def write_markdown(path: Path, section: str):
    """Replace this script's block of BENCHMARKS.md (appended when missing), atomically."""
    from diffkit.benchmark import write_block

    write_block(path, section, "bench/solvers.py")


def git_revision() -> tuple[str, list[str]]:
    """Commit of the working tree and the src/ files that differ from it (others may edit the tree)."""
    import subprocess

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True,
                               text=True).stdout.split("\n")
        return rev, [line[3:] for line in dirty if line.strip()]
    except Exception:  # noqa: BLE001
        return "?", []


_RECORD_DEFAULTS = {"heldout": False, "note": "", "problems": [], "end_sigma": 0.0}


def _slim_record(r: dict) -> dict:
    """A record without its default-valued fields (restored by `_full_record`)."""
    out = {k: v for k, v in r.items() if not (k in _RECORD_DEFAULTS and v == _RECORD_DEFAULTS[k])}
    if out.get("resolved") == out.get("config"):
        del out["resolved"]
    if "seconds" in out:
        out["seconds"] = float(f"{out['seconds']:.3g}")
    return out


def _full_record(r: dict) -> dict:
    return {**{k: (list(v) if isinstance(v, list) else v) for k, v in _RECORD_DEFAULTS.items()}, **r}


_PRECISE = ("err", "median_err", "err_end", "diff")  # kept exactly (17 digits): --from-json re-derives rankings,
# and equivalent configurations (UniPC-3 without corrector and DPM-Solver++(3M)) differ only in the last digits


def _rounded(obj, digits: int = 6):
    """Floats to `digits` significant digits (keeps the JSON small), errors to 10."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: _rounded(v, 17 if k in _PRECISE else digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__, "k_diffusion": A.k_diffusion_version(),
            "platform": platform.platform()}


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: N=200, NFE 5/10/20, fewer configurations")
    p.add_argument("--n", type=int, default=None, help="samples per testbed (default 1000, quick 200)")
    p.add_argument("--nfe", type=str, default=None, help="comma-separated NFE budgets")
    p.add_argument("--testbeds", type=str, default=",".join(TESTBEDS), help="comma-separated testbed keys")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--overhead-repeats", type=int, default=None)
    p.add_argument("--no-overhead", action="store_true")
    p.add_argument("--overhead-only", action="store_true",
                   help="time only the per-step overhead, on --device; writes bench/results/overhead_<device>.json")
    p.add_argument("--device", type=str, default="cpu", help="device of the --overhead-only loops")
    p.add_argument("--no-heldout", action="store_true")
    p.add_argument("--md", type=str, default=None,
                   help="markdown file to update (default BENCHMARKS.md; none in --quick mode unless given)")
    p.add_argument("--json", type=str, default=None)
    p.add_argument("--figure", type=str, default=None)
    p.add_argument("--from-json", type=str, default=None,
                   help="re-render the plot and BENCHMARKS.md from a results JSON of an earlier run (no sampling)")
    args = p.parse_args(argv)
    if args.from_json:
        return rerender(args)
    if args.overhead_only:
        return overhead_only(args)

    t_start = time.perf_counter()
    commit, dirty = git_revision()
    quick = args.quick
    n = args.n or (200 if quick else 1000)
    budgets = tuple(int(x) for x in args.nfe.split(",")) if args.nfe else (QUICK_NFES if quick else NFES)
    keys = [k for k in args.testbeds.split(",") if k]
    for k in keys:
        if k not in TESTBEDS:
            p.error(f"unknown testbed {k!r}; valid: {', '.join(TESTBEDS)}")
    suffix = "_quick" if quick else ""
    json_path = Path(args.json) if args.json else HERE / "results" / f"solvers{suffix}.json"
    fig_path = Path(args.figure) if args.figure else HERE / "figures" / f"solvers_error_vs_nfe{suffix}.png"
    md_path = Path(args.md) if args.md else (None if quick else ROOT / "BENCHMARKS.md")
    torch.set_num_threads(1)
    G.update(n=n, quick=quick, diffkit=diffkit_configs(quick))
    from tqdm.auto import tqdm

    # 1. exact references (σ̄ -> 0, σ̄ -> σ̄_min, held-out σ̄ -> 0)
    ref_tasks = []
    for key in keys:
        mixture, process = TESTBEDS[key][1]()
        ref_tasks += [(key, False, 0.0), (key, False, process.sigma_bar_min)]
        if not args.no_heldout:
            ref_tasks.append((key, True, 0.0))
    pool = _pool(args.jobs)
    ref_time = {}
    for k, ref, dt in tqdm(_imap(pool, _reference_task, ref_tasks), total=len(ref_tasks), desc="references"):
        G["refs"][k] = ref
        ref_time["/".join(map(str, k))] = dt
    if pool:
        pool.close()
        pool.join()

    # 2. every configuration at every budget
    tasks = []
    for key in reversed(keys):  # the expensive testbed first, for load balance
        for i in range(len(G["diffkit"])):
            tasks.append((key, "diffkit", i, False, budgets))
        for i in range(len(anchor_configs(key, False))):
            tasks.append((key, "anchor", i, False, budgets))
    records = []
    pool = _pool(args.jobs)
    for recs in tqdm(_imap(pool, _config_task, tasks), total=len(tasks), desc="configs", smoothing=0.05):
        records.extend(recs)
    if pool:
        pool.close()
        pool.join()
    t_configs = time.perf_counter() - t_start

    summary = analyse(records, keys, budgets)

    # 3. held-out check of the selected best configurations
    if not args.no_heldout:
        ho_tasks = []
        for key in keys:
            for row in summary[key]:
                for side in ("best_diffkit", "best_anchor"):
                    r = row[side]
                    if r is not None:
                        kind = "diffkit" if r["library"] == "diffkit" else "anchor"
                        ho_tasks.append((key, kind, r["index"], True, (row["budget"],)))
        cands = candidates(records, summary, keys, budgets)
        for nfe, cs in cands.items():
            if cs:
                for key in keys:
                    ho_tasks.append((key, "diffkit", cs[0]["index"], True, (nfe,)))
        ho_tasks = list(dict.fromkeys(ho_tasks))
        pool = _pool(args.jobs)
        for recs in tqdm(_imap(pool, _config_task, ho_tasks), total=len(ho_tasks), desc="held-out"):
            records.extend(recs)
        if pool:
            pool.close()
            pool.join()
        attach_heldout(records, summary, cands, keys)
    else:
        cands = candidates(records, summary, keys, budgets)

    # 4. consistency and overhead (single process, nothing else running)
    print("consistency checks ...", flush=True)
    cons = consistency(keys)
    over = []
    if not args.no_overhead:
        print("per-step overhead ...", flush=True)
        reps = args.overhead_repeats or (10 if quick else 30)
        over = overhead(nfes=(20,) if quick else (20, 50), repeats=reps)
    runtime = time.perf_counter() - t_start
    ru_self, ru_kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = ru_self.ru_utime + ru_self.ru_stime + ru_kids.ru_utime + ru_kids.ru_stime

    meta = {"command": ".venv/bin/python bench/solvers.py" + (" --quick" if quick else ""), "n": n, "budgets": budgets,
            "testbeds": {k: TESTBEDS[k][0] for k in keys}, "jobs": args.jobs, "runtime_s": runtime, "cpu_s": cpu_s,
            "load_avg": os.getloadavg(),
            "configs_runtime_s": t_configs, "reference_seconds": ref_time, "overhead_shape": list(OVERHEAD_SHAPE),
            "overhead_repeats": args.overhead_repeats or (10 if quick else 30), **machine(),
            "defaults": {str(b): default_choice(b) for b in budgets},
            "deterministic": deterministic_solvers(), "stochastic_excluded": stochastic_solvers()}
    meta["commit"] = commit
    meta["dirty"] = dirty
    report(meta, records, over, cons, keys, budgets, summary, cands, json_path, fig_path, md_path)


def overhead_only(args):
    """The overhead part alone on `args.device` (a GPU run beside the CPU benchmark; rendered by --from-json)."""
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    reps = args.overhead_repeats or 30
    rows = overhead(repeats=reps, device=args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else machine()["cpu"]
    commit, dirty = git_revision()
    commit = os.environ.get("DIFFKIT_COMMIT", commit)  # a copy of the tree without .git (a GPU machine) names it
    meta = {"command": f".venv/bin/python bench/solvers.py --overhead-only --device {args.device}",
            "device_name": name, "overhead_shape": list(OVERHEAD_SHAPE), "overhead_repeats": reps, "commit": commit,
            "dirty": dirty, **machine()}
    path = Path(args.json) if args.json else HERE / "results" / f"overhead_{dev.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(_rounded({"meta": meta, "overhead": rows}), indent=1, default=str).encode())
    print_overhead(rows)
    print(f"wrote {path}")


def gpu_overhead_markdown(w) -> None:
    """The table of bench/results/overhead_cuda.json (from `--overhead-only --device cuda`), when there is one."""
    path = HERE / "results" / "overhead_cuda.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["overhead"]
    w("")
    w(f"On a GPU ({meta['device_name']}, torch {meta['torch']}, diffusers {meta['diffusers']}, commit "
      f"{meta['commit']}; `{meta['command']}`): the same loops with every tensor on the GPU, each timed up to a "
      f"device synchronisation, median of {meta['overhead_repeats']} interleaved repeats. The model (one "
      f"elementwise kernel) costs {rows[0]['model_us_per_call']:.0f} µs per call, so these are the host-side "
      "work and kernel launches of each library's loop.")
    ratios = [r["ratio_vs_diffusers"] for r in rows if "ratio_vs_diffusers" in r]
    worst = max(rows, key=lambda r: r.get("ratio_vs_diffusers", 0.0))
    w("")
    w(f"diffkit / diffusers here: {min(ratios):.2f} to {max(ratios):.2f} (worst: {worst['loop']} at NFE "
      f"{worst['nfe']}). Target (iii) is judged on the CPU table above, the machine CI and the rest of this file "
      "use; this GPU run is reported beside it, not folded into the verdict.")
    w("")
    overhead_table(w, rows)


def overhead_table(w, rows) -> None:
    """Markdown table of `overhead()` rows (the CPU run and the GPU run alike)."""
    w("| library | loop | NFE | µs / step | diffkit / diffusers |")
    w("|---|---|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['ratio_vs_diffusers']:.2f} (vs {r['vs']})" if "ratio_vs_diffusers" in r else ""
        w(f"| {r['library']} | {r['loop']} | {r['nfe']} | {r['us_per_step']:.0f} | {ratio} |")


def print_overhead(rows) -> None:
    """Console lines of `overhead()` rows."""
    print("== per-step overhead (µs/step)")
    for r in rows:
        extra = f"  ratio vs {r['vs']}: {r['ratio_vs_diffusers']:.2f}" if "vs" in r else ""
        print(f"  {r['library']:12s} {r['loop']:28s} NFE {r['nfe']:>3}: {r['us_per_step']:8.1f}{extra}")


def rerender(args):
    """Plot and markdown from a saved results JSON (same analysis, no sampling)."""
    data = json.loads(Path(args.from_json).read_text())
    meta, records = data["meta"], [_full_record(r) for r in data["records"]]
    meta.setdefault("dirty", [])
    keys, budgets = list(meta["testbeds"]), tuple(meta["budgets"])
    quick = "--quick" in meta["command"]
    suffix = "_quick" if quick else ""
    fig_path = Path(args.figure) if args.figure else HERE / "figures" / f"solvers_error_vs_nfe{suffix}.png"
    md_path = Path(args.md) if args.md else (None if quick else ROOT / "BENCHMARKS.md")
    summary = analyse(records, keys, budgets)
    cands = candidates(records, summary, keys, budgets)
    attach_heldout(records, summary, cands, keys)
    report(meta, records, data["overhead"], data["consistency"], keys, budgets, summary, cands,
           Path(args.json or args.from_json), fig_path, md_path, write_json=args.json is not None)


def report(meta, records, over, cons, keys, budgets, summary, cands, json_path, fig_path, md_path, write_json=True):
    """Targets, flags, plot, JSON, markdown and the console summary."""
    records = sorted(records, key=lambda r: (r["testbed"], r["library"], r["config"], r["heldout"], r["budget"]))
    tg = targets(summary, over, budgets)
    tg_med = targets(analyse(records, keys, budgets, "median_err"), over, budgets, "median_err")
    sus = suspicious(records, keys, budgets)
    runtime, cpu_s, t_configs = meta["runtime_s"], meta["cpu_s"], meta["configs_runtime_s"]
    plot(records, summary, keys, budgets, fig_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    slim = {"meta": meta, "targets": tg, "targets_median_err": tg_med, "candidate_defaults": cands,
            "records": [_slim_record(r) for r in records], "overhead": over, "consistency": cons,
            "suspicious": sus,
            "summary": {k: [{"budget": row["budget"], "heldout_ratio": row.get("heldout_ratio"),
                             **{f: (None if row[f] is None else {x: row[f].get(x) for x in
                                                                 ("library", "config", "err", "nfe")})
                                for f in ("best_diffkit", "best_anchor", "default", "best_diffusers",
                                          "best_kdiffusion")}} for row in rows] for k, rows in summary.items()}}
    if write_json:
        atomic_write(json_path, json.dumps(_rounded(slim), separators=(",", ":"), default=str).encode())
    if md_path is not None:
        fig_rel = os.path.relpath(fig_path, md_path.parent)
        write_markdown(md_path, markdown(meta, records, summary, tg, over, cons, sus, keys, budgets, fig_rel,
                                              tg_med, cands))

    # console summary
    print()
    for key in keys:
        print(f"== {key}: {TESTBEDS[key][0]}")
        print(f"  {'NFE':>4}  {'best diffkit':>10}  {'default':>10}  {'best anchor':>11}  ratio  "
              "config (diffkit | anchor)")
        for row in summary[key]:
            d, a, df = row["best_diffkit"], row["best_anchor"], row["default"]
            ratio = f"{d['err'] / a['err']:.2f}" if d and a else "—"
            print(f"  {row['budget']:>4}  {_fmt(d):>10}  {_fmt(df):>10}  {_fmt(a):>11}  {ratio:>5}  "
                  f"{d['config'] if d else '—'} | {a['config'] if a else '—'}")
    if over:
        print_overhead(over)
    if sus:
        print(f"== {len(sus)} flagged items (see BENCHMARKS.md / JSON)")
        for s in sus[:15]:
            print(f"  [{s['kind']}] {s['testbed']} {s['config']} @ {s['budget']}: {s['detail']}")
    for k, t in tg.items():
        print(f"TARGET ({k}) {_verdict(t)}: {t['title']} "
              f"[{t['cells'] - len(t['failures'])}/{t['cells']}]")
    print(f"runtime {runtime:.0f} s (configs {t_configs:.0f} s, {cpu_s:.0f} CPU-s); results: {json_path}"
          + (f", {md_path}" if md_path else "") + f", {fig_path}")


if __name__ == "__main__":
    main()
