"""Classifier-free guidance and its variants, as denoiser transforms in canonical x0 space.

With D_c = D(x̄, σ̄, **cond) and D_u = D(x̄, σ̄, **uncond) from one batched network call, CFG is
D_w = D_u + w (D_c - D_u). Since ε̂ = (x̄ - D)/σ̄ is affine in D, this is the same guidance in ε̂, score or
velocity space. The unconditional conditioning comes from the model (`null_cond`) or is given as `uncond`;
negative conditioning ("negative prompts") is `uncond` set to the conditioning to steer away from.
Every class counts its network passes in `passes` ("cond", "uncond") and reports `saved_fraction`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .base import GuidedDenoiser, batched_call, scale_at

Tensor = torch.Tensor

__all__ = ["CFG", "CFGPlusPlus", "AdaptiveGuidance", "LinearAG", "fit_linear_ag", "null_cond"]


def null_cond(denoiser) -> dict:
    """The conditioning of the unconditional model under `denoiser` ("Classifier-Free Diffusion Guidance", Ho &
    Salimans 2022, Sec. 3.2: one network, trained with a null condition): the first `null_cond` dict on the
    denoiser or on what it wraps (`.denoiser`, `.model`, ...), or {"label": -1} at a diffkit model with a class
    embedding (its null class)."""
    obj, seen = denoiser, set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        found = getattr(obj, "null_cond", None)
        if isinstance(found, dict):
            return dict(found)
        if getattr(obj, "class_embed", None) is not None:
            return {"label": -1}
        inner = getattr(obj, "denoiser", None)
        obj = inner if inner is not None else getattr(obj, "model", None)
    raise ValueError(f"{type(denoiser).__name__} has no unconditional path (no null_cond, no class embedding); "
                     "pass uncond=... (the conditioning of the unconditional or negative pass)")


def _per_sample(v, x: Tensor):
    """A number, or a () / (batch,) tensor shaped to broadcast against x of shape (batch, ...)."""
    if not isinstance(v, Tensor):
        return v
    v = v.to(x.device, x.dtype if v.is_floating_point() else v.dtype)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v


class CFG(GuidedDenoiser):
    """Classifier-free guidance ("Classifier-Free Diffusion Guidance", Ho & Salimans 2022, Eq. 6 with their
    w + 1 = our w): D_w = D_u + w (D_c - D_u); w = 1 is the conditional model, w = 0 the unconditional one.

    `scale` w is a number or a function of σ̄. `uncond`: the conditioning of the unconditional pass (default:
    `null_cond(denoiser)`); give another condition for negative guidance. Both passes are one forward call.

    `rescale` φ ("Common Diffusion Noise Schedules and Sample Steps Are Flawed", Lin et al. 2024, Sec. 3.4,
    Alg. 2): D = φ D_w std(D_c)/std(D_w) + (1 - φ) D_w, std per sample over its features.
    `interval` (σ_lo, σ_hi) ("Applying Guidance in a Limited Interval Improves Sample and Distribution Quality
    in Diffusion Models", Kynkäänniemi et al. 2024, Eq. 2): guidance only for σ̄ in (σ_lo, σ_hi], elsewhere D_c
    alone, without the unconditional pass when no sample of the batch is inside.
    """

    def __init__(self, denoiser, scale: float | Callable, *, uncond: dict | None = None, rescale: float = 0.0,
                 interval: tuple[float, float] | None = None):
        super().__init__(denoiser)
        self.scale, self.rescale = scale, float(rescale)
        self.uncond = null_cond(denoiser) if uncond is None else dict(uncond)
        if not 0 <= self.rescale <= 1:
            raise ValueError(f"rescale must be in [0, 1]; got {rescale}")
        if interval is not None and not 0 <= float(interval[0]) < float(interval[1]):
            raise ValueError(f"interval must be (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi; got {interval}")
        self.interval = interval

    def predictions(self, x: Tensor, sigma, cond: dict) -> tuple[Tensor, Tensor]:
        """(D_c, D_u) from one batched forward call (one "cond" and one "uncond" pass)."""
        self.passes.update(("cond", "uncond"))
        d_c, d_u = batched_call(self.denoiser, x, sigma, [cond, self.uncond])
        return d_c, d_u

    def conditional(self, x: Tensor, sigma, cond: dict) -> Tensor:
        """D_c alone (one "cond" pass)."""
        self.passes["cond"] += 1
        return self.denoiser(x, sigma, **cond)

    def combine(self, d_c: Tensor, d_u: Tensor, sigma) -> Tensor:
        """D_u + w (D_c - D_u), rescaled by φ (formulas in the class docstring)."""
        d = torch.lerp(d_u, d_c, _per_sample(scale_at(self.scale, sigma), d_c))
        if self.rescale:
            dims = tuple(range(1, d.ndim))
            d = torch.lerp(d, d * (d_c.std(dims, keepdim=True) / d.std(dims, keepdim=True)), self.rescale)
        return d

    def denoise_at(self, x: Tensor, sigma, **cond) -> tuple[Tensor, Tensor]:
        inside = None
        if self.interval is not None:
            s = torch.as_tensor(sigma, dtype=torch.float64)
            inside = (s > self.interval[0]) & (s <= self.interval[1])
            if not inside.any():
                return x, self.conditional(x, sigma, cond)
        d_c, d_u = self.predictions(x, sigma, cond)
        d = self.combine(d_c, d_u, sigma)
        if inside is not None and not inside.all():
            d = torch.where(_per_sample(inside, x), d, d_c)
        return x, d

    @property
    def saved_fraction(self) -> float:
        """1 - passes / (2 × evaluations): the share of full CFG's network passes not run since `prepare` (each
        evaluation makes exactly one conditional pass, so evaluations = passes["cond"])."""
        n = self.passes["cond"]
        return 1 - sum(self.passes.values()) / (2 * n) if n else 0.0


def _check_lambda(lam) -> None:
    t = torch.as_tensor(lam, dtype=torch.float64)
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"CFG++ needs a guidance scale lambda in [0, 1]; got {lam}")


class CFGPlusPlus(CFG):
    """CFG++ ("CFG++: Manifold-constrained Classifier Free Guidance for Diffusion Models", Chung et al. 2024,
    Alg. 1): D_λ = D_u + λ (D_c - D_u) with λ in [0, 1], and the DDIM step renoises with the unconditional
    ε̂_u = (x̄ - D_u)/σ̄: x̄_next = D_λ + σ̄_next ε̂_u.

    Through `denoise_at` the state is re-anchored at x̄' = D_λ + σ̄ ε̂_u = x̄ + D_λ - D_u; a solver's DDIM step
    from x̄', D + σ̄_next (x̄' - D)/σ̄, is then exactly the CFG++ update, and every other solver applies the same
    re-anchoring at each of its evaluations. `scale` λ is a number or a function of σ̄.
    """

    def __init__(self, denoiser, scale: float | Callable, *, uncond: dict | None = None):
        super().__init__(denoiser, scale, uncond=uncond)
        if not callable(scale):
            _check_lambda(scale)

    def denoise_at(self, x: Tensor, sigma, **cond) -> tuple[Tensor, Tensor]:
        if callable(self.scale):
            _check_lambda(self.scale(sigma))
        d_c, d_u = self.predictions(x, sigma, cond)
        d = self.combine(d_c, d_u, sigma)
        return x + (d - d_u), d


class AdaptiveGuidance(CFG):
    """Adaptive Guidance ("Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models",
    Castillo et al. 2023, Sec. 4): CFG while γ ≤ γ̄ (`threshold`), then the conditional model alone, one pass per
    evaluation, for the rest of the trajectory; γ is the cosine similarity of the conditional and unconditional
    predictions, flattened per sample, and the batch minimum decides.

    `space` chooses the predictions compared. "x0" (default): D_c and D_u. "eps": ε̂_c and ε̂_u as in the paper
    (x̄ - D over σ̄; σ̄ cancels). Both are the paper's criterion "the two predictions agree", but in canonical
    variables ε̂ = (x̄ - D)/σ̄ shares the term x̄/σ̄, which dominates at large σ̄: on an EDM model started at
    σ̄ = 80, ε̂-similarity is ≈ 1 - 2e-5 at the first evaluation and falls along the trajectory (the paper's SD
    models start at σ̄ ≈ 14.6 in latent space), so the ε̂ rule drops guidance at once; D-similarity rises
    monotonically towards 1 as the sample settles, which is the behaviour the rule relies on (measured in
    bench/guidance.py). `similarities` lists γ at each guided evaluation since `prepare`.
    """

    SPACES = ("x0", "eps")

    def __init__(self, denoiser, scale: float | Callable, *, threshold: float = 0.999, space: str = "x0",
                 uncond: dict | None = None):
        super().__init__(denoiser, scale, uncond=uncond)
        if space not in self.SPACES:
            raise ValueError(f"unknown space {space!r}; valid: {', '.join(self.SPACES)}")
        self.threshold, self.space = float(threshold), space
        self.reset()

    def reset(self) -> None:
        self.similarities: list[float] = []
        self.dropped = False

    def denoise_at(self, x: Tensor, sigma, **cond) -> tuple[Tensor, Tensor]:
        if self.dropped:
            return x, self.conditional(x, sigma, cond)
        d_c, d_u = self.predictions(x, sigma, cond)
        a, b = (d_c, d_u) if self.space == "x0" else (x - d_c, x - d_u)
        gamma = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
        self.similarities.append(float(gamma.clamp(-1, 1).min()))
        self.dropped = self.similarities[-1] > self.threshold
        return x, self.combine(d_c, d_u, sigma)


def fit_linear_ag(eps_c: Sequence[Tensor], eps_u: Sequence[Tensor]) -> Tensor:
    """LinearAG's calibration (Castillo et al. 2023, Sec. 5): per evaluation i ≥ 1, the (a_i, b_i, c_i)
    minimising Σ ‖ε̂_u(i) - a_i ε̂_c(i) - b_i ε̂_c(i-1) - c_i ε̂_u(i-1)‖² over every sample and feature of the
    recorded predictions (lists over evaluations of batch tensors). Shape (n, 3) in float64; row 0 is NaN."""
    if len(eps_c) != len(eps_u):
        raise ValueError(f"eps_c and eps_u must list the same evaluations; got {len(eps_c)} and {len(eps_u)}")
    coef = torch.full((len(eps_c), 3), math.nan, dtype=torch.float64)
    for i in range(1, len(eps_c)):
        cols = torch.stack([eps_c[i].flatten(), eps_c[i - 1].flatten(), eps_u[i - 1].flatten()], 1)
        target = eps_u[i].flatten()[:, None]
        coef[i] = torch.linalg.lstsq(cols.cpu().double(), target.cpu().double()).solution[:, 0]
    return coef


class LinearAG(CFG):
    """LinearAG ("Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models", Castillo et
    al. 2023, Sec. 5): at the evaluations i with `skip(i)` the unconditional pass is replaced by the affine
    estimate ε̂_u(i) ≈ a_i ε̂_c(i) + b_i ε̂_c(i-1) + c_i ε̂_u(i-1) from predictions already made (ε̂_u(i-1)
    possibly an estimate itself), then D_u = x̄ - σ̄ ε̂_u and CFG as usual.

    `coefficients` (n, 3) are per evaluation index along a trajectory (`fit_linear_ag`); `calibrate` fits them
    on full-CFG trajectories, which must use the solver and grid sampling will use. `skip` (evaluation index ->
    bool) defaults to every other evaluation (saved_fraction 1/4); e.g. `lambda i: i >= k` estimates all after k.
    """

    def __init__(self, denoiser, scale: float | Callable, coefficients=None, *,
                 skip: Callable[[int], bool] | None = None, uncond: dict | None = None):
        super().__init__(denoiser, scale, uncond=uncond)
        self.coefficients = None if coefficients is None else torch.as_tensor(coefficients, dtype=torch.float64)
        self.skip = skip or (lambda i: i % 2 == 1)
        self._trace: list | None = None  # (ε̂_c, ε̂_u) per evaluation while calibrating
        self.reset()

    def reset(self) -> None:
        self.index, self.previous = 0, None  # evaluation index, (ε̂_c, ε̂_u) of the previous evaluation

    def denoise_at(self, x: Tensor, sigma, **cond) -> tuple[Tensor, Tensor]:
        i, s = self.index, _per_sample(sigma, x)
        if self._trace is None and self.coefficients is None:
            raise ValueError("LinearAG needs coefficients: call calibrate(noise, ...) or pass coefficients=")
        if self._trace is None and self.previous is not None and self.skip(i):
            if i >= len(self.coefficients):
                raise ValueError(f"LinearAG is calibrated for {len(self.coefficients)} evaluations; this "
                                 "trajectory has more (calibrate with the solver and grid you sample with)")
            a, b, c = self.coefficients[i].tolist()
            d_c = self.conditional(x, sigma, cond)
            e_c = (x - d_c) / s
            e_u = a * e_c + b * self.previous[0] + c * self.previous[1]
            d_u = x - s * e_u
        else:
            d_c, d_u = self.predictions(x, sigma, cond)
            e_c, e_u = (x - d_c) / s, (x - d_u) / s
            if self._trace is not None:
                self._trace.append((e_c, e_u))
        self.index, self.previous = i + 1, (e_c, e_u)
        return x, self.combine(d_c, d_u, sigma)

    def calibrate(self, noise: Tensor, **sample_options) -> Tensor:
        """Fit and set `coefficients` on full-CFG trajectories `diffkit.sample(self, noise, **sample_options)`
        (give the solver, grid and `cond` sampling will use); returns them."""
        from ..solvers import sample

        self._trace = []
        try:
            with torch.no_grad():
                sample(self, noise, **sample_options)
            eps_c, eps_u = zip(*((c.detach(), u.detach()) for c, u in self._trace))
        finally:
            self._trace = None
        self.coefficients = fit_linear_ag(eps_c, eps_u)
        return self.coefficients
