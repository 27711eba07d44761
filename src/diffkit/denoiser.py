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

Every row is affine in (x̄, out): D = c_x x̄ + c_out out (`affine_coefficients`), which is how the conversion is
computed, for a whole batch with two tensor operations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .processes import Process

Tensor = torch.Tensor

PREDICTIONS = ("eps", "x0", "v", "score", "flow", "edm")

__all__ = ["Denoiser", "PREDICTIONS", "to_x0", "from_x0", "convert", "affine_coefficients"]


def network_of(denoiser) -> torch.nn.Module | None:
    """The torch network under `denoiser`, found through `.model` (a `Denoiser`, a guidance transform) and
    `.denoiser` (wrappers) attributes; None for a plain callable (a testbed's closed forms)."""
    net = denoiser
    for _ in range(8):
        if net is None or isinstance(net, torch.nn.Module):
            break
        inner = getattr(net, "model", None)
        net = inner if inner is not None else getattr(net, "denoiser", None)
    return net if isinstance(net, torch.nn.Module) else None


def network_device(denoiser) -> torch.device | None:
    """The device of the first parameter (or buffer) of the network under `denoiser`; None when unknown."""
    net = network_of(denoiser)
    if net is None:
        return None
    for t in net.parameters():
        return t.device
    for t in net.buffers():
        return t.device
    return None


def _check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTIONS)}")
    return prediction


def _bcast(c: Tensor, x: Tensor) -> Tensor:
    """Per-sample coefficient of shape () or (batch,) broadcast against x of shape (batch, ...)."""
    c = c.to(device=x.device, dtype=x.dtype)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim)) if c.ndim else c


def _edm_coefficients(sigma_bar: Tensor, sigma_data: float):
    """EDM Table 1: (c_skip, c_out, c_in, c_noise) at canonical noise level σ̄."""
    sb2 = sigma_bar**2 + sigma_data**2
    return sigma_data**2 / sb2, sigma_bar * sigma_data * sb2.rsqrt(), sb2.rsqrt(), sigma_bar.log() / 4


def affine_coefficients(process: Process, prediction: str, t: Tensor) -> tuple[Tensor, Tensor]:
    """(c_x, c_out) with D = c_x x̄ + c_out out: every prediction type is affine in (x̄, network output).

    From the table in the module docstring with x = a x̄:  eps (1, -σ̄);  x0 (0, 1);  v (a²/(a²+s²), -s/(a²+s²));
    score (1, s²/a);  flow (-a s'/(a' s - a s'), s/(a' s - a s'));  edm (c_skip, c_out).
    """
    _check_prediction(prediction)
    t = torch.as_tensor(t, dtype=torch.float64)
    if prediction == "edm":
        c_skip, c_out, _, _ = _edm_coefficients(process.sigma_bar(t), _sigma_data(process))
        return c_skip, c_out
    a, s = process.alpha(t), process.sigma(t)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    if prediction == "eps":
        return one, -s / a
    if prediction == "x0":
        return zero, one
    if prediction == "v":
        n = a**2 + s**2
        return a**2 / n, -s / n
    if prediction == "score":
        return one, s**2 / a
    da, ds = process.d_alpha(t), process.d_sigma(t)
    den = da * s - a * ds
    return -a * ds / den, s / den


def to_x0(out: Tensor, x: Tensor, t, process: Process, prediction: str) -> Tensor:
    """Convert a network output in native space (x = x_t at native time t) to the x0 prediction."""
    t = torch.as_tensor(t, dtype=torch.float64)
    c_x, c_o = affine_coefficients(process, prediction, t)
    x_bar = x / _bcast(process.alpha(t), x)
    return _bcast(c_x, x) * x_bar + _bcast(c_o, x) * out


def from_x0(x0: Tensor, x: Tensor, t, process: Process, prediction: str) -> Tensor:
    """Inverse of `to_x0`: the network output of type `prediction` that corresponds to x0."""
    t = torch.as_tensor(t, dtype=torch.float64)
    c_x, c_o = affine_coefficients(process, prediction, t)
    x_bar = x / _bcast(process.alpha(t), x)
    return (x0 - _bcast(c_x, x) * x_bar) / _bcast(c_o, x)


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
    the model untouched. Per-level scalar coefficients are computed once in float64 and cached.
    """

    _CACHE_SIZE = 4096

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
        self._scalar_cache: dict[float, tuple[float, float, float, float]] = {}

    @classmethod
    def from_diffusers(cls, net, scheduler) -> Denoiser:
        """Wrap a diffusers UNet2DModel / UNet2DConditionModel / transformer with the scheduler it was trained
        with: process, ᾱ table and prediction type come from the scheduler's config; conditioning keyword
        arguments (`encoder_hidden_states`, `class_labels`, ...) are passed through."""
        from .models.from_diffusers import from_diffusers

        return from_diffusers(net, scheduler)

    @classmethod
    def from_k_diffusion(cls, model, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Denoiser:
        """Wrap a k-diffusion-style denoiser `model(x, sigma, **cond) -> x0` (canonical already: a VE process with
        x0 prediction), with the σ range its schedules should use."""
        from .processes import VE

        return cls(model, VE(sigma_min, sigma_max), "x0")

    def _coefficients(self, sb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(input scale, model time, c_x, c_out) at canonical levels σ̄ (float64 tensors)."""
        if self.prediction == "edm":
            c_skip, c_out, c_in, c_noise = _edm_coefficients(sb, self.process.sigma_data)
            return c_in, c_noise, c_skip, c_out
        t = self.process.t_of_sigma_bar(sb)
        c_x, c_o = affine_coefficients(self.process, self.prediction, t)
        return self.process.alpha(t), t, c_x, c_o

    def _scalar(self, sigma: float) -> tuple[float, float, float, float]:
        c = self._scalar_cache.get(sigma)
        if c is None:
            if len(self._scalar_cache) >= self._CACHE_SIZE:
                self._scalar_cache.clear()
            c = tuple(float(v) for v in self._coefficients(torch.tensor(sigma, dtype=torch.float64)))
            self._scalar_cache[sigma] = c
        return c

    def prepare(self, sigmas) -> None:
        """Compute and cache the scalar coefficients of every positive level of a grid in one batch."""
        levels = [s for s in torch.as_tensor(sigmas, dtype=torch.float64).flatten().tolist()
                  if s > 0 and s not in self._scalar_cache]
        if not levels or len(levels) + len(self._scalar_cache) > self._CACHE_SIZE:
            return
        sb = torch.tensor(levels, dtype=torch.float64)
        cols = [c.expand(len(sb)).tolist() for c in self._coefficients(sb)]
        for sigma, *c in zip(sb.tolist(), *cols):
            self._scalar_cache[sigma] = tuple(c)

    def native(self, x_bar: Tensor, sigma_bar) -> tuple[Tensor, Tensor]:
        """The network's input (x_t, t) for canonical (x̄, σ̄): t of shape (batch,), x_t = alpha(t) x̄
        (for prediction 'edm': c_in x̄ and c_noise)."""
        scale, t, _, _ = self._coefficients(self._sigma_batch(x_bar, sigma_bar))
        return x_bar * _bcast(scale, x_bar), t

    def _sigma_batch(self, x: Tensor, sigma_bar) -> Tensor:
        sb = torch.as_tensor(sigma_bar, dtype=torch.float64)
        if sb.ndim == 0:
            sb = sb.expand(x.shape[0])
        elif sb.shape != (x.shape[0],):
            raise ValueError(f"sigma_bar must be a scalar or have shape (batch,)=({x.shape[0]},); got "
                             f"{tuple(sb.shape)}")
        return sb

    def __call__(self, x_bar: Tensor, sigma_bar, **cond) -> Tensor:
        if isinstance(sigma_bar, float) or isinstance(sigma_bar, int) or (
                isinstance(sigma_bar, Tensor) and sigma_bar.ndim == 0):
            scale, t, c_x, c_o = self._scalar(float(sigma_bar))
            t_batch = torch.full((x_bar.shape[0],), t, dtype=torch.promote_types(x_bar.dtype, torch.float32),
                                 device=x_bar.device)  # fresh each call: a model may modify its inputs
            out = self.model(x_bar * scale if scale != 1.0 else x_bar, t_batch, **cond)
            self._check_output(out, x_bar)
            if out.dtype != x_bar.dtype:
                out = out.to(x_bar.dtype)
            if c_x == 1.0:
                return torch.add(x_bar, out, alpha=c_o)
            return torch.add(x_bar * c_x, out, alpha=c_o)
        time_dtype = torch.promote_types(x_bar.dtype, torch.float32)
        scale, t, c_x, c_o = self._coefficients(self._sigma_batch(x_bar, sigma_bar))
        out = self.model(x_bar * _bcast(scale, x_bar), t.to(x_bar.device, time_dtype), **cond)
        self._check_output(out, x_bar)
        return _bcast(c_x, x_bar) * x_bar + _bcast(c_o, x_bar) * out.to(x_bar.dtype)

    @staticmethod
    def _check_output(out, x):
        if not isinstance(out, Tensor):
            raise TypeError(f"model must return a tensor; got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(f"model output has shape {tuple(out.shape)} but its input has shape "
                             f"{tuple(x.shape)}; the output must match the input")

    def __repr__(self):
        return f"Denoiser(model={self.model!r}, process={self.process!r}, prediction={self.prediction!r})"
