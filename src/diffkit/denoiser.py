"""`Denoiser`: any network, any forward process, one canonical interface D(x̄, σ̄) = E[x0 | x̄].

The network lives in its native space: it is called as `model(x_t, t, **cond)` with x_t = alpha(t) x̄ and
native time t (see `diffkit.processes`). Its output, whatever it predicts, is converted to the Tweedie
denoiser at this boundary, so solvers, guidance and everything else only ever see (x̄, σ̄, D).

Conversions, with x = a x0 + s eps, a = alpha(t), s = sigma(t), a' = dalpha/dt, s' = dsigma/dt:

==========  =========================================  =====================================
prediction  network output                             x0 from the output
==========  =========================================  =====================================
eps         eps                                        (x - s out) / a
x0          x0                                         out
v           a eps - s x0   (Salimans & Ho 2022)        (a x - s out) / (a² + s²)
score       ∇ log p_t(x) = -(x - a x0) / s²            (x + s² out) / a
flow        dx_t/dt = a' x0 + s' eps  (Lipman 2023)    (s out - s' x) / (a' s - a s')
edm         F of EDM Table 1 (Karras et al. 2022)      c_skip x̄ + c_out F(c_in x̄, c_noise)
==========  =========================================  =====================================

EDM preconditioning (Karras et al. 2022, Table 1), in canonical σ̄ and the process's sigma_data σ_d:
c_skip = σ_d² / (σ̄² + σ_d²), c_out = σ̄ σ_d / sqrt(σ̄² + σ_d²), c_in = 1 / sqrt(σ̄² + σ_d²),
c_noise = ln(σ̄) / 4; for prediction 'edm' the network receives (c_in x̄, c_noise) instead of (x_t, t).
"""

from __future__ import annotations

from typing import Callable

import torch

from .processes import Process

Tensor = torch.Tensor

PREDICTIONS = ("eps", "x0", "v", "score", "flow", "edm")

__all__ = ["Denoiser", "PREDICTIONS", "to_x0", "from_x0", "convert"]


def _check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTIONS)}")
    return prediction


def _bcast(c: Tensor, x: Tensor) -> Tensor:
    """Per-sample coefficient of shape () or (batch,) broadcast against x of shape (batch, ...)."""
    c = c.to(device=x.device, dtype=x.dtype)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim)) if c.ndim else c


def _coefficients(process: Process, t: Tensor, need_derivatives: bool):
    t64 = t.to(torch.float64)
    a, s = process.alpha(t64), process.sigma(t64)
    if need_derivatives:
        return a, s, process.d_alpha(t64), process.d_sigma(t64)
    return a, s, None, None


def _edm_coefficients(sigma_bar: Tensor, sigma_data: float):
    sb2 = sigma_bar**2 + sigma_data**2
    return sigma_data**2 / sb2, sigma_bar * sigma_data * sb2.rsqrt(), sb2.rsqrt(), sigma_bar.log() / 4


def to_x0(out: Tensor, x: Tensor, t, process: Process, prediction: str) -> Tensor:
    """Convert a network output in native space (x = x_t at native time t) to the x0 prediction."""
    _check_prediction(prediction)
    t = torch.as_tensor(t, dtype=torch.float64)
    if prediction == "x0":
        return out
    if prediction == "edm":
        sb = process.sigma_bar(t)
        c_skip, c_out, _, _ = _edm_coefficients(sb, _sigma_data(process))
        x_bar = x / _bcast(process.alpha(t), x)
        return _bcast(c_skip, x) * x_bar + _bcast(c_out, x) * out
    a, s, da, ds = _coefficients(process, t, prediction == "flow")
    if prediction == "eps":
        return (x - _bcast(s, x) * out) / _bcast(a, x)
    if prediction == "v":
        return (_bcast(a, x) * x - _bcast(s, x) * out) / _bcast(a**2 + s**2, x)
    if prediction == "score":
        return (x + _bcast(s**2, x) * out) / _bcast(a, x)
    # flow velocity
    return (_bcast(s, x) * out - _bcast(ds, x) * x) / _bcast(da * s - a * ds, x)


def from_x0(x0: Tensor, x: Tensor, t, process: Process, prediction: str) -> Tensor:
    """Inverse of `to_x0`: the network output of type `prediction` that corresponds to x0."""
    _check_prediction(prediction)
    t = torch.as_tensor(t, dtype=torch.float64)
    if prediction == "x0":
        return x0
    if prediction == "edm":
        sb = process.sigma_bar(t)
        c_skip, c_out, _, _ = _edm_coefficients(sb, _sigma_data(process))
        x_bar = x / _bcast(process.alpha(t), x)
        return (x0 - _bcast(c_skip, x) * x_bar) / _bcast(c_out, x)
    a, s, da, ds = _coefficients(process, t, prediction == "flow")
    eps = (x - _bcast(a, x) * x0) / _bcast(s, x)
    if prediction == "eps":
        return eps
    if prediction == "v":
        return _bcast(a, x) * eps - _bcast(s, x) * x0
    if prediction == "score":
        return -eps / _bcast(s, x)
    return _bcast(da, x) * x0 + _bcast(ds, x) * eps


def convert(out: Tensor, x: Tensor, t, process: Process, source: str, target: str) -> Tensor:
    """Convert a prediction of type `source` to type `target` at native (x, t)."""
    _check_prediction(target)
    return from_x0(to_x0(out, x, t, process, source), x, t, process, target)


def _sigma_data(process: Process) -> float:
    sd = getattr(process, "sigma_data", None)
    if sd is None:
        raise ValueError(f"prediction 'edm' needs a process with sigma_data (diffkit.EDM); got {process!r}")
    return sd


class Denoiser:
    """Wrap `model(x_t, t, **cond)` of a `process` predicting `prediction` as D(x̄, σ̄) = E[x0 | x̄].

    Calling the denoiser with canonical x̄ of shape (batch, ...) and σ̄ (a float, or a tensor of shape () or
    (batch,)) returns the x0 prediction in x̄'s dtype and device. Conditioning keyword arguments are passed to
    the model untouched.
    """

    def __init__(self, model: Callable, process: Process, prediction: str = "eps"):
        if not callable(model):
            raise TypeError("model must be callable as model(x_t, t, **cond)")
        if not isinstance(process, Process):
            raise TypeError(f"process must be a diffkit Process (VP, VE, EDM, Flow, Interpolant); got {process!r}")
        self.model = model
        self.process = process
        self.prediction = _check_prediction(prediction)
        if prediction == "edm":
            _sigma_data(process)

    def native(self, x_bar: Tensor, sigma_bar) -> tuple[Tensor, Tensor]:
        """The network's input (x_t, t) for canonical (x̄, σ̄): t = t(σ̄) of shape (batch,), x_t = alpha(t) x̄."""
        sb = self._sigma_batch(x_bar, sigma_bar)
        t = self.process.t_of_sigma_bar(sb)
        return x_bar * _bcast(self.process.alpha(t), x_bar), t

    def _sigma_batch(self, x: Tensor, sigma_bar) -> Tensor:
        sb = torch.as_tensor(sigma_bar, dtype=torch.float64)
        if sb.ndim == 0:
            sb = sb.expand(x.shape[0])
        elif sb.shape != (x.shape[0],):
            raise ValueError(f"sigma_bar must be a scalar or have shape (batch,)=({x.shape[0]},); got "
                             f"{tuple(sb.shape)}")
        return sb

    def __call__(self, x_bar: Tensor, sigma_bar, **cond) -> Tensor:
        sb = self._sigma_batch(x_bar, sigma_bar)
        time_dtype = torch.promote_types(x_bar.dtype, torch.float32)
        if self.prediction == "edm":
            c_skip, c_out, c_in, c_noise = _edm_coefficients(sb, self.process.sigma_data)
            out = self.model(x_bar * _bcast(c_in, x_bar), c_noise.to(x_bar.device, time_dtype), **cond)
            self._check_output(out, x_bar)
            return _bcast(c_skip, x_bar) * x_bar + _bcast(c_out, x_bar) * out.to(x_bar.dtype)
        t = self.process.t_of_sigma_bar(sb)
        x = x_bar * _bcast(self.process.alpha(t), x_bar)
        out = self.model(x, t.to(x_bar.device, time_dtype), **cond)
        self._check_output(out, x_bar)
        return to_x0(out.to(x_bar.dtype), x, t, self.process, self.prediction)

    @staticmethod
    def _check_output(out, x):
        if not isinstance(out, Tensor):
            raise TypeError(f"model must return a tensor; got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(f"model output has shape {tuple(out.shape)} but its input has shape "
                             f"{tuple(x.shape)}; the output must match the input")

    def __repr__(self):
        return f"Denoiser(model={self.model!r}, process={self.process!r}, prediction={self.prediction!r})"
