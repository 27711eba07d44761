"""Forward processes x_t = alpha(t) x0 + sigma(t) eps and their canonical noise level.

Every process is the same process in the canonical variable x̄ = x_t / alpha(t) with noise level
σ̄ = sigma(t) / alpha(t):  x̄ = x0 + σ̄ eps  ("Elucidating the Design Space of Diffusion-Based Generative
Models", Karras et al. 2022, Sec. 2). A `Process` gives alpha(t), sigma(t), their time derivatives, and the
two-way map between native time t and σ̄. Native time is what the user's network is fed:

========================  ==========================  ===========================================
process                   native time t               x_t
========================  ==========================  ===========================================
VP.discrete(betas)        timestep index 0..T-1       sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) eps
VP.continuous(...)        t in [eps, 1]               exp(m(t)) x0 + sqrt(1-exp(2m(t))) eps
VE(sigma_min, sigma_max)  σ                           x0 + σ eps
EDM(..., sigma_data)      σ                           x0 + σ eps (network preconditioned, see Denoiser)
Flow(shift)               t in [0, 1]                 (1-t) x0 + t eps
Interpolant(alpha, sigma) user's t                    alpha(t) x0 + sigma(t) eps
========================  ==========================  ===========================================

All maps accept tensors (any shape) and return tensors of the same shape and dtype; computations that
need it are done in float64 internally.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

Tensor = torch.Tensor

__all__ = ["Process", "VP", "DiscreteVP", "LinearVP", "CosineVP", "VE", "EDM", "Flow", "Interpolant"]


def _as_tensor(t) -> Tensor:
    """Tensor view of t; integers (e.g. discrete timesteps) become float64."""
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.float64)


class Process:
    """A forward process x_t = alpha(t) x0 + sigma(t) eps with native time range [t_min, t_max].

    Subclasses implement `alpha`, `sigma` and `t_of_sigma_bar`; derivatives default to autograd.
    """

    t_min: float
    t_max: float

    def alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sigma_bar(self, t) -> Tensor:
        """Canonical noise level σ̄(t) = sigma(t) / alpha(t)."""
        t = _as_tensor(t)
        return self.sigma(t) / self.alpha(t)

    def t_of_sigma_bar(self, sigma_bar) -> Tensor:  # pragma: no cover - abstract
        """Native time t with σ̄(t) = sigma_bar (inverse of `sigma_bar`)."""
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        """d alpha / dt (autograd by default; built-in processes override with closed forms)."""
        return _autograd_derivative(self.alpha, t)

    def d_sigma(self, t: Tensor) -> Tensor:
        """d sigma / dt."""
        return _autograd_derivative(self.sigma, t)

    @functools.cached_property
    def sigma_bar_min(self) -> float:
        """σ̄(t_min) (processes are immutable once built: computed once)."""
        return float(self.sigma_bar(torch.tensor(self.t_min, dtype=torch.float64)))

    @functools.cached_property
    def sigma_bar_max(self) -> float:
        """σ̄(t_max)."""
        return float(self.sigma_bar(torch.tensor(self.t_max, dtype=torch.float64)))

    def start_scale(self, t: float) -> float:
        """Native standard deviation given to standard normal noise at the start time t: x_t = scale * noise.
        sigma(t) by default (VE/EDM: x = σ noise); VP and Flow override it with 1 (x_T = noise, x_1 = noise)."""
        return float(self.sigma(torch.tensor(t, dtype=torch.float64)))

    def noise_to_canonical(self, noise: Tensor, sigma_bar: float) -> Tensor:
        """The canonical start x̄ = start_scale(t) noise / alpha(t) at t = t(σ̄) for standard normal noise."""
        return noise * self.canonical_scale(float(sigma_bar))

    def canonical_scale(self, sigma_bar: float) -> float:
        """start_scale(t) / alpha(t) at t = t(σ̄), cached per level (sampling starts at the same few levels)."""
        cache = self.__dict__.setdefault("_canonical_scale_cache", {})
        c = cache.get(sigma_bar)
        if c is None:
            t = self.t_of_sigma_bar(torch.tensor(sigma_bar, dtype=torch.float64))
            c = cache[sigma_bar] = self.start_scale(float(t)) / float(self.alpha(t))
        return c

    # time grids used by the uniform-in-native-time schedules -------------------------------------------
    def uniform_time_warp(self, u: Tensor) -> Tensor:
        """Map a uniform grid u in [t_min, t_max] to native time (identity except for shifted flows)."""
        return u

    def config(self) -> dict:
        """JSON-serializable description (for checkpoints and plans)."""
        return {"type": type(self).__name__}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"


def _autograd_derivative(fn: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    t = _as_tensor(t).detach().to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        y = fn(t)
        (g,) = torch.autograd.grad(y.sum(), t)
    return g


# ----------------------------------------------------------------------------------------------------------
# Variance preserving
# ----------------------------------------------------------------------------------------------------------


class _UnitStart(Process):
    """Processes whose sampling starts from x_{t_max} = noise (VP: x_T = noise; Flow: x_1 = noise)."""

    def start_scale(self, t: float) -> float:
        return 1.0

_BETA_PRESETS = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _betas_preset(name: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """The beta schedules of DDPM (linear), Stable Diffusion (scaled_linear) and improved DDPM (cosine)."""
    T = num_train_timesteps
    if name == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if name == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if name == "squaredcos_cap_v2":
        # "Improved Denoising Diffusion Probabilistic Models" (Nichol & Dhariwal 2021), Eq. 17, s = 0.008,
        # betas clipped at 0.999.
        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        b = [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)]
        return torch.tensor(b, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {name!r}; valid: {', '.join(_BETA_PRESETS)}")


class DiscreteVP(_UnitStart):
    """Discrete-time VP ("Denoising Diffusion Probabilistic Models", Ho et al. 2020): ᾱ_t = prod_{s<=t}(1-β_s).

    Native time is the timestep index t in [0, T-1]; fractional timesteps interpolate log σ̄ linearly between
    neighbouring integers (the rule diffusers uses for Karras sigmas, `_sigma_to_t`), so t -> σ̄ is a
    monotone piecewise log-linear map with an exact inverse.
    """

    def __init__(self, betas, name: dict | None = None):
        self.name = name
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError("betas must be a 1-D sequence with at least two entries")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas >= 1).any():
            raise ValueError("betas must be finite and in (0, 1)")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        self.sigma_bars = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self._log_sb = self.sigma_bars.log()
        self.t_min, self.t_max = 0.0, float(len(betas) - 1)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    def _log_sigma_bar(self, t: Tensor) -> Tensor:
        t64 = t.to(torch.float64).clamp(self.t_min, self.t_max)
        lo = t64.floor().long().clamp(max=len(self.betas) - 2)
        w = t64 - lo
        ls = self._log_sb.to(t.device)
        return (1 - w) * ls[lo] + w * ls[lo + 1]

    def sigma_bar(self, t) -> Tensor:
        t = _as_tensor(t)
        return self._log_sigma_bar(t).exp().to(t.dtype)

    def alpha(self, t) -> Tensor:
        t = _as_tensor(t)
        sb = self._log_sigma_bar(t).exp()
        return (1 + sb**2).rsqrt().to(t.dtype)

    def sigma(self, t) -> Tensor:
        t = _as_tensor(t)
        sb = self._log_sigma_bar(t).exp()
        return (sb * (1 + sb**2).rsqrt()).to(t.dtype)

    def t_of_sigma_bar(self, sigma_bar) -> Tensor:
        sigma_bar = _as_tensor(sigma_bar)
        ls = self._log_sb.to(sigma_bar.device)
        x = sigma_bar.to(torch.float64).clamp(min=1e-300).log().clamp(float(ls[0]), float(ls[-1]))
        hi = torch.searchsorted(ls, x.contiguous()).clamp(1, len(ls) - 1)
        lo = hi - 1
        w = (x - ls[lo]) / (ls[hi] - ls[lo])
        return (lo + w).to(sigma_bar.dtype)

    def config(self) -> dict:
        if self.name is not None:
            return {"type": "VP.discrete", **self.name}
        return {"type": "VP.discrete", "betas": self.betas.tolist()}


class LinearVP(_UnitStart):
    """Continuous VP with linear β(t) ("Score-Based Generative Modeling through SDEs", Song et al. 2021).

    log alpha(t) = -β_1-β_0 t²/4 - β_0 t/2,  sigma = sqrt(1 - alpha²); the inverse is DPM-Solver's closed form
    t(λ) = 2 log(e^{-2λ}+1) / (sqrt(β_0² + 2(β_1-β_0) log(e^{-2λ}+1)) + β_0).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        if not 0 < beta_min < beta_max:
            raise ValueError("need 0 < beta_min < beta_max")
        if not 0 < t_min < t_max:
            raise ValueError("need 0 < t_min < t_max")
        self.beta_min, self.beta_max, self.t_min, self.t_max = beta_min, beta_max, t_min, t_max

    def _log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t):
        return self._log_alpha(_as_tensor(t)).exp()

    def sigma(self, t):
        t = _as_tensor(t)
        return (-torch.expm1(2 * self._log_alpha(t))).sqrt()

    def sigma_bar(self, t):
        t = _as_tensor(t)
        return torch.expm1(-2 * self._log_alpha(t)).sqrt()

    def d_alpha(self, t):
        t = _as_tensor(t)
        return self.alpha(t) * (-0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min)

    def d_sigma(self, t):
        t = _as_tensor(t)
        a, s = self.alpha(t), self.sigma(t)
        return -a * self.d_alpha(t) / s

    def t_of_sigma_bar(self, sigma_bar):
        sb = _as_tensor(sigma_bar)
        L = torch.log1p(sb.to(torch.float64) ** 2)  # = -2 log alpha
        db = self.beta_max - self.beta_min
        t = 2 * L / ((self.beta_min**2 + 2 * db * L).sqrt() + self.beta_min)
        return t.to(sb.dtype)

    def config(self):
        return {"type": "VP.continuous", "schedule": "linear", "beta_min": self.beta_min,
                "beta_max": self.beta_max, "t_min": self.t_min, "t_max": self.t_max}


class CosineVP(_UnitStart):
    """Continuous cosine VP (Nichol & Dhariwal 2021): alpha(t) = cos((t+s)/(1+s) π/2) / cos(s/(1+s) π/2).

    t_max defaults to 0.9946 as in DPM-Solver, where σ̄ is still finite (≈ 119).
    """

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946):
        if not 0 < t_min < t_max < 1:
            raise ValueError("need 0 < t_min < t_max < 1")
        self.s, self.t_min, self.t_max = s, t_min, t_max
        self._log_a0 = math.log(math.cos(s / (1 + s) * math.pi / 2))

    def _angle(self, t):
        return (t + self.s) / (1 + self.s) * math.pi / 2

    def alpha(self, t):
        t = _as_tensor(t)
        return torch.cos(self._angle(t)) / math.exp(self._log_a0)

    def sigma(self, t):
        a = self.alpha(t)
        return (1 - a**2).clamp(min=0).sqrt()

    def d_alpha(self, t):
        t = _as_tensor(t)
        return -torch.sin(self._angle(t)) * (math.pi / 2 / (1 + self.s)) / math.exp(self._log_a0)

    def d_sigma(self, t):
        a = self.alpha(t)
        return -a * self.d_alpha(t) / self.sigma(t)

    def t_of_sigma_bar(self, sigma_bar):
        sb = _as_tensor(sigma_bar)
        log_a = -0.5 * torch.log1p(sb.to(torch.float64) ** 2)
        t = 2 * (1 + self.s) / math.pi * torch.arccos(torch.exp(log_a + self._log_a0)) - self.s
        return t.to(sb.dtype)

    def config(self):
        return {"type": "VP.continuous", "schedule": "cosine", "s": self.s, "t_min": self.t_min,
                "t_max": self.t_max}


class VP:
    """Variance-preserving processes: `VP.discrete(...)` and `VP.continuous(...)`."""

    PRESETS = _BETA_PRESETS

    @staticmethod
    def discrete(betas="linear", num_train_timesteps: int = 1000, beta_start: float | None = None,
                 beta_end: float | None = None) -> DiscreteVP:
        """Discrete VP from explicit betas or a diffusers preset name.

        Presets and their diffusers defaults: linear (1e-4 .. 0.02, DDPM), scaled_linear (0.00085 .. 0.012,
        Stable Diffusion), squaredcos_cap_v2 (improved DDPM cosine).
        """
        if isinstance(betas, str):
            if betas not in _BETA_PRESETS:
                raise ValueError(f"unknown beta schedule {betas!r}; valid: {', '.join(_BETA_PRESETS)}")
            defaults = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}.get(betas, (None, None))
            bs = beta_start if beta_start is not None else defaults[0]
            be = beta_end if beta_end is not None else defaults[1]
            name = {"preset": betas, "num_train_timesteps": num_train_timesteps}
            if bs is not None:
                name.update(beta_start=bs, beta_end=be)
            return DiscreteVP(_betas_preset(betas, num_train_timesteps, bs or 0.0, be or 0.0), name=name)
        return DiscreteVP(betas)

    @staticmethod
    def continuous(schedule: str = "linear", **kwargs) -> Process:
        """Continuous VP: schedule 'linear' (score-SDE β_min=0.1, β_max=20) or 'cosine'."""
        if schedule == "linear":
            return LinearVP(**kwargs)
        if schedule == "cosine":
            return CosineVP(**kwargs)
        raise ValueError(f"unknown continuous VP schedule {schedule!r}; valid: linear, cosine")


# ----------------------------------------------------------------------------------------------------------
# Variance exploding / EDM
# ----------------------------------------------------------------------------------------------------------


class VE(Process):
    """Variance exploding: x_σ = x0 + σ eps, native time t = σ (Song et al. 2021; Karras et al. 2022)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
            raise ValueError("need 0 < sigma_min < sigma_max < inf")
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)

    def alpha(self, t):
        return torch.ones_like(_as_tensor(t))

    def sigma(self, t):
        return _as_tensor(t).clone()

    def sigma_bar(self, t):
        return _as_tensor(t).clone()

    def d_alpha(self, t):
        return torch.zeros_like(_as_tensor(t))

    def d_sigma(self, t):
        return torch.ones_like(_as_tensor(t))

    def t_of_sigma_bar(self, sigma_bar):
        return _as_tensor(sigma_bar).clone()

    def config(self):
        return {"type": type(self).__name__, "sigma_min": self.t_min, "sigma_max": self.t_max}


class EDM(VE):
    """EDM process (Karras et al. 2022): VE with sigma_data for the network preconditioning (Table 1)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        super().__init__(sigma_min, sigma_max)
        if not sigma_data > 0:
            raise ValueError("sigma_data must be positive")
        self.sigma_data = float(sigma_data)

    def config(self):
        return {**super().config(), "sigma_data": self.sigma_data}


# ----------------------------------------------------------------------------------------------------------
# Flows and general interpolants
# ----------------------------------------------------------------------------------------------------------


class Interpolant(Process):
    """General interpolant x_t = alpha(t) x0 + sigma(t) eps from user callables
    ("Stochastic Interpolants: A Unifying Framework for Flows and Diffusions", Albergo et al. 2023).

    alpha must decrease and sigma increase on [t_min, t_max] so that σ̄(t) is strictly increasing; the inverse
    t(σ̄) is found by bisection in float64. Derivatives come from autograd unless given.
    """

    def __init__(self, alpha: Callable, sigma: Callable, t_min: float = 1e-3, t_max: float = 1 - 1e-3,
                 d_alpha: Callable | None = None, d_sigma: Callable | None = None):
        self._alpha, self._sigma, self._da, self._ds = alpha, sigma, d_alpha, d_sigma
        self.t_min, self.t_max = float(t_min), float(t_max)
        grid = torch.linspace(self.t_min, self.t_max, 257, dtype=torch.float64)
        sb = self.sigma_bar(grid)
        if not torch.isfinite(sb).all() or (sb <= 0).any() or not (sb[1:] > sb[:-1]).all():
            raise ValueError("sigma(t)/alpha(t) must be finite, positive and strictly increasing on "
                             "[t_min, t_max]")

    def alpha(self, t):
        return self._alpha(_as_tensor(t))

    def sigma(self, t):
        return self._sigma(_as_tensor(t))

    def d_alpha(self, t):
        return self._da(_as_tensor(t)) if self._da else _autograd_derivative(self._alpha, t)

    def d_sigma(self, t):
        return self._ds(_as_tensor(t)) if self._ds else _autograd_derivative(self._sigma, t)

    def t_of_sigma_bar(self, sigma_bar):
        sb = _as_tensor(sigma_bar)
        target = sb.to(torch.float64)
        lo = torch.full_like(target, self.t_min)
        hi = torch.full_like(target, self.t_max)
        for _ in range(60):  # bisection: 2^-60 of the interval, below float64 resolution
            mid = 0.5 * (lo + hi)
            up = self.sigma_bar(mid) < target
            lo = torch.where(up, mid, lo)
            hi = torch.where(up, hi, mid)
        return (0.5 * (lo + hi)).to(sb.dtype)

    def config(self):
        return {"type": "Interpolant", "t_min": self.t_min, "t_max": self.t_max}


class Flow(_UnitStart):
    """Rectified flow / linear interpolant x_t = (1-t) x0 + t eps ("Flow Straight and Fast", Liu et al. 2023;
    "Flow Matching for Generative Modeling", Lipman et al. 2023); σ̄ = t/(1-t), t = σ̄/(1+σ̄).

    `shift` is the SD3 time shift t = s u / (1 + (s-1) u) ("Scaling Rectified Flow Transformers", Esser et al.
    2024, Eq. 23) applied to uniform-in-time schedules (on the position within [t_min, t_max], which keeps the
    ends); the model always receives the interpolant time t.
    The native range is [t_min, t_max] = [1e-3, 1-1e-3] by default so that σ̄ stays finite (σ̄_max = 999),
    as VP's alpha(T) > 0 does for discrete VP.
    """

    def __init__(self, shift: float = 1.0, t_min: float = 1e-3, t_max: float = 1 - 1e-3):
        if not shift > 0:
            raise ValueError("shift must be positive")
        if not 0 < t_min < t_max < 1:
            raise ValueError("need 0 < t_min < t_max < 1")
        self.shift, self.t_min, self.t_max = float(shift), float(t_min), float(t_max)

    def alpha(self, t):
        return 1 - _as_tensor(t)

    def sigma(self, t):
        return _as_tensor(t).clone()

    def sigma_bar(self, t):
        t = _as_tensor(t)
        return t / (1 - t)

    def d_alpha(self, t):
        return -torch.ones_like(_as_tensor(t))

    def d_sigma(self, t):
        return torch.ones_like(_as_tensor(t))

    def t_of_sigma_bar(self, sigma_bar):
        sb = _as_tensor(sigma_bar)
        return sb / (1 + sb)

    def uniform_time_warp(self, u):
        """SD3 shift on the normalized position w = (u - t_min)/(t_max - t_min): w' = s w / (1 + (s-1) w),
        so both ends of the native range stay fixed."""
        lo, hi, s = self.t_min, self.t_max, self.shift
        w = (u - lo) / (hi - lo)
        return lo + (hi - lo) * (s * w / (1 + (s - 1) * w))

    def config(self):
        return {"type": "Flow", "shift": self.shift, "t_min": self.t_min, "t_max": self.t_max}


def process_from_config(cfg: dict) -> Process:
    """Rebuild a process from `Process.config()` output (custom Interpolants cannot be rebuilt)."""
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind == "VP.discrete":
        if "betas" in cfg:
            return VP.discrete(cfg["betas"])
        return VP.discrete(cfg.pop("preset"), **cfg)
    if kind == "VP.continuous":
        return VP.continuous(**cfg)
    builders = {"VE": VE, "EDM": EDM, "Flow": Flow}
    if kind not in builders:
        raise ValueError(f"unknown process type {kind!r}; valid: VP.discrete, VP.continuous, VE, EDM, Flow")
    return builders[kind](**cfg)
