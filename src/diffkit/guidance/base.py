"""The guidance contract: a guidance method is a transform from denoiser to denoiser.

A `GuidedDenoiser` wraps any denoiser D(x̄, σ̄, **cond) (a `diffkit.Denoiser`, a testbed, another guided denoiser)
and is itself one, so every guidance method works with every solver, schedule and model, including solvers that
evaluate the model several times per step. Subclasses implement `denoise_at(x, sigma, **cond) -> (x', D)`: the
guided D and the state the solver continues from (x' is x except for methods that move the state, such as CFG++;
see `diffkit.solvers.base.evaluate`). Calling the object returns D alone.

Cost accounting: `passes` counts network passes by kind ("cond", "uncond", "perturbed", ...), each pass over the
whole batch; a batched conditional + unconditional forward is one model call of two passes. `prepare(sigmas)`
(called by `diffkit.sample` before solving) resets per-trajectory state and the counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch

Tensor = torch.Tensor

__all__ = ["GuidedDenoiser", "batched_call", "scale_at", "expand_cond"]


class GuidedDenoiser:
    """Base class of the guidance transforms (see the module docstring)."""

    def __init__(self, denoiser):
        if not callable(denoiser):
            raise TypeError(f"guidance wraps a denoiser D(x, sigma, **cond); got {type(denoiser).__name__}")
        self.denoiser = denoiser
        self.process = getattr(denoiser, "process", None)
        self.passes: Counter = Counter()

    @property
    def model(self):
        """The network under the (possibly nested) denoiser, for methods that hook into it."""
        return getattr(self.denoiser, "model", None)

    def prepare(self, sigmas) -> None:
        """Forward the grid to the wrapped denoiser and start a new trajectory."""
        if hasattr(self.denoiser, "prepare"):
            self.denoiser.prepare(sigmas)
        self.passes.clear()
        self.reset()

    def reset(self) -> None:
        """Clear per-trajectory state (subclasses with state override this)."""

    def denoise_at(self, x: Tensor, sigma, **cond) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        return self.denoise_at(x, sigma, **cond)[1]


def expand_cond(cond: dict, batch: int, device=None) -> dict:
    """Conditioning with every value a batch-first tensor on `device` (default: where it is): Python numbers and
    0-d tensors are repeated `batch` times; None is kept (models read None as "no conditioning")."""
    out = {}
    for k, v in cond.items():
        if v is None:
            out[k] = v
        elif isinstance(v, Tensor) and v.ndim > 0:
            out[k] = v if device is None else v.to(device)
        else:
            out[k] = torch.as_tensor(v, device=device).expand(batch).clone()
    return out


def batched_call(denoiser, x: Tensor, sigma, conds: Sequence[dict]) -> list[Tensor]:
    """D(x̄, σ̄, **c) for each c in `conds` in one forward call on the concatenated batch ("Classifier-Free
    Diffusion Guidance", Ho & Salimans 2022: the conditional and unconditional passes share one network call).
    All dicts must have the same keys; values are batch-first tensors (see `expand_cond`) or None everywhere."""
    n, k = x.shape[0], len(conds)
    if k == 1:
        return [denoiser(x, sigma, **conds[0])]
    conds = [expand_cond(c, n, x.device) for c in conds]  # one batch with the state: on its device
    keys = set(conds[0])
    for c in conds[1:]:
        if set(c) != keys:
            raise ValueError(f"conditionings batched in one call must have the same keys; got {sorted(keys)} and "
                             f"{sorted(c)}")
    merged = {}
    for key in keys:
        vals = [c[key] for c in conds]
        if all(v is None for v in vals):
            merged[key] = None
        elif any(v is None for v in vals):
            raise ValueError(f"conditioning {key!r} is None in some passes and not in others; give the "
                             "unconditional value explicitly (e.g. label=-1 for diffkit's null class)")
        else:
            for v in vals:
                if v.shape[0] != n:
                    raise ValueError(f"conditioning {key!r} has batch size {v.shape[0]}, the state {n}")
            merged[key] = torch.cat(vals)
    s = torch.as_tensor(sigma)
    s = s.repeat(k) if s.ndim > 0 else sigma
    return list(denoiser(x.repeat(k, *([1] * (x.ndim - 1))), s, **merged).chunk(k))


def scale_at(scale: float | Callable, sigma) -> float | Tensor:
    """A guidance scale given as a number or as a function of σ̄ (evaluated at the current σ̄)."""
    return scale(sigma) if callable(scale) else scale
