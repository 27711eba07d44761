"""Analytic testbeds: Gaussian mixtures, where every quantity a sampler needs has a closed form.

For p0 = Σ_k w_k N(μ_k, Σ_k) and x̄ = x0 + σ̄ eps, the noisy marginal is p(x̄; σ̄) = Σ_k w_k N(μ_k, Σ_k + σ̄² I).
With Σ_k = U_k diag(λ_k) U_kᵀ and y_k = U_kᵀ (x̄ - μ_k):

* responsibilities r_k(x̄) ∝ w_k N(x̄; μ_k, Σ_k + σ̄² I)
* Tweedie denoiser D(x̄, σ̄) = Σ_k r_k (μ_k + U_k diag(λ_k / (λ_k + σ̄²)) y_k)
* noise prediction ε̂ = (x̄ - D)/σ̄ = Σ_k r_k U_k diag(σ̄ / (λ_k + σ̄²)) y_k (finite at σ̄ = 0)
* score ∇ log p(x̄; σ̄) = (D - x̄) / σ̄²
* probability-flow ODE dx̄/dσ̄ = ε̂(x̄, σ̄) ("Elucidating the Design Space", Karras et al. 2022, Eq. 1 with
  s = 1), integrated here in float64 by scipy's DOP853 with tight tolerances: the "exact" flow map.

Class-conditional mixtures give each component a label y_k. Conditioning on y keeps the components with y_k = y
(weights renormalised): its denoiser is the formula above with r_k masked to those components, and
p(y | x̄; σ̄) = Σ_{k: y_k = y} r_k(x̄), the exact classifier of classifier guidance.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp

from .denoiser import Denoiser, _bcast, _edm_coefficients, from_x0
from .processes import Process

Tensor = torch.Tensor

__all__ = ["GaussianMixture"]

_F64 = torch.float64


class GaussianMixture:
    """Mixture Σ_k w_k N(μ_k, Σ_k) with exact denoiser, density, score, samples and flow map.

    Give `means` (K, d) and one of `stds` ((K,) isotropic or (K, d) diagonal) or `covariances` (K, d, d);
    `weights` (K,) default to uniform. Optional `labels` (K,) give each component a class in 0..C-1 (several
    components may share one); then `denoise`, `model` and `denoiser` take a per-sample `label` (-1 or None:
    unconditional) and `null_cond` = {"label": -1} is the unconditional conditioning guidance uses.
    The closed forms are evaluated in float64 on the CPU; results come back in the dtype and on the device of the
    input points, so a testbed drives a sampler on any device.
    """

    def __init__(self, means, stds=None, weights=None, *, covariances=None, labels=None):
        mu = torch.as_tensor(means, dtype=_F64)
        if mu.ndim != 2:
            raise ValueError(f"means must have shape (K, d); got {tuple(mu.shape)}")
        K, d = mu.shape
        if (stds is None) == (covariances is None):
            raise ValueError("give exactly one of stds and covariances")
        if covariances is not None:
            cov = torch.as_tensor(covariances, dtype=_F64)
            if cov.shape != (K, d, d):
                raise ValueError(f"covariances must have shape ({K}, {d}, {d}); got {tuple(cov.shape)}")
            if not torch.allclose(cov, cov.transpose(1, 2)):
                raise ValueError("covariances must be symmetric")
            lam, U = torch.linalg.eigh(cov)
            self._diagonal = False
        else:
            s = torch.as_tensor(stds, dtype=_F64)
            if s.shape == (K,):
                s = s[:, None].expand(K, d)
            if s.shape != (K, d):
                raise ValueError(f"stds must have shape ({K},) or ({K}, {d}); got {tuple(s.shape)}")
            lam, U = s**2, torch.eye(d, dtype=_F64).expand(K, d, d)
            self._diagonal = True
        if not (lam > 0).all():
            raise ValueError("component covariances must be positive definite")
        w = torch.full((K,), 1.0 / K, dtype=_F64) if weights is None else torch.as_tensor(weights, dtype=_F64)
        if w.shape != (K,) or (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"weights must be {K} non-negative finite numbers with a positive sum")
        self.means, self.eigvals, self.eigvecs = mu, lam.contiguous(), U.contiguous()
        self.weights = w / w.sum()
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if self.labels is not None and (self.labels.shape != (K,) or (self.labels < 0).any()):
            raise ValueError(f"labels must be {K} non-negative class indices; got {labels!r}")
        self.K, self.dim = K, d

    @property
    def num_classes(self) -> int:
        """C = 1 + the largest label (0 without labels)."""
        return 0 if self.labels is None else int(self.labels.max()) + 1

    @property
    def null_cond(self) -> dict | None:
        """Conditioning of the unconditional model ({"label": -1}) for classifier-free guidance; None without
        labels."""
        return None if self.labels is None else {"label": -1}

    def conditional(self, label: int) -> GaussianMixture:
        """p0(x0 | y): the components labelled y, weights renormalised."""
        classes = self._class_mask()
        if not (0 <= int(label) < self.num_classes and classes[:, int(label)].any()):
            raise ValueError(f"no component has label {label!r}")
        keep = classes[:, int(label)]
        sub = object.__new__(GaussianMixture)
        sub.means, sub.eigvals, sub.eigvecs = self.means[keep], self.eigvals[keep], self.eigvecs[keep]
        sub.weights, sub.labels = self.weights[keep] / self.weights[keep].sum(), self.labels[keep]
        sub._diagonal, sub.K, sub.dim = self._diagonal, int(keep.sum()), self.dim
        return sub

    # -- presets -----------------------------------------------------------------------------------------------
    @classmethod
    def ring(cls, n_modes: int = 8, radius: float = 1.0, std: float = 0.08) -> GaussianMixture:
        """2-D ring of equally weighted isotropic modes."""
        ang = torch.arange(n_modes, dtype=_F64) * (2 * math.pi / n_modes)
        means = radius * torch.stack([ang.cos(), ang.sin()], 1)
        return cls(means, torch.full((n_modes,), std, dtype=_F64), labels=torch.arange(n_modes))

    @classmethod
    def grid(cls, side: int = 4, spacing: float = 0.6, std: float = 0.06) -> GaussianMixture:
        """2-D square grid of side x side isotropic modes, centred at the origin."""
        c = (torch.arange(side, dtype=_F64) - (side - 1) / 2) * spacing
        means = torch.cartesian_prod(c, c)
        return cls(means, torch.full((side * side,), std, dtype=_F64), labels=torch.arange(side * side))

    @classmethod
    def random(cls, dim: int, n_components: int = 8, seed: int = 0, scale: float = 1.0,
               std_range: tuple[float, float] = (0.02, 0.5)) -> GaussianMixture:
        """Random mixture in `dim` dimensions with sharp, anisotropic components: means N(0, scale² I),
        random rotations, eigenvalue std devs log-uniform in `std_range`, Dirichlet(2) weights."""
        g = torch.Generator().manual_seed(seed)
        means = scale * torch.randn(n_components, dim, generator=g, dtype=_F64)
        lo, hi = math.log(std_range[0]), math.log(std_range[1])
        stds = (lo + (hi - lo) * torch.rand(n_components, dim, generator=g, dtype=_F64)).exp()
        Q, R = torch.linalg.qr(torch.randn(n_components, dim, dim, generator=g, dtype=_F64))
        Q = Q * torch.sign(torch.diagonal(R, dim1=1, dim2=2))[:, None, :]
        cov = Q @ torch.diag_embed(stds**2) @ Q.transpose(1, 2)
        cov = 0.5 * (cov + cov.transpose(1, 2))
        w = np.random.default_rng(seed).dirichlet(np.full(n_components, 2.0))
        return cls(means, weights=w, covariances=cov)

    # -- closed forms ----------------------------------------------------------------------------------------
    def _project(self, x: Tensor):
        """y_k = U_kᵀ (x - μ_k), shape (N, K, d)."""
        diff = x[:, None, :] - self.means[None]
        if self._diagonal:
            return diff
        return torch.einsum("kde,nkd->nke", self.eigvecs, diff)

    def _unproject(self, y: Tensor):
        if self._diagonal:
            return y
        return torch.einsum("kde,nke->nkd", self.eigvecs, y)

    def _flat(self, x: Tensor) -> Tensor:
        """Points as (N, d) float64 on the CPU, where the closed forms are evaluated (inputs on any device)."""
        if x.ndim < 2 or x[0].numel() != self.dim:
            raise ValueError(f"points must have shape (N, {self.dim}) (or (N, ...) with {self.dim} features); got "
                             f"shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.dim).to("cpu", _F64)

    @staticmethod
    def _like(out: Tensor, x: Tensor) -> Tensor:
        """`out` (N, d) back in the shape, dtype and device of the input points `x`."""
        return out.reshape(x.shape).to(x.device, x.dtype)

    def _sigma2(self, sigma_bar, n: int) -> Tensor:
        s = torch.as_tensor(sigma_bar, dtype=_F64, device="cpu")
        if s.ndim == 0:
            s = s.expand(n)
        return (s**2)[:, None, None]  # (N, 1, 1)

    def _parts(self, x: Tensor, sigma_bar):
        y = self._project(x)
        var = self.eigvals[None] + self._sigma2(sigma_bar, x.shape[0])  # (N, K, d)
        logn = -0.5 * ((y**2 / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        logp = logn + self.weights.log()[None]
        return y, var, logp

    def _class_mask(self) -> Tensor:
        """(K, C) boolean: component k has label c."""
        if self.labels is None:
            raise ValueError("this mixture has no labels (give labels=... to GaussianMixture)")
        return self.labels[:, None] == torch.arange(self.num_classes)[None]

    def _label_logits(self, label, n: int) -> Tensor | None:
        """(N, K) log-mask: 0 on the components of each sample's label, -inf elsewhere (label < 0: unmasked)."""
        if label is None:
            return None
        y = torch.as_tensor(label, dtype=torch.long, device="cpu")
        y = y.expand(n) if y.ndim == 0 else y
        if y.shape != (n,):
            raise ValueError(f"label must be an integer or have shape ({n},); got {tuple(y.shape)}")
        keep = self._class_mask()[:, y.clamp(0, self.num_classes - 1)].T | (y[:, None] < 0)
        if (y >= self.num_classes).any() or not keep.any(1).all():
            raise ValueError(f"each label must be a class of this mixture or -1 (unconditional); got {y.tolist()}")
        return torch.zeros(keep.shape, dtype=_F64).masked_fill_(~keep, -math.inf)

    def class_log_probs(self, x_bar: Tensor, sigma_bar) -> Tensor:
        """Exact log p(y | x̄; σ̄) = log Σ_{k: y_k = y} r_k(x̄), shape (N, C) (Bayes' rule on the mixture)."""
        _, _, logp = self._parts(self._flat(x_bar), sigma_bar)
        per_class = logp[:, :, None].masked_fill(~self._class_mask()[None], -math.inf)
        return (torch.logsumexp(per_class, 1) - torch.logsumexp(logp, -1, keepdim=True)).to(x_bar.device)

    def responsibilities(self, x_bar: Tensor, sigma_bar) -> Tensor:
        """Posterior component probabilities r_k(x̄; σ̄), shape (N, K)."""
        _, _, logp = self._parts(self._flat(x_bar), sigma_bar)
        return torch.softmax(logp, -1).to(x_bar.device)

    def denoise(self, x_bar: Tensor, sigma_bar, label=None) -> Tensor:
        """Exact D(x̄, σ̄) = E[x0 | x̄] (σ̄ scalar or per sample), in x̄'s dtype; with `label` (an integer or one
        per sample, -1: unconditional) E[x0 | x̄, y], the denoiser of `conditional(y)`."""
        x = self._flat(x_bar)
        y, var, logp = self._parts(x, sigma_bar)
        mask = self._label_logits(label, x.shape[0])
        r = torch.softmax(logp if mask is None else logp + mask, -1)
        post = self.means[None] + self._unproject(self.eigvals[None] / var * y)
        return self._like((r[..., None] * post).sum(1), x_bar)

    __call__ = denoise

    def eps(self, x_bar: Tensor, sigma_bar) -> Tensor:
        """Exact ε̂(x̄, σ̄) = (x̄ - D)/σ̄, finite at σ̄ = 0."""
        x = self._flat(x_bar)
        y, var, logp = self._parts(x, sigma_bar)
        r = torch.softmax(logp, -1)
        sb = self._sigma2(sigma_bar, x.shape[0]).sqrt()
        return self._like((r[..., None] * self._unproject(sb / var * y)).sum(1), x_bar)

    def log_prob(self, x_bar: Tensor, sigma_bar=0.0) -> Tensor:
        """Exact log p(x̄; σ̄), shape (N,)."""
        _, _, logp = self._parts(self._flat(x_bar), sigma_bar)
        return torch.logsumexp(logp, -1).to(x_bar.device)

    def score(self, x_bar: Tensor, sigma_bar) -> Tensor:
        """Exact ∇ log p(x̄; σ̄) = -Σ_k r_k (Σ_k + σ̄² I)^{-1} (x̄ - μ_k)."""
        y, var, logp = self._parts(self._flat(x_bar), sigma_bar)
        r = torch.softmax(logp, -1)
        return self._like(-(r[..., None] * self._unproject(y / var)).sum(1), x_bar)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32,
               return_components: bool = False):
        """Exact samples x0 ~ p0 (and their component indices if asked)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=_F64)
        x = self.means[k] + torch.einsum("nde,ne->nd", self.eigvecs[k], self.eigvals[k].sqrt() * z)
        return (x.to(dtype), k) if return_components else x.to(dtype)

    def flow_map(self, x_bar: Tensor, sigma_from: float, sigma_to: float = 0.0, rtol: float = 1e-10,
                 atol: float = 1e-10) -> Tensor:
        """Exact probability-flow map x̄(σ_from) -> x̄(σ_to): DOP853 in float64 on dx̄/dσ̄ = ε̂(x̄, σ̄)."""
        x = self._flat(x_bar)
        if not (sigma_from >= 0 and sigma_to >= 0):
            raise ValueError("noise levels must be non-negative")
        if sigma_from == sigma_to:
            return x_bar.clone()
        n = x.shape[0]

        def rhs(s, flat):
            xt = torch.from_numpy(flat).reshape(n, self.dim)
            return self.eps(xt, float(s)).reshape(-1).numpy()

        sol = solve_ivp(rhs, (float(sigma_from), float(sigma_to)), x.reshape(-1).numpy(), method="DOP853",
                        rtol=rtol, atol=atol)
        if not sol.success:  # pragma: no cover - would be a bug in the mixture formulas
            raise RuntimeError(f"exact flow map integration failed: {sol.message}")
        return self._like(torch.from_numpy(sol.y[:, -1]), x_bar)

    # -- as a network of any process -------------------------------------------------------------------------
    def model(self, process: Process, prediction: str = "eps"):
        """The exact network `model(x_t, t, label=None)` of `process` predicting `prediction` (for
        `diffkit.Denoiser`); a labelled mixture's network carries `null_cond` for classifier-free guidance."""
        if prediction == "edm":
            sd = getattr(process, "sigma_data", None)
            if sd is None:
                raise ValueError("prediction 'edm' needs a process with sigma_data")

            def net(x_in, c_noise, label=None):
                sb = (4 * c_noise.to(_F64)).exp()
                c_skip, c_out, c_in, _ = _edm_coefficients(sb, sd)
                xb = x_in / _bcast(c_in, x_in)
                return ((self.denoise(xb, sb, label) - _bcast(c_skip, xb) * xb) / _bcast(c_out, xb)).to(x_in.dtype)
        else:
            def net(x_t, t, label=None):
                t64 = torch.as_tensor(t, dtype=_F64)
                xb = x_t / _bcast(process.alpha(t64), x_t)
                x0 = self.denoise(xb, process.sigma_bar(t64), label)
                return from_x0(x0, x_t, t64, process, prediction).to(x_t.dtype)

        net.null_cond = self.null_cond
        return net

    def denoiser(self, process: Process, prediction: str = "eps") -> Denoiser:
        """`Denoiser` of the exact network under `process` (equals `self.denoise` up to round-off)."""
        return Denoiser(self.model(process, prediction), process, prediction)

    def __repr__(self):
        return f"GaussianMixture(K={self.K}, dim={self.dim})"
