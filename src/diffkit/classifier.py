"""The small digits classifier behind diffkit's image metrics (the digits analogue of FID's Inception network).

A four-layer CNN on 16x16 digits in [-1, 1] (scikit-learn's bundled 8x8 digits upsampled bilinearly, as
`diffkit.data.digits(16)`); its 64-d penultimate activations are the feature space of
`diffkit.image_metrics`. Trained by our own script with a fixed seed on a stratified 70 % split (the held-out
30 % is the metrics' reference set):

    python -m diffkit.classifier --out src/diffkit/assets/digits_classifier

which writes ``model.safetensors`` + ``config.json`` (held-out accuracy included). `load_classifier()` loads the
shipped copy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsClassifier", "digits_split", "train_classifier", "load_classifier", "ASSET"]

ASSET = Path(__file__).resolve().parent / "assets" / "digits_classifier"
SPLIT_SEED = 0
HELD_OUT = 0.3


class DigitsClassifier(nn.Module):
    """conv(1→16) → pool → conv(16→32) → pool → linear(512→64) → linear(64→10); `features` = the 64-d ReLU
    activations before the last layer."""

    def __init__(self, width: int = 16, features: int = 64, num_classes: int = 10):
        super().__init__()
        self.width, self.n_features, self.num_classes = width, features, num_classes
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 16, features)
        self.fc2 = nn.Linear(features, num_classes)

    def config(self) -> dict:
        return {"width": self.width, "features": self.n_features, "num_classes": self.num_classes}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, 64) of images (N, 1, 16, 16) in [-1, 1] (clamped; other sizes resized)."""
        x = x.float()
        if x.shape[-2:] != (16, 16):
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        x = x.clamp(-1, 1)
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_held_out, y_held_out): the 16x16 digits in [-1, 1], stratified 70/30 split, fixed seed."""
    from sklearn.model_selection import train_test_split

    from .data import digits

    d = digits(16)
    idx = torch.arange(len(d.x)).numpy()
    tr, te = train_test_split(idx, test_size=HELD_OUT, random_state=SPLIT_SEED, stratify=d.labels.numpy())
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return d.x[tr], d.labels[tr], d.x[te], d.labels[te]


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translations by up to one pixel (edge pixels are background, -1)."""
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=g).tolist()
    return pad[..., dy:dy + 16, dx:dx + 16]


def train_classifier(epochs: int = 40, seed: int = 0, batch_size: int = 64, lr: float = 2e-3,
                     progress: bool = False) -> tuple[DigitsClassifier, dict]:
    """Train the classifier on the 70 % split (Adam, one-pixel random shifts, fixed seed); returns (model, record
    with held-out accuracy)."""
    x, y, xt, yt = digits_split()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    t0 = time.time()
    it = range(epochs)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="classifier", unit="epoch")
    for _ in it:
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            b = perm[i:i + batch_size]
            loss = F.cross_entropy(model(_shift(x[b], g)), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
        train_acc = float((model(x).argmax(1) == y).float().mean())
    record = {"held_out_accuracy": acc, "train_accuracy": train_acc, "held_out": len(xt), "train": len(x),
              "epochs": epochs, "seed": seed, "seconds": round(time.time() - t0, 1),
              "command": "python -m diffkit.classifier --out src/diffkit/assets/digits_classifier"}
    return model, record


def save_frozen(folder, model: nn.Module, kind: str, input_desc: str, record: dict) -> Path:
    """Write `folder`/model.safetensors + `folder`/config.json (kind, architecture, input, data split, training
    record, tensor file info), atomically; `load_frozen` reads it back."""
    from .checkpoint import atomic_write, save_tensors

    folder = Path(folder)
    info = save_tensors(folder / "model.safetensors", model.state_dict())
    meta = {"kind": kind, "model": model.config(), "input": input_desc,
            "split": {"seed": SPLIT_SEED, "held_out": HELD_OUT, "stratified": True}, "training": record,
            "tensors": info}
    atomic_write(folder / "config.json", json.dumps(meta, indent=1).encode())
    return folder


def save_classifier(folder, model: DigitsClassifier, record: dict) -> Path:
    """Write `folder`/model.safetensors + `folder`/config.json (architecture and training record)."""
    return save_frozen(folder, model, "digits-classifier", "(N, 1, 16, 16) in [-1, 1]", record)


_CACHE: dict = {}


def load_frozen(folder, cls, what: str):
    """An `nn.Module` of class `cls` stored as `folder`/config.json ("model": constructor arguments, "tensors":
    file, size and sha256) + safetensors weights, in eval mode with frozen weights; cached per folder."""
    from .checkpoint import CheckpointError, load_tensors

    folder = Path(folder)
    key = (cls.__name__, str(folder.resolve()))
    if key not in _CACHE:
        cfg_path = folder / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(f"no {what} at {str(folder)!r} (config.json missing)")
        meta = json.loads(cfg_path.read_text())
        info = meta.get("tensors", {})
        state = load_tensors(folder / info.get("file", "model.safetensors"), info.get("size"), info.get("sha256"))
        model = cls(**meta["model"])
        model.load_state_dict(state)
        _CACHE[key] = model.eval().requires_grad_(False)
    return _CACHE[key]


def load_classifier(folder=None) -> DigitsClassifier:
    """The digits classifier stored in `folder` (default: the shipped one), in eval mode; cached per folder."""
    return load_frozen(folder or ASSET, DigitsClassifier, "digits classifier")


def asset_main(argv, *, prog: str, doc: str, out: Path, length: tuple[str, int, str], train, save,
               threads_help: str = "torch threads (default: %(default)s)") -> int:
    """The command line of a shipped asset's training script: --out, the training length (`length` = (flag,
    default, what it counts)), --seed and --threads; trains with `train(length, seed, progress=...)`, writes with
    `save(out, model, record)` and prints the record as JSON."""
    flag, default, what = length
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(out), help="output folder (default: the shipped asset folder)")
    p.add_argument(f"--{flag}", dest="length", metavar=flag.upper(), type=int, default=default,
                   help=f"{what} (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help=threads_help)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, record = train(args.length, args.seed, progress=sys.stderr.isatty())
    save(args.out, model, record)
    print(json.dumps(record))
    return 0


def main(argv=None) -> int:
    return asset_main(argv, prog="python -m diffkit.classifier", doc=__doc__, out=ASSET,
                      length=("epochs", 40, "training epochs"), train=train_classifier, save=save_classifier)


if __name__ == "__main__":
    sys.exit(main())
