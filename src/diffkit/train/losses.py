"""Denoising losses for every prediction type, noise-level sampling, loss weighting, in-batch noise assignment.

A training pair is x̄ = x0 + σ̄ eps (canonical variables, see `diffkit.processes`); the network sees its native
input (x_t = alpha(t) x̄ at native time t, or EDM's (c_in x̄, c_noise)) and its regression target is the output
that `diffkit.denoiser.affine_coefficients` maps to x0: with D = c_x x̄ + c_out out,

    target = ((1 - c_x) x0 - c_x σ̄ eps) / c_out

which is eps for 'eps', x0 for 'x0', a eps - s x0 for 'v', a' x0 + s' eps for 'flow', -eps / s for 'score' and
EDM's F target (Karras et al. 2022, Eq. 8) for 'edm'. Since ||out - target||² = ||D - x0||² / c_out², a weight
λ(σ̄) on the x0-space error is a weight λ(σ̄) c_out² on the native-space error; the default ('native') is the plain
mean squared error of each prediction type (λ = 1 / c_out²).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..denoiser import _edm_coefficients, _sigma_data, affine_coefficients
from ..processes import DiscreteVP, Process

Tensor = torch.Tensor
F64 = torch.float64

__all__ = ["DiffusionLoss", "Draw", "NOISE_LEVELS", "WEIGHTINGS", "sample_noise_levels", "loss_weight",
           "immiscible_assignment", "interval_clusters", "IntervalWeighting", "eps_loss", "x0_loss", "v_loss",
           "flow_loss", "edm_loss", "native_coefficients"]

NOISE_LEVELS = ("uniform", "lognormal", "logit_normal")
WEIGHTINGS = ("native", "snr", "min_snr", "edm", "x0")


def sample_noise_levels(kind: str, process: Process, n: int, generator: torch.Generator | None = None, *,
                        p_mean: float = -1.2, p_std: float = 1.2, logit_mean: float = 0.0,
                        logit_std: float = 1.0) -> Tensor:
    """Canonical noise levels σ̄ (float64, shape (n,)) for one batch.

    'uniform': native time uniform on [t_min, t_max] (integer timesteps for a discrete VP, "Denoising Diffusion
    Probabilistic Models", Ho et al. 2020, Alg. 1); 'lognormal': ln σ̄ ~ N(p_mean, p_std²) ("Elucidating the Design
    Space of Diffusion-Based Generative Models", Karras et al. 2022, Table 1, P_mean = -1.2, P_std = 1.2);
    'logit_normal': flow time t = sigmoid(N(m, s²)), σ̄ = t / (1 - t) ("Scaling Rectified Flow Transformers for
    High-Resolution Image Synthesis", Esser et al. 2024, Eq. 19).
    """
    if kind == "uniform":
        if isinstance(process, DiscreteVP):
            t = torch.randint(0, process.num_train_timesteps, (n,), generator=generator).to(F64)
        else:
            t = process.t_min + (process.t_max - process.t_min) * torch.rand(n, generator=generator, dtype=F64)
        return process.sigma_bar(t).to(F64)
    if kind == "lognormal":
        return (p_mean + p_std * torch.randn(n, generator=generator, dtype=F64)).exp()
    if kind == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, dtype=F64))
        t = t.clamp(1e-5, 1 - 1e-5)
        return t / (1 - t)
    raise ValueError(f"unknown noise-level sampler {kind!r}; valid: {', '.join(NOISE_LEVELS)}")


def native_coefficients(process: Process, prediction: str, sigma_bar: Tensor):
    """(input scale, model time, c_x, c_out) at canonical levels σ̄ (float64): the network is called as
    model(scale * x̄, time) and D = c_x x̄ + c_out out (`diffkit.Denoiser`'s boundary, Karras et al. 2022, Table 1
    for 'edm')."""
    sb = torch.as_tensor(sigma_bar, dtype=F64)
    if prediction == "edm":
        c_skip, c_out, c_in, c_noise = _edm_coefficients(sb, _sigma_data(process))
        return c_in, c_noise, c_skip, c_out
    t = process.t_of_sigma_bar(sb)
    c_x, c_o = affine_coefficients(process, prediction, t)
    return process.alpha(t), t, c_x, c_o


def loss_weight(weighting, sigma_bar: Tensor, c_out: Tensor, *, gamma: float = 5.0,
                sigma_data: float | None = None) -> Tensor:
    """Per-sample weight on the native-space squared error, λ(σ̄) c_out², for an x0-space weighting λ:

    'native' λ = 1/c_out² (plain MSE of the prediction type); 'x0' λ = 1; 'snr' λ = SNR = 1/σ̄² (the ε-loss of
    "Denoising Diffusion Probabilistic Models", Ho et al. 2020, Eq. 14); 'min_snr' λ = min(SNR, γ) ("Efficient
    Diffusion Training via Min-SNR Weighting Strategy", Hang et al. 2023, Eq. 8); 'edm' λ = (σ̄² + σ_d²)/(σ̄ σ_d)²
    (Karras et al. 2022, Table 1); or a callable λ(σ̄).
    """
    sb = sigma_bar.to(F64)
    c2 = c_out.to(F64) ** 2
    if callable(weighting):
        return torch.as_tensor(weighting(sb), dtype=F64) * c2
    if weighting in (None, "native"):
        return torch.ones_like(sb)
    if weighting == "x0":
        return c2
    if weighting == "snr":
        return c2 / sb**2
    if weighting == "min_snr":
        return torch.clamp(1 / sb**2, max=gamma) * c2
    if weighting == "edm":
        if sigma_data is None:
            raise ValueError("weighting 'edm' needs sigma_data (use a diffkit.EDM process)")
        return (sb**2 + sigma_data**2) / (sb * sigma_data) ** 2 * c2
    raise ValueError(f"unknown loss weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)} or a callable")


def immiscible_assignment(x0: Tensor, eps: Tensor) -> Tensor:
    """Reorder a batch of noise so that the total squared distance between images and their noise is minimal
    ("Immiscible Diffusion: Accelerating Diffusion Training with Noise Assignment", Li et al. 2024, Eq. 4: a
    linear assignment over the mini-batch, solved exactly by the Hungarian method). Returns eps permuted."""
    a = x0.detach().reshape(len(x0), -1).to(F64).cpu()
    b = eps.detach().reshape(len(eps), -1).to(F64).cpu()
    cost = torch.cdist(a, b).pow(2).numpy()
    _, cols = linear_sum_assignment(cost)
    return eps[torch.as_tensor(cols, device=eps.device)]


def interval_clusters(process: Process, n_intervals: int, objective: str = "snr", grid: int = 1000) -> Tensor:
    """Split the process's noise range into `n_intervals` contiguous intervals of denoising tasks ("Addressing
    Negative Transfer in Diffusion Models", Go et al. 2023, Sec. 4.1, interval clustering by dynamic programming).

    'timestep': equal intervals of native time; 'snr': the intervals minimising the within-interval squared
    spread of log-SNR over a uniform time grid (1-D k-means restricted to intervals, exact by dynamic
    programming). Returns the n_intervals - 1 interior boundaries as canonical noise levels σ̄ (increasing).
    """
    if n_intervals < 1:
        raise ValueError("n_intervals must be positive")
    t = torch.linspace(process.t_min, process.t_max, grid, dtype=F64)
    if objective == "timestep":
        edges = torch.linspace(process.t_min, process.t_max, n_intervals + 1, dtype=F64)[1:-1]
        return process.sigma_bar(edges).to(F64)
    if objective != "snr":
        raise ValueError(f"unknown interval objective {objective!r}; valid: timestep, snr")
    v = (-2 * process.sigma_bar(t).to(F64).log()).numpy()  # log-SNR along the grid
    c1 = np.concatenate([[0.0], np.cumsum(v)])
    c2 = np.concatenate([[0.0], np.cumsum(v**2)])

    def cost(i, j):  # squared spread of v[i:j] (vectorised over i)
        n = j - i
        s = c1[j] - c1[i]
        return (c2[j] - c2[i]) - s**2 / np.maximum(n, 1)

    n = len(v)
    dp = np.full((n_intervals + 1, n + 1), np.inf)
    arg = np.zeros((n_intervals + 1, n + 1), dtype=np.int64)
    dp[0, 0] = 0.0
    idx = np.arange(n + 1)
    for k in range(1, n_intervals + 1):
        for j in range(k, n + 1):
            i = idx[k - 1:j]
            tot = dp[k - 1, i] + cost(i, j)
            m = int(np.argmin(tot))
            dp[k, j], arg[k, j] = tot[m], i[m]
    cuts, j = [], n
    for k in range(n_intervals, 0, -1):
        j = arg[k, j]
        cuts.append(j)
    cuts = sorted(cuts)[1:]  # drop the leading 0
    edges = torch.tensor([0.5 * (t[c - 1] + t[c]) for c in cuts], dtype=F64)
    return process.sigma_bar(edges).to(F64)


class IntervalWeighting(nn.Module):
    """Multi-task weighting of the loss across intervals of noise levels (Go et al. 2023, "Addressing Negative
    Transfer in Diffusion Models", Sec. 4.2): each interval is a task with its mean loss L_k in the batch.

    'uncertainty': Σ_k exp(-s_k) L_k + s_k with learnable log-variances s_k ("Multi-Task Learning Using
    Uncertainty to Weigh Losses", Kendall et al. 2018, Eq. 7 as used by Go et al.); 'equal': the mean over the
    intervals present in the batch of L_k (every task counts the same whatever its share of the batch)."""

    def __init__(self, boundaries: Tensor, method: str = "uncertainty"):
        super().__init__()
        if method not in ("uncertainty", "equal"):
            raise ValueError(f"unknown interval weighting {method!r}; valid: uncertainty, equal")
        self.method = method
        self.register_buffer("boundaries", torch.as_tensor(boundaries, dtype=F64).sort().values)
        k = len(self.boundaries) + 1
        self.log_vars = nn.Parameter(torch.zeros(k)) if method == "uncertainty" else None

    def interval(self, sigma_bar: Tensor) -> Tensor:
        """Index of the interval of each noise level."""
        return torch.bucketize(sigma_bar.to(F64).to(self.boundaries.device), self.boundaries)

    def forward(self, per_sample: Tensor, sigma_bar: Tensor) -> Tensor:
        idx = self.interval(sigma_bar).to(per_sample.device)
        k = len(self.boundaries) + 1
        sums = torch.zeros(k, dtype=per_sample.dtype, device=per_sample.device).index_add(0, idx, per_sample)
        counts = torch.bincount(idx, minlength=k).to(per_sample.dtype)
        present = counts > 0
        means = sums[present] / counts[present]
        if self.method == "equal":
            return means.mean()
        s = self.log_vars.to(per_sample.dtype)[present]
        return (torch.exp(-s) * means + s).sum() / present.sum()


@dataclass
class Draw:
    """The randomness of one training batch: noise eps, canonical levels σ̄ (float64) and the label-dropout mask.
    Drawing it for the global batch and slicing (`draw[i:j]`) gives every data-parallel rank its share."""

    eps: Tensor
    sigma_bar: Tensor
    drop: Tensor | None = None

    def __getitem__(self, s: slice) -> Draw:
        return Draw(self.eps[s], self.sigma_bar[s], None if self.drop is None else self.drop[s])

    def to(self, device) -> Draw:
        return Draw(self.eps.to(device), self.sigma_bar, None if self.drop is None else self.drop.to(device))


class DiffusionLoss(nn.Module):
    """Denoising score-matching loss for `process` and a network predicting `prediction`
    ("Denoising Diffusion Probabilistic Models", Ho et al. 2020, Eq. 14 for 'eps'; "Progressive Distillation",
    Salimans & Ho 2022, Sec. 4 for 'v'; "Flow Matching for Generative Modeling", Lipman et al. 2023, Eq. 23 for
    'flow'; Karras et al. 2022, Eq. 8 and Table 1 for 'edm'): E_{σ̄, x0, eps} w(σ̄) ||model(x_t, t) - target||².

    Options: `noise_levels` ('uniform' | 'lognormal' | 'logit_normal', see `sample_noise_levels`, whose keyword
    arguments go in `noise_level_options`), `weighting` (see `loss_weight`; `min_snr_gamma`), `immiscible` (in-batch
    noise assignment), `label_dropout` (probability of replacing the label by `null_label` for classifier-free
    guidance), `intervals` (an `IntervalWeighting`). Call as `loss(model, x0, cond)`; `draw` gives the batch's
    randomness explicitly (see `Draw`).
    """

    def __init__(self, process: Process, prediction: str = "eps", *, noise_levels: str = "uniform",
                 noise_level_options: dict | None = None, weighting="native", min_snr_gamma: float = 5.0,
                 immiscible: bool = False, label_dropout: float = 0.0, null_label: int = -1,
                 intervals: IntervalWeighting | None = None):
        super().__init__()
        if prediction not in ("eps", "x0", "v", "score", "flow", "edm"):
            raise ValueError(f"unknown prediction type {prediction!r}; valid: eps, x0, v, score, flow, edm")
        if prediction == "edm":
            _sigma_data(process)
        if noise_levels not in NOISE_LEVELS:
            raise ValueError(f"unknown noise-level sampler {noise_levels!r}; valid: {', '.join(NOISE_LEVELS)}")
        if not callable(weighting) and weighting not in WEIGHTINGS + (None,):
            raise ValueError(f"unknown loss weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)} or a callable")
        if not 0 <= label_dropout < 1:
            raise ValueError("label_dropout must be in [0, 1)")
        self.process, self.prediction = process, prediction
        self.noise_levels, self.noise_level_options = noise_levels, dict(noise_level_options or {})
        self.weighting, self.min_snr_gamma = weighting, min_snr_gamma
        self.immiscible, self.label_dropout, self.null_label = immiscible, label_dropout, null_label
        self.intervals = intervals

    def config(self) -> dict:
        """JSON description (for checkpoints)."""
        return {"prediction": self.prediction, "noise_levels": self.noise_levels,
                "noise_level_options": self.noise_level_options,
                "weighting": self.weighting if isinstance(self.weighting, str) or self.weighting is None
                else "callable", "min_snr_gamma": self.min_snr_gamma, "immiscible": self.immiscible,
                "label_dropout": self.label_dropout,
                "intervals": None if self.intervals is None else
                {"method": self.intervals.method, "boundaries": self.intervals.boundaries.tolist()}}

    def draw(self, x0: Tensor, generator: torch.Generator | None = None) -> Draw:
        """Noise, noise levels and label-dropout mask for the batch x0 (drawn on the CPU generator)."""
        n = x0.shape[0]
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        if self.immiscible:
            eps = immiscible_assignment(x0, eps)
        sb = sample_noise_levels(self.noise_levels, self.process, n, generator, **self.noise_level_options)
        drop = None
        if self.label_dropout > 0:
            drop = (torch.rand(n, generator=generator) < self.label_dropout).to(x0.device)
        return Draw(eps, sb, drop)

    def per_sample(self, model, x0: Tensor, cond: dict | None = None, draw: Draw | None = None,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Weighted per-sample losses (float32, shape (batch,)) and their noise levels σ̄."""
        draw = self.draw(x0, generator) if draw is None else draw.to(x0.device)
        cond = dict(cond or {})
        if draw.drop is not None and cond.get("label") is not None:
            label = cond["label"]
            cond["label"] = torch.where(draw.drop, torch.full_like(label, self.null_label), label)
        scale, time, c_x, c_o = native_coefficients(self.process, self.prediction, draw.sigma_bar)
        sb = draw.sigma_bar
        if self.prediction != "edm":  # levels as the network sees them (a discrete VP clamps to its range)
            sb = self.process.sigma_bar(time).to(F64)
        dev, dt = x0.device, x0.dtype
        shape = (-1,) + (1,) * (x0.ndim - 1)
        col = lambda c: c.to(dev, dt).reshape(shape)
        x_in = col(scale) * (x0 + col(sb) * draw.eps)
        target = col((1 - c_x) / c_o) * x0 - col(c_x * sb / c_o) * draw.eps
        out = model(x_in, time.to(dev, torch.promote_types(dt, torch.float32)), **cond)
        err = (out.float() - target.float()).pow(2).reshape(len(x0), -1).mean(1)
        w = loss_weight(self.weighting, sb, c_o, gamma=self.min_snr_gamma,
                        sigma_data=getattr(self.process, "sigma_data", None))
        return err * w.to(dev, torch.float32), sb

    def forward(self, model, x0: Tensor, cond: dict | None = None, draw: Draw | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        per_sample, sb = self.per_sample(model, x0, cond, draw, generator)
        if self.intervals is not None:
            return self.intervals(per_sample, sb)
        return per_sample.mean()


def eps_loss(process: Process, **kw) -> DiffusionLoss:
    """ε-prediction loss ("Denoising Diffusion Probabilistic Models", Ho et al. 2020, Eq. 14)."""
    return DiffusionLoss(process, "eps", **kw)


def x0_loss(process: Process, **kw) -> DiffusionLoss:
    """x0-prediction loss (Ho et al. 2020, Sec. 3.2, the μ-parameterisation's data term)."""
    return DiffusionLoss(process, "x0", **kw)


def v_loss(process: Process, **kw) -> DiffusionLoss:
    """v-prediction loss, v = alpha eps - sigma x0 ("Progressive Distillation for Fast Sampling of Diffusion
    Models", Salimans & Ho 2022, Sec. 4)."""
    return DiffusionLoss(process, "v", **kw)


def flow_loss(process: Process | None = None, **kw) -> DiffusionLoss:
    """Conditional flow-matching loss, target eps - x0 for the linear interpolant ("Flow Matching for Generative
    Modeling", Lipman et al. 2023, Eq. 23); logit-normal times by default (Esser et al. 2024, Eq. 19)."""
    from ..processes import Flow

    kw.setdefault("noise_levels", "logit_normal")
    return DiffusionLoss(process or Flow(), "flow", **kw)


def edm_loss(process: Process | None = None, **kw) -> DiffusionLoss:
    """EDM's preconditioned loss: F-target with log-normal σ (Karras et al. 2022, "Elucidating the Design Space
    of Diffusion-Based Generative Models", Eq. 8 and Table 1; the weight λ(σ) c_out² equals 1)."""
    from ..processes import EDM

    kw.setdefault("noise_levels", "lognormal")
    return DiffusionLoss(process or EDM(), "edm", **kw)

