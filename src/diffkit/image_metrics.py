"""Image-quality metrics for digits models, in the feature space of diffkit's own digits classifier
(`diffkit.classifier`, 64-d penultimate activations; the digits analogue of FID's Inception features).

* `frechet_digits_distance`: the Fréchet distance between Gaussian fits of generated and real features
  ("GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", Heusel et al. 2017,
  Eq. 6; `diffkit.metrics.frechet_distance`). The reference is the classifier's held-out 30 % of scikit-learn's
  digits (540 images, never seen by the classifier), computed at run time; no download.
* `classifier_accuracy`: the fraction of class-conditional samples that the classifier assigns to their label.
* `precision_recall`: k-NN manifold precision and recall ("Improved Precision and Recall Metric for Assessing
  Generative Models", Kynkäänniemi et al. 2019, Eqs. 1-2): a sample is "in" a set's manifold when it lies within
  the distance to the k-th nearest neighbour of some member of the set; precision = fraction of generated samples
  inside the real manifold, recall = fraction of real samples inside the generated manifold.

`digits_report(samples, labels)` gives all of them. Samples are (N, 1, 16, 16) in the model's data units,
[-1, 1] for `diffkit.data.digits(16)` and the shipped model.
"""

from __future__ import annotations

import torch

from .metrics import feature_statistics, frechet_distance

Tensor = torch.Tensor

__all__ = ["digit_features", "reference_features", "frechet_digits_distance", "classifier_accuracy",
           "precision_recall", "digits_report"]

_REF: dict = {}


def _images(x) -> Tensor:
    x = torch.as_tensor(x).detach().float().cpu()
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"digit images must have shape (N, 1, H, W); got {tuple(x.shape)}")
    if len(x) == 0:
        raise ValueError("no images")
    return x


def digit_features(x, classifier=None, batch: int = 1024) -> Tensor:
    """The classifier's 64-d penultimate features of images (N, 1, 16, 16) in [-1, 1], float64."""
    from .classifier import load_classifier

    clf = classifier or load_classifier()
    x = _images(x)
    with torch.no_grad():
        return torch.cat([clf.features(x[i:i + batch]) for i in range(0, len(x), batch)]).double()


def reference_features(classifier=None) -> tuple[Tensor, Tensor]:
    """(features, labels) of the real held-out digits (the classifier's 30 % split), computed once per process."""
    from .classifier import digits_split

    key = id(classifier)
    if key not in _REF:
        _, _, xt, yt = digits_split()
        _REF[key] = (digit_features(xt, classifier), yt)
    return _REF[key]


def frechet_digits_distance(samples, classifier=None) -> float:
    """Fréchet distance (Heusel et al. 2017, Eq. 6) between the classifier features of `samples` and of the
    real held-out digits."""
    feats = digit_features(samples, classifier)
    if len(feats) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples")
    ref, _ = reference_features(classifier)
    return frechet_distance(feature_statistics(feats), feature_statistics(ref))


def classifier_accuracy(samples, labels, classifier=None) -> float:
    """Fraction of class-conditional `samples` that the digits classifier assigns to their `labels`."""
    from .classifier import load_classifier

    clf = classifier or load_classifier()
    x = _images(samples)
    labels = torch.as_tensor(labels).long().flatten()
    if len(labels) != len(x):
        raise ValueError(f"{len(x)} samples but {len(labels)} labels")
    with torch.no_grad():
        pred = torch.cat([clf(x[i:i + 1024]).argmax(1) for i in range(0, len(x), 1024)])
    return float((pred == labels).float().mean())


def _kth_radius(f: Tensor, k: int) -> Tensor:
    d = torch.cdist(f, f)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def _coverage(query: Tensor, support: Tensor, radii: Tensor) -> float:
    return float((torch.cdist(query, support) <= radii[None]).any(1).double().mean())


def precision_recall(real_features, fake_features, k: int = 3) -> tuple[float, float]:
    """k-NN manifold precision and recall (Kynkäänniemi et al. 2019, Eqs. 1-2) between feature sets (n, d)."""
    real, fake = torch.as_tensor(real_features).double(), torch.as_tensor(fake_features).double()
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must be (n, d) with the same d; got {tuple(real.shape)}, {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points in each set")
    precision = _coverage(fake, real, _kth_radius(real, k))
    recall = _coverage(real, fake, _kth_radius(fake, k))
    return precision, recall


def digits_report(samples, labels=None, classifier=None, k: int = 3) -> dict:
    """{'fd', 'accuracy' (when labels are given), 'precision', 'recall', 'n'} for digit samples in [-1, 1]."""
    feats = digit_features(samples, classifier)
    ref, _ = reference_features(classifier)
    out = {"n": len(feats), "fd": frechet_distance(feature_statistics(feats), feature_statistics(ref))}
    if labels is not None:
        out["accuracy"] = classifier_accuracy(samples, labels, classifier)
    out["precision"], out["recall"] = precision_recall(ref, feats, k)
    return out
