"""A small Diffusion Transformer ("Scalable Diffusion Models with Transformers", Peebles & Xie 2023): patchify,
fixed 2-D sin-cos position embedding, transformer blocks conditioned by adaLN-Zero (Sec. 3.2), linear
un-patchify; configured by `DiTConfig`.

Hook points: ``blocks.{i}.attn`` (attention output before projection; hooks get ``v``), ``blocks.{i}`` (block
output tokens) and ``out``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import Hookable, HookPoint
from .layers import ClassEmbedding, SelfAttention, TimeEmbedding

__all__ = ["DiTConfig", "DiT", "sincos_2d"]


@dataclass
class DiTConfig:
    """DiT hyper-parameters: tokens are patch_size x patch_size patches of an image_size x image_size input."""

    image_size: int = 16
    in_channels: int = 1
    out_channels: int | None = None
    patch_size: int = 2
    hidden: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    num_classes: int = 0
    time_scale: float = 1.0

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden {self.hidden} must be divisible by num_heads {self.num_heads}")


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (grid*grid, dim): half the channels encode the row, half the
    column, each with the 1-D sinusoids of "Attention Is All You Need" (Vaswani et al. 2017, Sec. 3.5)."""
    if dim % 4:
        raise ValueError("hidden size must be divisible by 4 for the 2-D position embedding")
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    pos = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(pos, pos, indexing="ij")

    def emb(p):
        a = p.reshape(-1, 1) * omega[None]
        return torch.cat([a.sin(), a.cos()], 1)

    return torch.cat([emb(yy), emb(xx)], 1).float()


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero (Peebles & Xie 2023, Sec. 3.2): the conditioning regresses
    shift, scale and a zero-initialised gate for the attention and MLP branches."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, dropout: float, name: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden, num_heads, name + ".attn")
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(approximate="tanh"),
                                 nn.Dropout(dropout) if dropout > 0 else nn.Identity(), nn.Linear(width, hidden))
        self.ada = nn.Linear(hidden, 6 * hidden)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)
        self.hook = HookPoint(name)

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(_modulate(self.norm1(x), s1, sc1))
        x = x + g2[:, None] * self.mlp(_modulate(self.norm2(x), s2, sc2))
        return self.hook(x) if self.hook.fns else x


class DiT(nn.Module, Hookable):
    """Diffusion transformer network `model(x, t, label=None)` (Peebles & Xie 2023, "Scalable Diffusion Models
    with Transformers", Fig. 3, adaLN-Zero variant); input/output (B, in_channels, image_size, image_size)."""

    def __init__(self, config: DiTConfig | None = None, **kwargs):
        super().__init__()
        cfg = config or DiTConfig(**kwargs)
        self.config = cfg
        p, d = cfg.patch_size, cfg.hidden
        self.grid = cfg.image_size // p
        self.out_channels = cfg.out_channels or cfg.in_channels
        self.patch = nn.Conv2d(cfg.in_channels, d, p, stride=p)
        self.register_buffer("pos", sincos_2d(d, self.grid)[None], persistent=False)
        self.time_embed = TimeEmbedding(256, d, cfg.time_scale)
        self.class_embed = ClassEmbedding(cfg.num_classes, d) if cfg.num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, f"blocks.{i}")
                                    for i in range(cfg.depth))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(d, 2 * d)
        self.linear_out = nn.Linear(d, p * p * self.out_channels)
        for m in (self.ada_out, self.linear_out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.out_hook = HookPoint("out")

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"DiT expects input of shape (B, {cfg.in_channels}, {cfg.image_size}, "
                             f"{cfg.image_size}); got {tuple(x.shape)}")
        B, p, G = x.shape[0], cfg.patch_size, self.grid
        h = self.patch(x.to(self.patch.weight.dtype)).flatten(2).transpose(1, 2) + self.pos
        c = self.time_embed(t, B)
        if self.class_embed is not None:
            c = c + self.class_embed(label, B, x.device)
        elif label is not None:
            raise ValueError("this DiT is unconditional (num_classes=0) but got a label")
        c = F.silu(c)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada_out(c).chunk(2, dim=1)
        h = self.linear_out(_modulate(self.norm_out(h), shift, scale))  # (B, G*G, p*p*C)
        out = h.reshape(B, G, G, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        out = out.reshape(B, self.out_channels, G * p, G * p)
        return self.out_hook(out) if self.out_hook.fns else out
