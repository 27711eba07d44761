"""Named hook points inside diffkit's networks.

Every attention layer and every block of the built-in models passes its output through a `HookPoint` with a
stable name (``"down.1.0"``, ``"mid.attn"``, ``"blocks.3"`` ...). Functions registered on a hook point see the
output (and, for attention, the value vectors) and may return a replacement, which is how perturbed-attention
guidance ("Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance", Ahn et al. 2024: replace the
self-attention map by the identity, i.e. the attention output by the values) and feature caching ("DeepCache:
Accelerating Diffusion Models for Free", Ma et al. 2023: reuse high-level up-block features) reach inside a
model without patching it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["HookPoint", "Hookable", "HookHandle"]

HookFn = Callable[..., "torch.Tensor | None"]


class HookPoint(nn.Module):
    """Identity module with a name; `fn(output, name=..., **info)` hooks may return a replacement output."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fns: list[HookFn] = []

    def forward(self, x: torch.Tensor, **info) -> torch.Tensor:
        for fn in self.fns:
            y = fn(x, name=self.name, **info)
            if y is not None:
                if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                    raise ValueError(f"hook on {self.name!r} must return None or a tensor of shape "
                                     f"{tuple(x.shape)}; got {getattr(y, 'shape', type(y).__name__)}")
                x = y
        return x

    def extra_repr(self) -> str:
        return repr(self.name)


class HookHandle:
    """Removes the hooks registered by one `Hookable.add_hook` call."""

    def __init__(self, entries: list[tuple[HookPoint, HookFn]]):
        self.entries = entries

    def remove(self) -> None:
        for point, fn in self.entries:
            if fn in point.fns:
                point.fns.remove(fn)
        self.entries = []


class Hookable:
    """Mixin for `nn.Module`s built with `HookPoint`s: list, add and temporarily install named hooks."""

    def hook_points(self) -> dict[str, HookPoint]:
        """Name -> hook point, in forward order."""
        return {m.name: m for m in self.modules() if isinstance(m, HookPoint)}  # type: ignore[attr-defined]

    def hook_names(self) -> list[str]:
        """Names accepted by `add_hook` (glob patterns such as ``"up.*"`` select several)."""
        return list(self.hook_points())

    def add_hook(self, pattern: str, fn: HookFn) -> HookHandle:
        """Register `fn(output, name=..., **info) -> Tensor | None` on every hook point matching `pattern`."""
        points = self.hook_points()
        chosen = [p for n, p in points.items() if fnmatch.fnmatchcase(n, pattern)]
        if not chosen:
            raise ValueError(f"no hook point matches {pattern!r}; valid names: {', '.join(points)}")
        for p in chosen:
            p.fns.append(fn)
        return HookHandle([(p, fn) for p in chosen])

    def clear_hooks(self) -> None:
        """Remove every registered hook."""
        for p in self.hook_points().values():
            p.fns.clear()

    @contextmanager
    def hooks(self, mapping: dict[str, HookFn]) -> Iterator[None]:
        """Install {pattern: fn} hooks for the duration of a `with` block."""
        handles = []
        try:
            for pattern, fn in mapping.items():
                handles.append(self.add_hook(pattern, fn))
            yield
        finally:
            for h in handles:
                h.remove()
