"""Checkpoints: weights in safetensors plus a JSON description, written atomically, verified when read.

A training checkpoint is a pair ``ckpt-00001000.safetensors`` (model, EMA, optimizer and RNG tensors) and
``ckpt-00001000.json`` (step, configuration of model / process / prediction / EMA / data normalization / loss /
training, the non-tensor parts of the optimizer and RNG states, and the size and SHA-256 of the tensor file).
Each file is written to a temporary name in the same folder, fsynced and renamed into place (a POSIX rename is
atomic), the JSON last: a checkpoint exists only once both halves are complete, so a run killed at any moment
leaves the previous checkpoint intact. An exported model (`save_model`) is ``model.safetensors`` +
``config.json`` in a folder.

Every read problem (missing half, truncated or corrupt file, another architecture) raises `CheckpointError`
(a `ValueError`) naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["CheckpointError", "atomic_write", "save_tensors", "load_tensors", "save_checkpoint", "load_checkpoint",
           "list_checkpoints", "latest_checkpoint", "save_model", "load_model", "load_denoiser",
           "restore_checkpoint", "rng_state", "set_rng_state", "optimizer_state", "load_optimizer_state",
           "check_state_dict"]

FORMAT = "diffkit-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{8,})\.json$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt or for another architecture."""


def atomic_write(path, data: bytes) -> None:
    """Write bytes to `path` atomically: temporary file in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - folders cannot be fsynced on some platforms
        pass


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_tensors(path, tensors: dict[str, torch.Tensor]) -> dict:
    """Write tensors as safetensors atomically; returns {"file", "size", "sha256"} for the JSON half."""
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    data = save(clean)
    atomic_write(path, data)
    return {"file": Path(path).name, "size": len(data), "sha256": _sha256(data)}


def load_tensors(path, size: int | None = None, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, checking its size and hash when given; CheckpointError on any problem."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint tensor file {str(path)!r} is missing")
    data = path.read_bytes()
    if size is not None and len(data) != size:
        raise CheckpointError(f"checkpoint tensor file {str(path)!r} is truncated or corrupt: {len(data)} bytes, "
                              f"expected {size}")
    if sha256 is not None and _sha256(data) != sha256:
        raise CheckpointError(f"checkpoint tensor file {str(path)!r} is corrupt: its SHA-256 does not match")
    try:
        return load(data)
    except Exception as e:  # safetensors raises its own SafetensorError / ValueError kinds
        raise CheckpointError(f"checkpoint tensor file {str(path)!r} is not a valid safetensors file: {e}") from e


def _read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} is truncated or corrupt (invalid JSON: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a diffkit checkpoint (no format={FORMAT!r} field)")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint version {meta.get('version')}; this diffkit reads up "
                              f"to {VERSION}")
    return meta


# -- RNG and optimizer states ---------------------------------------------------------------------------------
def rng_state(generators: dict[str, torch.Generator] | None = None) -> tuple[dict, dict]:
    """(tensors, json) capturing torch's global (and CUDA), numpy's and Python's RNGs and named generators."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [py[0], list(py[1]), py[2]]}
    for name, g in (generators or {}).items():
        tensors[f"rng.gen.{name}"] = g.get_state()
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    for name, g in (generators or {}).items():
        key = f"rng.gen.{name}"
        if key not in tensors:
            raise CheckpointError(f"checkpoint has no state for generator {name!r}")
        g.set_state(tensors[key])


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors, json) of an optimizer's state dict: tensors under optim.<param index>.<key>."""
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                plain.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Inverse of `optimizer_state`."""
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for idx, d in meta.get("plain", {}).items():
        state.setdefault(int(idx), {}).update(d)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state does not fit this model's parameters: {e}") from e


def _prefixed(tensors: dict, prefix: str) -> dict:
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


def check_state_dict(module: nn.Module, state: dict, where: str) -> None:
    """CheckpointError unless `state` has exactly the keys and shapes of `module`'s state dict."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        raise CheckpointError(f"{where} was saved from a different architecture than the model given: "
                              + ", ".join(parts))


# -- training checkpoints -------------------------------------------------------------------------------------
def save_checkpoint(folder, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    ema=None, loss: nn.Module | None = None, generators: dict | None = None,
                    config: dict | None = None, extra: dict | None = None, keep: int | None = None) -> Path:
    """Write ckpt-<step>.safetensors and ckpt-<step>.json in `folder` atomically (JSON last); keep the newest
    `keep` checkpoints. Returns the JSON path."""
    folder = Path(folder)
    model = getattr(model, "module", model)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta: dict = {"format": FORMAT, "version": VERSION, "step": int(step), "config": config or {},
                  "extra": extra or {}}
    if ema is not None:
        st = ema.state_dict()
        tensors.update({f"ema.{k}": v for k, v in st["module"].items()})
        meta["ema"] = {k: v for k, v in st.items() if k != "module"}
    if loss is not None:
        tensors.update({f"loss.{k}": v for k, v in loss.state_dict().items()})
    if optimizer is not None:
        t, m = optimizer_state(optimizer)
        tensors.update(t)
        meta["optimizer"] = m
    t, m = rng_state(generators)
    tensors.update(t)
    meta["rng"] = m
    stem = f"ckpt-{int(step):08d}"
    meta["tensors"] = save_tensors(folder / f"{stem}.safetensors", tensors)
    path = folder / f"{stem}.json"
    atomic_write(path, json.dumps(meta).encode())
    if keep is not None and keep > 0:
        for old in list_checkpoints(folder)[:-keep]:
            for p in (old, old.with_suffix(".safetensors")):
                p.unlink(missing_ok=True)
    return path


def list_checkpoints(folder) -> list[Path]:
    """Checkpoint JSON files in `folder`, oldest first (by step)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder) -> Path | None:
    """The newest checkpoint JSON in `folder` (None if there is none)."""
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path) -> tuple[dict, dict]:
    """(meta, tensors) of a checkpoint JSON path (or a folder: its newest checkpoint), verified."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"no checkpoint (ckpt-*.json) in folder {str(path)!r}")
        path = latest
    meta = _read_json(path)
    info = meta.get("tensors")
    if not isinstance(info, dict) or "file" not in info:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt: no tensor file recorded")
    tensors = load_tensors(path.parent / info["file"], info.get("size"), info.get("sha256"))
    meta["path"] = str(path)
    return meta, tensors


def restore_checkpoint(path, *, model: nn.Module, optimizer=None, ema=None, loss: nn.Module | None = None,
                       generators: dict | None = None) -> dict:
    """Load a checkpoint into live objects (model, optimizer, EMA, loss, RNGs); returns its meta (with step)."""
    meta, tensors = load_checkpoint(path)
    where = f"checkpoint {meta['path']!r}"
    model = getattr(model, "module", model)
    state = _prefixed(tensors, "model.")
    check_state_dict(model, state, where)
    model.load_state_dict(state)
    if ema is not None:
        est = _prefixed(tensors, "ema.")
        if not est:
            raise CheckpointError(f"{where} has no EMA weights")
        check_state_dict(ema.module, est, where + " (EMA)")
        ema.load_state_dict({"module": est, **meta["ema"]})
    if loss is not None:
        lst = _prefixed(tensors, "loss.")
        check_state_dict(loss, lst, where + " (loss)")
        loss.load_state_dict(lst)
    if optimizer is not None:
        if "optimizer" not in meta:
            raise CheckpointError(f"{where} has no optimizer state")
        load_optimizer_state(optimizer, tensors, meta["optimizer"])
    set_rng_state(tensors, meta["rng"], generators)
    return meta


# -- exported models ------------------------------------------------------------------------------------------
def save_model(folder, model: nn.Module, *, process=None, prediction: str | None = None, ema: dict | None = None,
               data: dict | None = None, extra: dict | None = None) -> Path:
    """Export a network for sampling: `folder`/model.safetensors + `folder`/config.json (model, process,
    prediction type, EMA settings, data normalization). Returns the folder."""
    from .models import model_config

    folder = Path(folder)
    model = getattr(model, "module", model)
    info = save_tensors(folder / "model.safetensors", model.state_dict())
    meta = {"format": FORMAT, "version": VERSION, "kind": "model", "model": model_config(model),
            "process": process.config() if process is not None else None, "prediction": prediction,
            "ema": ema, "data": data, "extra": extra or {}, "tensors": info}
    atomic_write(folder / "config.json", json.dumps(meta, indent=1).encode())
    return folder


def load_model(path, *, ema: bool = True, map_location="cpu") -> tuple[nn.Module, dict]:
    """(model, config) from an exported folder (config.json) or a training checkpoint (JSON path or folder;
    EMA weights when `ema` and present). The architecture is rebuilt from the stored config."""
    from .models import build_model

    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        meta = _read_json(path / "config.json")
        info = meta.get("tensors") or {}
        tensors = load_tensors(path / info.get("file", "model.safetensors"), info.get("size"), info.get("sha256"))
        state, cfg, where = tensors, meta, f"model {str(path)!r}"
    else:
        meta, tensors = load_checkpoint(path)
        cfg = meta.get("config", {})
        where = f"checkpoint {meta['path']!r}"
        state = _prefixed(tensors, "ema.") if ema else {}
        state = state or _prefixed(tensors, "model.")
    if not cfg.get("model"):
        raise CheckpointError(f"{where} does not record a diffkit model configuration; build the model yourself "
                              f"and use restore_checkpoint")
    try:
        model = build_model(cfg["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from e
    check_state_dict(model, state, where)
    model.load_state_dict(state)
    return model.to(map_location).eval(), cfg


def load_denoiser(path, *, ema: bool = True, map_location="cpu"):
    """A `diffkit.Denoiser` around the model stored at `path` (see `load_model`), with its process and
    prediction type."""
    from .denoiser import Denoiser
    from .processes import process_from_config

    model, cfg = load_model(path, ema=ema, map_location=map_location)
    if not cfg.get("process") or not cfg.get("prediction"):
        raise CheckpointError(f"{str(path)!r} does not record its process and prediction type")
    try:
        process = process_from_config(cfg["process"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r}: {e}") from e
    return Denoiser(model, process, cfg["prediction"])
