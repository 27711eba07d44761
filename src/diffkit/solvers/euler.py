"""First- and second-order solvers of the probability-flow ODE dx̄/dσ̄ = ε̂(x̄, σ̄)."""

from __future__ import annotations

import torch

from .base import eps_of, evaluate, step_loop


def euler(denoiser, x, sigmas, *, cond=None, callback=None, progress=False):
    """Euler / DDIM ("Denoising Diffusion Implicit Models", Song et al. 2021, Eq. 13 with η = 0; Karras et al.
    2022, Alg. 1 without the correction): x̄' = x̄ + (σ̄' - σ̄) ε̂ = D + (σ̄'/σ̄)(x̄ - D). One call per step."""
    return step_loop(denoiser, x, sigmas, cond, callback, progress,
                     lambda i, x, d, si, ti: torch.lerp(d, x, ti / si))  # = D + (σ̄'/σ̄)(x̄ - D)


def heun(denoiser, x, sigmas, *, cond=None, callback=None, progress=False):
    """Heun's second-order method ("Elucidating the Design Space of Diffusion-Based Generative Models",
    Karras et al. 2022, Alg. 1): x̄' = x̄ + (σ̄' - σ̄)(ε̂(x̄, σ̄) + ε̂(x̄_E, σ̄'))/2 with x̄_E the Euler step;
    the step to σ̄ = 0 is Euler. Two calls per step, one for the last step to 0."""
    cond = cond or {}

    def step(i, x, d, si, ti):
        e = eps_of(x, d, si)
        x_euler, d2 = evaluate(denoiser, x + (ti - si) * e, ti, cond)
        return x + (ti - si) * 0.5 * (e + eps_of(x_euler, d2, ti))

    return step_loop(denoiser, x, sigmas, cond, callback, progress, step)
