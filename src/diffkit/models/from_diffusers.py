"""Use diffusers models with diffkit: a scheduler's configuration says the process and the prediction type,
the UNet (or transformer) becomes the network of a `Denoiser`. diffusers is only imported by the caller.

    den = Denoiser.from_diffusers(unet, scheduler)
    x = diffkit.sample(den, noise, solver="unipc", nfe=10, cond={"encoder_hidden_states": emb})
"""

from __future__ import annotations

import torch

from ..denoiser import Denoiser
from ..processes import DiscreteVP, Flow, Process

Tensor = torch.Tensor

_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}

# diffusers clamps the terminal ᾱ of zero-terminal-SNR schedules to this value so that σ̄_max stays finite (we
# also keep it below the previous level)
_ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def process_from_scheduler(scheduler) -> tuple[Process, str, float]:
    """(process, prediction type, model time scale) read from a diffusers scheduler.

    VP schedulers (DDPM, DDIM, DPMSolverMultistep, UniPC, Euler, ...) give `VP.discrete` with the scheduler's
    own ᾱ table and a time scale of 1 (timestep indices); flow-matching schedulers give `Flow(shift)` and the
    network is fed t * num_train_timesteps, as diffusers pipelines do.
    """
    cfg = scheduler.config
    name = type(scheduler).__name__
    if "FlowMatch" in name:
        if cfg.get("use_dynamic_shifting", False):
            raise ValueError("dynamic (resolution-dependent) shifting is set per call in diffusers; build "
                             "diffkit.Flow(shift=...) with the shift you want and a Denoiser by hand")
        return Flow(shift=float(cfg.get("shift", 1.0))), "flow", float(cfg.get("num_train_timesteps", 1000))
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"cannot read a forward process from {name}: it has neither an alphas_cumprod table "
                         "nor a flow-matching configuration")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise ValueError(f"unknown diffusers prediction_type {prediction!r}; valid: {', '.join(_PREDICTIONS)}")
    betas = torch.as_tensor(scheduler.betas, dtype=torch.float64).clone()
    abar = torch.cumprod(1 - betas, 0)
    if abar[-1] <= 0:  # zero terminal SNR (β_T = 1): a small positive ᾱ_T below ᾱ_{T-1} keeps σ̄_max finite
        betas[-1] = 1 - min(_ZERO_SNR_ALPHA_CUMPROD, 0.5 * float(abar[-2])) / abar[-2]
    return DiscreteVP(betas), _PREDICTIONS[prediction], 1.0


class DiffusersNetwork(torch.nn.Module):
    """`model(x_t, t, **cond)` around a diffusers UNet2DModel / UNet2DConditionModel / transformer: returns the
    `.sample` of its output, keeps the first `in_channels` channels of a learned-variance output, feeds
    `t * time_scale` as the timestep, and passes conditioning keyword arguments through untouched."""

    def __init__(self, net, time_scale: float = 1.0):
        super().__init__()
        self.net, self.time_scale = net, time_scale

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        dtype = getattr(self.net, "dtype", x.dtype)
        out = self.net(x.to(dtype), t * self.time_scale, **cond)
        out = getattr(out, "sample", out[0] if isinstance(out, tuple) else out)
        if out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
            out = out[:, : x.shape[1]]  # learned variance (e.g. DDPM "learned_range"): the mean part
        return out.to(x.dtype)


def from_diffusers(net, scheduler) -> Denoiser:
    """A `Denoiser` from a diffusers network and the scheduler it was trained with (process, ᾱ table and
    prediction type from the scheduler's config)."""
    process, prediction, time_scale = process_from_scheduler(scheduler)
    return Denoiser(DiffusersNetwork(net, time_scale), process, prediction)
