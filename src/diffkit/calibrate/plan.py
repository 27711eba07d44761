"""`SolverPlan`: a calibrated sampler as data — the noise levels of its model calls and the linear rule that
builds each next state.

Every deterministic solver of this library (Euler/DDIM, Heun, DPM-Solver(++), UniPC, DEIS, iPNDM, ...) is, on a
fixed grid, a linear method: the state it passes to call j is a fixed linear combination of the start x̄_0 and the
outputs D_0 .. D_{j-1} of the previous calls. A plan stores that rule in the form

    x̄_{j+1} = α_j x̄_j + Σ_{k<=j} B_jk D_k,      D_k = D(x̄_k, τ_k),   j = 0 .. n-1,

with x̄_j the state of call j (τ_j its noise level) and x̄_n the output at `sigma_end`. This is the search space of
"Optimal Linear Subspace Search" (Duan et al. 2023: each state a linear combination of the previous states and
model outputs; the span of x̄_j and D_0..D_j is that of all previous states and outputs) and the output space of
every calibration method here: searched grids (AutoDiffusion, LD3-style gradient descent), per-step solver choices
(S³), learned coefficients, compensation ratios (DC-Solver), empirical model statistics (DPM-Solver-v3) and
momentum all end as (τ, α, B). Plans are JSON files; `diffkit.sample(..., plan=plan)` runs them.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..denoiser import network_of
from ..solvers.base import emit, evaluate, steps

Tensor = torch.Tensor

__all__ = ["SolverPlan", "run_linear", "fingerprint", "PlanError"]

FORMAT = "diffkit-solver-plan"
VERSION = 1


class PlanError(ValueError):
    """A plan file or plan that cannot be used (malformed, for another budget or process)."""


@dataclass
class SolverPlan:
    """A calibrated sampler: call levels `sigmas` (τ_0 .. τ_{n-1}, τ_0 the start σ̄), `alpha` (n) and the
    lower-triangular `coeffs` (row j has j + 1 entries B_j0 .. B_jj), the output level `sigma_end`, and where it
    came from (`method`, `solver` it started from, `process` config, model `fingerprint`, `metrics`)."""

    sigmas: list[float]
    alpha: list[float]
    coeffs: list[list[float]]
    sigma_end: float = 0.0
    method: str = "solver"
    solver: str | None = None
    process: dict | None = None
    fingerprint: str | None = None
    metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        self.sigmas = [float(s) for s in self.sigmas]
        self.alpha = [float(a) for a in self.alpha]
        self.coeffs = [[float(c) for c in row] for row in self.coeffs]
        self.sigma_end = float(self.sigma_end)
        self.validate()

    @property
    def nfe(self) -> int:
        """Model calls per sample: one per level."""
        return len(self.sigmas)

    def validate(self) -> None:
        n = len(self.sigmas)
        if n < 1:
            raise PlanError("a plan needs at least one model call")
        if len(self.alpha) != n or len(self.coeffs) != n:
            raise PlanError(f"a plan with {n} calls needs {n} alpha values and {n} coefficient rows; got "
                            f"{len(self.alpha)} and {len(self.coeffs)}")
        for j, row in enumerate(self.coeffs):
            if len(row) != j + 1:
                raise PlanError(f"coefficient row {j} must have {j + 1} entries (B_j0 .. B_jj); got {len(row)}")
        values = self.sigmas + self.alpha + [c for row in self.coeffs for c in row] + [self.sigma_end]
        if not all(math.isfinite(v) for v in values):
            raise PlanError("plan values must be finite")
        if not all(s > 0 for s in self.sigmas) or self.sigma_end < 0:
            raise PlanError("call levels must be positive and sigma_end non-negative")

    # -- from the tensors the calibration methods fit ---------------------------------------------------------
    @classmethod
    def from_tensors(cls, tau: Tensor, alpha: Tensor, B: Tensor, **meta) -> SolverPlan:
        n = len(tau)
        t, a, b = (v.detach().to("cpu", torch.float64) for v in (tau, alpha, B))
        return cls(t.tolist(), a.tolist(), [b[j, :j + 1].tolist() for j in range(n)], **meta)

    # -- JSON ----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "nfe": self.nfe, "sigmas": self.sigmas, "alpha": self.alpha,
                "coeffs": self.coeffs, "sigma_end": self.sigma_end, "method": self.method, "solver": self.solver,
                "process": self.process, "fingerprint": self.fingerprint, "metrics": self.metrics}

    @classmethod
    def from_dict(cls, d: dict) -> SolverPlan:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PlanError(f"not a diffkit solver plan (expected \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION:
            raise PlanError(f"unsupported solver plan version {d.get('version')!r}; this diffkit reads {VERSION}")
        missing = [k for k in ("sigmas", "alpha", "coeffs") if k not in d]
        if missing:
            raise PlanError(f"solver plan is missing {', '.join(missing)}")
        try:
            plan = cls(d["sigmas"], d["alpha"], d["coeffs"], d.get("sigma_end", 0.0), d.get("method", "solver"),
                       d.get("solver"), d.get("process"), d.get("fingerprint"), d.get("metrics") or {})
        except (TypeError, ValueError) as e:
            raise PlanError(f"malformed solver plan: {e}") from None
        if "nfe" in d and d["nfe"] != plan.nfe:
            raise PlanError(f"solver plan says nfe {d['nfe']} but has {plan.nfe} call levels")
        return plan

    def save(self, path) -> Path:
        """Write the plan as JSON (atomically)."""
        from ..checkpoint import atomic_write

        path = Path(path)
        atomic_write(path, (json.dumps(self.to_dict(), indent=1) + "\n").encode())
        return path

    @classmethod
    def load(cls, path) -> SolverPlan:
        """Read a plan written by `save`; malformed files raise `PlanError` naming the file."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: malformed JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None

    # -- use -----------------------------------------------------------------------------------------------------
    def check(self, denoiser, nfe: int | None = None) -> None:
        """Errors for a plan used at another budget or with a process whose σ̄ range does not hold the plan's levels
        (a plan for another process); warnings for another process configuration or model than it was fitted to
        when the levels fit (the plan still runs: its levels are canonical σ̄)."""
        if nfe is not None and nfe != self.nfe:
            raise PlanError(f"this plan was calibrated for nfe={self.nfe}; got nfe={nfe} (calibrate a plan for "
                            f"that budget, or leave nfe out)")
        process = getattr(denoiser, "process", None)
        if process is not None:
            lo, hi = process.sigma_bar_min, process.sigma_bar_max
            top, bottom = max(self.sigmas), min(self.sigmas + ([self.sigma_end] if self.sigma_end > 0 else []))
            if top > hi * (1 + 1e-6) or bottom < lo * (1 - 1e-6):
                raise PlanError(f"this plan's noise levels [{bottom:.4g}, {top:.4g}] lie outside the denoiser's "
                                f"process range [{lo:.4g}, {hi:.4g}]: it is a plan for another process "
                                f"({self.process})")
        if self.process is not None and process is not None and process.config() != self.process:
            warnings.warn(f"solver plan was fitted to process {self.process}, but the denoiser's is "
                          f"{process.config()}: its levels and coefficients may not suit this model", stacklevel=3)
        if self.fingerprint is not None:
            fp = fingerprint(denoiser)
            if fp is not None and fp != self.fingerprint:
                warnings.warn("solver plan was fitted to another model (its weights' fingerprint differs): "
                              "recalibrate for best accuracy", stacklevel=3)

    def run(self, denoiser, x: Tensor, *, cond=None, callback=None, progress=False) -> Tensor:
        """Apply the plan from the canonical start x̄_0 = x (at σ̄ = sigmas[0]); returns x̄ at `sigma_end`."""
        return run_linear(denoiser, x, self.sigmas, self.alpha, self.coeffs, cond=cond, callback=callback,
                          progress=progress)


def run_linear(denoiser, x: Tensor, tau, alpha, B, *, cond=None, callback=None, progress=False,
               sigma_arg=None) -> Tensor:
    """x̄_{j+1} = α_j x̄_j + Σ_{k<=j} B_jk D(x̄_k, τ_k) for j = 0 .. n-1 (module docstring). Differentiable in x,
    τ, α and B when they are tensors (then `sigma_arg(tau_j, x)` builds the σ̄ argument, e.g. a batch tensor so
    that gradients reach τ through the model). Calls go through `evaluate`, so guidance transforms apply."""
    cond = cond or {}
    n = len(tau)
    outs = []
    for j in steps(n, progress, desc="plan"):
        sig = tau[j] if sigma_arg is None else sigma_arg(tau[j], x)
        x, d = evaluate(denoiser, x, sig, cond)
        outs.append(d)
        if callback is not None:
            emit(callback, j, x, float(tau[j]), float(tau[j + 1]) if j + 1 < n else 0.0, d)
        nxt = x * alpha[j]
        for k in range(j + 1):
            nxt = nxt + B[j][k] * outs[k]
        x = nxt
    return x


# network -> (weights' version counters, hash); weak keys, so a freed network's entry never matches a new one
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fingerprint(denoiser) -> str | None:
    """A short hash of the weights of the network under `denoiser` (None when it has no parameters); recomputed
    only when a weight tensor has been replaced or modified since the last call (torch's per-tensor version
    counters)."""
    net = network_of(denoiser)
    if net is None:
        return None
    state = sorted(net.state_dict(keep_vars=True).items())
    versions = tuple((id(v), v.data_ptr(), v._version) for _, v in state)  # replaced or modified weights
    cached = _FINGERPRINTS.get(net)
    if cached is not None and cached[0] == versions:
        return cached[1]
    h = hashlib.sha256()
    for name, v in state:
        h.update(name.encode())
        h.update(v.detach().to("cpu").contiguous().numpy().tobytes())
    _FINGERPRINTS[net] = (versions, h.hexdigest()[:16])
    return _FINGERPRINTS[net][1]
