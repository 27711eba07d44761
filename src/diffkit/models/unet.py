"""A small convolutional UNet for diffusion ("Denoising Diffusion Probabilistic Models", Ho et al. 2020, App. B;
"Diffusion Models Beat GANs on Image Synthesis", Dhariwal & Nichol 2021, Sec. 3: scale-shift norm, attention
at several resolutions), configured by `UNetConfig`.

Hook points (see `diffkit.models.hooks`): ``down.{level}.{i}`` / ``down.{level}.{i}.attn`` for the encoder
blocks, ``down.{level}.downsample``, ``mid.0``, ``mid.attn``, ``mid.1``, ``up.{level}.{i}`` /
``up.{level}.{i}.attn`` for the decoder blocks (level 0 is the full resolution), ``up.{level}.upsample`` and
``out`` (the final prediction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import Hookable, HookPoint
from .layers import ClassEmbedding, SelfAttention, TimeEmbedding, group_norm

__all__ = ["UNetConfig", "UNet"]


@dataclass
class UNetConfig:
    """UNet hyper-parameters. `attention_resolutions` lists the feature-map sizes (e.g. 8 for 8x8) that get
    self-attention; `num_classes` > 0 adds a class embedding with a null class for classifier-free guidance."""

    image_size: int = 16
    in_channels: int = 1
    out_channels: int | None = None
    channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8,)
    num_heads: int = 4
    dropout: float = 0.0
    num_classes: int = 0
    groups: int = 32
    time_scale: float = 1.0

    def __post_init__(self):
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        if self.image_size % 2 ** (len(self.channel_mults) - 1):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2^(levels-1) = "
                             f"{2 ** (len(self.channel_mults) - 1)}")
        if self.channels < 1 or self.in_channels < 1 or self.num_res_blocks < 1 or not self.channel_mults:
            raise ValueError("channels, in_channels, num_res_blocks and channel_mults must be positive/non-empty")


class ResBlock(nn.Module):
    """GN-SiLU-conv, scale-shift by the embedding, GN-SiLU-dropout-conv (zero-initialised), residual
    (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", Sec. 3, adaptive group normalization)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, groups: int, name: str):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = group_norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.hook = HookPoint(name)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        h = self.conv2(self.dropout(F.silu(h)))
        out = self.skip(x) + h
        return self.hook(out) if self.hook.fns else out


class AttnBlock(nn.Module):
    """GroupNorm then multi-head self-attention over the H*W positions, residual."""

    def __init__(self, ch: int, num_heads: int, groups: int, name: str):
        super().__init__()
        self.norm = group_norm(ch, groups)
        self.attn = SelfAttention(ch, num_heads, name)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        tokens = self.norm(x).reshape(B, C, H * W).transpose(1, 2)
        return x + self.attn(tokens).transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module, Hookable):
    """UNet ε/x0/v/flow/F network `model(x, t, label=None)` (Ho et al. 2020, "Denoising Diffusion Probabilistic
    Models", App. B, with Dhariwal & Nichol 2021's scale-shift norm): input and output have shape
    (B, in_channels, image_size, image_size); t is the process's native time (scaled by `time_scale`)."""

    def __init__(self, config: UNetConfig | None = None, **kwargs):
        super().__init__()
        cfg = config or UNetConfig(**kwargs)
        self.config = cfg
        ch, emb_dim, g = cfg.channels, 4 * cfg.channels, cfg.groups
        self.time_embed = TimeEmbedding(ch, emb_dim, cfg.time_scale)
        self.class_embed = ClassEmbedding(cfg.num_classes, emb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips, cur, res = [ch], ch, cfg.image_size
        for level, mult in enumerate(cfg.channel_mults):
            blocks = nn.ModuleList()
            for i in range(cfg.num_res_blocks):
                name = f"down.{level}.{i}"
                block = nn.ModuleList([ResBlock(cur, ch * mult, emb_dim, cfg.dropout, g, name)])
                cur = ch * mult
                if res in cfg.attention_resolutions:
                    block.append(AttnBlock(cur, cfg.num_heads, g, name + ".attn"))
                blocks.append(block)
                skips.append(cur)
            stage = nn.Module()
            stage.blocks = blocks
            if level < len(cfg.channel_mults) - 1:
                stage.downsample = nn.Conv2d(cur, cur, 3, stride=2, padding=1)
                stage.down_hook = HookPoint(f"down.{level}.downsample")
                skips.append(cur)
                res //= 2
            self.down.append(stage)
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, cfg.dropout, g, "mid.0"),
                                  AttnBlock(cur, cfg.num_heads, g, "mid.attn"),
                                  ResBlock(cur, cur, emb_dim, cfg.dropout, g, "mid.1")])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            blocks = nn.ModuleList()
            for i in range(cfg.num_res_blocks + 1):
                name = f"up.{level}.{i}"
                block = nn.ModuleList([ResBlock(cur + skips.pop(), ch * mult, emb_dim, cfg.dropout, g, name)])
                cur = ch * mult
                if res in cfg.attention_resolutions:
                    block.append(AttnBlock(cur, cfg.num_heads, g, name + ".attn"))
                blocks.append(block)
            stage = nn.Module()
            stage.blocks = blocks
            if level > 0:
                stage.upsample = nn.Conv2d(cur, cur, 3, padding=1)
                stage.up_hook = HookPoint(f"up.{level}.upsample")
                res *= 2
            self.up.append(stage)
        self.norm_out = group_norm(cur, g)
        self.conv_out = nn.Conv2d(cur, cfg.out_channels or cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.out_hook = HookPoint("out")

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None,
                cache: dict | None = None) -> torch.Tensor:
        """Predict from (x, t, label). `cache` (a dict) enables feature reuse across sampling steps ("DeepCache:
        Accelerating Diffusion Models for Free", Ma et al. 2023, Sec. 3.2): a full pass stores the deep feature
        entering the full-resolution decoder (the output of ``up.1.upsample``) in cache["deep"]; with
        cache["reuse"] true and a stored feature, only the full-resolution encoder and decoder blocks run."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] != cfg.image_size or \
                x.shape[3] != cfg.image_size:
            raise ValueError(f"UNet expects input of shape (B, {cfg.in_channels}, {cfg.image_size}, "
                             f"{cfg.image_size}); got {tuple(x.shape)}")
        B = x.shape[0]
        emb = self.time_embed(t, B)
        if self.class_embed is not None:
            emb = emb + self.class_embed(label, B, x.device)
        elif label is not None:
            raise ValueError("this UNet is unconditional (num_classes=0) but got a label")
        emb = F.silu(emb)
        h = self.conv_in(x.to(self.conv_in.weight.dtype))
        hs = [h]
        if cache is not None and cache.get("reuse") and "deep" in cache and len(self.down) > 1:
            for block in self.down[0].blocks:
                h = block[0](h, emb)
                h = block[1](h) if len(block) > 1 else h
                hs.append(h)
            return self._decode_level0(cache["deep"], hs, emb)
        for stage in self.down:
            for block in stage.blocks:
                h = block[0](h, emb)
                if len(block) > 1:
                    h = block[1](h)
                hs.append(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
                h = stage.down_hook(h) if stage.down_hook.fns else h
                hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for stage in self.up[:-1]:
            for block in stage.blocks:
                h = block[0](torch.cat([h, hs.pop()], dim=1), emb)
                if len(block) > 1:
                    h = block[1](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
                h = stage.up_hook(h) if stage.up_hook.fns else h
        if cache is not None:
            cache["deep"] = h
        return self._decode_level0(h, hs, emb)

    def _decode_level0(self, h, hs, emb):
        """The full-resolution decoder blocks and the output head."""
        for block in self.up[-1].blocks:
            h = block[0](torch.cat([h, hs.pop()], dim=1), emb)
            if len(block) > 1:
                h = block[1](h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return self.out_hook(out) if self.out_hook.fns else out
