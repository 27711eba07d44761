"""Perturbed-attention guidance (Ahn et al. 2024): D + s (D − D_perturbed) in one forward call on a doubled batch,
on diffkit's UNet and DiT (hook points) and on diffusers models (attention processors), checked against the
perturbed model computed separately; hooks and processors are gone afterwards; CFG + PAG in one call."""

import pytest
import torch

import diffkit
from diffkit.guidance.pag import PAG, attention_layers
from diffkit.models import DiT, UNet
from diffkit.models.layers import SelfAttention

F64 = torch.float64
N = 3
SIGMA = 1.3


def _jitter(model, std=0.2):
    """Random-init models zero some layers (adaLN-Zero gates, zero-init projections): perturb every parameter
    so attention matters to the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model.to(F64).eval().requires_grad_(False)


def tiny_unet(**kw):
    torch.manual_seed(0)
    cfg = dict(image_size=8, channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
               groups=4, num_heads=2)
    return _jitter(UNet(**{**cfg, **kw}))


def tiny_dit():
    torch.manual_seed(0)
    return _jitter(DiT(image_size=8, patch_size=2, hidden=16, depth=3, num_heads=2))


def tiny_diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return _jitter(diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8), std=0.05)


def diffusers_denoiser(net):
    diffusers = pytest.importorskip("diffusers")
    return diffkit.Denoiser.from_diffusers(net, diffusers.DDIMScheduler())


def build(kind):
    """(denoiser, network called once per evaluation)."""
    if kind == "unet":
        net = tiny_unet()
        return diffkit.Denoiser(net, diffkit.VP.discrete("linear")), net
    if kind == "dit":
        net = tiny_dit()
        return diffkit.Denoiser(net, diffkit.EDM(), "edm"), net
    den = diffusers_denoiser(tiny_diffusers_unet())
    return den, den.model


def identity_mask_processor(original):
    """Reference perturbation for diffusers layers through diffusers' own processor: an additive attention mask
    that is 0 on the diagonal and -inf elsewhere makes softmax(QKᵀ/√d + M) the identity, so the output is V."""
    def proc(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        tokens = hidden_states.shape[-1] * hidden_states.shape[-2] if hidden_states.ndim == 4 else \
            hidden_states.shape[1]
        eye = torch.full((tokens, tokens), float("-inf"), dtype=hidden_states.dtype).fill_diagonal_(0.0)
        return original(attn, hidden_states, attention_mask=eye.expand(hidden_states.shape[0], -1, -1), temb=temb)
    return proc


def perturbed_reference(den, pag, x, sigma, **cond):
    """D_perturbed computed separately: diffkit layers via `model.hooks` (attention output := values), diffusers
    layers via an identity-mask processor."""
    net = pag.network
    if isinstance(net, (UNet, DiT)):
        with net.hooks({name: (lambda out, name, v: v) for name in pag.layers}):
            return den(x, sigma, **cond)
    mods = [pag.attention[name] for name in pag.layers]
    originals = [m.processor for m in mods]
    try:
        for m, p in zip(mods, originals):
            m.set_processor(identity_mask_processor(p))
        return den(x, sigma, **cond)
    finally:
        for m, p in zip(mods, originals):
            m.set_processor(p)


def record_calls(module):
    """Forward calls of `module`: a list of (args, kwargs, output)."""
    calls = []
    handle = module.register_forward_hook(lambda m, a, k, out: calls.append((a, k, out)), with_kwargs=True)
    return calls, handle


def installed(pag):
    """What PAG might leave behind: hook functions on diffkit attention layers, processors on diffusers ones."""
    return [(list(m.hook.fns) if isinstance(m, SelfAttention) else m.processor) for m in pag.attention.values()]


@pytest.mark.parametrize("kind", ["unet", "dit", "diffusers"])
def test_pag_equals_guidance_away_from_the_separately_perturbed_model(kind):
    den, net = build(kind)
    x = torch.randn(N, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(2))
    pag = PAG(den, 2.5)
    before_state, before = installed(pag), den(x, SIGMA)
    d, d_pert = den(x, SIGMA), perturbed_reference(den, pag, x, SIGMA)
    assert float((d - d_pert).abs().max()) > 1e-3  # the perturbation matters for this model
    calls, handle = record_calls(net)
    try:
        guided = pag(x, SIGMA)
    finally:
        handle.remove()
    assert torch.allclose(guided, d + 2.5 * (d - d_pert), rtol=0, atol=1e-6)
    # one forward call on the doubled batch; its first half is the plain model, its second the perturbed one
    assert len(calls) == 1 and calls[0][0][0].shape[0] == 2 * N
    args, kwargs, out = calls[0]
    plain = net(*(a[:N] for a in args), **kwargs)
    assert torch.allclose(out[:N], plain, rtol=0, atol=1e-10)
    assert pag.passes == {"normal": 1, "perturbed": 1}
    # nothing left behind: same hooks/processors, same output as before
    assert installed(pag) == before_state
    assert torch.equal(den(x, SIGMA), before)


@pytest.mark.parametrize("kind", ["unet", "diffusers"])
def test_scale_zero_is_the_plain_denoiser_in_one_pass(kind):
    den, net = build(kind)
    x = torch.randn(N, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    pag = PAG(den, 0.0)
    calls, handle = record_calls(net)
    try:
        out = pag(x, SIGMA)
    finally:
        handle.remove()
    assert torch.equal(out, den(x, SIGMA))
    assert len(calls) == 1 and calls[0][0][0].shape[0] == N and pag.passes == {"normal": 1}


def test_scale_as_a_function_of_sigma_and_per_sample_sigma():
    den, _ = build("unet")
    x = torch.randn(N, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(4))
    pag = PAG(den, lambda s: 2 * torch.as_tensor(s))
    sig = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    d, d_pert = den(x, sig), perturbed_reference(den, pag, x, sig)
    assert torch.allclose(pag(x, sig), d + 2 * sig[:, None, None, None] * (d - d_pert), rtol=0, atol=1e-6)


def test_hooks_removed_on_error():
    den, net = build("unet")
    pag = PAG(den, 1.0)
    with pytest.raises(ValueError, match="shape"):
        pag(torch.zeros(N, 1, 4, 4, dtype=F64), SIGMA)
    assert all(not p.fns for p in net.hook_points().values())


def test_diffusers_processors_restored_on_error():
    den, _ = build("diffusers")
    pag = PAG(den, 1.0, layers="*")
    before = installed(pag)
    with pytest.raises(RuntimeError):
        pag(torch.zeros(N, 2, 8, 8, dtype=F64), SIGMA)  # wrong channel count fails inside the network
    assert installed(pag) == before


def test_default_and_chosen_layers():
    assert PAG(build("unet")[0], 1.0).layers == ["mid.attn"]
    assert PAG(build("dit")[0], 1.0).layers == ["blocks.1.attn"]
    den = build("diffusers")[0]
    assert PAG(den, 1.0).layers == ["mid_block.attentions.0"]
    assert PAG(den, 1.0, layers=["up_blocks.*"]).layers == ["up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]
    assert attention_layers(build("unet")[0]) == ["down.1.0.attn", "mid.attn", "up.1.0.attn", "up.1.1.attn"]


def test_cross_attention_unet_perturbs_self_attention_only():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    net = _jitter(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=4), std=0.05)
    den = diffusers_denoiser(net)
    assert not any(name.endswith("attn2") for name in attention_layers(den))
    pag = PAG(den, 1.5)
    assert pag.layers == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    x = torch.randn(N, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(5))
    emb = torch.randn(N, 4, 8, dtype=F64)
    d, d_pert = den(x, SIGMA, encoder_hidden_states=emb), perturbed_reference(den, pag, x, SIGMA,
                                                                              encoder_hidden_states=emb)
    assert float((d - d_pert).abs().max()) > 1e-4
    out = pag(x, SIGMA, encoder_hidden_states=emb)
    assert torch.allclose(out, d + 1.5 * (d - d_pert), rtol=0, atol=1e-6)


def test_diffusers_dit_with_class_labels():
    """A diffusers DiT (DiTTransformer2DModel): self-attention "attn1" of the middle transformer block."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    net = _jitter(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=3, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10), std=0.05)
    den = diffusers_denoiser(net)
    pag = PAG(den, 1.5)
    assert pag.layers == ["transformer_blocks.1.attn1"]
    x = torch.randn(N, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(9))
    labels = torch.tensor([1, 2, 3])
    d = den(x, SIGMA, class_labels=labels)
    d_pert = perturbed_reference(den, pag, x, SIGMA, class_labels=labels)
    assert float((d - d_pert).abs().max()) > 1e-3
    assert torch.allclose(pag(x, SIGMA, class_labels=labels), d + 1.5 * (d - d_pert), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["unet", "diffusers"])
def test_sampling_with_pag_respects_the_budget(kind):
    den, _ = build(kind)
    noise = torch.randn(2, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(6))
    pag = PAG(den, 2.0)
    with torch.no_grad():
        out, info = diffkit.sample(pag, noise, solver="heun", nfe=7, return_info=True)
    assert info["nfe"] <= 7 and torch.isfinite(out).all()
    assert pag.passes["normal"] == pag.passes["perturbed"] == info["nfe"]
    assert installed(pag) == installed(PAG(den, 2.0))


def test_cfg_scale_runs_cond_uncond_and_perturbed_in_one_call():
    """diffusers' PAG + CFG combination: D_u + w (D_c − D_u) + s (D_c − D_c,perturbed), three passes, one call."""
    net = tiny_unet(num_classes=3)
    den = diffkit.Denoiser(net, diffkit.VP.discrete("linear"))
    x = torch.randn(N, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(7))
    label = torch.tensor([0, 2, 1])
    pag = PAG(den, 1.5, cfg_scale=3.0)  # uncond from the class embedding: label -1
    d_c, d_u = den(x, SIGMA, label=label), den(x, SIGMA, label=torch.full((N,), -1))
    d_cp = perturbed_reference(den, pag, x, SIGMA, label=label)
    calls, handle = record_calls(net)
    try:
        out = pag(x, SIGMA, label=label)
    finally:
        handle.remove()
    assert torch.allclose(out, d_u + 3.0 * (d_c - d_u) + 1.5 * (d_c - d_cp), rtol=0, atol=1e-6)
    assert len(calls) == 1 and calls[0][0][0].shape[0] == 3 * N
    assert pag.passes == {"cond": 1, "uncond": 1, "perturbed": 1}
    # w = 1 is the conditional model: no unconditional pass
    assert torch.allclose(PAG(den, 1.5, cfg_scale=1.0)(x, SIGMA, label=label), d_c + 1.5 * (d_c - d_cp),
                          rtol=0, atol=1e-6)


def test_pag_over_cfg_composes_in_one_call():
    """PAG(CFG(D, w), s) = D_w + s (D_w − D_w,perturbed): CFG's tiling of PAG's doubled batch keeps the pattern."""
    cfg_module = pytest.importorskip("diffkit.guidance.cfg")
    net = tiny_unet(num_classes=3)
    den = diffkit.Denoiser(net, diffkit.VP.discrete("linear"))
    x = torch.randn(N, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(8))
    label = torch.tensor([1, 0, 2])
    cfg = cfg_module.CFG(den, 2.0)
    pag = PAG(cfg, 1.5)
    d_w = cfg(x, SIGMA, label=label)
    d_wp = perturbed_reference(cfg, pag, x, SIGMA, label=label)
    calls, handle = record_calls(net)
    try:
        out = pag(x, SIGMA, label=label)
    finally:
        handle.remove()
    assert torch.allclose(out, d_w + 1.5 * (d_w - d_wp), rtol=0, atol=1e-6)
    assert len(calls) == 1 and calls[0][0][0].shape[0] == 4 * N


def test_models_without_attention_are_refused():
    mlp = diffkit.Denoiser(diffkit.models.MLP(dim=2), diffkit.VP.discrete("linear"))
    with pytest.raises(ValueError, match="self-attention hook points.*MLP.*Denoiser.from_diffusers"):
        PAG(mlp, 1.0)
    with pytest.raises(ValueError, match="self-attention hook points"):
        PAG(lambda x, sigma: x, 1.0)


def test_layers_matching_nothing_are_refused():
    den = build("unet")[0]
    with pytest.raises(ValueError, match=r"\['nope\.\*'\].*valid attention layer names: down\.1\.0\.attn, mid\.attn"):
        PAG(den, 1.0, layers="nope.*")
    with pytest.raises(ValueError, match="match no self-attention layer"):
        PAG(den, 1.0, layers=["mid.attn", "mid.0"])  # a hook point that is not an attention layer


def test_cfg_scale_without_an_unconditional_path_is_refused():
    with pytest.raises(ValueError, match="uncond"):
        PAG(build("unet")[0], 1.0, cfg_scale=2.0)
