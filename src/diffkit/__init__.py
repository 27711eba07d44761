"""diffkit: diffusion and flow-matching models through one canonical denoiser D(x̄, σ̄).

Every forward process x_t = alpha(t) x0 + sigma(t) eps is x̄ = x0 + σ̄ eps in the canonical variables
x̄ = x_t / alpha(t), σ̄ = sigma(t) / alpha(t); a `Denoiser` converts any network to D(x̄, σ̄) = E[x0 | x̄] and every
solver, schedule and testbed speaks (x̄, σ̄, D).
"""

# `solvers` is a callable module: diffkit.solvers() lists the solver names, diffkit.solvers.dpm is a submodule
# `calibrate` is a callable module too: diffkit.calibrate(denoiser, nfe, ...) fits a plan, diffkit.calibrate.fitting
# holds the methods
from . import (
    calibrate,  # noqa: E402  (after .solvers, which it builds on)
    metrics,
    noise,
    schedules,
    solvers,
    testbeds,
)
from .calibrate.plan import SolverPlan  # noqa: E402
from .denoiser import PREDICTIONS, Denoiser
from .likelihood import bits_per_dim, likelihood
from .processes import EDM, VE, VP, Flow, Interpolant, Process
from .schedules import get_sigmas
from .solvers import sample

__all__ = ["Denoiser", "PREDICTIONS", "Process", "VP", "VE", "EDM", "Flow", "Interpolant", "sample", "solvers",
           "get_sigmas", "schedules", "testbeds", "likelihood", "bits_per_dim", "metrics", "noise", "calibrate",
           "SolverPlan", "guidance"]
__version__ = "0.1.0"

# training subpackages load on first use (diffkit.models, diffkit.train, diffkit.data, diffkit.checkpoint)
_LAZY = ("models", "train", "data", "checkpoint", "guidance")


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'diffkit' has no attribute {name!r}")
