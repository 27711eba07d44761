"""Perturbed-attention guidance ("Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance", Ahn et al.
2024, Sec. 4, Eqs. 8–10): guide away from the same model with chosen self-attention maps replaced by the identity,

    D_guided = D + s (D − D_perturbed),

where in D_perturbed the attention softmax(QKᵀ/√d) V of the chosen layers is replaced by I V = V (the layer's
output becomes its output projection of the values). The rule is stated for ε in the paper; D is affine in ε with
the same coefficients for both passes, so it is the same rule for D.

Both passes run in one forward call on a doubled batch [x; x]: the perturbation is installed for the duration of
the call and touches only the second half of the batch (rows are matched modulo PAG's own batch, so a wrapped
denoiser that tiles the batch, as `batched_call` does for CFG, keeps the pattern). It reaches inside

- diffkit's UNet and DiT through the hook points of their `SelfAttention` layers (hooks receive ``v``);
- diffusers models (UNet2DModel, UNet2DConditionModel, DiT/Transformer2DModel, ...) through the attention
  processors of their self-attention `Attention` modules, swapped for the call and restored afterwards.

Layers are chosen by glob patterns on `attention_layers(denoiser)`; the default takes the middle-block ("mid*")
attention layers, the paper's best choice for U-Nets, else the middle attention layer in order (e.g. DiT block
depth // 2). With `cfg_scale` the three passes of PAG + CFG (cond, uncond, cond perturbed) share one call.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..models.from_diffusers import DiffusersNetwork
from ..models.layers import SelfAttention
from ..solvers.base import evaluate
from .base import GuidedDenoiser, batched_call, scale_at
from .cfg import null_cond

Tensor = torch.Tensor

__all__ = ["PAG", "attention_layers", "find_network"]

_NO_ATTENTION = ("PAG needs self-attention hook points; {what} has none. Get them from a diffkit UNet (with "
                 "attention_resolutions) or DiT wrapped in diffkit.Denoiser(model, process, prediction), or from a "
                 "diffusers model with self-attention Attention modules wrapped with "
                 "diffkit.Denoiser.from_diffusers(net, scheduler)")


def find_network(denoiser, max_depth: int = 16) -> nn.Module | None:
    """The network under a denoiser: follows `.model` and `.denoiser` of wrapped denoisers (guidance transforms,
    call counters, `Denoiser`) to the first `nn.Module`; a diffusers adapter gives the diffusers model itself."""
    obj = denoiser
    for _ in range(max_depth):
        if isinstance(obj, DiffusersNetwork):
            return obj.net
        if isinstance(obj, nn.Module):
            return obj
        nxt = getattr(obj, "model", None)
        obj = nxt if nxt is not None else getattr(obj, "denoiser", None)
        if obj is None:
            return None
    return None


def _is_diffusers_self_attention(module: nn.Module) -> bool:
    """A diffusers `Attention`-like module (settable processor, value and output projections) that attends to its
    own tokens: not cross-attention, no added key/value context (joint attention)."""
    return (hasattr(module, "set_processor") and hasattr(module, "processor") and hasattr(module, "to_v")
            and hasattr(module, "to_out") and not getattr(module, "is_cross_attention", False)
            and getattr(module, "added_kv_proj_dim", None) is None)


def _attention_modules(network: nn.Module) -> dict[str, nn.Module]:
    """Name -> self-attention module: diffkit `SelfAttention` layers by their hook-point name, diffusers
    self-attention modules by their module name."""
    found = {}
    for name, module in network.named_modules():
        if isinstance(module, SelfAttention):
            found[module.hook.name] = module
        elif _is_diffusers_self_attention(module):
            found[name] = module
    return found


def attention_layers(denoiser) -> list[str]:
    """Names of the self-attention layers PAG can perturb (the names `layers=` patterns match)."""
    network = find_network(denoiser)
    return [] if network is None else list(_attention_modules(network))


def default_layers(names: Sequence[str]) -> list[str]:
    """Ahn et al. 2024 (Sec. 5, layer ablation): the middle block's self-attention works best on U-Nets. Layers
    whose first name component starts with "mid" (diffkit "mid.attn", diffusers "mid_block..."), else the middle
    attention layer in order (e.g. "blocks.{depth // 2}.attn" of a DiT)."""
    mid = [n for n in names if n.split(".")[0].startswith("mid")]
    return mid or [names[len(names) // 2]]


def select_layers(names: Sequence[str], layers: str | Sequence[str] | None) -> list[str]:
    """The attention layers matching any of the glob patterns `layers` (None: `default_layers`); every pattern
    must match at least one layer."""
    if layers is None:
        return default_layers(names)
    patterns = [layers] if isinstance(layers, str) else list(layers)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched or not patterns:
        raise ValueError(f"PAG layers {unmatched or patterns} match no self-attention layer; valid attention layer "
                         f"names: {', '.join(names)}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def identity_attention(attn: nn.Module, x: Tensor, temb: Tensor | None = None) -> Tensor:
    """A diffusers self-attention layer with its attention map replaced by the identity (Ahn et al. 2024, Eq. 9:
    softmax(QKᵀ/√d) V -> I V): output projection of the value projection, with the layer's own input
    normalisations, 4-D token layout, residual connection and output rescaling."""
    residual = x
    if getattr(attn, "spatial_norm", None) is not None:
        x = attn.spatial_norm(x, temb)
    image_shape = x.shape if x.ndim == 4 else None
    if image_shape is not None:
        x = x.flatten(2).transpose(1, 2)
    if getattr(attn, "group_norm", None) is not None:
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    out = attn.to_v(x)
    for layer in attn.to_out:
        out = layer(out)
    if image_shape is not None:
        out = out.transpose(1, 2).reshape(image_shape[0], -1, *image_shape[2:])
    if getattr(attn, "residual_connection", False):
        out = out + residual
    return out / getattr(attn, "rescale_output_factor", 1.0)


def _take(value, index: Tensor, batch: int):
    """Rows `index` of a batch-first tensor argument; anything else unchanged."""
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value.index_select(0, index)
    return value


class PerturbedAttentionProcessor:
    """diffusers attention processor for PAG (Ahn et al. 2024, Eq. 9): rows `rows(batch)` get the identity map
    (`identity_attention`), the others the original processor's attention. diffusers passes a processor only the
    keyword arguments its `__call__` signature names, so this one presents the original's signature."""

    def __init__(self, original, rows: Callable[[int, torch.device], Tensor]):
        self.original, self.rows = original, rows

        def call(*args, **kwargs):
            return type(self).__call__(self, *args, **kwargs)

        call.__signature__ = inspect.signature(original.__call__)
        self.__call__ = call  # what diffusers inspects; calling the processor uses the class's __call__

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("PAG perturbs self-attention only; a chosen layer received encoder_hidden_states "
                             "(choose self-attention layers with layers=)")
        batch = hidden_states.shape[0]
        perturbed = self.rows(batch, hidden_states.device)
        keep, swap = (~perturbed).nonzero().squeeze(1), perturbed.nonzero().squeeze(1)
        ident = identity_attention(attn, hidden_states.index_select(0, swap), _take(kwargs.get("temb"), swap, batch))
        if len(keep) == 0:
            return ident
        kept = {k: _take(v, keep, batch) for k, v in kwargs.items()}
        normal = self.original(attn, hidden_states.index_select(0, keep), encoder_hidden_states=None,
                               attention_mask=_take(attention_mask, keep, batch), **kept)
        out = normal.new_empty((batch, *normal.shape[1:]))
        out[keep], out[swap] = normal, ident.to(normal.dtype)
        return out


class PAG(GuidedDenoiser):
    """Perturbed-attention guidance (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with Perturbed-Attention
    Guidance", Eq. 10): D + s (D − D_perturbed), s = `scale` (a number or a function of σ̄), the chosen
    self-attention maps replaced by the identity in D_perturbed (see the module docstring); both passes in one call.

    `layers`: glob pattern(s) over `attention_layers(denoiser)`; None takes the middle-block attention.
    `cfg_scale` w (number or function of σ̄) adds classifier-free guidance in the same call, as diffusers' PAG
    pipelines combine them: D_u + w (D_c − D_u) + s (D_c − D_c,perturbed) (Ho & Salimans 2022, "Classifier-Free
    Diffusion Guidance", Eq. 6, in the w-weights-the-difference convention: w = 1 is the conditional model);
    `uncond` gives the unconditional conditioning (keys it omits keep the call's values), e.g. {"label": -1} for
    diffkit's null class or {"encoder_hidden_states": empty_prompt}; default: the `null_cond` a wrapped denoiser
    or network carries (testbed networks do), or label -1 for a diffkit model with a class embedding.

    Passes are counted as "normal"/"perturbed", or "cond"/"uncond"/"perturbed" with CFG; a pass whose weight is
    zero (s = 0, w = 1) is skipped.

    Composition: PAG over another guidance transform (e.g. PAG(CFG(den, w), s)) perturbs the second half of the
    batch it hands on, so it guides the inner guided D with the inner guidance's perturbed D: D_w + s (D_w −
    D_w,perturbed), four passes in one call when the inner method batches its passes with `batched_call`. The
    `cfg_scale` option is diffusers' three-pass combination instead.
    """

    def __init__(self, denoiser, scale: float | Callable, *, layers: str | Sequence[str] | None = None,
                 cfg_scale: float | Callable | None = None, uncond: dict | None = None):
        super().__init__(denoiser)
        if uncond is None and cfg_scale is not None:
            uncond = null_cond(denoiser)  # ValueError when the model has no unconditional path
        if cfg_scale is not None and uncond is None:  # pragma: no cover - null_cond raises first
            raise ValueError("PAG with cfg_scale needs uncond=, the unconditional conditioning (e.g. {'label': -1} "
                             "for diffkit's null class, {'encoder_hidden_states': empty_prompt} for diffusers)")
        self.scale, self.cfg_scale, self.uncond = scale, cfg_scale, dict(uncond or {})
        self.network = find_network(denoiser)
        if self.network is None:
            raise ValueError(_NO_ATTENTION.format(what=f"a {type(denoiser).__name__} without an nn.Module network"))
        self.attention = _attention_modules(self.network)
        if not self.attention:
            raise ValueError(_NO_ATTENTION.format(what=f"the network {type(self.network).__name__}"))
        self.layers = select_layers(list(self.attention), layers)
        self._perturbed: Tensor | None = None

    def _rows(self, batch: int, device) -> Tensor:
        """Which rows of a batch reaching a perturbed layer get the identity map: PAG's own row pattern, repeated
        when a wrapped denoiser tiled the batch."""
        pattern = self._perturbed
        if batch % len(pattern):
            raise RuntimeError(f"PAG called the model with {len(pattern)} rows but a perturbed attention layer saw "
                               f"{batch}; denoisers under PAG must pass the batch on whole or tiled")
        return pattern.to(device).repeat(batch // len(pattern))

    def _hook(self, out: Tensor, name: str, v: Tensor | None = None, **info) -> Tensor:
        """diffkit hook: attention output := values on the perturbed rows (Ahn et al. 2024, Eq. 9)."""
        rows = self._rows(out.shape[0], out.device)
        return torch.where(rows.reshape(-1, *([1] * (out.ndim - 1))), v, out)

    @contextmanager
    def perturbation(self, pattern: Tensor):
        """Install the perturbation on the chosen layers for rows `pattern` (bool, one per row of the call);
        restore hooks and processors afterwards, also on error."""
        points, swapped = [], []
        self._perturbed = pattern
        try:
            for name in self.layers:
                module = self.attention[name]
                if isinstance(module, SelfAttention):
                    module.hook.fns.append(self._hook)
                    points.append(module.hook)
                else:
                    swapped.append((module, module.processor))
                    module.set_processor(PerturbedAttentionProcessor(module.processor, self._rows))
            yield
        finally:
            for point in points:
                point.fns.remove(self._hook)
            for module, processor in reversed(swapped):
                module.set_processor(processor)
            self._perturbed = None

    def _passes(self, sigma, cond: dict) -> tuple[list[str], list[dict], object, object]:
        """The passes this evaluation needs (kinds, conditionings) and the scales s, w at σ̄."""
        s = scale_at(self.scale, sigma)
        w = None if self.cfg_scale is None else scale_at(self.cfg_scale, sigma)
        kinds, conds = ["normal" if w is None else "cond"], [cond]
        if w is not None and not _equals(w, 1.0):
            kinds.append("uncond")
            conds.append({**cond, **self.uncond})
        if not _equals(s, 0.0):
            kinds.append("perturbed")
            conds.append(cond)
        return kinds, conds, s, w

    def denoise_at(self, x: Tensor, sigma, **cond) -> tuple[Tensor, Tensor]:
        """Ahn et al. 2024, Eq. 10 (with CFG: D_u + w (D_c − D_u) + s (D_c − D_c,perturbed)), all passes in one
        call of the wrapped denoiser; the state it moves to (if any) is taken from the first pass."""
        kinds, conds, s, w = self._passes(sigma, cond)
        moved = {}

        def inner(xs, sig, **c):
            moved["x"], d = evaluate(self.denoiser, xs, sig, c)
            return d

        n = x.shape[0]
        if kinds[-1] == "perturbed":
            pattern = torch.arange(n * len(kinds), device=x.device) >= n * (len(kinds) - 1)
            with self.perturbation(pattern):
                outs = dict(zip(kinds, batched_call(inner, x, sigma, conds)))
        else:
            outs = dict(zip(kinds, batched_call(inner, x, sigma, conds)))
        self.passes.update(kinds)
        d = outs[kinds[0]]
        guided = d
        if "uncond" in outs:
            guided = outs["uncond"] + _per_sample(w, d) * (d - outs["uncond"])
        if "perturbed" in outs:
            guided = guided + _per_sample(s, d) * (d - outs["perturbed"])
        return moved["x"][:n], guided

    def __repr__(self):
        return f"PAG(scale={self.scale!r}, layers={self.layers}, cfg_scale={self.cfg_scale!r}, {self.denoiser!r})"


def _equals(scale, value: float) -> bool:
    """A scale given as a number (not a per-sample tensor) equal to `value`: its pass can be skipped."""
    return isinstance(scale, (int, float)) and scale == value


def _per_sample(scale, ref: Tensor):
    """A scalar scale as is; a tensor of shape () or (batch,) shaped to broadcast against `ref`."""
    if not isinstance(scale, Tensor):
        return scale
    scale = scale.to(device=ref.device, dtype=ref.dtype)
    return scale.reshape(scale.shape + (1,) * (ref.ndim - scale.ndim)) if scale.ndim else scale
