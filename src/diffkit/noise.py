"""Noise for stochastic samplers: per-sample Gaussian streams and Brownian-tree noise.

A noise sampler is any callable ``noise(sigma, sigma_next) -> Tensor`` that returns standard normal noise shaped
like the sampler's state for the step between the two canonical noise levels (k-diffusion's convention).
Stochastic solvers call it once per random draw; they scale the result themselves.

* `GaussianNoise`: independent N(0, I) draws. With ``seeds`` (or a list of generators), row i of every draw
  comes from its own generator, so sample i depends only on its own seed: not on the batch size nor on its
  position in the batch.
* `BrownianTreeNoise`: the normalized increment (W(b) - W(a)) / sqrt(b - a) of one Brownian path W over σ̄,
  queried through a Brownian tree ("Scalable Gradients for Stochastic Differential Equations", Li et al. 2020,
  Sec. 4, as implemented by torchsde). Different step counts then see the same path, so the output of a
  stochastic sampler converges as the number of steps grows instead of changing completely.
* `randn`: initial noise with the same per-seed guarantee (stream 0 of each seed; step noise uses other
  streams, so the start and the step noise are independent even when they share a seed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

Tensor = torch.Tensor

__all__ = ["NoiseSampler", "GaussianNoise", "BrownianTreeNoise", "randn", "derive_seed", "make_noise_sampler",
           "NOISE_KINDS"]

NoiseSampler = Callable[[float, float], Tensor]
NOISE_KINDS = ("gaussian", "brownian")

# independent random streams derived from one user seed
_STREAM_START, _STREAM_STEPS, _STREAM_BROWNIAN = 0, 1, 2


def derive_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for stream `stream` of user seed `seed`, hashed by NumPy's SeedSequence (the entropy mixing of
    "PCG: A Family of Simple Fast Space-Efficient Statistically Good Algorithms for Random Number Generation",
    O'Neill 2014, as NumPy implements it), so nearby seeds and streams give unrelated generators."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seeds must be integers; got {seed!r}")
    state = np.random.SeedSequence([int(seed) % 2**63, int(stream)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)


def _check_seeds(seeds, batch: int | None) -> list[int]:
    seeds = [int(s) if not isinstance(s, bool) and isinstance(s, (int, np.integer)) else _bad_seed(s)
             for s in seeds]
    if batch is not None and len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}; give one seed per sample")
    return seeds


def _bad_seed(s):
    raise TypeError(f"seeds must be integers; got {s!r}")


def _generators(seeds: Sequence[int], stream: int, device="cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(derive_seed(s, stream)) for s in seeds]


def _draw(shape, generator, dtype, device) -> Tensor:
    """N(0, I) of `shape` from `generator` (drawn on the generator's device, then moved)."""
    if generator is None:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device).to(device)


def randn(shape, *, seeds: Sequence[int] | None = None, generator: torch.Generator | None = None,
          dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Standard normal starting noise of `shape` (batch first). With `seeds`, row i is drawn from a generator
    seeded by seeds[i] only, so it does not depend on the batch size or position ("Denoising Diffusion
    Probabilistic Models", Ho et al. 2020, Alg. 2 line 1: x_T ~ N(0, I), one stream per sample)."""
    shape = tuple(shape)
    if seeds is None:
        return _draw(shape, generator, dtype, device)
    if generator is not None:
        raise ValueError("give either seeds or generator, not both")
    seeds = _check_seeds(seeds, shape[0])
    rows = [_draw(shape[1:], g, dtype, device) for g in _generators(seeds, _STREAM_START)]
    return torch.stack(rows) if rows else torch.empty(shape, dtype=dtype, device=device)


class GaussianNoise:
    """Independent N(0, I) draws shaped like `x` for every call (Ho et al. 2020, Alg. 2 line 3: z ~ N(0, I)).

    `generator` is None (torch's global generator), one `torch.Generator` (one stream for the whole batch) or a
    list of generators, one per sample; `seeds` (one integer per sample) builds per-sample generators on a
    stream separate from `randn`'s. Per-sample streams make sample i depend on its own seed only.
    """

    def __init__(self, x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 seeds: Sequence[int] | None = None):
        self.shape, self.dtype, self.device = tuple(x.shape), x.dtype, x.device
        if seeds is not None and generator is not None:
            raise ValueError("give either seeds or generator, not both")
        self.generators: list[torch.Generator] | None = None
        self.generator: torch.Generator | None = None
        if seeds is not None:
            self.generators = _generators(_check_seeds(seeds, self.shape[0]), _STREAM_STEPS)
        elif isinstance(generator, torch.Generator) or generator is None:
            self.generator = generator
        else:
            gens = list(generator)
            if len(gens) != self.shape[0] or not all(isinstance(g, torch.Generator) for g in gens):
                raise ValueError(f"generator must be a torch.Generator or a list of {self.shape[0]} generators "
                                 f"(one per sample)")
            self.generators = gens

    def __call__(self, sigma: float | None = None, sigma_next: float | None = None) -> Tensor:
        if self.generators is None:
            return _draw(self.shape, self.generator, self.dtype, self.device)
        return torch.stack([_draw(self.shape[1:], g, self.dtype, self.device) for g in self.generators])


class BrownianTreeNoise:
    """Brownian-path noise over canonical noise levels: ``noise(a, b) = (W(τ(b)) - W(τ(a))) / sqrt(|τ(b) - τ(a)|)``
    for one Brownian path W queried through a torchsde Brownian tree (Li et al. 2020, "Scalable Gradients for
    Stochastic Differential Equations", Sec. 4); τ is `transform` of σ̄ (identity by default).

    The path covers τ in [τ(sigma_min), τ(sigma_max)]; queries outside are clamped. With `seeds` every sample
    has its own tree (batch-invariant, one tree query per sample); otherwise one tree for the whole batch with
    entropy `seed` (drawn from torch's global generator when None).
    """

    def __init__(self, x: Tensor, sigma_min: float, sigma_max: float, *, seed: int | None = None,
                 seeds: Sequence[int] | None = None, transform: Callable[[float], float] | None = None,
                 tol: float = 1e-6):
        try:
            import torchsde
        except ImportError as e:  # pragma: no cover - torchsde is a core dependency
            raise ImportError("Brownian-tree noise needs torchsde (pip install torchsde)") from e
        self.transform = transform or (lambda s: s)
        t0, t1 = float(self.transform(float(sigma_min))), float(self.transform(float(sigma_max)))
        if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
            raise ValueError(f"the Brownian path needs a non-empty finite range; got [{t0}, {t1}]")
        self.t0, self.t1 = min(t0, t1), max(t0, t1)
        self.shape, self.dtype, self.device = tuple(x.shape), x.dtype, x.device
        if seeds is not None and seed is not None:
            raise ValueError("give either seed or seeds, not both")

        def tree(shape, entropy):
            w0 = torch.zeros(shape, dtype=self.dtype, device=self.device)
            return torchsde.BrownianTree(self.t0, w0, self.t1, entropy=entropy, tol=tol)

        if seeds is not None:
            seeds = _check_seeds(seeds, self.shape[0])
            self.trees = [tree(self.shape[1:], derive_seed(s, _STREAM_BROWNIAN)) for s in seeds]
            self.batched = False
        else:
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()).item())
            self.trees = [tree(self.shape, int(seed))]
            self.batched = True

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        a, b = float(self.transform(float(sigma))), float(self.transform(float(sigma_next)))
        a, b = sorted((min(max(a, self.t0), self.t1), min(max(b, self.t0), self.t1)))
        if b <= a:
            raise ValueError(f"Brownian increment over an empty interval [{sigma}, {sigma_next}] (after clamping "
                             f"to the tree's range)")
        scale = 1.0 / math.sqrt(b - a)
        if self.batched:
            return self.trees[0](a, b) * scale
        return torch.stack([t(a, b) for t in self.trees]) * scale


def make_noise_sampler(kind: str | NoiseSampler | None, x: Tensor, sigmas, *,
                       generator: torch.Generator | Sequence[torch.Generator] | None = None,
                       seeds: Sequence[int] | None = None) -> NoiseSampler:
    """The noise sampler `diffkit.sample` hands to a stochastic solver: `kind` 'gaussian' (default; independent
    draws, Ho et al. 2020, Alg. 2) or 'brownian' (a Brownian tree over [0, 2 σ̄_max], "Scalable Gradients for
    Stochastic Differential Equations", Li et al. 2020, Sec. 4), or a ready callable noise(sigma, sigma_next)."""
    if callable(kind):
        if generator is not None or seeds is not None:
            raise ValueError("a ready noise sampler carries its own randomness; do not also give generator or "
                             "seeds")
        return kind
    kind = kind or "gaussian"
    if kind == "gaussian":
        return GaussianNoise(x, generator=generator, seeds=seeds)
    if kind == "brownian":
        s = torch.as_tensor(sigmas, dtype=torch.float64)
        seed = None
        if isinstance(generator, torch.Generator):
            seed = int(torch.randint(0, 2**62, (), generator=generator).item())
        elif generator is not None:
            raise ValueError("Brownian noise takes one torch.Generator or per-sample `seeds`, not a list of "
                             "generators")
        return BrownianTreeNoise(x, 0.0, 2.0 * float(s.max()), seed=seed, seeds=seeds)
    raise ValueError(f"unknown noise kind {kind!r}; valid: {', '.join(NOISE_KINDS)} or a callable "
                     f"noise(sigma, sigma_next)")
