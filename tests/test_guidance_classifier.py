"""Classifier guidance, gradient-free classifier guidance, loss / universal guidance and minority guidance against
closed forms on Gaussian mixtures; the noise-conditional digits classifier (training on a tiny budget, the shipped
asset)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import single_threaded  # noqa: F401  (autouse fixture)

import diffkit
from diffkit.guidance import ClassifierGuidance, GradientFreeGuidance, LossGuidance, MinorityGuidance, native_classifier
from diffkit.testbeds import GaussianMixture

F64 = torch.float64


# -- labelled mixtures and their exact class posteriors ---------------------------------------------------------
def labelled_mixture() -> GaussianMixture:
    """Four 2-D components, class 0 owns components 0 and 1 (weights 0.1, 0.3), class 1 owns 2 and 3."""
    means = torch.tensor([[-2.0, 0.0], [-1.0, 1.5], [2.0, 0.5], [1.5, -1.5]])
    return GaussianMixture(means, torch.tensor([0.3, 0.4, 0.35, 0.3]), weights=torch.tensor([0.1, 0.3, 0.4, 0.2]),
                           labels=torch.tensor([0, 0, 1, 1]))


def class_log_probs(mix: GaussianMixture, x: torch.Tensor, sigma) -> torch.Tensor:
    """Exact log p(y | x̄, σ̄): the responsibilities summed per label (differentiable in x̄)."""
    onehot = torch.nn.functional.one_hot(mix.labels, int(mix.labels.max()) + 1).to(F64)
    return (mix.responsibilities(x, sigma) @ onehot).log()


def sub_mixture(mix: GaussianMixture, label: int) -> GaussianMixture:
    """The class-conditional mixture p(x0 | y = label)."""
    keep = mix.labels == label
    return GaussianMixture(mix.means[keep], mix.eigvals[keep].sqrt(), weights=mix.weights[keep])


class ConditionalMixture:
    """Exact class-conditional denoiser D(x̄, σ̄, label) of a labelled mixture (label < 0: unconditional)."""

    def __init__(self, mix: GaussianMixture):
        self.mix = mix
        self.subs = {int(c): sub_mixture(mix, int(c)) for c in mix.labels.unique()}
        self.calls = 0

    def __call__(self, x, sigma, label=None):
        self.calls += 1
        if label is None:
            return self.mix.denoise(x, sigma)
        label = torch.as_tensor(label).expand(x.shape[0])
        s = torch.as_tensor(sigma, dtype=F64).expand(x.shape[0])
        out = self.mix.denoise(x, s)
        for c, sub in self.subs.items():
            m = label == c
            if m.any():
                out[m] = sub.denoise(x[m], s[m])
        return out


def component_of(mix: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """The component each clean sample most likely came from."""
    return mix.responsibilities(x.to(F64), 1e-3).argmax(1)


# -- classifier guidance --------------------------------------------------------------------------------------
def test_classifier_guidance_w1_is_the_class_conditional_denoiser():
    mix = labelled_mixture()
    guided = ClassifierGuidance(mix, lambda x, s: class_log_probs(mix, x, s), 1.0)
    g = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(64, 2, generator=g, dtype=F64)
    for sigma in (0.05, 0.4, 1.0, 3.0, torch.linspace(0.1, 5.0, 64, dtype=F64)):
        for label in (0, 1):
            exact = sub_mixture(mix, label).denoise(x, sigma)
            assert torch.allclose(guided(x, sigma, label=label), exact, atol=1e-10, rtol=0)
    labels = torch.arange(64) % 2
    exact = torch.where(labels[:, None] == 0, sub_mixture(mix, 0).denoise(x, 0.7), sub_mixture(mix, 1).denoise(x, 0.7))
    assert torch.allclose(guided(x, 0.7, label=labels), exact, atol=1e-10, rtol=0)
    assert guided.passes == {"uncond": 11, "classifier": 11}
    # the testbed's own exact posterior and label-conditional denoiser agree
    own = ClassifierGuidance(mix, mix.class_log_probs, 1.0)
    assert torch.allclose(own(x, 0.7, label=labels), mix.denoise(x, 0.7, label=labels), atol=1e-10, rtol=0)


def test_classifier_guidance_scale_and_pass_label():
    mix = labelled_mixture()
    x = torch.randn(8, 2, dtype=F64)
    clf = lambda x, s: class_log_probs(mix, x, s)  # noqa: E731
    d, d1 = mix.denoise(x, 0.5), ClassifierGuidance(mix, clf, 1.0)(x, 0.5, label=1)
    d3 = ClassifierGuidance(mix, clf, lambda s: 3.0)(x, 0.5, label=1)
    assert torch.allclose(d3 - d, 3 * (d1 - d), atol=1e-12)
    cond = ConditionalMixture(mix)
    both = ClassifierGuidance(cond, clf, 1.0, pass_label=True)
    # conditional model + exact classifier: D_y + σ̄² ∇ log p(y | x̄) (the label is passed on)
    assert torch.allclose(both(x, 0.5, label=1) - cond(x, 0.5, label=1), d1 - d, atol=1e-12)
    assert both.passes["cond"] == 1


def test_classifier_guidance_sampling_gives_the_class_conditional_modes():
    mix = labelled_mixture()
    guided = ClassifierGuidance(mix, lambda x, s: class_log_probs(mix, x, s), 1.0)
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    out = diffkit.sample(guided, noise, solver="heun", steps=40, sigma_min=0.002, sigma_max=80.0, cond={"label": 0})
    k = component_of(mix, out)
    frac = torch.bincount(k, minlength=4).double() / len(k)
    assert frac[2:].sum() < 0.005  # all mass on class 0's components
    assert abs(frac[0] - 0.25) < 0.03 and abs(frac[1] - 0.75) < 0.03  # within-class weights 0.1 : 0.3


def test_classifier_guidance_bad_input():
    mix = labelled_mixture()
    x = torch.randn(5, 2, dtype=F64)
    good = lambda x, s: class_log_probs(mix, x, s)  # noqa: E731
    with pytest.raises(ValueError, match="logits of shape"):
        ClassifierGuidance(mix, lambda x, s: good(x, s)[:, 0], 1.0)(x, 0.5, label=0)
    with pytest.raises(ValueError, match="logits of shape"):
        ClassifierGuidance(mix, lambda x, s: good(x, s)[:3], 1.0)(x, 0.5, label=0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        ClassifierGuidance(mix, good, 1.0)(x, 0.5, label=2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        ClassifierGuidance(mix, good, 1.0)(x, 0.5, label=torch.tensor([0, 1, -1, 0, 1]))
    with pytest.raises(ValueError, match="target label"):
        ClassifierGuidance(mix, good, 1.0)(x, 0.5)
    with pytest.raises(ValueError, match="one per sample"):
        ClassifierGuidance(mix, good, 1.0)(x, 0.5, label=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer class labels"):
        ClassifierGuidance(mix, good, 1.0)(x, 0.5, label=0.5)
    with pytest.raises(ValueError, match="not differentiable"):
        ClassifierGuidance(mix, lambda x, s: good(x, s).detach(), 1.0)(x, 0.5, label=0)
    with pytest.raises(TypeError):
        ClassifierGuidance(mix, "not a classifier", 1.0)


def test_native_classifier_adapter_matches_the_canonical_gradient():
    """A classifier of native (x_t, t) of a VP process, adapted, gives the same guided D as the canonical one."""
    mix = labelled_mixture()
    proc = diffkit.VP.continuous("linear")
    den = mix.denoiser(proc, "eps")

    def native(x_t, t):
        t64 = t.to(F64)
        return class_log_probs(mix, x_t / proc.alpha(t64)[:, None], proc.sigma_bar(t64))

    x = torch.randn(16, 2, dtype=F64)
    a = ClassifierGuidance(den, native_classifier(native, den), 1.0)(x, 0.8, label=1)
    b = sub_mixture(mix, 1).denoise(x, 0.8)
    assert torch.allclose(a, b, atol=1e-8)
    with pytest.raises(TypeError, match="diffkit.Denoiser"):
        native_classifier(native, mix)


# -- loss guidance --------------------------------------------------------------------------------------------
def single_gaussian() -> tuple[GaussianMixture, torch.Tensor]:
    cov = torch.tensor([[[0.5, 0.2, 0.0], [0.2, 0.3, 0.1], [0.0, 0.1, 0.8]]], dtype=F64)
    return GaussianMixture(torch.tensor([[0.3, -0.2, 0.5]]), covariances=cov), cov[0]


def test_loss_guidance_closed_forms_on_a_gaussian():
    gauss, cov = single_gaussian()
    target = torch.tensor([1.0, 0.5, -0.5], dtype=F64)
    loss = lambda x0: (x0 - target).pow(2).sum(1)  # noqa: E731
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    s = 0.7
    for sigma in (0.3, 1.0, 2.5):
        d = gauss.denoise(x, sigma)
        ident = LossGuidance(gauss, loss, s, through_denoiser=False)
        assert torch.allclose(ident(x, sigma), d - s * sigma**2 * 2 * (d - target), atol=1e-12)
        jac = cov @ torch.linalg.inv(cov + sigma**2 * torch.eye(3, dtype=F64))  # ∂D/∂x̄ = Σ (Σ + σ̄² I)^-1
        through = LossGuidance(gauss, loss, s)
        with torch.no_grad():  # gradients are taken even under the caller's no_grad
            got = through(x, sigma)
        assert torch.allclose(got, d - s * sigma**2 * 2 * (d - target) @ jac, atol=1e-12)
        assert through.passes == {"cond": 1, "backward": 1} and ident.passes == {"cond": 1}
    # a scalar loss (sum over the batch) gives the same per-sample gradients
    scalar = LossGuidance(gauss, lambda x0: loss(x0).sum(), s)
    assert torch.allclose(scalar(x, 1.0), LossGuidance(gauss, loss, s)(x, 1.0), atol=1e-12)
    # per-sample σ̄ and a σ̄-dependent scale
    sig = torch.linspace(0.2, 2.0, 10, dtype=F64)
    d = gauss.denoise(x, sig)
    got = LossGuidance(gauss, loss, lambda sg: 0.5 * sg, through_denoiser=False)(x, sig)
    assert torch.allclose(got, d - (0.5 * sig**3)[:, None] * 2 * (d - target), atol=1e-12)


def test_loss_guidance_bad_loss():
    gauss, _ = single_gaussian()
    x = torch.randn(4, 3, dtype=F64)
    msg = r"loss must return a scalar or one value per sample; got shape \(4, 3\)"
    for through in (True, False):
        with pytest.raises(ValueError, match=msg):
            LossGuidance(gauss, lambda x0: x0.pow(2), 1.0, through_denoiser=through)(x, 0.5)
    with pytest.raises(ValueError, match="one value per sample"):
        LossGuidance(gauss, lambda x0: x0.sum(1)[:2], 1.0)(x, 0.5)
    with pytest.raises(ValueError, match="not differentiable"):
        LossGuidance(gauss, lambda x0: x0.detach().sum(1), 1.0)(x, 0.5)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="recurrence"):
            LossGuidance(gauss, lambda x0: x0.sum(1), 1.0, recurrence=bad)


def test_loss_guidance_self_recurrence_moves_the_state():
    gauss, _ = single_gaussian()
    target = torch.tensor([1.0, 0.5, -0.5], dtype=F64)
    loss = lambda x0: (x0 - target).pow(2).sum(1)  # noqa: E731
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    rec = LossGuidance(gauss, loss, 0.3, through_denoiser=False, recurrence=3,
                       generator=torch.Generator().manual_seed(7))
    x_new, d_new = rec.denoise_at(x, 0.8)
    # replay: two re-noisings with the same generator stream, each from the guided estimate
    one = LossGuidance(gauss, loss, 0.3, through_denoiser=False)
    g = torch.Generator().manual_seed(7)
    xr, dr = x, one(x, 0.8)
    for _ in range(2):
        xr = dr + 0.8 * torch.randn(x.shape, generator=g, dtype=F64)
        dr = one(xr, 0.8)
    assert torch.allclose(x_new, xr, atol=1e-12) and torch.allclose(d_new, dr, atol=1e-12)
    assert rec.passes["cond"] == 3 and not torch.allclose(x_new, x)
    # recurrence 1 leaves the state alone, and sampling through the solvers works with the moved state
    assert torch.equal(LossGuidance(gauss, loss, 0.3).denoise_at(x, 0.8)[0], x)
    out = diffkit.sample(rec, torch.randn(6, 3, dtype=F64), solver="euler", steps=5, sigma_min=0.01, sigma_max=10.0)
    assert torch.isfinite(out).all()


# -- minority guidance ----------------------------------------------------------------------------------------
def test_minority_guidance_raises_the_minority_mode():
    mix = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), torch.tensor([0.25, 0.25]),
                          weights=torch.tensor([0.9, 0.1]))
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    kw = dict(solver="euler", steps=25, sigma_min=0.01, sigma_max=20.0)

    def minority_fraction(den):
        return float((component_of(mix, diffkit.sample(den, noise, **kw)) == 1).double().mean())

    base = minority_fraction(mix)
    guided = MinorityGuidance(mix, 1.0, sigma_r=1.0, generator=torch.Generator().manual_seed(5))
    more = minority_fraction(guided)
    assert 0.07 < base < 0.13
    assert more > base + 0.1, (base, more)
    assert guided.passes["perturbed"] == guided.passes["cond"] == 25
    with pytest.raises(ValueError, match="sigma_r"):
        MinorityGuidance(mix, 1.0, sigma_r=0.0)


def test_minority_score_is_the_reconstruction_loss():
    mix = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), torch.tensor([0.25, 0.25]),
                          weights=torch.tensor([0.9, 0.1]))
    x0 = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=F64)
    z = torch.randn(2, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    expected = (x0 - mix.denoise(x0 + 0.8 * z, 0.8)).pow(2).sum(1)
    got = diffkit.guidance.minority_score(mix, x0, 0.8, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(got, expected, atol=1e-14)
    many = torch.stack([diffkit.guidance.minority_score(mix, x0, 1.0) for _ in range(400)]).mean(0)
    assert many[1] > many[0]  # the minority mode is reconstructed worse on average


# -- gradient-free classifier guidance --------------------------------------------------------------------------
def three_class_mixture() -> GaussianMixture:
    means = torch.tensor([[0.0, 0.0], [0.8, 0.0], [0.0, 3.0]])
    return GaussianMixture(means, torch.tensor([0.4, 0.4, 0.4]), labels=torch.tensor([0, 1, 2]))


def test_gfcg_rule_on_a_mixture():
    mix = three_class_mixture()
    cond = ConditionalMixture(mix)
    clean = lambda x0: class_log_probs(mix, x0, 1e-3)  # noqa: E731  (a clean-sample classifier)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(8), dtype=F64)
    y = torch.arange(32) % 3
    for lagged in (False, True):
        gf = GradientFreeGuidance(cond, clean, 2.0, lagged=lagged)
        got = gf(x, 0.6, label=y)
        d_y = cond(x, 0.6, label=y)
        p = clean(d_y).exp()
        masked = p.scatter(1, y[:, None], -1.0)
        ref = masked.argmax(1)
        w = 2.0 * (p.gather(1, ref[:, None]) / p.gather(1, y[:, None])).clamp(max=1.0)
        assert torch.allclose(got, d_y + w * (d_y - cond(x, 0.6, label=ref)), atol=1e-12)
        assert (ref != y).all()
        assert gf.passes == {"cond": 1, "reference": 1, "classifier": 1}
    # lagged: the second evaluation reuses the first one's reference in one batched call
    gf = GradientFreeGuidance(cond, clean, 2.0)
    gf(x, 0.6, label=y)
    ref_prev, ratio_prev = gf.reference.clone(), gf.ratio.clone()
    calls = cond.calls
    got = gf(x, 0.3, label=y)
    assert cond.calls == calls + 1
    d_y = cond(x, 0.3, label=y)
    expected = d_y + 2.0 * ratio_prev[:, None] * (d_y - cond(x, 0.3, label=ref_prev))
    assert torch.allclose(got, expected, atol=1e-12)
    gf.prepare([1.0, 0.0])
    assert gf.reference is None and not gf.passes
    # zero scale is the conditional model
    assert torch.allclose(GradientFreeGuidance(cond, clean, 0.0)(x, 0.6, label=y), cond(x, 0.6, label=y))
    with pytest.raises(ValueError, match="logits of shape"):
        GradientFreeGuidance(cond, lambda x0: clean(x0)[:, :1].squeeze(1), 1.0)(x, 0.6, label=y)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        GradientFreeGuidance(cond, clean, 1.0)(x, 0.6, label=3)


def test_gfcg_sampling_improves_class_accuracy_on_overlapping_classes():
    mix = three_class_mixture()  # classes 0 and 1 overlap
    cond = ConditionalMixture(mix)
    clean = lambda x0: class_log_probs(mix, x0, 1e-3)  # noqa: E731
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    kw = dict(solver="heun", steps=15, sigma_min=0.002, sigma_max=20.0, cond={"label": 0})

    def accuracy(den):
        return float((clean(diffkit.sample(den, noise, **kw)).argmax(1) == 0).double().mean())

    plain, guided = accuracy(cond), accuracy(GradientFreeGuidance(cond, clean, 1.0))
    assert guided > plain + 0.05, (plain, guided)


# -- the noise-conditional digits classifier --------------------------------------------------------------------
def test_noisy_classifier_training_runs_and_round_trips(tmp_path):
    from diffkit.guidance.noisy_classifier import load_noisy_classifier, save_noisy_classifier, train_noisy_classifier

    model, record = train_noisy_classifier(steps=3, batch_size=16)
    assert record["steps"] == 3 and set(record["held_out_accuracy"]) >= {"0.1", "1", "80"}
    save_noisy_classifier(tmp_path / "clf", model, record)
    loaded = load_noisy_classifier(tmp_path / "clf")
    x = torch.randn(4, 1, 16, 16)
    assert torch.allclose(loaded(x, 0.5), model(x, 0.5)) and loaded(x, torch.rand(4)).shape == (4, 10)
    with pytest.raises(ValueError, match="sigma_bar"):
        loaded(x, torch.rand(3))


def test_shipped_noisy_classifier_is_accurate_and_guides_the_digits_model():
    from diffkit.checkpoint import load_denoiser
    from diffkit.classifier import digits_split, load_classifier
    from diffkit.guidance.noisy_classifier import ASSET, held_out_accuracy, load_noisy_classifier

    clf = load_noisy_classifier()
    assert (ASSET / "model.safetensors").stat().st_size < 1_000_000
    _, _, xt, yt = digits_split()
    acc = held_out_accuracy(clf, xt, yt, sigmas=(0.1, 1.0), draws=1)
    assert acc["0.1"] > 0.9 and acc["1"] > 0.6, acc
    # classifier guidance of the digits model run unconditionally (the label is not passed: the null class)
    den = load_denoiser(Path(diffkit.__file__).parent / "assets" / "digits")
    noise = torch.randn(20, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    target = torch.arange(20) % 10
    kw = dict(solver="dpmpp_2m", steps=8, cond={"label": target})
    clean = load_classifier()
    with torch.no_grad():
        guided = diffkit.sample(ClassifierGuidance(den, clf, 4.0), noise, **kw)
        plain = diffkit.sample(den, noise, solver="dpmpp_2m", steps=8)
        hit = lambda out: float((clean(out).argmax(1) == target).float().mean())  # noqa: E731
        assert hit(guided) > hit(plain) + 0.3, (hit(plain), hit(guided))


def test_gfcg_on_the_digits_model_batches_the_reference_pass():
    from diffkit.checkpoint import load_denoiser
    from diffkit.classifier import load_classifier

    den = load_denoiser(Path(diffkit.__file__).parent / "assets" / "digits")
    sizes, model = [], den.model
    den.model = lambda x, t, **c: sizes.append(x.shape[0]) or model(x, t, **c)
    noise = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    gf = GradientFreeGuidance(den, load_classifier(), 2.0)
    with torch.no_grad():
        out = diffkit.sample(gf, noise, solver="dpmpp_2m", steps=4, cond={"label": torch.arange(6)})
    assert torch.isfinite(out).all()
    assert sizes == [6, 6, 12, 12, 12]  # first evaluation: D_y, classify, D_ref; then one batched call each
    assert gf.passes == {"cond": 4, "reference": 4, "classifier": 4}
    assert gf.reference.shape == (6,) and (gf.reference != torch.arange(6)).all()
