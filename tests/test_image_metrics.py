"""Image metrics in the digits classifier's feature space: the shipped classifier, the Fréchet distance against
the held-out real digits, class accuracy and k-NN precision/recall (Kynkäänniemi et al. 2019)."""

import json

import pytest
import torch

import diffkit.image_metrics as im
from diffkit.classifier import ASSET, digits_split, load_classifier


def test_shipped_classifier_accuracy_matches_its_record():
    _, _, xt, yt = digits_split()
    record = json.loads((ASSET / "config.json").read_text())["training"]
    acc = im.classifier_accuracy(xt, yt)
    assert acc == pytest.approx(record["held_out_accuracy"], abs=1e-6)
    assert acc > 0.97
    assert im.digit_features(xt[:5]).shape == (5, load_classifier().n_features)


def test_frechet_distance_orders_real_noise_and_blur():
    x, y, xt, _ = digits_split()
    assert abs(im.frechet_digits_distance(xt)) < 1e-3                   # the reference itself
    real = im.frechet_digits_distance(x[:500])
    blurred = im.frechet_digits_distance(torch.nn.functional.avg_pool2d(x[:500], 3, 1, 1))
    noise = im.frechet_digits_distance(torch.rand(500, 1, 16, 16) * 2 - 1)
    assert real < blurred < noise
    assert real < 10


def test_accuracy_and_bad_input():
    x, y, _, _ = digits_split()
    assert im.classifier_accuracy(x[:200], y[:200]) > 0.97
    assert im.classifier_accuracy(x[:200], (y[:200] + 1) % 10) < 0.05
    with pytest.raises(ValueError, match="labels"):
        im.classifier_accuracy(x[:10], y[:9])
    with pytest.raises(ValueError, match="shape"):
        im.digit_features(torch.zeros(3, 3, 16, 16))


def test_precision_recall_on_point_sets():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 4, generator=g, dtype=torch.float64)
    p, r = im.precision_recall(real, torch.randn(400, 4, generator=g, dtype=torch.float64))
    assert p > 0.85 and r > 0.85
    collapsed = 0.1 * torch.randn(400, 4, generator=g, dtype=torch.float64)   # all inside, covers little
    p, r = im.precision_recall(real, collapsed)
    assert p > 0.95 and r < 0.5
    far = torch.randn(400, 4, generator=g, dtype=torch.float64) + 10.0
    assert im.precision_recall(real, far) == (0.0, 0.0)
    with pytest.raises(ValueError):
        im.precision_recall(real, far[:3])


def test_digits_report_keys():
    x, y, _, _ = digits_split()
    rep = im.digits_report(x[:100], y[:100])
    assert set(rep) == {"n", "fd", "accuracy", "precision", "recall"}
    assert rep["precision"] > 0.8 and rep["recall"] > 0.8


@pytest.mark.parametrize("module, flag", [("diffkit.classifier", "--epochs"),
                                          ("diffkit.guidance.noisy_classifier", "--steps")])
def test_asset_training_command_line(module, flag, tmp_path, monkeypatch, capsys):
    """Both asset training scripts parse --out, their length flag, --seed and --threads, train with them and write
    the record (training itself replaced by a stub here)."""
    import importlib

    mod = importlib.import_module(module)
    calls = {}

    def train(length, seed, progress):
        calls["train"] = (length, seed)
        return "model", {"length": length, "seed": seed}

    def save(out, model, record):
        calls["save"] = (out, model, record)

    name = "classifier" if module == "diffkit.classifier" else "noisy_classifier"
    monkeypatch.setattr(mod, f"train_{name}", train)
    monkeypatch.setattr(mod, f"save_{name}", save)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.setdefault("threads", n))
    assert mod.main(["--out", str(tmp_path), flag, "7", "--seed", "3", "--threads", "2"]) == 0
    assert calls == {"threads": 2, "train": (7, 3), "save": (str(tmp_path), "model", {"length": 7, "seed": 3})}
    assert json.loads(capsys.readouterr().out) == {"length": 7, "seed": 3}
