"""Models: shapes, conditioning with a null class, named hooks, config round trips and clear errors."""

import pytest
import torch
from helpers import single_threaded  # noqa: F401

from diffkit.models import MLP, DiT, UNet, build_model, count_parameters, model_config


def tiny_unet(**kw):
    cfg = dict(image_size=8, in_channels=1, channels=16, channel_mults=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,), num_heads=2, groups=8)
    cfg.update(kw)
    return UNet(**cfg)


def tiny_dit(**kw):
    cfg = dict(image_size=8, in_channels=1, patch_size=2, hidden=32, depth=2, num_heads=2)
    cfg.update(kw)
    return DiT(**cfg)


def _randomize(model):
    """Give the zero-initialised output layers weights so outputs depend on every input."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("make", [tiny_unet, tiny_dit])
def test_image_models_shapes_and_zero_init(make):
    model = make()
    x = torch.randn(3, 1, 8, 8)
    out = model(x, torch.tensor([0.0, 10.0, 500.0]))
    assert out.shape == x.shape
    assert torch.all(out == 0)  # zero-initialised output layer: the network starts at the zero prediction
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("make", [tiny_unet, tiny_dit, lambda **kw: MLP(dim=2, hidden=16, depth=2, **kw)])
def test_class_conditioning_and_null_class(make):
    model = _randomize(make(num_classes=3)).eval()
    x = torch.randn(4, 2) if isinstance(model, MLP) else torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 0.5)
    a = model(x, t, label=torch.tensor([0, 1, 2, 0]))
    assert not torch.allclose(a[0], model(x, t, label=torch.tensor([1, 1, 2, 0]))[0])
    null = model(x, t, label=torch.full((4,), 3))
    assert torch.allclose(null, model(x, t, label=None))            # None -> null class
    assert torch.allclose(null, model(x, t, label=torch.full((4,), -1)))  # negative -> null class
    with pytest.raises(ValueError, match="labels must be < 3"):
        model(x, t, label=torch.full((4,), 4))
    unconditional = make()
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, t, label=torch.zeros(4, dtype=torch.long))


def test_unet_hooks_replace_and_remove():
    model = _randomize(tiny_unet()).eval()
    names = model.hook_names()
    assert {"down.0.0", "down.1.0.attn", "mid.attn", "up.0.1", "out"} <= set(names)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 4.0])
    ref = model(x, t)
    seen = []
    handle = model.add_hook("up.*", lambda out, name, **info: seen.append((name, out.shape)))
    assert torch.equal(model(x, t), ref)  # observing hooks do not change the output
    assert [n for n, _ in seen] == [n for n in names if n.startswith("up.")]
    handle.remove()
    # perturbed attention: identity attention map = attention output replaced by the values
    with model.hooks({"mid.attn": lambda out, name, v: v}):
        pag = model(x, t)
    assert not torch.allclose(pag, ref)
    assert torch.equal(model(x, t), ref)  # the context manager removed the hook
    with pytest.raises(ValueError, match="no hook point matches 'nope'"):
        model.add_hook("nope", lambda out, **kw: None)
    with pytest.raises(ValueError, match="must return None or a tensor of shape"):
        with model.hooks({"out": lambda out, **kw: out[:1]}):
            model(x, t)


def test_dit_hooks_and_attention_values():
    model = _randomize(tiny_dit()).eval()
    assert model.hook_names() == ["blocks.0.attn", "blocks.0", "blocks.1.attn", "blocks.1", "out"]
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.1, 0.9])
    shapes = {}
    record = lambda out, name, **info: shapes.setdefault(name, (out.shape, sorted(info))) and None
    with model.hooks({"blocks.*": record}):
        model(x, t)
    assert shapes["blocks.0"] == (torch.Size([2, 16, 32]), [])
    assert shapes["blocks.0.attn"] == (torch.Size([2, 16, 32]), ["v"])


@pytest.mark.parametrize("make", [tiny_unet, tiny_dit, lambda: MLP(dim=3, hidden=8, depth=1, num_classes=2)])
def test_config_round_trip(make):
    model = make()
    cfg = model_config(model)
    clone = build_model(cfg)
    clone.load_state_dict(model.state_dict())
    assert model_config(clone) == cfg
    assert count_parameters(clone) == count_parameters(model)


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown model type 'resnet'; valid: unet, dit, mlp"):
        build_model({"type": "resnet"})
    with pytest.raises(ValueError, match="unknown unet config field"):
        build_model({"type": "unet", "widht": 3})
    with pytest.raises(ValueError, match="divisible"):
        UNet(image_size=10, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="expects input of shape"):
        tiny_unet()(torch.randn(2, 3, 8, 8), torch.zeros(2))


def test_unet_feature_cache_reuses_the_deep_path():
    """DeepCache-style reuse: a shallow pass with the deep feature of the same input equals the full pass, runs
    only the full-resolution blocks, and with another time step differs from the full pass."""
    model = _randomize(tiny_unet(channel_mults=(1, 2, 2), attention_resolutions=(4,), image_size=8)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 4.0])
    cache = {}
    full = model(x, t, cache=cache)
    assert torch.equal(full, model(x, t)) and cache["deep"].shape == (2, 32, 8, 8)
    ran = []
    with model.hooks({"*": lambda out, name, **kw: ran.append(name)}):
        shallow = model(x, t, cache={**cache, "reuse": True})
    torch.testing.assert_close(shallow, full)
    assert ran == ["down.0.0", "up.0.0", "up.0.1", "out"]
    assert not torch.allclose(model(x, t + 5, cache={**cache, "reuse": True}), model(x, t + 5))
