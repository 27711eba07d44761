"""Anchors for bench/solvers.py: diffusers schedulers and k-diffusion samplers run from the same starting
points with the same exact Gaussian-mixture model as diffkit, every model call counted.

Only public entry points of the anchor libraries are called (scheduler classes and their `set_timesteps` /
`scale_model_input` / `step`; k-diffusion's `sampling` functions); nothing is copied from them.

How each library sees the process (the mixture's exact network is adapted to what the library calls):

* diffusers VP schedulers (DPMSolverMultistep, UniPCMultistep, DEISMultistep, DDIM, EulerDiscrete, PNDM) work
  on a discrete VP table. For the Stable-Diffusion VP testbed they get the very same betas; the model is
  `mixture.model(process, "eps")`, called as model(x_t, t) with t of shape (batch,). For an EDM testbed the
  same ODE is run through an equivalent discrete VP (x_t = alpha x̄): a table of 1000 levels log-uniform in
  σ̄ over the testbed's [σ̄_min, σ̄_max], passed as `trained_betas`; these configs are tagged "VP-reparam".
* diffusers EDM schedulers (EDMEuler, EDMDPMSolverMultistep) call the network with EDM preconditioning:
  input c_in x̄ and timestep c_noise = log(σ)/4, and read its output as F with D = c_skip x̄ + c_out F (their
  prediction_type "epsilon" is EDM's F-prediction); the model is `mixture.model(EDM(...), "edm")`.
* k-diffusion is canonical: model(x̄, σ) -> D, here `mixture.denoise`.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

import diffkit
from diffkit.processes import DiscreteVP

Tensor = torch.Tensor
F64 = torch.float64

__all__ = ["Counted", "Run", "Config", "import_k_diffusion_sampling", "vp_equivalent", "diffusers_anchors",
           "k_diffusion_anchors", "anchors"]


# -- plumbing ---------------------------------------------------------------------------------------------------


class Counted:
    """A model callable that counts its calls (a batched call counts once)."""

    def __init__(self, fn: Callable):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@dataclass
class Run:
    """One sampling run: output as the library returns it, model calls made, step count, the σ̄ it ends at,
    and the factor that maps the output back to canonical x̄ (x̄ = out / scale; alpha for native VP output)."""

    out: Tensor
    nfe: int
    steps: int
    end_sigma: float = 0.0
    scale: float = 1.0


@dataclass
class Config:
    """A named sampler configuration; `run(nfe)` samples within a budget of `nfe` model calls (ValueError when it
    cannot: recorded as n/a)."""

    name: str
    library: str
    run: Callable[[int], Run]
    note: str = ""


def import_k_diffusion_sampling():
    """`k_diffusion.sampling` without the package __init__ (which imports torchvision and CLIP, not installed):
    empty torchvision stubs, and a `k_diffusion` package module whose __init__ is never executed."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
    for name in names:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (make bench installs it with --no-deps)")
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    sys.modules["k_diffusion"] = pkg
    import k_diffusion.sampling as sampling

    return sampling


def k_diffusion_version() -> str:
    from importlib.metadata import version

    try:
        return version("k-diffusion")
    except Exception:  # pragma: no cover
        return "?"


def vp_equivalent(sigma_min: float, sigma_max: float, T: int = 1000) -> DiscreteVP:
    """A discrete VP with T levels log-uniform in σ̄ on [σ̄_min, σ̄_max]: ᾱ_t = 1/(1+σ̄_t²), β_t = 1 - ᾱ_t/ᾱ_{t-1}.
    It is the same probability-flow ODE in x̄, so VP-only schedulers can run an EDM/VE testbed."""
    sb = torch.logspace(math.log10(sigma_min), math.log10(sigma_max), T, dtype=F64)
    abar = 1 / (1 + sb**2)
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return DiscreteVP(1 - abar / prev)


def _expand_t(t: Tensor, n: int) -> Tensor:
    return torch.as_tensor(t).to(F64).reshape(-1)[:1].expand(n)


# -- diffusers --------------------------------------------------------------------------------------------------


def _diffusers_run(make: Callable, model: Callable, start: Tensor, *, end_sigma: float, scale: float,
                   expect_sigma_max: float, sigma_of_first: Callable) -> Callable[[int], Run]:
    """Budget -> Run for a diffusers scheduler: the largest `num_inference_steps` whose timesteps fit the budget,
    then the standard loop (scale_model_input, model, step)."""

    def run(nfe: int) -> Run:
        sch, last_error = None, None
        for steps in range(nfe, 0, -1):
            cand = make()
            try:
                cand.set_timesteps(steps)
            except Exception as e:  # a step count the scheduler rejects: try fewer
                last_error = e
                continue
            if len(cand.timesteps) <= nfe:
                sch = cand
                break
        if sch is None:
            raise ValueError(f"no step count fits a budget of {nfe} calls (last error: {last_error})")
        s0 = float(sigma_of_first(sch))
        if abs(s0 / expect_sigma_max - 1) > 1e-3:
            raise ValueError(f"schedule starts at sigma {s0:.4g}, not at sigma_max {expect_sigma_max:.4g}")
        counted = Counted(model)
        x = start.clone()
        n = x.shape[0]
        for t in sch.timesteps:
            inp = sch.scale_model_input(x, t)
            out = counted(inp, _expand_t(t, n))
            x = sch.step(out, t, x, return_dict=False)[0]
        return Run(x, counted.calls, steps, end_sigma, scale)

    return run


def _vp_first_sigma(process: DiscreteVP):
    """σ̄ at which a VP scheduler believes its first step starts (its `sigmas` when it keeps one per step)."""

    def f(sch):
        sig = getattr(sch, "sigmas", None)
        if isinstance(sig, Tensor) and len(sig) == len(sch.timesteps) + 1:
            return float(sig[0])
        return float(process.sigma_bar(torch.as_tensor(float(sch.timesteps[0]), dtype=F64)))

    return f


def _diffusers():
    import diffusers

    return diffusers


def diffusers_anchors(mixture, process, x_bar0: Tensor, *, quick: bool = False) -> list[Config]:
    """diffusers scheduler configurations for one testbed (see module docstring)."""
    dfs = _diffusers()
    s_min, s_max = process.sigma_bar_min, process.sigma_bar_max
    configs: list[Config] = []

    # VP schedulers: the testbed's own discrete VP, or the equivalent log-uniform VP table
    if isinstance(process, DiscreteVP) and process.name is not None:
        vp, tag = process, ""
        base = dict(beta_schedule=process.name["preset"], beta_start=process.name["beta_start"],
                    beta_end=process.name["beta_end"], num_train_timesteps=process.num_train_timesteps)
    else:
        vp, tag = vp_equivalent(s_min, s_max), ", VP-reparam"
        base = dict(trained_betas=vp.betas.numpy(), num_train_timesteps=vp.num_train_timesteps)
    base["prediction_type"] = "epsilon"
    vp_model = mixture.model(vp, "eps")
    t_max = torch.tensor(vp.t_max, dtype=F64)
    alpha_T = float(vp.alpha(t_max))
    x_T = x_bar0 * alpha_T  # native start x_T = alpha(T) x̄_0 (= the noise itself for the SD testbed)
    alpha_0 = float(vp.alpha(torch.tensor(0.0, dtype=F64)))
    first = _vp_first_sigma(vp)

    spacings = [("linspace", {"timestep_spacing": "linspace"}), ("trailing", {"timestep_spacing": "trailing"})]
    sig_opts = {"karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True},
                "lu_lambdas": {"use_lu_lambdas": True}}
    vp_specs = []  # (label, class, kwargs, start, end_sigma, scale)
    for order in (2, 3):
        for sched in ["linspace", "trailing", "karras", "exponential", "lu_lambdas"]:
            kw = dict(spacings)[sched] if sched in ("linspace", "trailing") else {"timestep_spacing": "trailing",
                                                                                 **sig_opts[sched]}
            vp_specs.append((f"DPMSolverMultistep(dpmsolver++, order {order}, {sched}{tag})",
                             dfs.DPMSolverMultistepScheduler,
                             dict(solver_order=order, algorithm_type="dpmsolver++", **kw), x_T, 0.0, 1.0))
    for order in (2, 3):
        for sched in ["linspace", "trailing", "karras", "exponential"]:
            kw = dict(spacings)[sched] if sched in ("linspace", "trailing") else {"timestep_spacing": "trailing",
                                                                                 **sig_opts[sched]}
            vp_specs.append((f"UniPCMultistep(bh2, order {order}, {sched}{tag})", dfs.UniPCMultistepScheduler,
                             dict(solver_order=order, **kw), x_T, 0.0, 1.0))
            vp_specs.append((f"DEISMultistep(order {order}, {sched}{tag})", dfs.DEISMultistepScheduler,
                             dict(solver_order=order, **kw), x_T, 0.0, 1.0))
    for sched in ["linspace", "trailing"]:
        vp_specs.append((f"DDIM({sched}{tag})", dfs.DDIMScheduler,
                         dict(clip_sample=False, set_alpha_to_one=True, **dict(spacings)[sched]), x_T, 0.0, 1.0))
        for one in (False, True):
            vp_specs.append((f"PNDM(PLMS, {sched}, set_alpha_to_one={one}{tag})", dfs.PNDMScheduler,
                             dict(skip_prk_steps=True, set_alpha_to_one=one, **dict(spacings)[sched]), x_T,
                             0.0 if one else s_min, 1.0 if one else alpha_0))
    for sched in ["linspace", "trailing", "karras", "exponential"]:
        kw = dict(spacings)[sched] if sched in ("linspace", "trailing") else {"timestep_spacing": "trailing",
                                                                             **sig_opts[sched]}
        # Euler's state is k-diffusion's x̄: it starts from x̄_0 = x_T * init_noise_sigma
        vp_specs.append((f"EulerDiscrete({sched}{tag})", dfs.EulerDiscreteScheduler, kw, x_bar0, 0.0, 1.0))

    for label, cls, kw, start, end_sigma, scale in vp_specs:
        if quick and not any(s in label for s in ("trailing", "karras")):
            continue

        def make(cls=cls, kw=kw):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return cls(**base, **kw)

        init = float(make().init_noise_sigma)
        want = 1 / alpha_T if cls is dfs.EulerDiscreteScheduler else 1.0
        note = "" if abs(init / want - 1) < 1e-4 else (
            f"init_noise_sigma = {init:.6g}, but x̄_T = x_T / alpha_T needs {want:.6g}; started from x̄_0 exactly")
        configs.append(Config("diffusers:" + label, "diffusers",
                              _diffusers_run(make, vp_model, start, end_sigma=end_sigma, scale=scale,
                                             expect_sigma_max=s_max, sigma_of_first=first), note))

    # EDM schedulers over the testbed's σ̄ range
    edm = diffkit.EDM(s_min, s_max, 0.5)
    edm_model = mixture.model(edm, "edm")
    for sched in ("karras", "exponential"):
        edm_specs = [(f"EDMEuler({sched})", dfs.EDMEulerScheduler, {})]
        for order in (2, 3):
            edm_specs.append((f"EDMDPMSolverMultistep(dpmsolver++, order {order}, {sched})",
                              dfs.EDMDPMSolverMultistepScheduler,
                              dict(solver_order=order, algorithm_type="dpmsolver++")))
        for label, cls, kw in edm_specs:
            if quick and sched != "karras":
                continue

            def make(cls=cls, kw=kw, sched=sched):
                return cls(sigma_min=s_min, sigma_max=s_max, sigma_data=0.5, sigma_schedule=sched,
                           prediction_type="epsilon", **kw)

            init = float(make().init_noise_sigma)
            note = (f"init_noise_sigma = sqrt(sigma_max^2+1) = {init:.6g}, not sigma_max; started from x̄_0 = "
                    f"sigma_max * noise instead")
            configs.append(Config("diffusers:" + label, "diffusers",
                                  _diffusers_run(make, edm_model, x_bar0, end_sigma=0.0, scale=1.0,
                                                 expect_sigma_max=s_max,
                                                 sigma_of_first=lambda sch: float(sch.sigmas[0])), note))
    return configs


# -- k-diffusion ------------------------------------------------------------------------------------------------


def _f64_default():
    """Context: float64 default dtype, so k-diffusion's schedule helpers build float64 grids."""

    class _Ctx:
        def __enter__(self):
            self.old = torch.get_default_dtype()
            torch.set_default_dtype(F64)

        def __exit__(self, *exc):
            torch.set_default_dtype(self.old)

    return _Ctx()


def k_diffusion_anchors(mixture, process, x_bar0: Tensor, *, quick: bool = False) -> list[Config]:
    """k-diffusion sampler configurations for one testbed (canonical model = `mixture.denoise`)."""
    K = import_k_diffusion_sampling()
    s_min, s_max = process.sigma_bar_min, process.sigma_bar_max
    configs: list[Config] = []

    def kd_grid(fn, steps):
        with _f64_default():
            return fn(steps, s_min, s_max).to(F64)

    samplers = [  # name, function, calls for n steps (grids end at 0: the last step is a single call)
        ("euler", K.sample_euler, lambda n: n),
        ("heun", K.sample_heun, lambda n: 2 * n - 1),
        ("lms", K.sample_lms, lambda n: n),
        ("dpm_2", K.sample_dpm_2, lambda n: 2 * n - 1),
        ("dpmpp_2m", K.sample_dpmpp_2m, lambda n: n),
    ]
    grids = [("karras", K.get_sigmas_karras), ("exponential", K.get_sigmas_exponential)]
    for sname, fn, calls in samplers:
        for gname, gfn in grids:
            if quick and (gname != "karras" or sname in ("lms", "dpm_2")):
                continue

            def run(nfe, fn=fn, calls=calls, gfn=gfn):
                steps = max((k for k in range(1, nfe + 1) if calls(k) <= nfe), default=None)
                if steps is None:
                    raise ValueError(f"budget {nfe} too small")
                model = Counted(mixture.denoise)
                out = fn(model, x_bar0.clone(), kd_grid(gfn, steps), disable=True)
                return Run(out, model.calls, steps, 0.0, 1.0)

            configs.append(Config(f"k-diffusion:sample_{sname}({gname})", "k-diffusion", run))

    # DPM-Solver-fast: n calls, stops at sigma_min; "+denoise" spends the last call on x̄ <- D(x̄, sigma_min)
    for final in (False, True):
        def run(nfe, final=final):
            n = nfe - 1 if final else nfe
            if n < 1:
                raise ValueError("budget too small")
            model = Counted(mixture.denoise)
            out = K.sample_dpm_fast(model, x_bar0.clone(), s_min, s_max, n, disable=True)
            if final:
                out = model(out, torch.full((out.shape[0],), s_min, dtype=F64))
            return Run(out, model.calls, n, 0.0 if final else s_min, 1.0)

        configs.append(Config(f"k-diffusion:sample_dpm_fast{' + final denoise' if final else ''}", "k-diffusion",
                              run, "" if final else "stops at sigma_min (no final denoising call)"))

    # DPM-Solver-12/23 adaptive: NFE set by the tolerance; one run per rtol, n/a where it exceeds the budget
    rtols = (0.2, 0.05, 0.01) if quick else (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002)
    cache: dict[float, Run] = {}

    def adaptive(rtol):
        if rtol not in cache:
            model = Counted(mixture.denoise)
            out = K.sample_dpm_adaptive(model, x_bar0.clone(), s_min, s_max, rtol=rtol, atol=rtol * 0.0078 / 0.05,
                                        disable=True)
            cache[rtol] = Run(out, model.calls, 0, s_min, 1.0)
        return cache[rtol]

    for rtol in rtols:
        for final in (False, True):
            def run(nfe, rtol=rtol, final=final):
                r = adaptive(rtol)
                need = r.nfe + (1 if final else 0)
                if need > nfe:
                    raise ValueError(f"rtol={rtol} needs {need} calls, above the budget of {nfe}")
                if not final:
                    return r
                model = Counted(mixture.denoise)
                out = model(r.out, torch.full((r.out.shape[0],), s_min, dtype=F64))
                return Run(out, need, 0, 0.0, 1.0)

            configs.append(Config(f"k-diffusion:sample_dpm_adaptive(rtol={rtol}{', + final denoise' if final else ''})",
                                  "k-diffusion", run,
                                  "" if final else "stops at sigma_min (no final denoising call)"))
    return configs


def anchors(mixture, process, x_bar0: Tensor, *, quick: bool = False) -> list[Config]:
    """All anchor configurations for one testbed."""
    return diffusers_anchors(mixture, process, x_bar0, quick=quick) + k_diffusion_anchors(
        mixture, process, x_bar0, quick=quick)


# -- per-step overhead loops --------------------------------------------------------------------------------------


def diffusers_loop(scheduler, model: Callable, x: Tensor, steps: int) -> Tensor:
    """The standard diffusers sampling loop, set_timesteps included (what a pipeline runs per image batch; the
    timesteps on the batch's device, as pipelines put them)."""
    scheduler.set_timesteps(steps, device=x.device)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, return_dict=False)[0]
    return x
