"""Shared builders for the core-engine tests (processes, mixtures, call counting)."""

from __future__ import annotations

import math

import pytest
import torch

from diffkit import EDM, VE, VP, Flow, Interpolant
from diffkit.testbeds import GaussianMixture

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def single_threaded():
    """The tests use tiny tensors: torch's intra-op threads only add overhead (and stall badly on a busy
    2-core runner), so each module runs single-threaded and restores the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trig_interpolant() -> Interpolant:
    """alpha = cos(pi t / 2), sigma = sin(pi t / 2): a VP interpolant with σ̄ = tan(pi t / 2)."""
    return Interpolant(lambda t: torch.cos(math.pi * t / 2), lambda t: torch.sin(math.pi * t / 2))


# name -> builder; every built-in process family, with non-default settings where they matter
PROCESSES = {
    "vp_discrete_linear": lambda: VP.discrete("linear"),
    "vp_discrete_scaled": lambda: VP.discrete("scaled_linear"),
    "vp_discrete_cosine": lambda: VP.discrete("squaredcos_cap_v2"),
    "vp_linear": lambda: VP.continuous("linear"),
    "vp_cosine": lambda: VP.continuous("cosine"),
    "ve": lambda: VE(0.01, 50.0),
    "edm": lambda: EDM(),
    "flow": lambda: Flow(),
    "flow_shift3": lambda: Flow(shift=3.0),
    "interpolant_trig": trig_interpolant,
}

# prediction types every process supports ('edm' needs EDM's sigma_data)
GENERIC_PREDICTIONS = ("eps", "x0", "v", "score", "flow")


def predictions_for(process) -> tuple[str, ...]:
    return GENERIC_PREDICTIONS + (("edm",) if isinstance(process, EDM) else ())


def smooth_mixture() -> GaussianMixture:
    """A 2-D mixture with wide, overlapping components: its probability-flow ODE is smooth, so solver
    errors follow their asymptotic orders at moderate step counts."""
    return GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, -0.3], [0.2, 1.2]]),
                           torch.tensor([0.6, 0.8, 0.5]), weights=torch.tensor([0.5, 0.3, 0.2]))


def anisotropic_mixture() -> GaussianMixture:
    """A 2-D mixture with full (rotated) covariances and unequal weights."""
    cov = torch.tensor([[[0.30, 0.12], [0.12, 0.10]], [[0.05, -0.02], [-0.02, 0.20]]], dtype=F64)
    return GaussianMixture(torch.tensor([[-0.8, 0.3], [0.9, -0.4]]), weights=torch.tensor([0.35, 0.65]),
                           covariances=cov)


class CallCounter:
    """Wraps a denoiser, counting calls and exposing its process (so `sample` treats it the same)."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.process = getattr(denoiser, "process", None)
        self.calls = 0

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        return self.denoiser(x, sigma, **cond)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))
