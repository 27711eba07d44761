"""A residual MLP denoiser for low-dimensional data (2-D toys, testbed mixtures), configured by `MLPConfig`.

Hook points: ``blocks.{i}`` (block outputs) and ``out``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import Hookable, HookPoint
from .layers import ClassEmbedding, TimeEmbedding

__all__ = ["MLPConfig", "MLP"]


@dataclass
class MLPConfig:
    """MLP hyper-parameters: `dim` input features, `depth` residual blocks of width `hidden`."""

    dim: int = 2
    hidden: int = 128
    depth: int = 3
    dropout: float = 0.0
    num_classes: int = 0
    time_scale: float = 1.0


class _Block(nn.Module):
    def __init__(self, hidden, dropout, name):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)
        self.emb = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.hook = HookPoint(name)

    def forward(self, h, c):
        r = self.fc2(self.dropout(F.silu(self.fc1(self.norm(h) + self.emb(c)))))
        h = h + r
        return self.hook(h) if self.hook.fns else h


class MLP(nn.Module, Hookable):
    """Residual MLP `model(x, t, label=None)` on (B, dim) inputs with a sinusoidal time embedding (Ho et al.
    2020, "Denoising Diffusion Probabilistic Models", App. B, time embedding) added in every block."""

    def __init__(self, config: MLPConfig | None = None, **kwargs):
        super().__init__()
        cfg = config or MLPConfig(**kwargs)
        self.config = cfg
        self.inp = nn.Linear(cfg.dim, cfg.hidden)
        self.time_embed = TimeEmbedding(cfg.hidden, cfg.hidden, cfg.time_scale)
        self.class_embed = ClassEmbedding(cfg.num_classes, cfg.hidden) if cfg.num_classes else None
        self.blocks = nn.ModuleList(_Block(cfg.hidden, cfg.dropout, f"blocks.{i}") for i in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.out_hook = HookPoint("out")

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.config.dim:
            raise ValueError(f"MLP expects input of shape (B, {self.config.dim}); got {tuple(x.shape)}")
        B = x.shape[0]
        c = self.time_embed(t, B)
        if self.class_embed is not None:
            c = c + self.class_embed(label, B, x.device)
        elif label is not None:
            raise ValueError("this MLP is unconditional (num_classes=0) but got a label")
        c = F.silu(c)
        h = self.inp(x.to(self.inp.weight.dtype))
        for block in self.blocks:
            h = block(h, c)
        out = self.out(F.silu(self.norm_out(h)))
        return self.out_hook(out) if self.out_hook.fns else out
