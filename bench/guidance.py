#!/usr/bin/env python
"""Guidance benchmark on the shipped class-conditional 16x16 digits model (`diffkit.demo.digits_model`).

Every configuration samples the same class-balanced labels (0..9 repeated) from the same fixed noise with the
probability-flow ODE and is scored in the feature space of diffkit's digits classifier (`diffkit.image_metrics`):
class accuracy, Fréchet distance (FD) to the held-out real digits, and two stability measures of the raw samples
(before any clipping): the fraction of saturated pixels, |x| > 1.1 (beyond the data range [-1, 1] by more than
5 % of its width; the unguided model already puts 16 % of its pixels just past |x| = 1, the digits' background
sits at -1), and a divergence flag (any non-finite value, or a sample RMS above 3). Accuracy and FD are measured
on the samples clipped to [-1, 1], as an image would be saved. Cost: model calls (solver evaluations) and network
passes per trajectory (`guided.passes`: a batched cond + uncond call is one call of two passes).

1. Scale sweep at DPM-Solver++(2M), NFE 10: CFG, CFG + rescale (φ = 0.7), CFG++ (λ), CFG in a limited interval,
   PAG (with and without CFG), classifier guidance with the noise-conditional digits classifier, gradient-free
   classifier guidance; the main variants also with Euler (DDIM), Heun, UniPC at NFE 10 and DPM-Solver++(2M) at
   NFE 20.
2. Target A: CFG++ and guidance rescale stay stable where plain CFG (DPM-Solver++(2M), NFE 10) breaks
   (breaks = saturated fraction > 5 % or divergence).
3. Target B: Adaptive Guidance saves >= 20 % of network passes at an FD within 5 % of full CFG (w = 3), paired on
   the same noise: AG with its default rule (cosine of D_c and D_u, `space="x0"`) over thresholds γ̄, the paper's
   ε̂ rule (`space="eps"`), LinearAG, at DPM-Solver++(2M) NFE 20 and 10 (and UniPC NFE 10 for the D rule).
4. Anchor: diffusers' schedulers driven with CFG as its pipelines do it (noise_uncond + w (noise_cond -
   noise_uncond), diffusers' own `rescale_noise_cfg` for guidance rescale) on the same UNet.

    python bench/guidance.py                  # full run (~15 min on 2 busy cores): BENCHMARKS.md, bench/results,
                                              # bench/figures
    python bench/guidance.py --quick          # smoke run (~1 min): 50 samples, a few configurations; outputs to a
                                              # temporary folder, BENCHMARKS.md untouched
    python bench/guidance.py --render bench/results/guidance.json   # re-render block and figures, no sampling
    python bench/guidance.py --resume         # reuse every row of bench/results/guidance.json whose configuration
                                              # key matches; sample only new or changed configurations (and the
                                              # full-CFG references of Target B, whose samples pair the ratios)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import anchors as A  # noqa: E402

import diffkit  # noqa: E402
from diffkit.benchmark import write_block  # noqa: E402
from diffkit.checkpoint import atomic_write  # noqa: E402
from diffkit.demo import (  # noqa: E402
    digits_model,
    pyplot,
    save_figure,
    tile_by_class,
)
from diffkit.guidance import (  # noqa: E402
    CFG,
    PAG,
    AdaptiveGuidance,
    CFGPlusPlus,
    ClassifierGuidance,
    GradientFreeGuidance,
    LinearAG,
)
from diffkit.image_metrics import classifier_accuracy, digit_features, reference_features  # noqa: E402
from diffkit.metrics import feature_statistics, frechet_distance  # noqa: E402
from diffkit.solvers import plan, sample  # noqa: E402

MARKER = "bench/guidance.py"
SAT_LEVEL = 1.1  # |x| above this counts as saturated
BREAK_SAT = 0.05  # a configuration "breaks" above this saturated fraction (or when it diverges)
DIVERGE_RMS = 3.0
RESCALE = 0.7
INTERVAL = (0.28, 5.42)  # Kynkäänniemi et al. 2024, their EDM2 interval (sigma_lo, sigma_hi]
PAG_CFG = 3.0
AG_W = 3.0
CLEAN_SIGMA = 0.01  # the noisy classifier as a clean classifier for GFCG
HALVES = 200  # random half-samples for the FD standard errors

VARIANTS = {  # key: (label, scale symbol)
    "cond": ("conditional model, no guidance", "-"),
    "cfg": ("CFG", "w"),
    "cfg_rescale": (f"CFG + rescale φ={RESCALE}", "w"),
    "cfgpp": ("CFG++", "λ"),
    "cfg_interval": (f"CFG, interval σ̄∈({INTERVAL[0]}, {INTERVAL[1]}]", "w"),
    "pag": ("PAG (mid-block attention)", "s"),
    "pag_all": ("PAG (all 4 attention layers)", "s"),
    "pag_cfg": (f"PAG (all layers) + CFG w={PAG_CFG:g}", "s"),
    "cg": ("classifier guidance (noisy clf.)", "w"),
    "gfcg": ("gradient-free classifier guidance", "s"),
    "ag": (f"Adaptive Guidance, w={AG_W:g}", "γ̄"),  # labelled by its space, AG_SPACES
    "linear_ag": (f"LinearAG, w={AG_W:g}", "skip"),
    "cfg_trunc": (f"CFG w={AG_W:g} only for σ̄ > σ_lo", "σ_lo"),
}
AG_SPACES = {  # AdaptiveGuidance(space=...): what the cosine γ compares
    "eps": "Adaptive Guidance (ε̂, paper's rule)",
    "x0": "Adaptive Guidance (D, default)",
}
AG_EPS = {20: (0.991, 0.99999), 10: (0.991,)}  # the paper's ε̂ rule: per dpmpp_2m NFE
AG_X0 = (0.99, 0.995, 0.999, 0.9995, 0.9999)  # the D rule (default): every AG setting
AG_EXTRA = (("unipc", 10),)  # further (solver, NFE) for the D rule, with their full CFG and unguided rows
AG_SPACE_COMMIT = "1e10088"  # AdaptiveGuidance(space=...) appears; before it the rule was always ε̂
SKIPS = {  # LinearAG: which evaluations estimate the unconditional pass instead of running it
    "odd": ("every other evaluation (i odd)", lambda i: i % 2 == 1),
    "2of3": ("two of every three (i mod 3 != 0)", lambda i: i % 3 != 0),
}


# ------------------------------------------------------------------------------------------------------------
# configuration grid
# ------------------------------------------------------------------------------------------------------------


def grid(quick: bool) -> list[dict]:
    """Every configuration to run (dicts: group, variant, scale, solver, nfe, seed, schedule)."""
    out = []

    def add(group, variant, scale, solver="dpmpp_2m", nfe=10, seed=0, schedule=None, space=None):
        out.append(dict(group=group, variant=variant, scale=scale, solver=solver, nfe=nfe, seed=seed,
                        schedule=schedule, space=space))

    if quick:
        sweep = {"cfg": [1, 3, 10, 30], "cfg_rescale": [10, 30], "cfgpp": [0.4, 1.0], "cfg_interval": [3],
                 "pag": [3], "pag_all": [1], "pag_cfg": [1], "cg": [3], "gfcg": [3]}
        cross = {"cfg": [(3, [("euler", 10)])]}
    else:
        sweep = {"cfg": [1, 2, 3, 5, 7.5, 10, 15, 20, 30], "cfg_rescale": [3, 5, 7.5, 10, 15, 20, 30],
                 "cfgpp": [0.2, 0.4, 0.6, 0.8, 1.0], "cfg_interval": [3, 10], "pag": [3, 10],
                 "pag_all": [0.5, 1, 3], "pag_cfg": [1, 3], "cg": [1, 3, 10, 30], "gfcg": [3, 10, 30]}
        nfe10 = [("euler", 10), ("heun", 10), ("unipc", 10)]
        cross = {"cond": [(None, nfe10 + [("dpmpp_2m", 20)])], "cfg": [(3, nfe10 + [("dpmpp_2m", 20)]), (10, nfe10)],
                 "cfg_rescale": [(10, nfe10)], "cfgpp": [(1.0, nfe10 + [("dpmpp_2m", 20)])]}
    add("sweep", "cond", None)
    for v, scales in sweep.items():
        for s in scales:
            add("sweep", v, s)
    for v, entries in cross.items():
        for s, solvers in entries:
            for solver, nfe in solvers:
                add("solvers", v, s, solver, nfe)
    # target B: full CFG w=3 against AG (D and ε̂ rules) / LinearAG / a fixed switch point, dpmpp_2m at NFE 20, 10
    x0_th = (0.99, 0.999) if quick else AG_X0
    for nfe in (10,) if quick else (20, 10):
        add("ag", "cfg", AG_W, nfe=nfe)
        add("ag", "cond", None, nfe=nfe)
        for th in x0_th:
            add("ag", "ag", th, nfe=nfe, space="x0")
        for th in ((0.991,) if quick else AG_EPS[nfe]):
            add("ag", "ag", th, nfe=nfe, space="eps")
        for sk in (("odd",) if quick else ("odd", "2of3")):
            add("ag", "linear_ag", sk, nfe=nfe)
        for lo in (() if quick else (1.0, 0.3)):
            add("ag", "cfg_trunc", lo, nfe=nfe)
    for solver, nfe in () if quick else AG_EXTRA:  # the D rule with other solvers
        add("ag", "cfg", AG_W, solver, nfe)
        add("ag", "cond", None, solver, nfe)
        for th in x0_th:
            add("ag", "ag", th, solver, nfe, space="x0")
    for seed in (1,) if quick else (1, 2, 3, 4):  # unpaired FD noise: other noise draws
        add("ag", "cfg", AG_W, nfe=10 if quick else 20, seed=seed)
    # anchors: diffkit on the Karras grid the diffusers schedulers use
    for w in ([3] if quick else [1, 3, 10]):
        add("anchor", "cfg", w, schedule="karras")
    add("anchor", "cfg_rescale", 10, schedule="karras")
    return out


def anchor_grid(quick: bool) -> list[dict]:
    """diffusers configurations: scheduler key, w, rescale."""
    if quick:
        return [dict(sched="edm", w=3, rescale=0.0), dict(sched="edm", w=10, rescale=RESCALE)]
    out = [dict(sched="edm", w=w, rescale=0.0) for w in (1, 3, 10)] + [dict(sched="edm", w=10, rescale=RESCALE)]
    out += [dict(sched="vp", w=w, rescale=0.0) for w in (3, 10)] + [dict(sched="vp", w=10, rescale=RESCALE)]
    return out


def key_of(c: dict) -> tuple:
    """A configuration's identity (AG rows: with their space, so the ε̂ and D rules never share a key)."""
    return (c["variant"], c["scale"], c["solver"], c["nfe"], c["seed"], c["schedule"], c.get("space"))


def label(r: dict) -> str:
    if r["variant"] == "ag":
        return f"{AG_SPACES[r.get('space') or 'eps']}, w={AG_W:g}"
    return VARIANTS[r["variant"]][0] if r["variant"] != "cond" else "conditional model only"


# ------------------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, n: int, chunk: int, quick: bool):
        self.den = digits_model()
        self.n, self.chunk, self.quick = n, chunk, quick
        self.labels = torch.arange(n) % 10
        self._noise: dict[int, torch.Tensor] = {}
        self.noisy_clf, self.noisy_note = None, ""
        try:
            from diffkit.guidance.noisy_classifier import load_noisy_classifier

            self.noisy_clf = load_noisy_classifier()
            self.noisy_note = "noise-conditional digits classifier `diffkit.guidance.noisy_classifier`"
        except Exception as e:  # not shipped yet: classifier guidance is skipped
            self.noisy_note = f"no noise-conditional classifier available ({type(e).__name__}: {e})"
        self.calibration: dict = {}

    def noise(self, seed: int) -> torch.Tensor:
        if seed not in self._noise:
            self._noise[seed] = torch.randn(self.n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
        return self._noise[seed]

    def clean_classifier(self):
        """GFCG's clean classifier: the noisy classifier read at a tiny noise level (not the classifier that
        scores accuracy and FD, so GFCG is not steered by the metric's own network)."""
        if self.noisy_clf is not None:
            clf = self.noisy_clf
            return lambda x0: clf(x0, CLEAN_SIGMA)
        from diffkit.classifier import load_classifier

        return load_classifier()

    def guided(self, c: dict):
        v, s, den = c["variant"], c["scale"], self.den
        if v == "cond":
            return den
        if v == "cfg":
            return CFG(den, float(s))
        if v == "cfg_rescale":
            return CFG(den, float(s), rescale=RESCALE)
        if v == "cfgpp":
            return CFGPlusPlus(den, float(s))
        if v == "cfg_interval":
            return CFG(den, float(s), interval=INTERVAL)
        if v == "cfg_trunc":
            return CFG(den, AG_W, interval=(float(s), math.inf))
        if v == "pag":
            return PAG(den, float(s))
        if v == "pag_all":
            return PAG(den, float(s), layers="*")
        if v == "pag_cfg":
            return PAG(den, float(s), layers="*", cfg_scale=PAG_CFG)
        if v == "cg":
            if self.noisy_clf is None:
                raise RuntimeError(self.noisy_note)
            return ClassifierGuidance(den, self.noisy_clf, float(s))
        if v == "gfcg":
            return GradientFreeGuidance(den, self.clean_classifier(), float(s))
        if v == "ag":
            return AdaptiveGuidance(den, AG_W, threshold=float(s), space=c["space"])
        if v == "linear_ag":
            g = LinearAG(den, AG_W, skip=SKIPS[s][1])
            k = (c["solver"], c["nfe"], c["schedule"])
            if k not in self.calibration:
                # calibrated on its own noise (seed 2) and labels, never on the scored noise
                m = min(self.n, 100)
                noise = torch.randn(m, 1, 16, 16, generator=torch.Generator().manual_seed(2))
                with torch.no_grad():
                    self.calibration[k] = g.calibrate(noise, solver=c["solver"], nfe=c["nfe"],
                                                      schedule=c["schedule"],
                                                      cond={"label": torch.arange(m) % 10}).detach().clone()
            g.coefficients = self.calibration[k]
            return g
        raise ValueError(v)

    def run(self, c: dict) -> tuple[dict, torch.Tensor]:
        g = self.guided(c)
        noise, labels = self.noise(c["seed"]), self.labels
        outs, passes, calls, chunks, sims = [], Counter(), None, 0, []
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, self.n, self.chunk):
                x, info = sample(g, noise[i:i + self.chunk], solver=c["solver"], nfe=c["nfe"],
                                 schedule=c["schedule"], cond={"label": labels[i:i + self.chunk]}, return_info=True)
                outs.append(x)
                calls, chunks = info["nfe"], chunks + 1
                passes.update(getattr(g, "passes", None) or {"cond": info["nfe"]})
                if hasattr(g, "similarities"):
                    sims.append(list(g.similarities))
        secs = time.perf_counter() - t0
        x = torch.cat(outs)
        row = {**c, "calls": calls, "seconds": secs, "chunks": chunks,
               "passes": {k: v / chunks for k, v in passes.items()}, **stability(x), **quality(x, labels)}
        row["net_passes"] = sum(v for k, v in row["passes"].items() if k != "classifier")
        row["saved"] = 1 - row["net_passes"] / (2 * calls)
        if sims:
            row["similarities"] = sims[0]
        return row, x


def stability(x: torch.Tensor) -> dict:
    """Saturation and divergence of raw samples (before clipping)."""
    flat = x.flatten(1)
    finite = torch.isfinite(flat).all(1)
    rms = flat.nan_to_num(nan=1e6, posinf=1e6, neginf=-1e6).pow(2).mean(1).sqrt()
    a = flat.abs().nan_to_num(nan=math.inf)
    return {"sat": float((a > SAT_LEVEL).double().mean()), "over1": float((a > 1.0).double().mean()),
            "max_abs": float(a.max()), "max_rms": float(rms.max()), "nonfinite": int((~finite).sum()),
            "diverged": bool((~finite).any() or (rms > DIVERGE_RMS).any())}


def images(x: torch.Tensor) -> torch.Tensor:
    return x.nan_to_num(nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1, 1)


def quality(x: torch.Tensor, labels: torch.Tensor) -> dict:
    img = images(x)
    feats = digit_features(img)
    ref, _ = reference_features()
    half = len(img) // 2
    return {"accuracy": classifier_accuracy(img, labels), "fd": frechet_distance(feats, ref),
            "fd_halves": [frechet_distance(feats[:half], ref), frechet_distance(feats[half:], ref)]}


def thumbnails(x: torch.Tensor, per_class: int = 3) -> str:
    """The first `per_class` samples of each class as 8-bit hex (for the sample figure in --render)."""
    idx = torch.arange(min(len(x), 10 * per_class))
    q = ((images(x[idx]) + 1) * 127.5).round().to(torch.uint8)
    return q.flatten().numpy().tobytes().hex()


def from_thumbnails(h: str) -> torch.Tensor:
    q = torch.frombuffer(bytearray(bytes.fromhex(h)), dtype=torch.uint8).float()
    return (q / 127.5 - 1).reshape(-1, 1, 16, 16)


# ------------------------------------------------------------------------------------------------------------
# diffusers anchor
# ------------------------------------------------------------------------------------------------------------


def _rescale_noise_cfg():
    """diffusers' own `rescale_noise_cfg`, from the Stable Diffusion pipeline module (where the SD pipelines take
    it from), else from diffusers.guiders."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
        return rescale_noise_cfg, "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"
    except Exception:  # pragma: no cover - pipeline module needs transformers
        from diffusers.guiders.guider_utils import rescale_noise_cfg

        return rescale_noise_cfg, "diffusers.guiders.guider_utils"


def diffusers_anchor(bench: Bench, a: dict) -> tuple[dict, torch.Tensor]:
    """Sample with a diffusers scheduler and the pipelines' CFG on the model output (EDM: F; VP: ε)."""
    import diffusers

    rescale_noise_cfg, _ = _rescale_noise_cfg()
    den, w, phi = bench.den, float(a["w"]), float(a["rescale"])
    proc = den.process
    s_min, s_max, sd = proc.sigma_bar_min, proc.sigma_bar_max, 0.5
    if a["sched"] == "edm":
        def make():
            return diffusers.EDMDPMSolverMultistepScheduler(sigma_min=s_min, sigma_max=s_max, sigma_data=sd,
                                                            sigma_schedule="karras", prediction_type="epsilon",
                                                            solver_order=2, algorithm_type="dpmsolver++")

        def to_output(x_in, t):  # EDM scheduler: input c_in x̄, timestep c_noise = ln(σ)/4, output F
            sig = (4 * t.to(torch.float64)).exp()
            x_bar = x_in * (sig**2 + sd**2).sqrt().to(x_in.dtype)[:, None, None, None]

            def out(d):
                c_skip = (sd**2 / (sig**2 + sd**2)).to(d.dtype)[:, None, None, None]
                c_out = (sig * sd / (sig**2 + sd**2).sqrt()).to(d.dtype)[:, None, None, None]
                return (d - c_skip * x_bar) / c_out

            return x_bar, sig, out

        first = lambda sch: float(sch.sigmas[0])  # noqa: E731
        start_scale, vp = 1.0, None
    else:
        vp = A.vp_equivalent(s_min, s_max)

        def make():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return diffusers.DPMSolverMultistepScheduler(trained_betas=vp.betas.numpy(),
                                                             num_train_timesteps=vp.num_train_timesteps,
                                                             prediction_type="epsilon", solver_order=2,
                                                             algorithm_type="dpmsolver++",
                                                             timestep_spacing="trailing", use_karras_sigmas=True)

        def to_output(x_t, t):  # VP scheduler: native x_t = alpha x̄, timestep index t, output ε
            sig = vp.sigma_bar(t.to(torch.float64))
            x_bar = x_t * (1 + sig**2).sqrt().to(x_t.dtype)[:, None, None, None]

            def out(d):
                return (x_bar - d) / sig.to(d.dtype)[:, None, None, None]

            return x_bar, sig, out

        first = A._vp_first_sigma(vp)
        start_scale = float(vp.alpha(torch.tensor(vp.t_max, dtype=torch.float64)))

    outs, calls, t0 = [], 0, time.perf_counter()
    noise = bench.noise(0)
    with torch.no_grad():
        for i in range(0, bench.n, bench.chunk):
            lab = bench.labels[i:i + bench.chunk]
            m = len(lab)

            def model(x_in, t, lab=lab, m=m):
                x_bar, sig, out = to_output(x_in, t)
                both = den(torch.cat([x_bar, x_bar]), torch.cat([sig, sig]),
                           label=torch.cat([lab, torch.full_like(lab, -1)]))
                o_c, o_u = out(both[:m]), out(both[m:])
                o = o_u + w * (o_c - o_u)  # as diffusers pipelines: noise_uncond + w (noise_text - noise_uncond)
                return rescale_noise_cfg(o, o_c, guidance_rescale=phi) if phi > 0 else o

            x_bar0 = noise[i:i + bench.chunk].double() * s_max
            run = A._diffusers_run(make, model, (x_bar0 * start_scale).float(), end_sigma=0.0, scale=1.0,
                                   expect_sigma_max=s_max, sigma_of_first=first)(10)
            outs.append(run.out.float())
            calls = run.nfe
    x = torch.cat(outs)
    name = ("EDMDPMSolverMultistep(dpmsolver++, order 2, karras)" if a["sched"] == "edm"
            else "DPMSolverMultistep(dpmsolver++, order 2, karras, VP-reparam)")
    row = {"group": "diffusers", "sched": a["sched"], "scheduler": name, "w": w, "rescale": phi, "nfe": 10,
           "calls": calls, "net_passes": 2 * calls, "seconds": time.perf_counter() - t0,
           **stability(x), **quality(x, bench.labels)}
    return row, x


# ------------------------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------------------------


def breaks(r: dict) -> bool:
    return bool(r["diverged"] or r["sat"] > BREAK_SAT)


def cfgpp_equivalent_w(nfe: int) -> dict:
    """CFG++'s step from σ to σ' (first order) equals a CFG DDIM step with w = λ σ / (σ - σ'): the scale grid that
    matches λ = 1 on the dpmpp_2m grid of this NFE (median and max over steps; the last step into 0 gives w = λ)."""
    _, sig, _, _ = plan("dpmpp_2m", process=digits_model().process, nfe=nfe)
    s = sig.tolist()
    ws = [a / (a - b) for a, b in zip(s[:-1], s[1:])]
    return {"nfe": nfe, "per_step": ws, "median": sorted(ws)[len(ws) // 2], "max": max(ws), "min": min(ws)}


def _halves(labels: torch.Tensor, reps: int, seed: int):
    """`reps` random half-samples, stratified by label (half of each class, without replacement: the labels are
    fixed by design, and FD reacts strongly to class proportions)."""
    g = torch.Generator().manual_seed(seed)
    groups = [torch.nonzero(labels == c).flatten() for c in labels.unique()]
    return [torch.cat([i[torch.randperm(len(i), generator=g)[:len(i) // 2]] for i in groups]) for _ in range(reps)]


def half_sd(stat, labels: torch.Tensor, reps: int = HALVES, seed: int = 0) -> float:
    """Standard error of a statistic of n samples by half-sampling: the spread of the statistic over random
    (class-stratified) halves times sqrt((n - m) / m) = 1 for m = n / 2 (the delete-d jackknife with d = n / 2;
    without replacement, so no duplicated samples, which would bias a Fréchet distance)."""
    vals = torch.tensor([stat(i) for i in _halves(labels, reps, seed)], dtype=torch.float64)
    return float(vals.std())


def fd_of(f: torch.Tensor, ref) -> float:
    return frechet_distance(feature_statistics(f), ref)


def find(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def target_a(rows: list[dict]) -> dict:
    sweep = [r for r in rows if "sweep" in r["groups"]]
    cfg = sorted([r for r in sweep if r["variant"] == "cfg"], key=lambda r: r["scale"])
    broken = [r["scale"] for r in cfg if breaks(r)]
    out = {"definition": f"breaks: saturated fraction (|x| > {SAT_LEVEL}) > {BREAK_SAT:.0%} or divergence "
                         f"(non-finite, or a sample RMS > {DIVERGE_RMS:g})",
           "cfg": [(r["scale"], r["sat"], r["diverged"]) for r in cfg], "cfg_breaks_at": broken}
    if not broken:
        out.update(verdict="n/a", reason=f"plain CFG never breaks for w <= {cfg[-1]['scale']}")
        return out
    w_break = broken[0]
    res = {r["scale"]: r for r in sweep if r["variant"] == "cfg_rescale"}
    res_rows = [(w, res[w]["sat"], res[w]["diverged"], not breaks(res[w])) for w in broken if w in res]
    out["rescale"] = res_rows
    out["rescale_stable_where_cfg_breaks"] = [w for w, _, _, ok in res_rows if ok]
    rescale_ok = w_break in res and not breaks(res[w_break])
    pp = sorted([r for r in sweep if r["variant"] == "cfgpp"], key=lambda r: r["scale"])
    out["cfgpp"] = [(r["scale"], r["sat"], r["diverged"], not breaks(r), r["accuracy"], r["fd"]) for r in pp]
    strongest = pp[-1] if pp else None
    cfgpp_ok = strongest is not None and not breaks(strongest)
    out["cfgpp_equivalent_w"] = cfgpp_equivalent_w(10)
    out.update(w_break=w_break, rescale_pass=rescale_ok, cfgpp_pass=cfgpp_ok,
               verdict="PASS" if rescale_ok and cfgpp_ok else "FAIL")
    return out


def target_b(rows: list[dict], feats: dict, labels: torch.Tensor) -> dict:
    """Every Target-B row against full CFG of its (solver, NFE) on the same noise. A row without samples in `feats`
    (reused by --resume) keeps the interval it was given when it was sampled (`ratio_ci`): its full-CFG reference
    is re-sampled on every run and must reproduce the stored one (checked in main)."""
    ref_stats = feature_statistics(reference_features()[0])
    out = {"w": AG_W, "per_nfe": []}
    settings = {(r["solver"], r["nfe"]) for r in rows if "ag" in r["groups"] and r["seed"] == 0}
    order = lambda sn: (sn[0] != "dpmpp_2m", sn[0], -sn[1])  # noqa: E731
    for solver, nfe in sorted(settings, key=order):
        full = find(rows, variant="cfg", scale=AG_W, solver=solver, nfe=nfe, seed=0, schedule=None)
        if full is None:
            continue
        fk = key_of(full)
        fa = feats.get(fk)
        entry = {"solver": solver, "nfe": nfe, "full": full,
                 "fd_sd": half_sd(lambda i: fd_of(fa[i], ref_stats), labels) if fa is not None else None,
                 "candidates": []}
        seeds = sorted([r for r in rows if r["variant"] == "cfg" and r["scale"] == AG_W and r["nfe"] == nfe
                        and r["solver"] == solver and r["schedule"] is None], key=lambda r: r["seed"])
        if len(seeds) > 1:
            t = torch.tensor([r["fd"] for r in seeds], dtype=torch.float64)
            entry["seed_fds"] = t.tolist()
            entry["seed_sd"] = float(t.std())
            entry["seed_mean"] = float(t.mean())
        for r in rows:
            if ("ag" not in r["groups"] or r["nfe"] != nfe or r["solver"] != solver or r is full or r["seed"] != 0
                    or r["schedule"] is not None):
                continue
            if r["variant"] not in ("ag", "linear_ag", "cfg_trunc", "cond"):
                continue
            ratio = r["fd"] / full["fd"]
            fb = feats.get(key_of(r))
            if fa is not None and fb is not None:
                sd = half_sd(lambda i: fd_of(fb[i], ref_stats) / fd_of(fa[i], ref_stats), labels)
                ci = (ratio - 1.96 * sd, ratio + 1.96 * sd)
                r["ratio_ci"] = list(ci)
            else:
                ci = tuple(r.get("ratio_ci") or (None, None))
            ok = r["variant"] in ("ag", "linear_ag") and r["saved"] >= 0.2 - 1e-9 and abs(ratio - 1) <= 0.05
            ci_in = ci[0] is not None and ci[0] >= 0.95 and ci[1] <= 1.05
            entry["candidates"].append({"variant": r["variant"], "space": r.get("space"), "scale": r["scale"],
                                        "key": list(key_of(r)), "saved": r["saved"], "fd": r["fd"], "ratio": ratio,
                                        "ci": ci, "ci_within": ci_in, "accuracy": r["accuracy"],
                                        "rms_to_full": r.get("rms_to_full"), "meets": ok,
                                        "similarities": r.get("similarities")})
        out["per_nfe"].append(entry)
    met = {name: [(e["solver"], e["nfe"], c["scale"], c["saved"], c["ratio"], c["ci_within"])
                  for e in out["per_nfe"] for c in e["candidates"] if c["meets"] and test(c)]
           for name, test in (("ag_x0", lambda c: c["variant"] == "ag" and c["space"] == "x0"),
                              ("ag_eps", lambda c: c["variant"] == "ag" and c["space"] == "eps"),
                              ("linear_ag", lambda c: c["variant"] == "linear_ag"))}
    out["meets"] = met
    # the target is Adaptive Guidance's: its default (D) rule must meet it at some threshold
    out["verdict"] = "PASS" if met["ag_x0"] else "FAIL"
    return out


# ------------------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------------------


def plot_sweep(rows, path: Path):
    plt = pyplot()
    sweep = [r for r in rows if "sweep" in r["groups"]]
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    (a_fd, a_acc), (a_sat, a_tr) = ax
    cond = find(sweep, variant="cond")
    for v in [k for k in VARIANTS if k != "cond"]:
        rs = sorted([r for r in sweep if r["variant"] == v], key=lambda r: r["scale"])
        if not rs:
            continue
        lab = f"{VARIANTS[v][0]} ({VARIANTS[v][1]})"
        xs = [r["scale"] for r in rs]
        a_fd.plot(xs, [r["fd"] for r in rs], "o-", ms=3, label=lab)
        a_acc.plot(xs, [100 * r["accuracy"] for r in rs], "o-", ms=3, label=lab)
        a_sat.plot(xs, [100 * r["sat"] for r in rs], "o-", ms=3, label=lab)
        a_tr.plot([100 * r["accuracy"] for r in rs], [r["fd"] for r in rs], "o-", ms=3, label=lab)
    if cond:
        for a, y in ((a_fd, cond["fd"]), (a_acc, 100 * cond["accuracy"]), (a_sat, 100 * cond["sat"])):
            a.axhline(y, color="gray", ls=":", lw=1, label="no guidance")
        a_tr.plot([100 * cond["accuracy"]], [cond["fd"]], "k*", ms=9, label="no guidance")
    a_sat.axhline(100 * BREAK_SAT, color="red", ls="--", lw=1, label=f"break threshold {BREAK_SAT:.0%}")
    for a, yl, t in ((a_fd, "Fréchet distance", "FD vs guidance scale"),
                     (a_acc, "class accuracy (%)", "accuracy vs guidance scale"),
                     (a_sat, f"saturated pixels, |x| > {SAT_LEVEL} (%)", "saturation vs guidance scale")):
        a.set(xscale="log", xlabel="guidance scale (w, λ or s; see legend)", ylabel=yl, title=t)
        a.grid(alpha=0.3)
    a_fd.set_yscale("log")
    a_tr.set(xlabel="class accuracy (%)", ylabel="Fréchet distance", yscale="log",
             title="trade-off (each curve: increasing scale)")
    a_tr.grid(alpha=0.3)
    a_sat.legend(fontsize=7)
    fig.suptitle("Guidance on the digits model, DPM-Solver++(2M), NFE 10", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)


def plot_ag(tb: dict, path: Path):
    plt = pyplot()
    entries = tb["per_nfe"]
    fig, axes = plt.subplots(1, len(entries), figsize=(5.5 * len(entries), 4.2), squeeze=False)
    marks = {("ag", "x0"): ("o", "AG, D rule (γ̄)", "tab:orange"), ("ag", "eps"): ("D", "AG, ε̂ rule (γ̄)", "tab:purple"),
             "linear_ag": ("s", "LinearAG (skip rule)", "tab:red"),
             "cfg_trunc": ("^", "CFG for σ̄ > σ_lo only (σ_lo)", "tab:brown"), "cond": ("x", "no guidance", "tab:blue")}
    for a, e in zip(axes[0], entries):
        full = e["full"]
        a.axhspan(0.95 * full["fd"], 1.05 * full["fd"], color="green", alpha=0.12, label="FD within 5 % of full CFG")
        a.plot([full["net_passes"]], [full["fd"]], "k*", ms=11, label=f"full CFG w={AG_W:g}")
        a.axvline(0.8 * full["net_passes"], color="gray", ls="--", lw=1, label="20 % fewer passes")
        seen = set()
        for c in e["candidates"]:
            mk = (c["variant"], c.get("space") or "eps") if c["variant"] == "ag" else c["variant"]
            m, lab, col = marks[mk]
            passes = (1 - c["saved"]) * full["net_passes"]
            a.plot([passes], [c["fd"]], m, color=col, ms=7, label=None if mk in seen else lab)
            seen.add(mk)
            txt = "w=1" if c["scale"] is None else str(c["scale"])
            a.annotate(txt, (passes, c["fd"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        a.set(xlabel="network passes per trajectory", ylabel="Fréchet distance", yscale="log",
              title=f"{SOLVER_NAMES.get(e.get('solver', 'dpmpp_2m'), e.get('solver'))}, NFE {e['nfe']}")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


SOLVER_NAMES = {"dpmpp_2m": "DPM-Solver++(2M)", "unipc": "UniPC", "euler": "Euler (DDIM)", "heun": "Heun"}

SAMPLE_PANELS = [("cond", None), ("cfg", 3), ("cfg", 10), ("cfg", 30), ("cfg_rescale", 10), ("cfg_rescale", 30),
                 ("cfgpp", 1.0), ("cfg_interval", 10), ("pag_all", 3), ("pag_cfg", 3), ("cg", 10), ("gfcg", 10)]


def plot_samples(rows, path: Path):
    plt = pyplot()
    found = [find(rows, variant=v, scale=s, solver="dpmpp_2m", nfe=10, seed=0, schedule=None) for v, s in SAMPLE_PANELS]
    panels = [r for r in found if r is not None and "thumbs" in r]
    if not panels:
        return
    cols = min(len(panels), 6)
    nrow = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(1.9 * cols, 5.0 * nrow), squeeze=False)
    for a in axes.flat:
        a.axis("off")
    for a, r in zip(axes.flat, panels):
        x = from_thumbnails(r["thumbs"])
        a.imshow(tile_by_class(x, torch.arange(len(x)) % 10), cmap="gray_r", vmin=-1, vmax=1,
                 interpolation="nearest")
        name = VARIANTS[r["variant"]][0] if r["variant"] != "cond" else "no guidance"
        sc = "" if r["scale"] is None else f" {VARIANTS[r['variant']][1]}={r['scale']:g}"
        name = name.replace(" + ", "\n+ ").replace(", interval", "\ninterval").replace(" (", "\n(")
        a.set_title(f"{name}{sc}\nacc {r['accuracy']:.0%} FD {r['fd']:.0f} sat {r['sat']:.1%}", fontsize=6.5)
    fig.suptitle("Samples (clipped to [-1, 1]), rows = classes 0..9, DPM-Solver++(2M) NFE 10", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------------------
# markdown
# ------------------------------------------------------------------------------------------------------------


def _scale(r) -> str:
    s = r["scale"]
    if s is None:
        return "-"
    if r["variant"] == "linear_ag":
        return SKIPS[s][0]
    return f"{s:g}"


def _row(r, extra=()) -> str:
    div = "**yes**" if r["diverged"] else "no"
    cells = [VARIANTS[r["variant"]][0], f"{VARIANTS[r['variant']][1]} = {_scale(r)}" if r["scale"] is not None
             else "-", f"{r['accuracy']:.1%}", f"{r['fd']:.1f}", f"{r['sat']:.2%}", f"{r['over1']:.1%}",
             f"{r['max_rms']:.2f}", div, str(r["calls"]), _passes(r), f"{r['seconds']:.0f}", *extra]
    return "| " + " | ".join(cells) + " |"


def _passes(r) -> str:
    p = r["passes"]
    net = f"{r['net_passes']:.4g}"
    return net + (f" + {p['classifier']:.4g} clf" if p.get("classifier") else "")


HEAD = ("| method | scale | accuracy | FD | saturated (\\|x\\| > 1.1) | \\|x\\| > 1 | max RMS | diverged | calls | "
        "net. passes | s |")
HEAD_SEP = "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"


def observations(rows: list[dict], anchors: list[dict]) -> list[str]:
    """Data-derived remarks for the notes (each only when its rows exist)."""
    out = []
    base = {(r["variant"], r["scale"], r["solver"], r["nfe"], r["schedule"]): r for r in rows if r["seed"] == 0}
    h, h3 = base.get(("cond", None, "heun", 10, None)), base.get(("cfg", 3, "heun", 10, None))
    if h and h3:
        _, sig, _, _ = plan("heun", process=digits_model().process, nfe=10)
        grid_txt = ", ".join(f"{float(v):.3g}" for v in sig)
        out.append(f"Heun at NFE 10 is {len(sig) - 2} Heun steps and a final Euler step on the Karras grid "
                   f"({grid_txt}); on this model it is poor even unguided (accuracy {h['accuracy']:.0%}, FD "
                   f"{h['fd']:.0f}, {h['sat']:.0%} saturated) and guidance amplifies it (CFG w = 3: accuracy "
                   f"{h3['accuracy']:.0%}, {h3['sat']:.0%} saturated). Heun is a solver for larger budgets here.")
    c0, pm = base.get(("cond", None, "dpmpp_2m", 10, None)), [r for r in rows if r["variant"] == "pag"]
    if c0 and pm:
        top = max(pm, key=lambda r: r["scale"])
        out.append(f"PAG on the paper's default layer (the mid-block attention, 4x4 tokens on this 16x16 UNet) "
                   f"hardly changes the samples: at s = {top['scale']:g}, FD {top['fd']:.2f} and accuracy "
                   f"{top['accuracy']:.1%} against {c0['fd']:.2f} and {c0['accuracy']:.1%} unguided; perturbing "
                   "all four attention layers has a visible effect.")
    dk = {(r["variant"], r["scale"]): r for r in rows if r["schedule"] == "karras" and r["solver"] == "dpmpp_2m"}
    an = {(a["sched"], a["w"], a["rescale"]): a for a in anchors}
    k10, k10r = dk.get(("cfg", 10)), dk.get(("cfg_rescale", 10))
    e10, e10r = an.get(("edm", 10.0, 0.0)), an.get(("edm", 10.0, RESCALE))
    v10, v10r = an.get(("vp", 10.0, 0.0)), an.get(("vp", 10.0, RESCALE))
    if k10 and k10r and e10r and v10 and v10r:
        out.append(f"Guidance rescale depends on the space it is applied in: at w = 10 on the Karras grid, "
                   f"saturation falls from {k10['sat']:.1%} to {k10r['sat']:.1%} with diffkit's rescale of D, to "
                   f"{e10r['sat']:.1%} with diffusers' rescale of the EDM scheduler's F output (from "
                   f"{e10['sat']:.1%}), and not at all with the ε-space rescale of the VP scheduler (Stable "
                   f"Diffusion's pipeline convention): {v10['sat']:.1%} -> {v10r['sat']:.1%}. At large σ̄, ε̂_c and "
                   "ε̂_cfg are both ≈ x̄/σ̄ with the same standard deviation, so the ε-space factor std(ε̂_c)/std(ε̂_cfg) "
                   "stays ≈ 1.")
    if k10r and base.get(("cfg_rescale", 10, "dpmpp_2m", 10, None)):
        lg = base[("cfg_rescale", 10, "dpmpp_2m", 10, None)]
        out.append(f"Saturation also depends on the grid: CFG + rescale at w = 10 with DPM-Solver++(2M), NFE 10, "
                   f"is {lg['sat']:.1%} saturated on diffkit's default log-SNR grid and {k10r['sat']:.1%} on the "
                   "Karras grid.")
    return out


def _setting(c: dict) -> str:
    if c["variant"] == "cond":
        return "w = 1"
    if c["variant"] == "linear_ag":
        return SKIPS[c["scale"]][0]
    return f"{VARIANTS[c['variant']][1]} = {c['scale']:g}"


def _setting_of(scale) -> str:
    return SKIPS[scale][0] if scale in SKIPS else f"γ̄ = {scale:g}"


def _solver(e: dict) -> str:
    return SOLVER_NAMES.get(e.get("solver", "dpmpp_2m"), e.get("solver"))


def _profile(e: dict, space: str):
    """(threshold, similarities, never dropped) of the AG row of this space with the longest γ record."""
    rows = [c for c in e["candidates"] if c["variant"] == "ag" and (c.get("space") or "eps") == space
            and c.get("similarities")]
    if not rows:
        return None
    c = max(rows, key=lambda c: (len(c["similarities"]), c["scale"]))
    return c["scale"], c["similarities"], c["saved"] <= 0


def _ratio(c: dict) -> str:
    lo, hi = c["ci"]
    return f"{c['ratio']:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{c['ratio']:.3f}"


def markdown(data: dict) -> str:
    meta, rows, anchors = data["meta"], data["rows"], data["anchors"]
    ta, tb = data["target_a"], data["target_b"]
    figs = data["figures"]
    L = ["## Guidance on the digits model (`bench/guidance.py`)", ""]
    sweep = [r for r in rows if "sweep" in r["groups"]]
    cond = find(sweep, variant="cond")
    over1 = cond["over1"] if cond else float("nan")
    L.append(f"Generated by `{meta['command']}` on {meta['date']} ({meta['platform']}, torch {meta['torch']}, "
             f"diffusers {meta['diffusers']}, {meta['threads']} torch thread(s), machine shared with other jobs; "
             f"diffkit at commit {meta['commit']}); runtime {meta['seconds'] / 60:.1f} min. Smoke run: "
             "`.venv/bin/python bench/guidance.py --quick` (about a minute, 50 samples, nothing written to "
             "BENCHMARKS.md).")
    rs = meta.get("resume")
    if rs:
        refs = rs.get("references_resampled") or []
        dev = max((x["max_abs_dev"] for x in refs), default=0.0)
        L.append(f"Resumed (`--resume`): {rs['reused']} rows and anchors reused from the run of {rs['date']} (diffkit "
                 f"{rs['commit']}, {(rs['seconds'] or 0) / 60:.1f} min), {rs['sampled']} configurations sampled "
                 f"now; the runtime above is this run's. Target B's {len(refs)} full-CFG references were sampled "
                 f"again to pair the new rows and reproduce the stored ones to {dev:.1e} (max |difference| of FD, "
                 "accuracy and saturation).")
    L.append("")
    L.append(f"The shipped class-conditional 16x16 digits model (EDM, σ̄ ∈ [0.002, 80], label -1 = null class). "
             f"Every configuration samples the same {meta['n']} labels (0..9 repeated, {meta['n'] // 10} per "
             f"class) from the same noise (seed 0; a second draw, seed 1, for the FD noise), probability-flow ODE, "
             f"in batches of {meta['chunk']}. Accuracy = samples the digits classifier assigns to their label; FD = "
             "Fréchet distance of its 64-d features to the 540 held-out real digits (`diffkit.image_metrics`; "
             f"{meta['real_fd']:.1f} for {meta['n']} real training digits: FD has a small-sample floor); both on "
             f"samples clipped to [-1, 1]. **Saturated** = fraction of raw pixels with |x| > {SAT_LEVEL} (the "
             f"unguided model already puts {over1:.0%} of its pixels just past |x| = 1, where the digits' background "
             "sits: column |x| > 1); **diverged** = a non-finite sample or a sample "
             f"RMS > {DIVERGE_RMS:g}. Calls = solver evaluations; net. passes = network passes per trajectory "
             "(a batched cond + uncond call is one call of two passes; `clf` = classifier forward + backward). "
             "Solvers run with diffkit's default schedule for each (log-SNR for DPM-Solver++(2M) and UniPC, "
             "Karras for Euler and Heun) unless marked Karras.")
    L.append("")
    L.append(f"Variants: CFG D_u + w (D_c - D_u) (w = 1: the conditional model); rescale φ = {RESCALE} (Lin et "
             "al. 2024) on D; CFG++ (λ ∈ [0, 1], Chung et al. 2024); CFG only for σ̄ ∈ "
             f"({INTERVAL[0]}, {INTERVAL[1]}] (Kynkäänniemi et al. 2024's EDM2 interval, not tuned here); PAG "
             "(identity attention in the perturbed pass) guiding the conditional model, with the paper's U-Net "
             "default (the mid-block attention, 4x4 tokens here) and with all four attention layers perturbed, and "
             f"PAG (all layers) + CFG w = {PAG_CFG:g} in one three-pass call; classifier guidance of the "
             f"unconditional model (null label) with the {meta['noisy_classifier']}; gradient-free classifier "
             "guidance (GFCG, lagged) whose clean classifier is that noisy classifier read at "
             f"σ̄ = {CLEAN_SIGMA} (not the metric's classifier).")
    L.append("")

    L += ["### Scale sweep, DPM-Solver++(2M), NFE 10", "", HEAD, HEAD_SEP]
    for v in VARIANTS:
        for r in sorted([r for r in sweep if r["variant"] == v], key=lambda r: (r["scale"] is not None,
                                                                                 r["scale"] or 0)):
            L.append(_row(r))
    if meta.get("cfg1_vs_cond") is not None:
        L += ["", f"Check: CFG at w = 1 vs the conditional model alone, same noise: max |difference| = "
                  f"{meta['cfg1_vs_cond']:.2e}."]
    L += ["", f"![guidance sweep]({figs['sweep']})", "", f"![samples]({figs['samples']})", ""]

    cross = [r for r in rows if "solvers" in r["groups"]]
    if cross:
        L += ["### Other solvers and NFE (main variants)", "", "| method | scale | solver | NFE | accuracy | FD | "
              "saturated | diverged | calls |", "|---|---|---|---:|---:|---:|---:|---|---:|"]
        base = {(r["variant"], r["scale"]): r for r in sweep}
        shown = set()
        for r in sorted(cross, key=lambda r: (list(VARIANTS).index(r["variant"]), r["scale"] or 0)):
            b = base.get((r["variant"], r["scale"]))
            if b is not None and (r["variant"], r["scale"]) not in shown:
                shown.add((r["variant"], r["scale"]))
                cross_rows = [b, r]
            else:
                cross_rows = [r]
            for r in cross_rows:
                sc = "-" if r["scale"] is None else f"{VARIANTS[r['variant']][1]} = {_scale(r)}"
                L.append(f"| {VARIANTS[r['variant']][0]} | {sc} | {r['solver']} | "
                         f"{r['nfe']} | {r['accuracy']:.1%} | {r['fd']:.1f} | {r['sat']:.2%} | "
                         f"{'**yes**' if r['diverged'] else 'no'} | {r['calls']} |")
        L.append("")

    # target A
    L += ["### Target A: CFG++ and guidance rescale stay stable where plain CFG breaks", ""]
    L.append(f"Definition: a configuration {ta['definition']}; measured with DPM-Solver++(2M) at NFE 10.")
    L.append("")
    if ta["verdict"] == "n/a":
        L.append(f"**n/a**: {ta['reason']}.")
    else:
        cfg_row = ", ".join(f"w={w:g}: {s:.1%}{' (div.)' if d else ''}" for w, s, d in ta["cfg"])
        L.append(f"- Plain CFG saturated fraction: {cfg_row}. CFG breaks at w ∈ "
                 f"{{{', '.join(f'{w:g}' for w in ta['cfg_breaks_at'])}}} (first at w = {ta['w_break']:g}).")
        res = ", ".join(f"w={w:g}: {s:.1%} ({'stable' if ok else 'breaks'})" for w, s, _, ok in ta["rescale"])
        L.append(f"- CFG + rescale φ = {RESCALE} at the scales where CFG breaks: {res}. Stable at "
                 f"w = {ta['w_break']:g}: **{'PASS' if ta['rescale_pass'] else 'FAIL'}**.")
        eq = ta["cfgpp_equivalent_w"]
        pp = ", ".join(f"λ={lam:g}: {s:.1%}, acc {acc:.0%}, FD {fd:.0f}" for lam, s, _, _, acc, fd in ta["cfgpp"])
        L.append(f"- CFG++ over its whole range: {pp}. At its strongest setting λ = 1 it is "
                 f"{'stable' if ta['cfgpp_pass'] else 'not stable'}: **{'PASS' if ta['cfgpp_pass'] else 'FAIL'}**. "
                 f"Caveat: CFG++'s step from σ̄ to σ̄' equals a CFG DDIM step with w = λ σ̄ / (σ̄ - σ̄'); on this "
                 f"NFE-10 grid that is w = {eq['median']:.2f} λ per step (max {eq['max']:.2f} λ, last step λ), so "
                 f"λ ∈ [0, 1] only reaches CFG strengths well below w = {ta['w_break']:g}: CFG++ cannot be driven "
                 "into the regime where CFG breaks at this NFE, and its stability there is by construction, not a "
                 "like-for-like win.")
        L.append("")
        stable = ", ".join(f"{w:g}" for w in ta["rescale_stable_where_cfg_breaks"])
        L.append(f"**Target A: {ta['verdict']}** (rescale stable where CFG first breaks; CFG++ stable at λ = 1). "
                 f"Rescale stays stable for w ∈ {{{stable}}} "
                 "among the scales where CFG breaks" +
                 ("; at larger w it breaks too." if len(ta["rescale_stable_where_cfg_breaks"]) < len(ta["rescale"])
                  else "."))
    L.append("")

    # target B
    L += [f"### Target B: Adaptive Guidance saves >= 20 % of model passes at an FD within 5 % of full CFG "
          f"(w = {AG_W:g})", ""]
    L.append("Saved = 1 - network passes / (2 × calls) against full CFG (2 passes per call). FD ratio = FD / FD of "
             "full CFG on the same noise; the interval is ratio ± 1.96 standard errors, the standard error by "
             f"paired half-sampling ({HALVES} random halves of the samples, the same indices for both sets; the "
             "delete-n/2 jackknife: a bootstrap with replacement duplicates samples and biases FD). AG's rule "
             "(Castillo et al. 2023): CFG until the cosine γ of the conditional and unconditional predictions "
             "exceeds γ̄ (batch minimum), then the conditional model alone. Two versions of the predictions "
             "compared: **D** (`AdaptiveGuidance(space=\"x0\")`, diffkit's default: D_c and D_u) and **ε̂** "
             "(`space=\"eps\"`, the paper's ε̂_c and ε̂_u). LinearAG is calibrated "
             "(least squares, `fit_linear_ag`) on full-CFG trajectories of 100 other noises (seed 2), same solver "
             "and grid. `CFG only for σ̄ > σ_lo` is the schedule AG aims at with a fixed switch point; it is "
             "listed for context and does not count for the target. The comparison is paired (same noise, same "
             "labels), so the noise that matters is that of the paired ratio (the interval column), much smaller "
             "than the unpaired FD noise between independent noise draws given per NFE. Meets target: saved >= "
             "20 % and point FD ratio within [0.95, 1.05]; the verdict counts Adaptive Guidance's default D rule, "
             "and the ε̂ rule and LinearAG are reported beside it.")
    L.append("")
    for e in tb["per_nfe"]:
        f = e["full"]
        noise = []
        if e.get("seed_fds"):
            noise.append(f"over {len(e['seed_fds'])} noise draws (seeds 0-{len(e['seed_fds']) - 1}) FD "
                         f"{', '.join(f'{v:.1f}' for v in e['seed_fds'])}: sd {e['seed_sd']:.2f} "
                         f"({100 * e['seed_sd'] / e['seed_mean']:.1f} % of the mean)")
        if e.get("fd_sd") is not None:
            noise.append(f"standard error of FD by half-sampling {e['fd_sd']:.2f} ({100 * e['fd_sd'] / f['fd']:.1f} "
                         "%)")
        noise.append(f"FD of the two halves (n = {meta['n'] // 2}) {f['fd_halves'][0]:.1f} / {f['fd_halves'][1]:.1f}")
        L.append(f"**{_solver(e)}, NFE {e['nfe']}**: full CFG: accuracy {f['accuracy']:.1%}, FD {f['fd']:.2f}, "
                 f"{f['net_passes']:.0f} passes. FD sampling noise: {'; '.join(noise)}.")
        L.append("")
        L.append("| method | setting | saved | FD | FD ratio [95 % CI] | accuracy | RMS to full-CFG samples | "
                 "meets target |")
        L.append("|---|---|---:|---:|---|---:|---:|---|")
        order = {("ag", "x0"): 0, ("ag", "eps"): 1, ("linear_ag", None): 2, ("cfg_trunc", None): 3, ("cond", None): 4}
        for c in sorted(e["candidates"], key=lambda c: (order.get((c["variant"], c.get("space")), 5),
                                                         str(c["scale"]))):
            ci, setting = _ratio(c), _setting(c)
            meets = ("**yes**" if c["meets"] else "no") if c["variant"] in ("ag", "linear_ag") else "(context)"
            rms = f"{c['rms_to_full']:.3f}" if c.get("rms_to_full") is not None else "-"
            L.append(f"| {label(c)} | {setting} | {c['saved']:.1%} | {c['fd']:.2f} | {ci} | {c['accuracy']:.1%} | "
                     f"{rms} | {meets} |")
        for sp in ("x0", "eps"):
            sims = _profile(e, sp)
            if sims:
                L.append("")
                L.append(f"1 - γ ({'D' if sp == 'x0' else 'ε̂'} rule; batch minimum, first batch) per evaluation "
                         f"until AG γ̄ = {sims[0]:g} drops guidance"
                         + (" (never, here: the whole trajectory)" if sims[2] else "") + ": "
                         + ", ".join(f"{1 - v:.2g}" for v in sims[1]) + ".")
        L.append("")
    met = tb.get("meets") or {}

    def where(items):
        """Grouped by solver and NFE: setting (saved, FD ratio; † = its 95 % interval is not inside ±5 %)."""
        groups: dict = {}
        for so, nfe, sc, sv, ra, inside in items:
            groups.setdefault((so, nfe), []).append(f"{_setting_of(sc)} ({sv:.1%} saved, FD ratio {ra:.3f}"
                                                     f"{'' if inside else ' †'})")
        return "; ".join(f"{SOLVER_NAMES.get(so, so)} NFE {nfe}: {', '.join(v)}" for (so, nfe), v in groups.items())

    x0, eps, lin = met.get("ag_x0", []), met.get("ag_eps", []), met.get("linear_ag", [])
    L.append(f"**Target B: {tb['verdict']}** — Adaptive Guidance with its default D rule "
             + (f"meets it at {where(x0)}." if x0 else "meets it at no threshold γ̄ tried."))
    L.append("")
    L.append("- The paper's ε̂ rule: " + (f"meets it at {where(eps)}." if eps else "meets it at no γ̄ tried."))
    L.append("- LinearAG: " + (f"meets it at {where(lin)}." if lin else "meets it at no skip schedule tried."))
    no_x0 = [e for e in tb["per_nfe"] if not any(c["meets"] and c["variant"] == "ag" and c.get("space") == "x0"
                                                 for c in e["candidates"])]
    if x0 and no_x0:
        L.append("- The D rule does not meet it at " + ", ".join(f"{_solver(e)} NFE {e['nfe']}" for e in no_x0) + ".")
    if any(not x[5] for x in x0 + eps + lin):
        L.append("- †: met by the point ratio, but the paired 95 % interval of the ratio is not inside [0.95, 1.05].")
    L.append("")
    sims = next((c["similarities"] for e in tb["per_nfe"] for c in e["candidates"] if c["variant"] == "ag"
                 and c.get("space", "eps") == "eps" and c["similarities"]
                 and len(c["similarities"]) == e["full"]["calls"]), None)
    if sims and sims[0] >= max(sims):
        L.append("Why the ε̂ rule fails here: on this EDM model (started at σ̄ = 80) γ of ε̂ is closest to 1 at the "
                 "*start* of the trajectory (both ε̂ are ≈ x̄/σ̄) and falls as σ̄ decreases, the opposite of the "
                 "trend AG relies on (guidance becoming redundant late in sampling): any γ̄ below the first γ drops "
                 "guidance after the first evaluation (the samples are then essentially the unguided model's: about "
                 "50 % saved at a very different FD), any γ̄ above it never drops. γ of D rises towards 1 along the "
                 "trajectory instead, which is why `AdaptiveGuidance` compares D by default.")
        L.append("")
    L.append(f"![AG: FD vs passes]({figs['ag']})")
    L.append("")

    # anchors
    L += ["### Anchor: diffusers' CFG on the same UNet", ""]
    L.append(f"diffusers {meta['diffusers']} schedulers stepped as a pipeline does (`set_timesteps`, "
             "`scale_model_input`, model, `step`; loop from bench/anchors.py) with the pipelines' CFG on the model "
             "output, noise_uncond + w (noise_cond - noise_uncond), and diffusers' own `rescale_noise_cfg` "
             f"(imported from `{meta['rescale_noise_cfg']}`) for guidance rescale. The UNet is diffkit's: "
             "EDMDPMSolverMultistep reads it as EDM's F-prediction (input c_in x̄, timestep ln(σ)/4), "
             "DPMSolverMultistep as an ε-prediction through an equivalent discrete VP table (`VP-reparam`, "
             "bench/anchors.py). Start x̄ = 80 × (the same noise). diffkit rows: DPM-Solver++(2M) on the Karras "
             "grid (ρ = 7), NFE 10. CFG is the same rule in D, ε or F (they are affine in each other); rescale is "
             "not: diffkit rescales D (x0 space), diffusers rescales whatever the network outputs (F for the EDM "
             "scheduler, ε for the VP one), so rescale rows are expected to differ. PAG has no diffusers anchor "
             "here: diffusers' PAG pipelines need diffusers UNet classes, and this UNet is diffkit's.")
    L.append("")
    L.append("| implementation | scheduler / solver | w | rescale | accuracy | FD | saturated | calls | "
             "RMS to diffkit |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted([r for r in rows if "anchor" in r["groups"]], key=lambda r: (r["variant"], r["scale"])):
        L.append(f"| diffkit | dpmpp_2m, Karras | {r['scale']:g} | {RESCALE if r['variant'] == 'cfg_rescale' else 0} | "
                 f"{r['accuracy']:.1%} | {r['fd']:.2f} | {r['sat']:.2%} | {r['calls']} | - |")
    for a in anchors:
        rms = f"{a['rms_to_diffkit']:.2e}" if a.get("rms_to_diffkit") is not None else "-"
        L.append(f"| diffusers | {a['scheduler']} | {a['w']:g} | {a['rescale']:g} | {a['accuracy']:.1%} | "
                 f"{a['fd']:.2f} | {a['sat']:.2%} | {a['calls']} | {rms} |")
    L.append("")
    L.append("RMS to diffkit: root-mean-square difference of the raw samples against the diffkit row with the same w "
             "and rescale (same noise).")
    L.append("")
    notes = list(meta.get("notes") or []) + observations(rows, anchors)
    if notes:
        L += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    L.append(f"Raw numbers: `{data.get('results', 'bench/results/guidance.json')}`. Figures: `{figs['sweep']}`, "
             f"`{figs['ag']}`, `{figs['samples']}`.")
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------


def commit() -> str:
    """The repository's HEAD commit (short) and whether diffkit's sources differ from it."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:  # pragma: no cover - no git
        return "unknown"
    src = Path(diffkit.__file__).resolve().parent
    if src.is_relative_to(ROOT):
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", str(src)],
                               capture_output=True, text=True).stdout.strip()
        return head + (" + uncommitted changes in src/diffkit" if dirty else "")
    stamp = src.parent.parent / "COMMIT"  # a `git archive` snapshot with its commit written next to it
    if stamp.exists():
        return f"{stamp.read_text().strip()} (clean `git archive` snapshot of src/)"
    return f"{head}? (diffkit imported from {src.parent})"


def real_fd(n: int) -> float:
    """FD of n real training digits against the same held-out reference (the small-sample floor)."""
    from diffkit.classifier import digits_split

    x, _, _, _ = digits_split()
    i = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
    ref, _ = reference_features()
    return frechet_distance(digit_features(x[i]), ref)


def _is_ancestor(commit: str, of: str) -> bool:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", commit, of],
                              capture_output=True).returncode == 0
    except Exception:  # pragma: no cover - no git
        return False


def load_previous(path: Path, n: int, chunk: int) -> dict:
    """The rows and anchors of a previous results JSON by configuration key, for --resume. Rows of the same n and
    chunk only (both change every number). AG rows written before `AdaptiveGuidance` had a `space` carry none:
    they used the ε̂ rule then (the only one), recognised by their diffkit commit preceding AG_SPACE_COMMIT, and
    are keyed as space "eps"; when that cannot be established they are not reused. Each Target-B row gets the
    FD-ratio interval it was given then (`ratio_ci`): its samples are not stored."""
    d = json.loads(path.read_text())
    m = d["meta"]
    if (m["n"], m["chunk"]) != (n, chunk):
        raise SystemExit(f"--resume: {path} has n = {m['n']}, chunk {m['chunk']}; this run n = {n}, chunk {chunk}")
    old_commit = str(m.get("commit", "")).split()[0].rstrip("?")
    eps_before = bool(old_commit) and _is_ancestor(old_commit, AG_SPACE_COMMIT + "^")
    cis = {}
    for e in (d.get("target_b") or {}).get("per_nfe", []):
        for c in e["candidates"]:
            if c.get("key") is not None:
                k = tuple(c["key"])
            else:  # written before keys were stored: dpmpp_2m, seed 0, default schedule
                sp = c.get("space") or ("eps" if c["variant"] == "ag" else None)
                k = (c["variant"], c["scale"], e.get("solver", "dpmpp_2m"), e["nfe"], 0, None, sp)
            if c.get("ci") and c["ci"][0] is not None:
                cis[k] = list(c["ci"])
    rows, migrated, dropped = {}, 0, 0
    for r in d["rows"]:
        r = dict(r)
        if "space" not in r:
            if r["variant"] == "ag":
                if not eps_before:
                    dropped += 1
                    continue
                r["space"], migrated = "eps", migrated + 1
            else:
                r["space"] = None
        k = key_of(r)
        if k in cis and "ratio_ci" not in r:
            r["ratio_ci"] = cis[k]
        rows[k] = r
    anchors = {(a["sched"], float(a["w"]), float(a["rescale"])): a for a in d.get("anchors", [])}
    print(f"--resume: {len(rows)} rows and {len(anchors)} anchors from {path} (diffkit {m.get('commit')}, "
          f"{m.get('date')}); {migrated} AG rows without a space taken as the ε̂ rule"
          + (f"; {dropped} such rows not reused (their commit is not known to precede the space parameter)"
             if dropped else ""), flush=True)
    return {"rows": rows, "anchors": anchors, "meta": m, "source": str(path), "eps_migrated": migrated}


def render(data: dict, out_dir: Path, figs_rel: str, md_path: Path | None):
    suffix = "_quick" if data["meta"]["quick"] else ""
    fig_dir = out_dir / "figures"
    paths = {k: fig_dir / f"guidance{suffix}_{k}.png" for k in ("sweep", "ag", "samples")}
    data["figures"] = {k: f"{figs_rel}/{p.name}" for k, p in paths.items()}
    data["results"] = str(Path(figs_rel).parent / "results" / f"guidance{suffix}.json")
    plot_sweep(data["rows"], paths["sweep"])
    plot_ag(data["target_b"], paths["ag"])
    plot_samples(data["rows"], paths["samples"])
    md = markdown(data)
    if md_path is not None:
        write_block(md_path, md, MARKER)
    return md


def summary(data: dict) -> str:
    ta, tb = data["target_a"], data["target_b"]
    lines = []
    if ta["verdict"] == "n/a":
        lines.append(f"Target A: n/a ({ta['reason']})")
    else:
        res = {w: s for w, s, _, _ in ta["rescale"]}
        lines.append(f"Target A: {ta['verdict']}  CFG breaks at w in {ta['cfg_breaks_at']} (first {ta['w_break']:g}, "
                     f"sat {dict((w, s) for w, s, _ in ta['cfg'])[ta['w_break']]:.1%}); rescale sat there "
                     f"{res.get(ta['w_break'], float('nan')):.1%} ({'PASS' if ta['rescale_pass'] else 'FAIL'}); "
                     f"CFG++ lambda=1 sat {ta['cfgpp'][-1][1]:.1%} ({'PASS' if ta['cfgpp_pass'] else 'FAIL'}); "
                     f"rescale stable at {ta['rescale_stable_where_cfg_breaks']}")
    for e in tb["per_nfe"]:
        best = [f"{c['variant']}{'/' + c['space'] if c.get('space') else ''}:{c['scale']} saved {c['saved']:.1%} "
                f"ratio {_ratio(c)}" for c in e["candidates"]]
        lines.append(f"Target B {e.get('solver', 'dpmpp_2m')} NFE {e['nfe']}: full CFG FD {e['full']['fd']:.2f}; "
                     + "; ".join(best))
    lines.append(f"Target B: {tb['verdict']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 50 samples, a few configurations (~1 min)")
    p.add_argument("--n", type=int, default=None, help="samples per configuration, a multiple of 10 "
                                                        "(default 300; quick 50)")
    p.add_argument("--chunk", type=int, default=150, help="samples per sampling batch (default %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default %(default)s: faster than 2 on the shared 2-core machine)")
    p.add_argument("--out", default=None, help="folder for results/ and figures/ (default: bench/, or a temporary "
                                               "folder with --quick)")
    p.add_argument("--md", default=None, help="markdown file to update (default BENCHMARKS.md; none with --quick)")
    p.add_argument("--render", default=None, help="re-render block and figures from a results JSON (no sampling)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="JSON",
                   help="reuse every row of a previous results JSON (default: this run's own, e.g. "
                        "bench/results/guidance.json) whose configuration key matches; sample only the rest")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))

    if args.render:
        data = json.loads(Path(args.render).read_text())
        for e in data["target_b"]["per_nfe"]:
            for c in e["candidates"]:
                c["ci"] = tuple(c["ci"])
        out_dir = Path(args.out) if args.out else HERE
        md_path = Path(args.md) if args.md else (None if data["meta"]["quick"] else ROOT / "BENCHMARKS.md")
        figs_rel = "bench/figures" if out_dir == HERE else str(out_dir / "figures")
        render(data, out_dir, figs_rel, md_path)
        print(summary(data))
        return 0

    quick = args.quick
    n = args.n or (50 if quick else 300)
    if n < 20 or n % 10:
        p.error("--n must be a multiple of 10, at least 20")
    chunk = min(args.chunk, n)
    t_start = time.perf_counter()
    bench = Bench(n, chunk, quick)
    configs = grid(quick)
    if bench.noisy_clf is None:
        configs = [c for c in configs if c["variant"] != "cg"]
    by_key: dict = {}
    for c in configs:  # a configuration listed by several groups runs once
        by_key.setdefault(key_of(c), {**c, "groups": []})["groups"].append(c["group"])
    unique = list(by_key.values())
    anchor_cfgs = anchor_grid(quick)
    if args.out:
        out_dir = Path(args.out)
    elif quick:
        out_dir = Path(tempfile.mkdtemp(prefix="diffkit_bench_guidance_"))
    else:
        out_dir = HERE
    res_path = out_dir / "results" / f"guidance{'_quick' if quick else ''}.json"
    old = None
    if args.resume is not None:
        old = load_previous(Path(args.resume) if args.resume else res_path, n, chunk)
    print(f"{len(unique)} diffkit configurations + {len(anchor_cfgs)} diffusers anchors, n = {n}, chunk {chunk}",
          flush=True)

    rows, samples, feats = [], {}, {}
    keep_feats = {key_of(c) for c in unique if "ag" in c["groups"]}
    # Target B's full-CFG references are always sampled: their samples pair every ratio of the new rows
    refs = {key_of(c) for c in unique if "ag" in c["groups"] and c["variant"] == "cfg" and c["seed"] == 0}
    reused, resampled = [], []
    for i, c in enumerate(unique):
        k = key_of(c)
        prev = old["rows"].get(k) if old else None
        if prev is not None and k not in refs:
            rows.append({**prev, "groups": c["groups"]})
            reused.append(k)
            print(f"[{i + 1}/{len(unique)} {time.perf_counter() - t_start:5.0f} s] {c['group']:8s} {c['variant']:12s} "
                  f"{_scale(prev):>10s} {c['solver']:9s} NFE {c['nfe']:2d} seed {c['seed']}: reused "
                  f"(FD {prev['fd']:.2f})", flush=True)
            continue
        row, x = bench.run(c)
        if prev is not None:  # a reference sampled again: it must reproduce the stored row
            dev = max(abs(row[m] - prev[m]) for m in ("fd", "accuracy", "sat"))
            resampled.append({"key": list(k), "fd": row["fd"], "stored_fd": prev["fd"], "max_abs_dev": dev})
            if dev > 1e-6:
                print(f"WARNING: {k} sampled again differs from the stored row (max |dev| {dev:.3g}); ratios and "
                      "intervals of reused rows refer to the stored one", flush=True)
        if "sweep" in c["groups"] and (c["variant"], c["scale"]) in SAMPLE_PANELS:
            row["thumbs"] = thumbnails(x)
        if {"ag", "anchor"} & set(c["groups"]) or (c["variant"] in ("cfg", "cond") and c["scale"] in (None, 1)):
            samples[k] = x
        if k in keep_feats:
            feats[k] = digit_features(images(x))
        rows.append(row)
        print(f"[{i + 1}/{len(unique)} {time.perf_counter() - t_start:5.0f} s] {c['group']:8s} {c['variant']:12s} "
              f"{_scale(row):>10s} {c['solver']:9s} NFE {c['nfe']:2d} seed {c['seed']}: acc {row['accuracy']:.1%} "
              f"FD {row['fd']:7.2f} sat {row['sat']:.2%} div {row['diverged']} passes {row['net_passes']:.1f} "
              f"({row['seconds']:.0f} s)", flush=True)
    # every row of the Target-B block against the full-CFG samples of the same NFE
    for r in rows:
        if "ag" in r["groups"] and r["seed"] == 0 and key_of(r) in samples:
            full = samples.get(("cfg", AG_W, r["solver"], r["nfe"], 0, None, None))
            if full is not None:
                r["rms_to_full"] = float((images(samples[key_of(r)]) - images(full)).pow(2).mean().sqrt())
    cond = samples.get(("cond", None, "dpmpp_2m", 10, 0, None, None))
    cfg1 = samples.get(("cfg", 1, "dpmpp_2m", 10, 0, None, None))
    cfg1_vs_cond = float((cond - cfg1).abs().max()) if cond is not None and cfg1 is not None else None
    if cfg1_vs_cond is None and old:
        cfg1_vs_cond = old["meta"].get("cfg1_vs_cond")

    anchor_rows = []
    for a in anchor_cfgs:
        prev = old["anchors"].get((a["sched"], float(a["w"]), float(a["rescale"]))) if old else None
        if prev is not None:
            anchor_rows.append(prev)
            reused.append(("anchor", a["sched"], a["w"], a["rescale"]))
            continue
        row, x = diffusers_anchor(bench, a)
        mine = samples.get(("cfg_rescale" if a["rescale"] else "cfg", a["w"], "dpmpp_2m", 10, 0, "karras", None))
        row["rms_to_diffkit"] = float((x - mine).pow(2).mean().sqrt()) if mine is not None else None
        anchor_rows.append(row)
        print(f"[anchor {time.perf_counter() - t_start:5.0f} s] {row['scheduler']} w {a['w']} rescale {a['rescale']}: "
              f"acc {row['accuracy']:.1%} FD {row['fd']:.2f} sat {row['sat']:.2%} RMS to diffkit "
              f"{row['rms_to_diffkit']}", flush=True)

    import diffusers

    notes = []
    if bench.noisy_clf is None:
        notes.append(f"Classifier guidance skipped: {bench.noisy_note}.")
    else:
        notes.append("Classifier guidance guides the unconditional model (null label) with the noisy classifier: "
                     "w = 1 is its class-conditional model p(x | y) ∝ p(x) p(y | x) only as far as the classifier is "
                     "calibrated; cost per call: one network pass plus a classifier forward and backward.")
    notes.append("AdaptiveGuidance drops the unconditional pass for the whole batch once the batch minimum of γ "
                 f"exceeds γ̄, so its saving depends on the batch ({chunk} samples per batch here).")
    data = {"meta": {"date": time.strftime("%Y-%m-%d"), "platform": platform.platform(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "threads": torch.get_num_threads(), "n": n, "chunk": chunk,
                     "quick": quick, "command": "python bench/guidance.py" + (" --quick" if quick else "") +
                     (f" --n {n}" if args.n else "") + (" --resume" if old else ""),
                     "noisy_classifier": bench.noisy_note, "commit": commit(), "real_fd": real_fd(n),
                     "diffkit_source": str(Path(diffkit.__file__).parent), "rescale_noise_cfg": _rescale_noise_cfg()[1],
                     "cfg1_vs_cond": cfg1_vs_cond, "notes": notes, "seconds": time.perf_counter() - t_start,
                     "sat_level": SAT_LEVEL, "break_sat": BREAK_SAT, "diverge_rms": DIVERGE_RMS},
            "rows": rows, "anchors": anchor_rows, "target_a": target_a(rows),
            "target_b": target_b(rows, feats, bench.labels)}
    if old:
        data["meta"]["resume"] = {"source": old["source"], "date": old["meta"].get("date"),
                                  "commit": old["meta"].get("commit"), "seconds": old["meta"].get("seconds"),
                                  "reused": len(reused), "sampled": len(unique) + len(anchor_cfgs) - len(reused),
                                  "sampled_keys": [list(key_of(c)) for c in unique if key_of(c) not in reused],
                                  "references_resampled": resampled, "eps_migrated": old["eps_migrated"]}
        carried = old["meta"].get("notes") or []
        data["meta"]["notes"] = notes + [n for n in carried if n not in notes]
    figs_rel = "bench/figures" if out_dir == HERE else str(out_dir / "figures")
    md_path = Path(args.md) if args.md else (None if quick else ROOT / "BENCHMARKS.md")
    data["meta"]["seconds"] = time.perf_counter() - t_start
    render(data, out_dir, figs_rel, md_path)
    atomic_write(res_path, json.dumps(data, indent=1, default=float).encode())
    print(summary(data))
    print(f"total {time.perf_counter() - t_start:.0f} s; results {res_path}; figures {out_dir / 'figures'}"
          + (f"; block in {md_path}" if md_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
