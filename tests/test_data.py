"""Data loaders: toys, mixtures, digits, image folders, array files, specs, and clear errors on bad input."""

import numpy as np
import pytest
import torch
from helpers import single_threaded  # noqa: F401
from PIL import Image

from diffkit.data import TOYS, digits, from_tensors, image_folder, load_dataset, load_file, mixture_dataset, toy
from diffkit.testbeds import GaussianMixture


@pytest.mark.parametrize("name", list(TOYS))
def test_toys_are_standardized_and_seeded(name):
    d = toy(name, 3000, seed=1)
    assert d.x.shape == (3000, 2) and d.x.dtype == torch.float32
    assert abs(float(d.x.mean())) < 1e-4 and abs(float(d.x.std()) - 1) < 1e-3  # one scale: shapes kept
    assert torch.equal(d.x, toy(name, 3000, seed=1).x) and not torch.equal(d.x, toy(name, 3000, seed=2).x)
    raw = d.denormalize(d.x)
    torch.testing.assert_close((raw - d.normalization["mean"]) / d.normalization["std"], d.x)
    with pytest.raises(ValueError, match="unknown toy dataset"):
        toy("spiral")


def test_mixture_dataset_keeps_exact_scale():
    m = GaussianMixture.ring()
    d = mixture_dataset(m, 4000)
    assert d.num_classes == 8 and d.labels.shape == (4000,)
    assert abs(float(d.x.norm(dim=1).mean()) - 1.0) < 0.02  # ring of radius 1, not renormalized


@pytest.mark.parametrize("size", [8, 16])
def test_digits(size):
    d = digits(size)
    assert d.x.shape == (1797, 1, size, size) and d.num_classes == 10
    assert float(d.x.min()) >= -1 and float(d.x.max()) <= 1
    assert d.denormalize(d.x).max() <= 16
    assert torch.bincount(d.labels).min() > 170
    assert load_dataset("digits16" if size == 16 else "digits").x.shape == d.x.shape


def _png(path, size, value=128, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255)).save(path)


def test_image_folder_with_classes_and_resize(tmp_path):
    _png(tmp_path / "cats" / "a.png", (6, 6), 0)
    _png(tmp_path / "cats" / "b.jpg", (6, 6), 255, "RGB")
    _png(tmp_path / "dogs" / "c.png", (6, 6), 255)
    d = image_folder(tmp_path, channels=1)
    assert d.x.shape == (3, 1, 6, 6) and d.labels.tolist() == [0, 0, 1] and d.num_classes == 2
    assert float(d.x[0].max()) == -1.0 and float(d.x[2].min()) == 1.0
    rgb = image_folder(tmp_path, size=4, channels=3)
    assert rgb.x.shape == (3, 3, 4, 4)
    assert rgb.normalization["classes"] == ["cats", "dogs"]
    assert load_dataset(f"folder:{tmp_path}", size=4).x.shape == (3, 3, 4, 4)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        image_folder(tmp_path / "empty")
    _png(tmp_path / "mixed" / "a.png", (8, 8))
    _png(tmp_path / "mixed" / "b.png", (16, 8))
    with pytest.raises(ValueError, match=r"images of mixed sizes: .*a.png' is 8x8 but .*b.png' is 16x8; pass size="):
        image_folder(tmp_path / "mixed")
    assert image_folder(tmp_path / "mixed", size=8).x.shape == (2, 3, 8, 8)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        image_folder(tmp_path / "broken")


def test_array_files(tmp_path):
    x, y = np.random.rand(20, 3).astype(np.float32), np.arange(20) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    np.save(tmp_path / "d.npy", x)
    torch.save({"x": torch.tensor(x), "y": torch.tensor(y)}, tmp_path / "d.pt")
    for name in ("d.npz", "d.pt"):
        d = load_dataset(str(tmp_path / name))
        assert d.x.shape == (20, 3) and d.num_classes == 4
    assert load_file(tmp_path / "d.npy", normalize=True).x.std() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="has no array 'images'"):
        load_file(tmp_path / "d.npz", key="images")
    with pytest.raises(FileNotFoundError):
        load_file(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read data file"):
        load_file(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="non-finite"):
        from_tensors(torch.tensor([[1.0], [float("nan")]]))
    with pytest.raises(ValueError, match="labels must have shape"):
        from_tensors(torch.zeros(3, 2), labels=torch.zeros(2))
