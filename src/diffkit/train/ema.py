"""Exponential moving averages of network weights.

* fixed decay β: θ̄ <- β θ̄ + (1 - β) θ ("Improved Techniques for Training Score-Based Generative Models", Song &
  Ermon 2020, Sec. 3.5), optionally with the warm-up β_t = min(β, (1 + t) / (10 + t));
* power-function EMA β_t = (1 - 1/t)^(γ+1) ("Analyzing and Improving the Training Dynamics of Diffusion Models",
  Karras et al. 2024, Eq. 3), whose averaging profile has relative width σ_rel linked to γ by
  σ_rel = (γ+1)^½ (γ+2)^-1 (γ+3)^-½ (their Eq. 2), solved for γ when `sigma_rel` is given.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["EMA", "sigma_rel_to_gamma"]


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """γ of the power-function EMA with relative standard deviation σ_rel (Karras et al. 2024, Eq. 2 inverted:
    the root of γ³ + 7γ² + (16 - σ_rel⁻²)γ + (12 - σ_rel⁻²) = 0)."""
    if not 0 < sigma_rel < 1 / math.sqrt(6):
        raise ValueError("sigma_rel must be in (0, 1/sqrt(6)) (gamma > 0)")
    t = sigma_rel**-2
    lo, hi = 0.0, 1e6
    for _ in range(200):  # the cubic is increasing in γ >= 0 where it changes sign
        mid = 0.5 * (lo + hi)
        if mid**3 + 7 * mid**2 + (16 - t) * mid + (12 - t) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class EMA:
    """Moving average of a model's parameters (buffers are copied): `EMA(model, decay=0.999)` (fixed decay, with
    `warmup`) or `EMA(model, gamma=6.94)` / `EMA(model, sigma_rel=0.05)` (power-function EMA of Karras et al. 2024,
    "Analyzing and Improving the Training Dynamics of Diffusion Models", Eq. 3). `update(model)` after each
    optimizer step; `ema.module` is the averaged network (for sampling and export)."""

    def __init__(self, model: nn.Module, decay: float | None = None, *, gamma: float | None = None,
                 sigma_rel: float | None = None, warmup: bool = False):
        given = sum(v is not None for v in (decay, gamma, sigma_rel))
        if given > 1:
            raise ValueError("give one of decay, gamma and sigma_rel")
        if given == 0:
            decay = 0.999
        if sigma_rel is not None:
            gamma = sigma_rel_to_gamma(sigma_rel)
        if decay is not None and not 0 <= decay < 1:
            raise ValueError("decay must be in [0, 1)")
        if gamma is not None and not gamma > 0:
            raise ValueError("gamma must be positive")
        self.decay, self.gamma, self.warmup = decay, gamma, warmup
        model = getattr(model, "module", model)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    def current_decay(self) -> float:
        """β used by the next update (step t = num_updates + 1)."""
        t = self.num_updates + 1
        if self.gamma is not None:
            return (1 - 1 / t) ** (self.gamma + 1)
        if self.warmup:
            return min(self.decay, (1 + t) / (10 + t))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """θ̄ <- β θ̄ + (1 - β) θ for every parameter; buffers copied."""
        model = getattr(model, "module", model)
        beta = self.current_decay()
        ema_p = [p for p in self.module.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        if len(ema_p) != len(src_p):
            raise ValueError("the EMA was built for a different model")
        torch._foreach_lerp_(ema_p, [p.to(e.dtype) for p, e in zip(src_p, ema_p)], 1 - beta)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay,
                "gamma": self.gamma, "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])

    def config(self) -> dict:
        return {"decay": self.decay, "gamma": self.gamma, "warmup": self.warmup}
