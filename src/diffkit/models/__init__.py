"""Networks for training with diffkit: `UNet`, `DiT` and `MLP`, each configured by a small dataclass and
exposing named hook points (`model.hook_names()`, `model.add_hook(name, fn)`, `with model.hooks({...})`).

`build_model({"type": "unet", ...})` builds a model from the JSON description that `model_config(model)`
returns (this is what checkpoints store).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .dit import DiT, DiTConfig
from .hooks import Hookable, HookHandle, HookPoint
from .mlp import MLP, MLPConfig
from .unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "DiT", "DiTConfig", "MLP", "MLPConfig", "HookPoint", "Hookable", "HookHandle",
           "MODELS", "build_model", "model_config", "count_parameters"]

# type name -> (config dataclass, model class)
MODELS: dict[str, tuple[type, type]] = {"unet": (UNetConfig, UNet), "dit": (DiTConfig, DiT), "mlp": (MLPConfig, MLP)}


def build_model(config: dict) -> nn.Module:
    """Build a diffkit network from {"type": "unet" | "dit" | "mlp", **fields of its config dataclass}."""
    if not isinstance(config, dict):
        raise TypeError(f"model config must be a dict with a 'type' key; got {type(config).__name__}")
    cfg = dict(config)
    kind = cfg.pop("type", None)
    if kind not in MODELS:
        raise ValueError(f"unknown model type {kind!r}; valid: {', '.join(MODELS)}")
    cls_cfg, cls = MODELS[kind]
    names = {f.name for f in dataclasses.fields(cls_cfg)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ValueError(f"unknown {kind} config field(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return cls(cls_cfg(**cfg))


def model_config(model: nn.Module) -> dict:
    """JSON description {"type": ..., **config} of a diffkit network (inverse of `build_model`)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    for kind, (_, cls) in MODELS.items():
        if type(model) is cls:
            d = dataclasses.asdict(model.config)
            return {"type": kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}
    valid = ", ".join(c.__name__ for _, c in MODELS.values())
    raise TypeError(f"{type(model).__name__} is not a diffkit model ({valid})")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
