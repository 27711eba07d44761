"""Building blocks shared by the UNet, the DiT and the MLP: time and class embeddings, attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import HookPoint

__all__ = ["timestep_embedding", "TimeEmbedding", "ClassEmbedding", "SelfAttention", "group_norm"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) times ("Attention Is All You Need", Vaswani et al. 2017,
    Sec. 3.5; used for diffusion time in "Denoising Diffusion Probabilistic Models", Ho et al. 2020):
    [cos(t ω_i), sin(t ω_i)] with ω_i = max_period^(-i / (dim/2)), i = 0 .. dim/2 - 1."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimeEmbedding(nn.Module):
    """t -> MLP(sinusoid(time_scale * t)) (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", App. B).

    `time_scale` maps the process's native time to the range the sinusoids resolve (1 for timestep indices,
    1000 for t in [0, 1], 250 for EDM's c_noise = ln(σ)/4)."""

    def __init__(self, freq_dim: int, dim: int, time_scale: float = 1.0):
        super().__init__()
        self.freq_dim, self.time_scale = freq_dim, time_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.mlp[0].weight.device)
        if t.ndim == 0:
            t = t.expand(batch)
        return self.mlp(timestep_embedding(t * self.time_scale, self.freq_dim).to(self.mlp[0].weight.dtype))


class ClassEmbedding(nn.Module):
    """Learned class embedding with an extra null class (index `num_classes`) for classifier-free guidance
    ("Classifier-Free Diffusion Guidance", Ho & Salimans 2022, Sec. 3.2). Labels < 0 or None mean the null class."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, label: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        if label is None:
            label = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        label = torch.as_tensor(label, device=device).long()
        if label.ndim == 0:
            label = label.expand(batch)
        if label.shape != (batch,):
            raise ValueError(f"label must have shape ({batch},); got {tuple(label.shape)}")
        if (label > self.num_classes).any():
            raise ValueError(f"labels must be < {self.num_classes} (or {self.num_classes} / negative for the null "
                             f"class); got max {int(label.max())}")
        label = torch.where(label < 0, torch.full_like(label, self.num_classes), label)
        return self.table(label)


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= `groups` that divides `channels` ("Group Normalization",
    Wu & He 2018)."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=1e-6)


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens (B, N, C) ("Attention Is All You Need", Vaswani et al. 2017, Eq. 1:
    softmax(QKᵀ/√d) V), with a hook point `name` on the attention output before the output projection; hooks
    receive ``v`` (the values, same layout) so perturbed attention can return them (identity attention map)."""

    def __init__(self, dim: int, num_heads: int, name: str, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.hook = HookPoint(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, N, C)
        if self.hook.fns:
            out = self.hook(out, v=v.transpose(1, 2).reshape(B, N, C))
        return self.proj(out)
