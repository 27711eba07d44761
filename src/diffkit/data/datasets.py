"""Dataset loaders (see `diffkit.data`)."""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class Dataset:
    """Normalized samples `x` (float32, (N, ...)), optional `labels` (long, (N,)) with `num_classes`, and the
    normalization x_norm = (x_raw - mean) / std (scalars, or per-channel lists for images)."""

    x: Tensor
    labels: Tensor | None = None
    num_classes: int = 0
    normalization: dict = field(default_factory=lambda: {"mean": 0.0, "std": 1.0})
    name: str = "tensors"

    def __post_init__(self):
        if not isinstance(self.x, Tensor) or not self.x.is_floating_point() or self.x.ndim < 2:
            raise ValueError("dataset samples must be a floating-point tensor of shape (N, ...)")
        if len(self.x) == 0:
            raise ValueError("dataset is empty")
        if not torch.isfinite(self.x).all():
            raise ValueError("dataset contains non-finite values")
        self.x = self.x.float().contiguous()
        if self.labels is not None:
            self.labels = torch.as_tensor(self.labels).long()
            if self.labels.shape != (len(self.x),):
                raise ValueError(f"labels must have shape ({len(self.x)},); got {tuple(self.labels.shape)}")
            if (self.labels < 0).any():
                raise ValueError("labels must be non-negative integers")
            self.num_classes = max(self.num_classes, int(self.labels.max()) + 1)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(self.x.shape[1:])

    def _stats(self, like: Tensor):
        mean = torch.as_tensor(self.normalization["mean"], dtype=like.dtype, device=like.device)
        std = torch.as_tensor(self.normalization["std"], dtype=like.dtype, device=like.device)
        if mean.ndim == 1 and like.ndim >= 3:  # per channel of (N, C, H, W)
            mean, std = mean[:, None, None], std[:, None, None]
        return mean, std

    def denormalize(self, x: Tensor) -> Tensor:
        """Map normalized samples back to data units: x_raw = x std + mean."""
        mean, std = self._stats(x)
        return x * std + mean

    def config(self) -> dict:
        """JSON description (for checkpoints): name, sample shape, classes, normalization."""
        return {"name": self.name, "shape": list(self.shape), "num_classes": self.num_classes,
                "normalization": self.normalization}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _standardize(x: Tensor, name: str, labels=None, num_classes=0) -> Dataset:
    mean, std = float(x.mean()), float(x.std())
    return Dataset((x - mean) / std, labels, num_classes, {"mean": mean, "std": std}, name)


def moons(n: int = 10000, noise: float = 0.05, seed: int = 0) -> Dataset:
    """Two interleaving half circles (the classic 'moons' toy), labelled by moon, standardized."""
    g = _gen(seed)
    k = torch.randint(0, 2, (n,), generator=g)
    a = math.pi * torch.rand(n, generator=g)
    x = torch.stack([a.cos(), a.sin()], 1)
    x = torch.where(k[:, None] == 1, torch.stack([1 - a.cos(), 0.5 - a.sin()], 1), x)
    x = x + noise * torch.randn(n, 2, generator=g)
    return _standardize(x, "moons", k, 2)


def swiss_roll(n: int = 10000, noise: float = 0.05, seed: int = 0) -> Dataset:
    """2-D Swiss roll: (t cos t, t sin t) / 4π with t uniform in [1.5π, 4.5π], standardized."""
    g = _gen(seed)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    x = torch.stack([t * t.cos(), t * t.sin()], 1) / (4 * math.pi) + noise * torch.randn(n, 2, generator=g)
    return _standardize(x, "swiss_roll")


def checkerboard(n: int = 10000, squares: int = 4, seed: int = 0) -> Dataset:
    """Uniform density on the dark squares of a squares x squares checkerboard in [-1, 1]², standardized."""
    g = _gen(seed)
    cells = [(i, j) for i in range(squares) for j in range(squares) if (i + j) % 2 == 0]
    c = torch.tensor(cells, dtype=torch.float32)[torch.randint(0, len(cells), (n,), generator=g)]
    x = (c + torch.rand(n, 2, generator=g)) * (2 / squares) - 1
    return _standardize(x, "checkerboard")


def rings(n: int = 10000, n_rings: int = 3, noise: float = 0.03, seed: int = 0) -> Dataset:
    """Concentric circles of radii 1/n_rings .. 1 with mass proportional to the radius, labelled by ring."""
    g = _gen(seed)
    radii = torch.arange(1, n_rings + 1, dtype=torch.float32) / n_rings
    k = torch.multinomial(radii / radii.sum(), n, replacement=True, generator=g)
    a = 2 * math.pi * torch.rand(n, generator=g)
    x = radii[k, None] * torch.stack([a.cos(), a.sin()], 1) + noise * torch.randn(n, 2, generator=g)
    return _standardize(x, "rings", k, n_rings)


TOYS = {"moons": moons, "swiss_roll": swiss_roll, "checkerboard": checkerboard, "rings": rings}


def toy(name: str, n: int = 10000, seed: int = 0, **kw) -> Dataset:
    """A 2-D toy by name: moons, swiss_roll, checkerboard, rings."""
    if name not in TOYS:
        raise ValueError(f"unknown toy dataset {name!r}; valid: {', '.join(TOYS)}")
    return TOYS[name](n=n, seed=seed, **kw)


def mixture_dataset(mixture, n: int = 10000, seed: int = 0) -> Dataset:
    """Exact samples of a `diffkit.testbeds.GaussianMixture` (not normalized, so the mixture's exact denoiser
    stays the reference), labelled by component (or by the mixture's own `labels`)."""
    x, k = mixture.sample(n, generator=_gen(seed), return_components=True)
    labels = k if mixture.labels is None else mixture.labels[k]
    return Dataset(x.float(), labels, int(labels.max()) + 1, {"mean": 0.0, "std": 1.0}, f"mixture:{mixture!r}")


def digits(size: int = 8) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, values 0..16; no download), as
    (N, 1, size, size) in [-1, 1]; size 16 (or any multiple of 8) upsamples bilinearly."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the digits dataset needs scikit-learn (pip install scikit-learn)") from e
    if size < 8:
        raise ValueError(f"digits size must be >= 8; got {size}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 16)
    return Dataset((x - 8.0) / 8.0, torch.tensor(d.target), 10, {"mean": 8.0, "std": 8.0},
                   "digits" if size == 8 else f"digits{size}")


def image_folder(path, size: int | None = None, channels: int = 3) -> Dataset:
    """Images (PNG/JPEG/...) under `path`, read with Pillow, converted to `channels` (1 or 3), resized to
    size x size if given (bilinear; otherwise all images must share one size), scaled to [-1, 1]. Images in
    sub-folders get one label per sub-folder (sorted names); images directly in `path` are unlabelled."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is not a folder")
    if channels not in (1, 3):
        raise ValueError("channels must be 1 or 3")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {str(root)!r}")
    classes = sorted({p.parent.relative_to(root).parts[0] for p in files if p.parent != root})
    if classes and any(p.parent == root for p in files):
        raise ValueError(f"{str(root)!r} mixes images in the folder itself with class sub-folders")
    arrays, first = [], None
    for p in files:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                if size is not None:
                    im = im.resize((size, size), Image.BILINEAR)
                a = np.asarray(im, dtype=np.float32)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {str(p)!r}: {e}") from e
        if first is None:
            first = (p, a.shape)
        elif a.shape != first[1]:
            raise ValueError(f"images of mixed sizes: {str(first[0])!r} is {first[1][1]}x{first[1][0]} but "
                             f"{str(p)!r} is {a.shape[1]}x{a.shape[0]}; pass size= to resize them")
        arrays.append(a)
    x = torch.from_numpy(np.stack(arrays))
    x = x[:, None] if channels == 1 else x.permute(0, 3, 1, 2)
    labels = None
    if classes:
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[p.parent.relative_to(root).parts[0]] for p in files])
    return Dataset((x - 127.5) / 127.5, labels, len(classes), {"mean": 127.5, "std": 127.5, "classes": classes},
                   f"folder:{root.name}")


def from_tensors(x, labels=None, normalize: bool = False, name: str = "tensors") -> Dataset:
    """A dataset from an array/tensor (N, ...) and optional labels; `normalize` standardizes to mean 0, std 1."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).float()
    if x.ndim == 1:
        x = x[:, None]
    if normalize:
        return _standardize(x, name, labels)
    return Dataset(x, labels, 0, {"mean": 0.0, "std": 1.0}, name)


def load_file(path, key: str = "x", labels_key: str = "y", normalize: bool = False) -> Dataset:
    """Samples from a .npy, .npz (arrays `key` and optional `labels_key`) or .pt file (a tensor, or a dict with
    those keys; loaded with weights_only=True)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    labels = None
    try:
        if p.suffix == ".npy":
            x = np.load(p, allow_pickle=False)
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if key not in z:
                    raise ValueError(f"{str(p)!r} has no array {key!r}; arrays: {', '.join(z.files)}")
                x = z[key]
                labels = z[labels_key] if labels_key in z else None
        elif p.suffix == ".pt":
            obj = torch.load(p, weights_only=True, map_location="cpu")
            if isinstance(obj, dict):
                if key not in obj:
                    raise ValueError(f"{str(p)!r} has no tensor {key!r}; keys: {', '.join(map(str, obj))}")
                x, labels = obj[key], obj.get(labels_key)
            else:
                x = obj
        else:
            raise ValueError(f"unsupported data file {str(p)!r}; use .npy, .npz or .pt")
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise ValueError(f"cannot read data file {str(p)!r}: {e}") from e
    return from_tensors(x, labels, normalize=normalize, name=p.name)


def load_dataset(spec: str, **kw) -> Dataset:
    """Build a dataset from a short spec: a toy name (moons, swiss_roll, checkerboard, rings), 'ring' / 'grid'
    (testbed mixtures), 'digits' / 'digits16', 'folder:PATH' (kw: size, channels) or a .npy/.npz/.pt path."""
    if not isinstance(spec, str):
        raise TypeError("dataset spec must be a string")
    if spec in TOYS:
        return toy(spec, **kw)
    if spec in ("ring", "grid"):
        from ..testbeds import GaussianMixture

        return mixture_dataset(getattr(GaussianMixture, spec)(), **kw)
    if spec == "digits":
        return digits(8)
    if spec.startswith("digits") and spec[6:].isdigit():
        return digits(int(spec[6:]))
    if spec.startswith("folder:"):
        return image_folder(spec[7:], **kw)
    if spec.endswith((".npy", ".npz", ".pt")):
        return load_file(spec, **kw)
    raise ValueError(f"unknown dataset {spec!r}; valid: {', '.join(TOYS)}, ring, grid, digits, digits16, "
                     f"folder:PATH, FILE.npy/.npz/.pt")
