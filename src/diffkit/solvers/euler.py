"""First- and second-order solvers of the probability-flow ODE dx̄/dσ̄ = ε̂(x̄, σ̄)."""

from __future__ import annotations

import torch

from .base import as_floats, emit, eps_of, evaluate, steps


def euler(denoiser, x, sigmas, *, cond=None, callback=None, progress=False):
    """Euler / DDIM ("Denoising Diffusion Implicit Models", Song et al. 2021, Eq. 13 with η = 0; Karras et al.
    2022, Alg. 1 without the correction): x̄' = x̄ + (σ̄' - σ̄) ε̂ = D + (σ̄'/σ̄)(x̄ - D). One call per step."""
    cond = cond or {}
    s = as_floats(sigmas)
    for i in steps(len(s) - 1, progress):
        x, d = evaluate(denoiser, x, s[i], cond)
        emit(callback, i, x, s[i], s[i + 1], d)
        x = torch.lerp(d, x, s[i + 1] / s[i])  # = D + (σ̄'/σ̄)(x̄ - D)
    return x


def heun(denoiser, x, sigmas, *, cond=None, callback=None, progress=False):
    """Heun's second-order method ("Elucidating the Design Space of Diffusion-Based Generative Models",
    Karras et al. 2022, Alg. 1): x̄' = x̄ + (σ̄' - σ̄)(ε̂(x̄, σ̄) + ε̂(x̄_E, σ̄'))/2 with x̄_E the Euler step;
    the step to σ̄ = 0 is Euler. Two calls per step, one for the last step to 0."""
    cond = cond or {}
    s = as_floats(sigmas)
    for i in steps(len(s) - 1, progress):
        x, d = evaluate(denoiser, x, s[i], cond)
        emit(callback, i, x, s[i], s[i + 1], d)
        e = eps_of(x, d, s[i])
        x_euler = x + (s[i + 1] - s[i]) * e
        if s[i + 1] == 0:
            x = x_euler
        else:
            x_euler, d2 = evaluate(denoiser, x_euler, s[i + 1], cond)
            e2 = eps_of(x_euler, d2, s[i + 1])
            x = x + (s[i + 1] - s[i]) * 0.5 * (e + e2)
    return x
