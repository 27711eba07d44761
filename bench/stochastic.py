#!/usr/bin/env python
"""Distribution error vs NFE of diffkit's stochastic and deterministic samplers, beside diffusers' and
k-diffusion's stochastic samplers, on exact Gaussian-mixture testbeds; and the exact likelihood on the same
testbeds.

Every run starts from the same canonical noise x̄_0 = noise_to_canonical(z, σ̄_max) (z ~ N(0, I), one draw per seed)
and calls the same exact mixture network, counted by a wrapper, within a hard budget of model calls (NFE).
The distribution error is MMD²(q, p) between the N samples and the mixture itself (`diffkit.metrics.mmd_mixture`:
RBF kernel, bandwidths stated per testbed; the terms with p are exact Gaussian integrals, so the estimate is
unbiased and zero in expectation for exact samples, with no reference sample set). Secondary metrics: mode-weight
total variation, whitened covariance error and excess cross-entropy H(q, p) - H(p). Each configuration is run
with 5 seeds (independent start and step noise); tables give the mean and a 95% t-interval over seeds.

Targets (issue #3):
* at each NFE and on every testbed, the best diffkit stochastic configuration matches or beats the best anchor:
  PASS when the mean difference (diffkit - anchor, paired by seed) is below the half-width of its 95% interval,
  i.e. diffkit is not significantly worse (FAIL otherwise);
* `diffkit.likelihood` within 0.01 nats/dim of the mixture's exact log-density (max over points of the error per
  dimension, at the process's σ̄_min).

    python bench/stochastic.py            # full run, writes BENCHMARKS.md, bench/results, bench/figures
    python bench/stochastic.py --quick    # smoke run: N = 300, 2 seeds, NFE 10/20, a subset; no BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import multiprocessing as mp
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import anchors as A  # noqa: E402

import diffkit  # noqa: E402
from diffkit import metrics  # noqa: E402
from diffkit.demo import pyplot, save_figure  # noqa: E402
from diffkit.likelihood import likelihood  # noqa: E402
from diffkit.solvers import get_solver  # noqa: E402
from diffkit.testbeds import GaussianMixture  # noqa: E402

F64 = torch.float64
MARKER = "bench/stochastic.py"
NFES, QUICK_NFES = (10, 20, 50, 100), (10, 20)
SEEDS, QUICK_SEEDS = 5, 2
N, QUICK_N = 1500, 300
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}

TESTBEDS = {
    "ring2d": ("2-D ring (8 modes, std 0.08), EDM, σ̄ ∈ [0.002, 80]",
               lambda: (GaussianMixture.ring(8, 1.0, 0.08), diffkit.EDM(0.002, 80.0, 0.5))),
    "grid2d": ("2-D grid (4x4 modes, std 0.06), Stable-Diffusion VP (scaled_linear), σ̄ ∈ [0.0292, 14.6]",
               lambda: (GaussianMixture.grid(4, 0.6, 0.06), diffkit.VP.discrete("scaled_linear"))),
    "random16d": ("16-D random mixture (8 anisotropic components, seed 1), Stable-Diffusion VP, σ̄ ∈ [0.0292, 14.6]",
                  lambda: (GaussianMixture.random(16, 8, seed=1), diffkit.VP.discrete("scaled_linear"))),
}


# ------------------------------------------------------------------------------------------------------------
# testbeds
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Bed:
    key: str
    mixture: GaussianMixture
    process: diffkit.Process
    s_min: float
    s_max: float
    bandwidths: tuple[float, float]
    data_var: float  # mean per-sample variance over features of clean samples (the time-shift sampler's input)
    entropy: float
    denoiser: diffkit.Denoiser = field(repr=False, default=None)


def make_bed(key: str) -> Bed:
    mixture, process = TESTBEDS[key][1]()
    b0 = float(mixture.eigvals.mean().sqrt())  # typical component standard deviation
    ref = mixture.sample(20000, generator=torch.Generator().manual_seed(123), dtype=F64)
    data_var = float(ref.var(dim=1).mean())
    entropy = float(-mixture.log_prob(ref).mean())
    pred = "edm" if isinstance(process, diffkit.EDM) else "eps"
    return Bed(key, mixture, process, process.sigma_bar_min, process.sigma_bar_max, (b0, 4 * b0), data_var,
               entropy, mixture.denoiser(process, pred))


def start_noise(bed: Bed, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, bed.mixture.dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def evaluate(bed: Bed, x: torch.Tensor) -> dict:
    x = x.to(F64)
    if not torch.isfinite(x).all():
        return {"mmd": math.inf, "weight": math.inf, "cov": math.inf, "xent": math.inf}
    ce = metrics.component_errors(x, bed.mixture)
    return {"mmd": metrics.mmd_mixture(x, bed.mixture, bed.bandwidths),
            "weight": metrics.mode_weight_error(x, bed.mixture), "cov": ce["cov_error"],
            "xent": metrics.cross_entropy(x, bed.mixture) - bed.entropy}


# ------------------------------------------------------------------------------------------------------------
# configurations: (label, library, kind, run(bed, z, nfe, seed) -> (x̄ at σ̄ = 0, calls))
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Cfg:
    label: str
    library: str  # diffkit | diffusers | k-diffusion
    kind: str  # stochastic | deterministic
    run: Callable


def _diffkit_cfg(name: str, schedule: str | None = None, options: dict | None = None, tag: str = "") -> Cfg:
    spec = get_solver(name)
    sched = schedule or spec.schedule
    opts = dict(options or {})

    def run(bed: Bed, z, nfe, seed):
        o = dict(opts)
        if name.startswith("ts_"):
            o.setdefault("data_var", bed.data_var)
        x, info = diffkit.sample(bed.denoiser, z, solver=name, nfe=nfe, schedule=sched, options=o,
                                 generator=torch.Generator().manual_seed(10_000 + seed), return_info=True)
        return x, info["nfe"]

    opt_txt = ", ".join(f"{k}={v}" for k, v in opts.items())
    label = f"{name}({sched}{', ' + opt_txt if opt_txt else ''}{tag})"
    return Cfg(label, "diffkit", "stochastic" if spec.stochastic else "deterministic", run)


def diffkit_configs(quick: bool) -> list[Cfg]:
    names = diffkit.solvers() if callable(diffkit.solvers) else list(diffkit.solvers)
    stoch = [n for n in names if get_solver(n).stochastic]
    det = [n for n in names if not get_solver(n).stochastic]
    cfgs = [_diffkit_cfg(n) for n in stoch]
    # option variants chosen by a sweep on other seeds (100, 101) than the ones scored here (0-4)
    cfgs += [_diffkit_cfg("dpmpp_2m_sde", "karras"), _diffkit_cfg("sa_solver", "karras"),
             _diffkit_cfg("sa_solver", "logsnr", {"tau": 0.7}),
             _diffkit_cfg("dpmpp_2m_sde", "logsnr", {"eta": 0.5}),
             _diffkit_cfg("euler_ancestral", "logsnr", {"eta": 0.5}),
             _diffkit_cfg("dpmpp_3m_sde", "logsnr", {"eta": 0.5}),
             _diffkit_cfg("dpmpp_2s_sde_heun", "logsnr", {"eta": 0.5}),
             _diffkit_cfg("edm_sde", "karras", {"s_churn": 5.0})]
    cfgs += [_diffkit_cfg(n) for n in det]
    if quick:
        keep = ("ddpm(", "euler_ancestral(", "dpmpp_2m_sde(", "dpmpp_3m_sde(", "sa_solver(", "edm_sde(", "dpmpp_2m(",
                "unipc(", "euler(")
        cfgs = [c for c in cfgs if c.label.startswith(keep)]
    return cfgs


# -- diffusers ---------------------------------------------------------------------------------------------------


def _vp_for(bed: Bed):
    """(discrete VP the diffusers VP schedulers run, base kwargs, tag): the testbed's own SD table, or the
    equivalent log-uniform table over its σ̄ range (bench/anchors.py `vp_equivalent`)."""
    p = bed.process
    if isinstance(p, diffkit.processes.DiscreteVP) and p.name is not None:
        return p, dict(beta_schedule=p.name["preset"], beta_start=p.name["beta_start"], beta_end=p.name["beta_end"],
                       num_train_timesteps=p.num_train_timesteps), ""
    vp = A.vp_equivalent(bed.s_min, bed.s_max)
    return vp, dict(trained_betas=vp.betas.numpy(), num_train_timesteps=vp.num_train_timesteps), ", VP-reparam"


def _diffusers_cfg(label: str, cls_name: str, kwargs: dict, state: str, step_kwargs: dict | None = None) -> Cfg:
    """state: 'native' (VP x_t = alpha x̄: DDPM, DDIM, DPMSolverMultistep, SASolver), 'sigma' (Euler-type schedulers
    whose state is x̄, model input scaled by the scheduler), 'edm' (EDM schedulers, EDM-preconditioned network)."""

    def run(bed: Bed, z, nfe, seed):
        import diffusers

        cls = getattr(diffusers, cls_name)
        x_bar0 = bed.process.noise_to_canonical(z, bed.s_max)
        n = z.shape[0]
        if state == "edm":
            edm = diffkit.EDM(bed.s_min, bed.s_max, 0.5)
            model = bed.mixture.model(edm, "edm")

            def make():
                return cls(sigma_min=bed.s_min, sigma_max=bed.s_max, sigma_data=0.5, **kwargs)
            start = x_bar0
        else:
            vp, base, _ = _vp_for(bed)
            model = bed.mixture.model(vp, "eps")

            def make():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return cls(**base, **kwargs)
            alpha_T = float(vp.alpha(torch.tensor(vp.t_max, dtype=F64)))
            start = x_bar0 * alpha_T if state == "native" else x_bar0
        sch = _fit_steps(make, nfe, (label, bed.key))
        torch.manual_seed(20_000 + seed)
        g = torch.Generator().manual_seed(20_000 + seed)
        takes_gen = "generator" in inspect.signature(sch.step).parameters
        counted = A.Counted(model)
        x = start.clone()
        for t in sch.timesteps:
            inp = sch.scale_model_input(x, t)
            out = counted(inp, torch.as_tensor(t).to(F64).reshape(-1)[:1].expand(n))
            x = sch.step(out, t, x, **({"generator": g} if takes_gen else {}), **(step_kwargs or {}),
                         return_dict=False)[0]
        return x, counted.calls

    return Cfg("diffusers:" + label, "diffusers", "stochastic", run)


_STEPS_CACHE: dict = {}


def _fit_steps(make, nfe: int, key):
    """A scheduler set to the largest step count whose timesteps (one model call each) fit `nfe`; the count is
    cached per (configuration, testbed, nfe) since building some schedulers costs ~0.3 s."""
    if (key, nfe) in _STEPS_CACHE:
        sch = make()
        sch.set_timesteps(_STEPS_CACHE[(key, nfe)])
        return sch
    steps, tried = nfe, set()
    while steps >= 1 and steps not in tried:
        tried.add(steps)
        sch = make()
        try:
            sch.set_timesteps(steps)
        except Exception:
            steps -= 1
            continue
        calls = len(sch.timesteps)
        if calls <= nfe:
            if steps + 1 not in tried and steps < nfe:  # make sure one more step would not also fit
                nxt = make()
                try:
                    nxt.set_timesteps(steps + 1)
                    if len(nxt.timesteps) <= nfe:
                        steps += 1
                        continue
                except Exception:
                    pass
            _STEPS_CACHE[(key, nfe)] = steps
            return sch
        steps = min(steps - 1, max(1, steps * nfe // calls))
    raise ValueError(f"no step count fits {nfe} calls")


def diffusers_configs(quick: bool) -> list[Cfg]:
    sde = dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, timestep_spacing="trailing")
    cfgs = [
        _diffusers_cfg("DDPM(trailing)", "DDPMScheduler", dict(clip_sample=False, timestep_spacing="trailing"),
                       "native"),
        _diffusers_cfg("EulerAncestralDiscrete(trailing)", "EulerAncestralDiscreteScheduler",
                       dict(timestep_spacing="trailing"), "sigma"),
        _diffusers_cfg("DPMSolverMultistep(sde-dpmsolver++, 2M midpoint, karras)", "DPMSolverMultistepScheduler",
                       dict(solver_order=2, solver_type="midpoint", **sde), "native"),
        _diffusers_cfg("DPMSolverMultistep(sde-dpmsolver++, 2M heun, karras)", "DPMSolverMultistepScheduler",
                       dict(solver_order=2, solver_type="heun", **sde), "native"),
        _diffusers_cfg("DPMSolverMultistep(sde-dpmsolver++, 3M, karras)", "DPMSolverMultistepScheduler",
                       dict(solver_order=3, **sde), "native"),
        _diffusers_cfg("SASolver(default)", "SASolverScheduler", {}, "native"),
        _diffusers_cfg("SASolver(karras)", "SASolverScheduler", dict(use_karras_sigmas=True), "native"),
        _diffusers_cfg("KDPM2AncestralDiscrete(karras)", "KDPM2AncestralDiscreteScheduler",
                       dict(use_karras_sigmas=True), "sigma"),
        _diffusers_cfg("EDMDPMSolverMultistep(sde-dpmsolver++, 2M, karras)", "EDMDPMSolverMultistepScheduler",
                       dict(algorithm_type="sde-dpmsolver++", solver_order=2), "edm"),
    ]
    if not quick:
        cfgs.append(_diffusers_cfg("DDIM(eta=1, trailing)", "DDIMScheduler",
                                   dict(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing"),
                                   "native", {"eta": 1.0}))
        cfgs.append(_diffusers_cfg("DPMSolverSDE(karras)", "DPMSolverSDEScheduler", dict(use_karras_sigmas=True),
                                   "sigma"))
    return cfgs


# -- k-diffusion -------------------------------------------------------------------------------------------------


def _kd_cfg(label: str, fn_name: str, calls: Callable[[int], int], grid: str, gaussian_noise: bool = False,
            **kw) -> Cfg:
    """gaussian_noise: pass a noise sampler of fresh N(0, I) draws instead of k-diffusion's default Brownian tree
    (for one run the two are the same distribution, independent normal increments over disjoint steps; the tree
    costs ~80 ms per query for a 1500 x 16 batch)."""

    def run(bed: Bed, z, nfe, seed):
        K = A.import_k_diffusion_sampling()
        steps = max((k for k in range(1, nfe + 1) if calls(k) <= nfe), default=None)
        if steps is None:
            raise ValueError(f"budget {nfe} too small")
        old = torch.get_default_dtype()
        torch.set_default_dtype(F64)
        try:
            gfn = K.get_sigmas_karras if grid == "karras" else K.get_sigmas_exponential
            sigmas = gfn(steps, bed.s_min, bed.s_max).to(F64)
        finally:
            torch.set_default_dtype(old)
        model = A.Counted(lambda x, s, **_: bed.mixture.denoise(x, s))
        torch.manual_seed(30_000 + seed)  # randn_like and the Brownian tree seed come from the global generator
        x0 = bed.process.noise_to_canonical(z, bed.s_max)
        extra = {"noise_sampler": lambda s, s_next: torch.randn_like(x0)} if gaussian_noise else {}
        x = getattr(K, fn_name)(model, x0, sigmas, disable=True, **kw, **extra)
        return x, model.calls

    opt = "".join(f", {k}={v}" for k, v in kw.items())
    return Cfg(f"k-diffusion:{fn_name}({grid}{opt})", "k-diffusion", "stochastic", run)


def k_diffusion_configs(quick: bool) -> list[Cfg]:
    one, two = (lambda n: n), (lambda n: 2 * n - 1)
    cfgs = [_kd_cfg("", "sample_euler_ancestral", one, "karras"),
            _kd_cfg("", "sample_dpm_2_ancestral", two, "karras"),
            _kd_cfg("", "sample_dpmpp_2s_ancestral", two, "karras"),
            _kd_cfg("", "sample_dpmpp_sde", two, "karras", True),
            _kd_cfg("", "sample_dpmpp_2m_sde", one, "karras", True),
            _kd_cfg("", "sample_dpmpp_2m_sde", one, "karras", True, solver_type="heun"),
            _kd_cfg("", "sample_dpmpp_3m_sde", one, "karras", True),
            _kd_cfg("", "sample_heun", two, "karras", s_churn=40.0, s_tmin=0.05, s_tmax=50.0)]
    if not quick:
        cfgs += [_kd_cfg("", "sample_dpmpp_2m_sde", one, "exponential", True),
                 _kd_cfg("", "sample_dpmpp_3m_sde", one, "exponential", True)]
    return cfgs


# ------------------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------------------

_CFGS: list[Cfg] = []
_BEDS: dict[str, Bed] = {}


def _task(args):
    key, ci, nfes, seeds, n = args
    torch.set_num_threads(1)
    bed, cfg = _BEDS[key], _CFGS[ci]
    out = []
    for nfe in nfes:
        for seed in range(seeds):
            z = start_noise(bed, n, seed)
            t0 = time.perf_counter()
            rec = {"bed": key, "cfg": cfg.label, "library": cfg.library, "kind": cfg.kind, "nfe": nfe, "seed": seed}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    x, calls = cfg.run(bed, z, nfe, seed)
                if calls > nfe:
                    raise RuntimeError(f"made {calls} calls, above the budget of {nfe}")
                rec.update(calls=calls, **evaluate(bed, x))
            except ValueError as e:  # the configuration cannot run within this budget
                rec["na"] = str(e)[:200]
            except Exception as e:  # noqa: BLE001 - recorded, reported as a failure of that configuration
                rec["error"] = f"{type(e).__name__}: {e}"[:300]
                rec["trace"] = traceback.format_exc()[-800:]
            rec["seconds"] = time.perf_counter() - t0
            out.append(rec)
    return out


def likelihood_check(keys, n: int) -> list[dict]:
    """`diffkit.likelihood` with default settings vs the exact log p(x; σ̄_min) on each testbed."""
    rows = []
    for key in keys:
        bed = _BEDS[key]
        x = bed.mixture.sample(n, generator=torch.Generator().manual_seed(7), dtype=F64)
        t0 = time.perf_counter()
        lp, info = likelihood(bed.denoiser, x, return_info=True)
        secs = time.perf_counter() - t0
        d = bed.mixture.dim
        err = (lp - bed.mixture.log_prob(x, bed.s_min)).abs() / d
        err0 = (lp - bed.mixture.log_prob(x, 0.0)).abs() / d
        rows.append({"bed": key, "n": n, "dim": d, "sigma_min": bed.s_min, "max_err_per_dim": float(err.max()),
                     "mean_err_per_dim": float(err.mean()), "mean_err_vs_data_density": float(err0.mean()),
                     "nfe": info["nfe"], "seconds": secs, "pass": bool(float(err.max()) < 0.01)})
    return rows


# ------------------------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------------------------


def _ci(vals: list[float]) -> tuple[float, float]:
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return m, math.nan
    return m, T95.get(len(vals) - 1, 1.96) * statistics.stdev(vals) / math.sqrt(len(vals))


def summarize(records, metric="mmd") -> dict:
    """(bed, cfg, nfe) -> {'mean', 'ci', 'vals' (by seed), 'calls', 'library', 'kind'} over complete seed sets."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["bed"], r["cfg"], r["nfe"]), []).append(r)
    out = {}
    for k, rs in groups.items():
        if any(("na" in r) or ("error" in r) for r in rs):
            continue
        rs = sorted(rs, key=lambda r: r["seed"])
        vals = [r[metric] for r in rs]
        if not all(math.isfinite(v) for v in vals):
            m, ci = math.inf, math.nan
        else:
            m, ci = _ci(vals)
        out[k] = {"mean": m, "ci": ci, "vals": vals, "calls": max(r["calls"] for r in rs), "library": rs[0]["library"],
                  "kind": rs[0]["kind"]}
    return out


def best(summary, bed, nfe, pred):
    cands = [(v["mean"], cfg, v) for (b, cfg, n), v in summary.items() if b == bed and n == nfe and pred(v)]
    return min(cands, key=lambda c: c[0]) if cands else None


def targets(summary, keys, nfes) -> list[dict]:
    rows = []
    for key in keys:
        for nfe in nfes:
            dk = best(summary, key, nfe, lambda v: v["library"] == "diffkit" and v["kind"] == "stochastic")
            an = best(summary, key, nfe, lambda v: v["library"] != "diffkit")
            det = best(summary, key, nfe, lambda v: v["library"] == "diffkit" and v["kind"] == "deterministic")
            row = {"bed": key, "nfe": nfe, "diffkit": dk and (dk[1], dk[2]["mean"], dk[2]["ci"]),
                   "anchor": an and (an[1], an[2]["mean"], an[2]["ci"]),
                   "deterministic": det and (det[1], det[2]["mean"], det[2]["ci"])}
            if dk and an:
                diff = [a - b for a, b in zip(dk[2]["vals"], an[2]["vals"])]
                m, half = _ci(diff)
                row["diff"], row["diff_ci"] = m, half
                row["pass"] = bool(m <= 0 or m < half)
            else:
                row["pass"] = None
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------------------


def _e(v: float, scale: float = 1e4) -> str:
    return "inf" if not math.isfinite(v) else f"{v * scale:.2f}"


def _cell(s, scale=1e4) -> str:
    if s is None:
        return "n/a"
    if not math.isfinite(s["mean"]):
        return "diverged"
    return f"{_e(s['mean'], scale)} ± {_e(s['ci'], scale) if math.isfinite(s['ci']) else '?'}"


def plot(summary, keys, nfes, path: Path):
    plt = pyplot()

    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.6), squeeze=False)
    groups = [("diffkit stochastic", lambda v: v["library"] == "diffkit" and v["kind"] == "stochastic", "C0"),
              ("diffkit deterministic", lambda v: v["library"] == "diffkit" and v["kind"] == "deterministic", "C2"),
              ("diffusers", lambda v: v["library"] == "diffusers", "C1"),
              ("k-diffusion", lambda v: v["library"] == "k-diffusion", "C3")]
    for ax, key in zip(axes[0], keys):
        for gname, pred, color in groups:
            # the group's configuration with the best geometric-mean error over the budgets it can run
            cfgs = {cfg for (b, cfg, n), v in summary.items() if b == key and pred(v)}

            def score(cfg):
                vals = [summary[(key, cfg, nfe)]["mean"] for nfe in nfes if (key, cfg, nfe) in summary]
                if len(vals) < len(nfes) or not all(math.isfinite(v) for v in vals):
                    return math.inf
                return sum(math.log10(max(v, 1e-5)) for v in vals)

            if not cfgs:
                continue
            top = min(cfgs, key=score)
            pts = [(nfe, summary[(key, top, nfe)]) for nfe in nfes if (key, top, nfe) in summary]
            pts = [(n_, s) for n_, s in pts if math.isfinite(s["mean"])]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1]["mean"] for p in pts]
            es = [p[1]["ci"] if math.isfinite(p[1]["ci"]) else 0 for p in pts]
            ax.errorbar(xs, ys, yerr=es, color=color, marker="o", capsize=3, label=f"{gname}: {top}")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=5e-4)  # linear within the seed noise around 0, log above
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xlabel("NFE (model calls)")
        ax.set_ylabel("MMD² to the mixture (mean ± 95% CI; symlog)")
        ax.set_title(key)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def markdown(meta, summary, sec, tg, lik, keys, nfes, fig_rel) -> str:
    L = []
    L.append("## Stochastic samplers: distribution error vs NFE (bench/stochastic.py)\n")
    L.append(f"Generated by `python bench/stochastic.py` on {meta['date']} ({meta['platform']}, torch {meta['torch']}, "
             f"diffusers {meta['diffusers']}, k-diffusion {meta['k_diffusion']}); runtime {meta['seconds']:.0f} s "
             f"with {meta['jobs']} worker processes. N = {meta['n']} samples per run, {meta['seeds']} seeds "
             f"(start noise and step noise independent per seed), NFE = hard budget of model calls, counted.\n")
    L.append("Distribution error: **MMD²(q, p)** between the samples and the exact mixture (RBF kernel "
             "Σ_b exp(-|x-y|²/2b²), bandwidths b listed per testbed; p's terms are exact Gaussian integrals, so the "
             "estimate is unbiased: exact samples give 0 ± noise, and small negative values occur). Values are "
             "×10⁴, mean ± 95% t-interval over seeds. Every library starts from the same canonical noise and calls the "
             "same exact network.\n")
    L.append("Testbeds:\n")
    for key in keys:
        b = _BEDS[key]
        L.append(f"* **{key}**: {TESTBEDS[key][0]}; bandwidths b = {b.bandwidths[0]:.4g}, {b.bandwidths[1]:.4g}; "
                 f"time-shift `data_var` = {b.data_var:.4g}.")
    L.append("")
    L.append("### Targets\n")
    L.append("| testbed | NFE | best diffkit stochastic | best anchor | diffkit − anchor (95% CI) | best diffkit "
             "deterministic | verdict |")
    L.append("|---|---|---|---|---|---|---|")
    for r in tg:
        def fmt(t):
            return "n/a" if not t else f"`{t[0]}` {_e(t[1])} ± {_e(t[2])}"
        diff = (f"{_e(r['diff'])} ± {_e(r['diff_ci'])}" if r.get("diff") is not None else "n/a")
        verdict = {True: "PASS", False: "**FAIL**", None: "n/a"}[r["pass"]]
        L.append(f"| {r['bed']} | {r['nfe']} | {fmt(r['diffkit'])} | {fmt(r['anchor'])} | {diff} | "
                 f"{fmt(r['deterministic'])} | {verdict} |")
    n_pass = sum(1 for r in tg if r["pass"])
    n_all = sum(1 for r in tg if r["pass"] is not None)
    overall = "PASS" if n_pass == n_all and n_all else "FAIL"
    L.append("")
    L.append(f"**Target 1 (best diffkit stochastic matches or beats the best anchor at equal NFE, every testbed): "
             f"{overall}** ({n_pass}/{n_all} testbed × NFE cells). PASS in a cell means the paired (by seed) mean "
             "difference diffkit − anchor is ≤ 0 or below the half-width of its 95% interval (not significantly "
             "worse). The best configuration on each side is chosen on the same seeds it is scored on.\n")
    L.append("Cross-check with a metric the kernel's bandwidths cannot hide (informational, not a target): the "
             "smallest whitened covariance error ||Σ_k^{-1/2} Σ̂_k Σ_k^{-1/2} - I||_F (w-weighted, mean over seeds) "
             "among diffkit's stochastic configurations and among the anchors. MMD² with these bandwidths saturates at "
             "NFE ≥ 50 (most configurations are within noise of 0); this metric still separates them. Its floor on "
             "the VP testbeds comes from σ̄_min = 0.029 (one denoising step to 0 from there) against component "
             "standard deviations of 0.02-0.06.\n")
    L.append("| testbed | NFE | diffkit stochastic | anchor | diffkit deterministic |")
    L.append("|---|---|---|---|---|")
    cov = sec["cov"]
    for key in keys:
        for nfe in nfes:
            cells = []
            for pred in (lambda v: v["library"] == "diffkit" and v["kind"] == "stochastic",
                         lambda v: v["library"] != "diffkit",
                         lambda v: v["library"] == "diffkit" and v["kind"] == "deterministic"):
                b = best(cov, key, nfe, pred)
                cells.append("n/a" if b is None else f"{b[0]:.3f} `{b[1]}`")
            L.append(f"| {key} | {nfe} | " + " | ".join(cells) + " |")
    L.append("")
    lp = all(r["pass"] for r in lik)
    L.append(f"**Target 2 (likelihood within 0.01 nats/dim of the exact log-density): {'PASS' if lp else 'FAIL'}**\n")
    L.append("| testbed | dim | points | σ̄_min | max error (nats/dim) | mean error | mean error vs log p₀ (σ̄=0) "
             "| ODE evaluations | seconds |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in lik:
        L.append(f"| {r['bed']} | {r['dim']} | {r['n']} | {r['sigma_min']:.4g} | {r['max_err_per_dim']:.2e} | "
                 f"{r['mean_err_per_dim']:.2e} | {r['mean_err_vs_data_density']:.2e} | {r['nfe']} | "
                 f"{r['seconds']:.1f} |")
    L.append("")
    L.append("`diffkit.likelihood` defaults: exact trace, RK45 at rtol = atol = 1e-6 in log σ̄, the Gaussian prior "
             "at σ̄_max matched to Tweedie's mean and covariance (`prior='auto'`). The model's density is that of "
             "the data smoothed to σ̄_min, so the reference is log p(x; σ̄_min); the column against log p₀ shows what "
             "the smoothing itself costs on the VP testbeds (σ̄_min = 0.029 against component stds of 0.06).\n")
    L.append(f"![MMD² vs NFE]({fig_rel})\n")
    for key in keys:
        L.append(f"### {key}: MMD² ×10⁴ (mean ± 95% CI) by configuration\n")
        cfgs = sorted({cfg for (b, cfg, n) in summary if b == key},
                      key=lambda c: (summary.get((key, c, nfes[-1]), {"mean": math.inf})["mean"], c))
        L.append("| configuration | library | kind | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
        L.append("|---|---|---|" + "---|" * len(nfes))
        for c in cfgs:
            any_v = next(v for (b, cc, n), v in summary.items() if b == key and cc == c)
            cells = [_cell(summary.get((key, c, n))) for n in nfes]
            L.append(f"| `{c}` | {any_v['library']} | {any_v['kind']} | " + " | ".join(cells) + " |")
        L.append("")
        mid = nfes[len(nfes) // 2]
        L.append(f"Secondary metrics at NFE {mid} for the 6 best configurations there (mode-weight TV, whitened "
                 "covariance error, excess cross-entropy in nats; mean over seeds):\n")
        top = sorted([(v["mean"], c) for (b, c, n), v in summary.items() if b == key and n == mid])[:6]
        L.append("| configuration | MMD² ×10⁴ | weight TV | cov error | H(q,p) − H(p) |")
        L.append("|---|---|---|---|---|")
        for _, c in top:
            L.append(f"| `{c}` | {_cell(summary[(key, c, mid)])} | {sec['weight'][(key, c, mid)]['mean']:.4f} | "
                     f"{sec['cov'][(key, c, mid)]['mean']:.3f} | {sec['xent'][(key, c, mid)]['mean']:+.4f} |")
        L.append("")
    if meta["failures"]:
        L.append("### Configurations that failed to run\n")
        for f in meta["failures"][:20]:
            L.append(f"* `{f['cfg']}` on {f['bed']} at NFE {f['nfe']}: {f['error']}")
        L.append("")
    L.append("Notes: diffusers' VP schedulers run the EDM testbed through an equivalent discrete VP table "
             "(`VP-reparam`, bench/anchors.py); `n/a` means the configuration cannot run within the budget. "
             "DDPM, DDIM(η=1) and Euler-ancestral are the same update in canonical variables (they differ only in "
             "their default grids). diffkit's `dpmpp_3m_sde` integrates the quadratic term exactly (the reference "
             "code, k-diffusion and diffusers weight it by half). The time-shift samplers estimate the noise level "
             "from the variance over features: with 2 features (ring2d, grid2d) that estimate is mostly noise. "
             "k-diffusion's SDE samplers (dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde) are given a noise sampler of fresh "
             "N(0, I) draws instead of their default Brownian tree: for a single run both give independent normal "
             "increments over disjoint steps (the same distribution), and the tree costs ~80 ms per query at this "
             "batch size; diffusers' DPMSolverSDE keeps its own tree. diffkit's option variants (η, τ, grids) were "
             "chosen by a sweep on seeds 100-101, not the seeds scored here.")
    return "\n".join(L) + "\n"


def write_section(path: Path, body: str):
    """Replace this script's block of BENCHMARKS.md (appended when missing), atomically."""
    from diffkit.benchmark import write_block

    write_block(path, body, MARKER)


def render(res_path: Path, md: str | None):
    """Markdown and figure from a saved results JSON (no sampling)."""
    data = json.loads(res_path.read_text())
    meta, records, lik = data["meta"], data["records"], data["likelihood"]
    keys = list(data["testbeds"])
    for k in keys:
        _BEDS[k] = make_bed(k)
    nfes = tuple(meta["nfes"])
    summary = summarize(records)
    sec = {m: summarize(records, m) for m in ("weight", "cov", "xent")}
    tg = targets(summary, keys, nfes)
    suffix = "_quick" if meta["quick"] else ""
    fig_path = HERE / "figures" / f"stochastic_mmd_vs_nfe{suffix}.png"
    plot(summary, keys, nfes, fig_path)
    text = markdown(meta, summary, sec, tg, lik, keys, nfes, f"bench/figures/{fig_path.name}")
    write_section(Path(md) if md else ROOT / "BENCHMARKS.md", text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--md", default=None, help="markdown file to update (default BENCHMARKS.md; none with --quick)")
    ap.add_argument("--render", default=None, help="only re-render markdown and figure from a results JSON")
    args = ap.parse_args()
    if args.render:
        return render(Path(args.render), args.md)
    quick = args.quick
    t_start = time.perf_counter()
    keys = list(TESTBEDS)
    nfes = QUICK_NFES if quick else NFES
    seeds = QUICK_SEEDS if quick else SEEDS
    n = QUICK_N if quick else N
    for k in keys:
        _BEDS[k] = make_bed(k)
    _CFGS.extend(diffkit_configs(quick) + diffusers_configs(quick) + k_diffusion_configs(quick))
    tasks = [(k, ci, nfes, seeds, n) for k in keys for ci in range(len(_CFGS))]
    # longest first: configurations with many calls per step and the 16-D testbed
    tasks.sort(key=lambda t: (t[0] != "random16d", t[1]))
    records = []
    if args.jobs > 1:
        with mp.get_context("fork").Pool(args.jobs) as pool:
            for i, out in enumerate(pool.imap_unordered(_task, tasks)):
                records.extend(out)
                if (i + 1) % 20 == 0:
                    print(f"  {i + 1}/{len(tasks)} configurations done ({time.perf_counter() - t_start:.0f} s)",
                          flush=True)
    else:
        for t in tasks:
            records.extend(_task(t))
    torch.set_num_threads(max(1, args.jobs))
    lik = likelihood_check(keys, 64 if quick else 200)
    summary = summarize(records)
    sec = {m: summarize(records, m) for m in ("weight", "cov", "xent")}
    tg = targets(summary, keys, nfes)
    failures = [{"bed": r["bed"], "cfg": r["cfg"], "nfe": r["nfe"], "error": r["error"]} for r in records
                if "error" in r]
    import diffusers

    meta = {"date": time.strftime("%Y-%m-%d"), "platform": platform.platform(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "k_diffusion": A.k_diffusion_version(), "n": n, "seeds": seeds,
            "nfes": list(nfes), "jobs": args.jobs, "quick": quick, "failures": failures,
            "seconds": time.perf_counter() - t_start}
    suffix = "_quick" if quick else ""
    res_path = HERE / "results" / f"stochastic{suffix}.json"
    fig_path = HERE / "figures" / f"stochastic_mmd_vs_nfe{suffix}.png"
    res_path.parent.mkdir(parents=True, exist_ok=True)
    plot(summary, keys, nfes, fig_path)
    meta["seconds"] = time.perf_counter() - t_start
    from diffkit.checkpoint import atomic_write

    atomic_write(res_path, json.dumps({"meta": meta, "testbeds": {k: {"title": TESTBEDS[k][0],
                                                                      "bandwidths": _BEDS[k].bandwidths,
                                                                      "data_var": _BEDS[k].data_var} for k in keys},
                                       "records": [{k: v for k, v in r.items() if k != "trace"} for r in records],
                                       "targets": tg, "likelihood": lik}, indent=1, default=str).encode())
    md = markdown(meta, summary, sec, tg, lik, keys, nfes, f"bench/figures/{fig_path.name}")
    md_path = Path(args.md) if args.md else (None if quick else ROOT / "BENCHMARKS.md")
    if md_path is not None:
        write_section(md_path, md)
    # console summary
    for r in tg:
        v = {True: "PASS", False: "FAIL", None: "n/a"}[r["pass"]]
        dk = r["diffkit"] and f"{r['diffkit'][0]} {_e(r['diffkit'][1])}±{_e(r['diffkit'][2])}"
        an = r["anchor"] and f"{r['anchor'][0]} {_e(r['anchor'][1])}±{_e(r['anchor'][2])}"
        print(f"{r['bed']:10s} NFE {r['nfe']:3d}  diffkit {dk}  |  anchor {an}  -> {v}")
    for r in lik:
        print(f"likelihood {r['bed']}: max {r['max_err_per_dim']:.2e} nats/dim -> {'PASS' if r['pass'] else 'FAIL'}")
    if failures:
        print(f"{len(failures)} failed runs, e.g. {failures[0]}")
    print(f"total {time.perf_counter() - t_start:.0f} s; results {res_path}, figure {fig_path}")


if __name__ == "__main__":
    main()
