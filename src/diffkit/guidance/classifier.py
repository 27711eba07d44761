"""Guidance by a classifier or a loss on the Tweedie estimate, as denoiser transforms (see `diffkit.guidance.base`).

Every method here changes the score of the model, ∇ log p(x̄; σ̄), by a term g and so the denoiser by σ̄² g, since
D = x̄ + σ̄² ∇ log p(x̄; σ̄) (Tweedie's formula in canonical variables):

* `ClassifierGuidance`: g = w ∇_x̄ log p(y | x̄, σ̄) of a noise-conditional classifier (Dhariwal & Nichol 2021);
* `LossGuidance`: g = -s ∇_x̄ loss(D(x̄, σ̄)) for any differentiable loss of the clean estimate, with the
  self-recurrence of universal guidance (Bansal et al. 2023);
* `MinorityGuidance`: `LossGuidance` with loss = -(minority score) (Um et al. 2024);
* `GradientFreeGuidance`: no gradient at all: a clean classifier on D picks, per sample and per step, a reference
  class to steer away from and how hard (Shenoy et al. 2024).

Classifiers passed to `ClassifierGuidance` are noise-conditional in canonical space: `classifier(x_bar, sigma_bar)`
returns logits (N, C) of p(y | x̄, σ̄) with x̄ = x0 + σ̄ ε (`native_classifier` adapts one trained on native
(x_t, t)). The target class is cond[label_key]: an int, a 0-d tensor or one label per sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import GuidedDenoiser, batched_call, expand_cond, scale_at

Tensor = torch.Tensor

__all__ = ["ClassifierGuidance", "GradientFreeGuidance", "LossGuidance", "MinorityGuidance", "native_classifier",
           "classifier_grad", "minority_score"]


def _col(v, x: Tensor) -> Tensor:
    """A number or per-sample (N,) tensor as a tensor broadcasting against x of shape (N, ...)."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v


def _labels(cond: dict, key: str, n: int) -> Tensor:
    """The target classes cond[key] as a long tensor of shape (n,)."""
    if cond.get(key) is None:
        raise ValueError(f"guidance toward a class needs the target label as cond[{key!r}] (e.g. "
                         f"sample(..., cond={{{key!r}: 3}})); got none")
    y = expand_cond({key: cond[key]}, n)[key]
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"cond[{key!r}] must hold integer class labels; got dtype {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"cond[{key!r}] must be one label or one per sample, shape ({n},); got {tuple(y.shape)}")
    return y.long()


def _check_logits(logits, n: int, y: Tensor) -> Tensor:
    """Logits of shape (n, C) with every target label in [0, C)."""
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"classifier must return logits of shape (N, C) = ({n}, C); got {shape}")
    c = logits.shape[1]
    if (y < 0).any() or (y >= c).any():
        raise ValueError(f"labels must be in [0, {c}) for a classifier with {c} classes; got min {int(y.min())}, "
                         f"max {int(y.max())}")
    return logits


def classifier_grad(classifier: Callable, x: Tensor, sigma, y: Tensor) -> tuple[Tensor, Tensor]:
    """(∇_x̄ log p(y | x̄, σ̄), log p(y | x̄, σ̄)) of a noise-conditional classifier by autograd ("Diffusion Models
    Beat GANs on Image Synthesis", Dhariwal & Nichol 2021, Sec. 4.1), also when the caller is in no_grad mode."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logits = _check_logits(classifier(xg, sigma), x.shape[0], y.to(x.device))
        logp = torch.log_softmax(logits, -1).gather(1, y.to(logits.device)[:, None])[:, 0]
        if not logp.requires_grad:
            raise ValueError("classifier output is not differentiable in its input (computed under no_grad, "
                             "detached or outside torch?); classifier guidance needs ∇_x log p(y | x)")
        (g,) = torch.autograd.grad(logp.sum(), xg, allow_unused=True)
    return (torch.zeros_like(x) if g is None else g), logp.detach()


def native_classifier(classifier: Callable, denoiser) -> Callable:
    """A classifier of native inputs `classifier(x_t, t) -> logits` (as trained in "Diffusion Models Beat GANs",
    Dhariwal & Nichol 2021, Sec. 4.1) as a canonical one (x̄, σ̄) -> logits, through `denoiser.native`
    (x_t = alpha(t) x̄; the EDM network input for prediction 'edm'). The map is invertible, so
    p(y | x_t, t) = p(y | x̄, σ̄), and autograd carries the chain rule ∇_x̄ = alpha(t) ∇_x_t."""
    if not hasattr(denoiser, "native"):
        raise TypeError("native_classifier needs a diffkit.Denoiser (it maps (x̄, σ̄) to the network's (x_t, t))")

    def canonical(x_bar: Tensor, sigma_bar) -> Tensor:
        x_t, t = denoiser.native(x_bar, sigma_bar)
        return classifier(x_t, t.to(x_t.device, torch.promote_types(x_t.dtype, torch.float32)))

    return canonical


class ClassifierGuidance(GuidedDenoiser):
    """Classifier guidance ("Diffusion Models Beat GANs on Image Synthesis", Dhariwal & Nichol 2021, Sec. 4.2) in
    canonical variables: the score ∇ log p(x̄; σ̄) + w ∇_x̄ log p(y | x̄, σ̄) is the denoiser

        D_w(x̄, σ̄) = D(x̄, σ̄) + w σ̄² ∇_x̄ log p(y | x̄, σ̄),

    exact for w = 1: the class-conditional denoiser E[x0 | x̄, y]. `classifier(x_bar, sigma_bar)` returns logits
    (N, C) of p(y | x̄, σ̄) for x̄ = x0 + σ̄ ε (use `native_classifier` for one trained on (x_t, t)); the target
    class is cond[label_key]. `scale` w is a number or a function of σ̄.

    The label is removed from the conditioning passed to `denoiser` (diffkit's unconditional models reject a
    label, conditional ones read a missing label as the null class); `pass_label=True` passes it on, for
    classifier guidance on top of a conditional model (Dhariwal & Nichol's conditional ADM-G). Passes: "uncond"
    (or "cond" with `pass_label`) and "classifier" (one forward and backward of the classifier).
    """

    def __init__(self, denoiser, classifier: Callable, scale: float | Callable, *, label_key: str = "label",
                 pass_label: bool = False):
        super().__init__(denoiser)
        if not callable(classifier):
            raise TypeError(f"classifier must be callable as classifier(x_bar, sigma_bar) -> logits; got "
                            f"{type(classifier).__name__}")
        self.classifier, self.scale, self.label_key, self.pass_label = classifier, scale, label_key, pass_label

    def denoise_at(self, x: Tensor, sigma, **cond) -> tuple[Tensor, Tensor]:
        """(x̄, D + w σ̄² ∇_x̄ log p(y | x̄, σ̄)) (Dhariwal & Nichol 2021, Sec. 4.2, in canonical variables)."""
        y = _labels(cond, self.label_key, x.shape[0])
        inner = cond if self.pass_label else {k: v for k, v in cond.items() if k != self.label_key}
        d = self.denoiser(x, sigma, **inner)
        self.passes["cond" if self.pass_label else "uncond"] += 1
        g, _ = classifier_grad(self.classifier, x, sigma, y)
        self.passes["classifier"] += 1
        w = scale_at(self.scale, sigma)
        return x, d + _col(w, x) * _col(torch.as_tensor(sigma, dtype=torch.float64) ** 2, x) * g.to(d.dtype)


class GradientFreeGuidance(GuidedDenoiser):
    """Gradient-free classifier guidance ("Gradient-Free Classifier Guidance for Diffusion Model Sampling",
    Shenoy et al. 2024, Sec. 3): a clean-image classifier, in inference mode only, reads the denoised estimate
    x̂0 = D(x̄, σ̄, y) and sets, per sample and per step, a reference class and a guidance scale; the guided
    denoiser steers away from the reference class's prediction as classifier-free guidance steers away from the
    unconditional one:

        D = D_y + w_t (D_y - D_ref),   p = softmax(classifier(x̂0)),   ref = argmax_{c ≠ y} p_c,
        w_t = scale · min(1, p_ref / p_y).

    The reference is the class the classifier most confuses with the target; the scale is full while that class
    is at least as likely as the target and falls to 0 as the classifier grows confident in the target. This is
    our reading of the paper's rule (its Sec. 3: reference class and adaptive scale from the classifier's
    probabilities); the ratio form and the cap at `scale` are our choices, documented here.

    With `lagged=True` (default) the reference and scale of an evaluation come from the x̂0 of the previous
    evaluation in the trajectory, so D_y and D_ref are one batched model call (`batched_call`), the cost of CFG;
    the first evaluation (and `lagged=False`, every evaluation) classifies the current D_y first and then calls
    the model again for D_ref. `classifier(x0) -> logits (N, C)` takes clean samples in the model's data space
    (e.g. `diffkit.classifier.load_classifier()` for the digits model); `denoiser` is conditional, called with
    cond[label_key] = y and = ref. Passes: "cond", "reference", "classifier".
    """

    def __init__(self, denoiser, classifier: Callable, scale: float | Callable, *, label_key: str = "label",
                 lagged: bool = True):
        super().__init__(denoiser)
        if not callable(classifier):
            raise TypeError(f"classifier must be callable as classifier(x0) -> logits; got "
                            f"{type(classifier).__name__}")
        self.classifier, self.scale, self.label_key, self.lagged = classifier, scale, label_key, lagged
        self.reset()

    def reset(self) -> None:
        """Forget the previous evaluation's reference classes and confidence ratios."""
        self.reference: Tensor | None = None
        self.ratio: Tensor | None = None

    def adapt(self, x0: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(reference class argmax_{c≠y} p_c, ratio min(1, p_ref / p_y)) per sample from the classifier's
        probabilities p on the clean estimate x0 (Shenoy et al. 2024, Sec. 3; see the class docstring)."""
        with torch.no_grad():
            logits = _check_logits(self.classifier(x0), x0.shape[0], y.to(x0.device))
            self.passes["classifier"] += 1
            logp = torch.log_softmax(logits.double(), -1)
            y = y.to(logp.device)
            masked = logp.scatter(1, y[:, None], float("-inf"))
            ref = masked.argmax(1)
            ratio = (masked.gather(1, ref[:, None]) - logp.gather(1, y[:, None]))[:, 0].exp().clamp(max=1.0)
        return ref, ratio

    def denoise_at(self, x: Tensor, sigma, **cond) -> tuple[Tensor, Tensor]:
        """(x̄, D_y + w_t (D_y - D_ref)) (Shenoy et al. 2024, Sec. 3; the rule in the class docstring)."""
        n, key = x.shape[0], self.label_key
        y = _labels(cond, key, n)
        cond = expand_cond(cond, n)
        if self.lagged and self.reference is not None and self.reference.shape[0] == n:
            ref, ratio = self.reference, self.ratio
            d_y, d_ref = batched_call(self.denoiser, x, sigma, [cond, {**cond, key: ref.to(cond[key])}])
            self.passes["cond"] += 1
            self.passes["reference"] += 1
            self.reference, self.ratio = self.adapt(d_y, y)
        else:
            d_y = self.denoiser(x, sigma, **cond)
            self.passes["cond"] += 1
            ref, ratio = self.reference, self.ratio = self.adapt(d_y, y)
            d_ref = self.denoiser(x, sigma, **{**cond, key: ref.to(cond[key])})
            self.passes["reference"] += 1
        w = _col(scale_at(self.scale, sigma), d_y) * _col(ratio.to(d_y.device), d_y)
        return x, d_y + w * (d_y - d_ref)


def _loss_grad(loss: Tensor, wrt: Tensor) -> Tensor:
    """∇_wrt of a scalar or per-sample (N,) loss (per-sample losses are independent, so the gradient of their sum
    is each sample's own gradient)."""
    if not isinstance(loss, Tensor) or not (loss.ndim == 0 or loss.shape == (wrt.shape[0],)):
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss must return a scalar or one value per sample; got shape {shape} for a batch of "
                         f"{wrt.shape[0]}")
    if not loss.requires_grad:
        raise ValueError("loss(x0_hat) is not differentiable in x0_hat (computed under no_grad, detached or outside "
                         "torch?); loss guidance needs its gradient")
    (g,) = torch.autograd.grad(loss.sum(), wrt, allow_unused=True)
    return torch.zeros_like(wrt) if g is None else g


class LossGuidance(GuidedDenoiser):
    """Loss guidance on the Tweedie estimate: forward universal guidance ("Universal Guidance for Diffusion Models",
    Bansal et al. 2023, Eq. 6; "Steered Diffusion", Nair et al. 2023; "Towards Practical Plug-and-Play Diffusion
    Models", Go et al. 2023) in canonical variables. With the score changed by -s ∇_x̄ loss(D(x̄, σ̄)):

        through_denoiser=True:   D_g = D - s σ̄² ∇_x̄ loss(D(x̄, σ̄))      (autograd through the model)
        through_denoiser=False:  D_g = D - s σ̄² ∇_x̂0 loss(x̂0)|_{x̂0 = D}  (identity Jacobian, no backprop)

    `loss(x0_hat)` returns one value per sample (N,) or a scalar (differentiated as is: a batch mean scales each
    sample's gradient by 1/N); `scale` s is a number or a function of σ̄. Gradients are taken with autograd on,
    also when the caller samples under no_grad.

    Self-recurrence (Bansal et al. 2023, Alg. 1) with `recurrence` k: within one evaluation, k - 1 times re-noise
    the guided estimate at the same level, x̄ ← D_g + σ̄ z with fresh z ~ N(0, I) (from `generator`), and guide
    again; the solver continues from the moved state (the `evaluate` contract of `diffkit.solvers.base`).
    Passes per guided estimate: "cond" (the denoiser forward) and, through the denoiser, "backward".
    """

    def __init__(self, denoiser, loss: Callable, scale: float | Callable, *, through_denoiser: bool = True,
                 recurrence: int = 1, generator: torch.Generator | None = None):
        super().__init__(denoiser)
        if not callable(loss):
            raise TypeError(f"loss must be callable as loss(x0_hat) -> (N,) or scalar; got {type(loss).__name__}")
        if isinstance(recurrence, bool) or not isinstance(recurrence, int) or recurrence < 1:
            raise ValueError(f"recurrence must be an integer >= 1; got {recurrence!r}")
        self.loss, self.scale, self.through_denoiser = loss, scale, through_denoiser
        self.recurrence, self.generator = recurrence, generator

    def loss_of(self, x0: Tensor, sigma, cond: dict) -> Tensor:
        """The loss of the clean estimate x0 (subclasses may use σ̄ and the conditioning)."""
        return self.loss(x0)

    def guided(self, x: Tensor, sigma, cond: dict) -> Tensor:
        """One guided estimate D - s σ̄² ∇ loss (Bansal et al. 2023, Eq. 6, in canonical variables)."""
        if self.through_denoiser:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                d = self.denoiser(xg, sigma, **cond)
                g = _loss_grad(self.loss_of(d, sigma, cond), xg)
            self.passes["backward"] += 1
            d = d.detach()
        else:
            d = self.denoiser(x, sigma, **cond)
            with torch.enable_grad():
                x0 = d.detach().requires_grad_(True)
                g = _loss_grad(self.loss_of(x0, sigma, cond), x0)
        self.passes["cond"] += 1
        s2 = _col(torch.as_tensor(sigma, dtype=torch.float64) ** 2, d)
        return d - _col(scale_at(self.scale, sigma), d) * s2 * g.to(d.dtype)

    def denoise_at(self, x: Tensor, sigma, **cond) -> tuple[Tensor, Tensor]:
        """(x̄', D_g(x̄')) after the self-recurrence (Bansal et al. 2023, Alg. 1; x̄' = x̄ when recurrence = 1)."""
        d = self.guided(x, sigma, cond)
        for _ in range(self.recurrence - 1):
            dev = self.generator.device if self.generator is not None else x.device
            z = torch.randn(x.shape, generator=self.generator, dtype=x.dtype, device=dev).to(x.device)
            x = d + _col(sigma, d) * z
            d = self.guided(x, sigma, cond)
        return x, d


def minority_score(denoiser, x0: Tensor, sigma_r: float, *, generator: torch.Generator | None = None,
                   **cond) -> Tensor:
    """Tweedie reconstruction loss l(x0) = || x0 - D(x0 + σ_r z, σ_r) ||² per sample, z ~ N(0, I) ("Don't Play
    Favorites: Minority Guidance for Diffusion Models", Um et al. 2024, Sec. 3.1, the minority score with the
    squared-error distance and one noise draw): large for samples the model reconstructs badly, i.e. off its
    dominant modes. Differentiable in x0."""
    dev = generator.device if generator is not None else x0.device
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=dev).to(x0.device)
    rec = denoiser(x0 + sigma_r * z, sigma_r, **cond)
    return (x0 - rec).pow(2).flatten(1).sum(1)


class MinorityGuidance(LossGuidance):
    """Self-guided minority guidance ("Don't Play Favorites: Minority Guidance for Diffusion Models", Um et al.
    2024): `LossGuidance` with loss(x̂0) = -minority_score(x̂0) = -|| x̂0 - D(x̂0 + σ_r z, σ_r) ||², so a positive
    `scale` raises the minority score and moves samples toward low-density (minority) regions. The paper trains a
    classifier on quantized minority scores and guides with it (its Sec. 3.2); here the score itself is
    differentiated (classifier-free), through the denoiser at σ_r. `sigma_r` is the perturbation level (canonical
    σ̄); the other options are those of `LossGuidance` (default: identity Jacobian for the outer estimate).
    Passes add "perturbed" (the reconstruction D at σ_r, forward and backward) per guided estimate."""

    def __init__(self, denoiser, scale: float | Callable, *, sigma_r: float = 1.0, through_denoiser: bool = False,
                 recurrence: int = 1, generator: torch.Generator | None = None):
        if not sigma_r > 0:
            raise ValueError(f"sigma_r must be positive; got {sigma_r!r}")
        super().__init__(denoiser, self._negative_score, scale, through_denoiser=through_denoiser,
                         recurrence=recurrence, generator=generator)
        self.sigma_r = float(sigma_r)
        self._cond: dict = {}

    def _negative_score(self, x0: Tensor) -> Tensor:
        self.passes["perturbed"] += 1
        return -minority_score(self.denoiser, x0, self.sigma_r, generator=self.generator, **self._cond)

    def loss_of(self, x0: Tensor, sigma, cond: dict) -> Tensor:
        """-minority_score(x0) under the same conditioning as the guided pass (Um et al. 2024, Sec. 3.1)."""
        self._cond = cond
        try:
            return self.loss(x0)
        finally:
            self._cond = {}
