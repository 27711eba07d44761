"""Training: every loss is minimized by the exact denoiser of a testbed mixture, targets, noise levels,
weightings, immiscible assignment, interval clustering, EMA, learning-rate schedule, and a tiny model learns."""

import itertools
import math

import numpy as np
import pytest
import torch
from helpers import single_threaded  # noqa: F401

import diffkit
from diffkit.data import from_tensors, toy
from diffkit.models import MLP
from diffkit.testbeds import GaussianMixture
from diffkit.train import (
    EMA,
    DiffusionLoss,
    Draw,
    IntervalWeighting,
    TrainConfig,
    Trainer,
    immiscible_assignment,
    interval_clusters,
    loss_weight,
    lr_at,
    sample_noise_levels,
    sigma_rel_to_gamma,
)

F64 = torch.float64

# (process, prediction, loss options): every prediction type, noise-level sampler and weighting appears
CASES = {
    "vp_discrete_eps_uniform": (lambda: diffkit.VP.discrete("linear"), "eps", {}),
    "vp_cosine_v_minsnr": (lambda: diffkit.VP.continuous("cosine"), "v", {"weighting": "min_snr"}),
    "vp_linear_x0_snr": (lambda: diffkit.VP.continuous("linear"), "x0", {"weighting": "snr",
                                                                          "noise_levels": "lognormal"}),
    "flow_flow_logitnormal": (lambda: diffkit.Flow(), "flow", {"noise_levels": "logit_normal"}),
    "edm_edm_lognormal": (lambda: diffkit.EDM(), "edm", {"noise_levels": "lognormal"}),
    "edm_x0_edm_weight": (lambda: diffkit.EDM(), "x0", {"noise_levels": "lognormal", "weighting": "edm"}),
    "ve_score_uniform": (lambda: diffkit.VE(0.05, 5.0), "score", {}),
    "vp_linear_eps_x0": (lambda: diffkit.VP.continuous("linear"), "eps", {"weighting": "x0"}),
}


class Perturbed(torch.nn.Module):
    """exact(x, t) + θ_i g(x, t) with one θ per sample, so autograd gives per-sample derivatives at θ = 0."""

    def __init__(self, exact, n, bias=0.0):
        super().__init__()
        self.exact, self.bias = exact, bias
        self.theta = torch.nn.Parameter(torch.zeros(n, dtype=F64))

    def forward(self, x, t, **cond):
        g = torch.sin(3 * x) + 0.5
        return self.exact(x, t) + (self.theta[:, None] + self.bias) * g


@pytest.mark.parametrize("case", list(CASES))
def test_exact_denoiser_minimizes_loss(case):
    """d/dθ E[loss(exact + θ g)] at θ = 0 is zero within Monte-Carlo error for the exact network of the
    matching prediction type, and many standard errors away for a wrong network."""
    make, prediction, opts = CASES[case]
    process = make()
    mixture = GaussianMixture.ring()
    n = 20000
    g = torch.Generator().manual_seed(1)
    x0 = mixture.sample(n, generator=g, dtype=F64)
    loss = DiffusionLoss(process, prediction, **opts)
    draw = loss.draw(x0, g)

    def derivatives(model):
        per_sample, _ = loss.per_sample(model, x0, draw=draw)
        (grad,) = torch.autograd.grad(per_sample.sum(), model.theta)
        grad = grad.double()
        return grad.mean().item(), grad.std().item() / math.sqrt(n)

    mean, se = derivatives(Perturbed(mixture.model(process, prediction), n))
    assert abs(mean) < 4 * se, (mean, se)
    wrong, se_w = derivatives(Perturbed(mixture.model(process, prediction), n, bias=0.3))
    assert abs(wrong) > 10 * se_w, (wrong, se_w)


class Recorder(torch.nn.Module):
    def forward(self, x, t, **cond):
        self.x, self.t, self.cond = x, t, cond
        return torch.zeros_like(x)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow", "score"])
def test_targets_in_closed_form(prediction):
    """With a zero output the native-weighted loss is mean(target²): check the target of each prediction type."""
    process = diffkit.VP.continuous("cosine") if prediction != "flow" else diffkit.Flow()
    loss = DiffusionLoss(process, prediction)
    x0 = torch.randn(6, 4, dtype=F64)
    draw = Draw(torch.randn(6, 4, dtype=F64), torch.tensor([0.1, 0.5, 1.0, 2.0, 5.0, 20.0], dtype=F64))
    rec = Recorder()
    per_sample, sb = loss.per_sample(rec, x0, draw=draw)
    t = process.t_of_sigma_bar(sb)
    a, s, da, ds = (f(t)[:, None] for f in (process.alpha, process.sigma, process.d_alpha, process.d_sigma))
    eps = draw.eps
    target = {"eps": eps, "x0": x0, "v": a * eps - s * x0, "flow": da * x0 + ds * eps, "score": -eps / s}[prediction]
    torch.testing.assert_close(rec.x, a * x0 + s * eps)
    torch.testing.assert_close(rec.t, t)
    torch.testing.assert_close(per_sample.double(), target.pow(2).mean(1), rtol=1e-5, atol=1e-6)


def test_edm_loss_is_lambda_weighted_x0_loss():
    """EDM's F-loss equals λ(σ)||D - x0||² with λ = (σ²+σ_d²)/(σ σ_d)² (Karras et al. 2022, Eq. 8)."""
    process, sd = diffkit.EDM(), 0.5
    x0 = GaussianMixture.ring().sample(64, generator=torch.Generator().manual_seed(0), dtype=F64)
    edm = DiffusionLoss(process, "edm", noise_levels="lognormal")
    draw = edm.draw(x0, torch.Generator().manual_seed(1))

    def f_net(x_in, c_noise):  # the F-network whose denoiser is D = 0.3 everywhere
        sigma = (4 * c_noise).exp()[:, None]
        c_skip, c_out, c_in = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt(), \
            1 / (sigma**2 + sd**2).sqrt()
        return (0.3 - c_skip * x_in / c_in) / c_out

    a, _ = edm.per_sample(f_net, x0, draw=draw)
    x0_net = lambda x, t: torch.full_like(x, 0.3)
    b, _ = DiffusionLoss(process, "x0", noise_levels="lognormal", weighting="edm").per_sample(x0_net, x0, draw=draw)
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


def test_noise_level_samplers():
    g = torch.Generator().manual_seed(0)
    ln = sample_noise_levels("lognormal", diffkit.EDM(), 200000, g).log()
    assert abs(ln.mean() + 1.2) < 0.01 and abs(ln.std() - 1.2) < 0.01
    t = sample_noise_levels("logit_normal", diffkit.Flow(), 200000, g)
    logit = (t / (1 + t)).logit()
    assert abs(logit.mean()) < 0.01 and abs(logit.std() - 1) < 0.01
    vp = diffkit.VP.discrete("linear")
    sb = sample_noise_levels("uniform", vp, 5000, g)
    assert ((sb[:, None] / vp.sigma_bars[None] - 1).abs().min(1).values < 1e-10).all()  # integer timesteps
    assert len(torch.unique(sb)) > 900
    with pytest.raises(ValueError, match="unknown noise-level sampler 'beta'"):
        sample_noise_levels("beta", vp, 3, g)


def test_loss_weights():
    sb = torch.tensor([0.1, 0.5, 2.0], dtype=F64)
    c_eps = -sb
    torch.testing.assert_close(loss_weight("min_snr", sb, c_eps, gamma=5.0), (1 / sb**2).clamp(max=5) * sb**2)
    torch.testing.assert_close(loss_weight("snr", sb, c_eps), torch.ones(3, dtype=F64))
    sd = 0.5
    c_out_edm = sb * sd / (sb**2 + sd**2).sqrt()
    torch.testing.assert_close(loss_weight("edm", sb, c_out_edm, sigma_data=sd), torch.ones(3, dtype=F64))
    torch.testing.assert_close(loss_weight(lambda s: 2 * s, sb, c_eps), 2 * sb**3)
    with pytest.raises(ValueError, match="unknown loss weighting"):
        DiffusionLoss(diffkit.EDM(), "eps", weighting="p2")


def test_immiscible_assignment_is_optimal_permutation():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    out = immiscible_assignment(x0, eps)
    assert sorted(map(tuple, out.tolist())) == sorted(map(tuple, eps.tolist()))
    best = min(sum(float((x0[i] - eps[p[i]]).pow(2).sum()) for i in range(7))
               for p in itertools.permutations(range(7)))
    assert float((x0 - out).pow(2).sum()) == pytest.approx(best, rel=1e-6)
    loss = DiffusionLoss(diffkit.Flow(), "flow", immiscible=True)
    d = loss.draw(x0, g)
    torch.testing.assert_close(immiscible_assignment(x0, d.eps), d.eps)  # drawn noise is already assigned


def test_label_dropout_uses_null_label():
    loss = DiffusionLoss(diffkit.Flow(), "flow", label_dropout=0.3)
    x0 = torch.randn(4000, 2)
    rec = Recorder()
    loss(rec, x0, {"label": torch.ones(4000, dtype=torch.long)}, generator=torch.Generator().manual_seed(0))
    frac = (rec.cond["label"] == -1).float().mean()
    assert abs(frac - 0.3) < 0.03 and set(rec.cond["label"].tolist()) == {-1, 1}


def test_interval_clusters_snr_is_optimal():
    process = diffkit.VP.continuous("linear")
    grid, k = 24, 3
    edges = interval_clusters(process, k, "snr", grid=grid)
    assert edges.shape == (k - 1,) and (edges[1:] > edges[:-1]).all()
    t = torch.linspace(process.t_min, process.t_max, grid, dtype=F64)
    v = (-2 * process.sigma_bar(t).log()).numpy()
    cost = lambda parts: sum(((p - p.mean()) ** 2).sum() for p in parts)
    best = min(itertools.combinations(range(1, grid), k - 1), key=lambda c: cost(np.split(v, c)))
    got = np.searchsorted(process.sigma_bar(t).numpy(), edges.numpy())
    assert cost(np.split(v, got)) == pytest.approx(cost(np.split(v, best)))
    uniform = interval_clusters(process, 4, "timestep")
    torch.testing.assert_close(process.t_of_sigma_bar(uniform), torch.tensor([0.25075, 0.5005, 0.75025], dtype=F64))


def test_interval_weighting():
    w = IntervalWeighting(torch.tensor([1.0, 10.0]), method="equal")
    per = torch.tensor([1.0, 3.0, 10.0, 100.0])
    sb = torch.tensor([0.5, 0.5, 5.0, 50.0], dtype=F64)
    assert float(w(per, sb)) == pytest.approx((2.0 + 10.0 + 100.0) / 3)
    u = IntervalWeighting(torch.tensor([1.0, 10.0]))
    assert float(u(per, sb).detach()) == pytest.approx((2.0 + 10.0 + 100.0) / 3)  # log-variances start at 0
    u(per, sb).backward()
    assert u.log_vars.grad is not None and u.log_vars.grad[2] < 0  # high-loss interval: variance grows


def test_ema_fixed_and_power():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(model, 0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
        start = float(ema.module.weight)
    ema.update(model)
    assert float(ema.module.weight) == pytest.approx(0.9 * start + 0.1)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # Karras et al. 2024, Sec. 3.1
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    p = EMA(model, gamma=6.94)
    assert p.current_decay() == 0.0  # t = 1: the average starts at the weights
    p.update(model)
    assert p.current_decay() == pytest.approx(0.5 ** 7.94)
    with pytest.raises(ValueError, match="give one of"):
        EMA(model, 0.9, gamma=1.0)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, lr_schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.5)
    assert lr_at(100, cfg) == pytest.approx(0.0)


def test_tiny_model_loss_falls_on_toy_data(tmp_path):
    torch.manual_seed(0)
    data = toy("moons", 2000)
    model = MLP(dim=2, hidden=64, depth=2, time_scale=1000)
    loss = DiffusionLoss(diffkit.Flow(), "flow", noise_levels="logit_normal")
    cfg = TrainConfig(steps=200, batch_size=128, lr=3e-3, log_every=1, progress=False, checkpoint_every=0,
                      sample_every=200, sample_count=32, sample_nfe=6, eval_every=100)
    trainer = Trainer(model, loss, data, cfg, out_dir=tmp_path, eval_fn=lambda tr: {"step_seen": tr.step})
    records = trainer.train()
    hist = [r["loss"] for r in records if "loss" in r]
    assert [r["eval"] for r in records if "eval" in r] == [{"step_seen": 100}, {"step_seen": 200}]
    assert np.mean(hist[-30:]) < 0.88 * np.mean(hist[:10])
    assert (tmp_path / "samples" / "step_00000200.png").exists()
    assert (tmp_path / "checkpoints" / "ckpt-00000200.json").exists()  # final checkpoint


def test_trainer_errors():
    data = from_tensors(torch.randn(10, 2))
    cond_model = MLP(dim=2, hidden=8, depth=1, num_classes=3)
    with pytest.raises(ValueError, match="needs a labelled dataset"):
        Trainer(cond_model, DiffusionLoss(diffkit.Flow(), "flow"), data, TrainConfig(progress=False))
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        TrainConfig(lr_schedule="step")


def test_presets_build_and_entry_point(tmp_path, capsys):
    from diffkit.train.__main__ import main
    from diffkit.train.presets import build, presets

    assert {"digits", "digits8", "moons", "ring"} <= set(presets)
    trainer = build("moons", out_dir=tmp_path / "m", overrides={"steps": 3, "progress": False, "sample_every": 0})
    trainer.train()
    assert trainer.step == 3 and trainer.config()["model"]["type"] == "mlp"
    assert main(["--list"]) == 0 and "digits" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown preset 'cifar'"):
        build("cifar")
    assert main(["--preset", "ring", "--out", str(tmp_path / "r"), "--steps", "2", "--no-progress"]) == 0
    assert (tmp_path / "r" / "model" / "config.json").exists() and (tmp_path / "r" / "samples" / "final.png").exists()


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_dit_trains_on_digits_with_and_without_bf16(amp):
    from diffkit.data import digits
    from diffkit.models import DiT

    model = DiT(image_size=8, in_channels=1, patch_size=2, hidden=32, depth=1, num_heads=2, num_classes=10,
                time_scale=250)
    loss = DiffusionLoss(diffkit.EDM(), "edm", noise_levels="lognormal", label_dropout=0.1)
    trainer = Trainer(model, loss, digits(8), TrainConfig(steps=2, batch_size=8, progress=False, amp=amp,
                                                          checkpoint_every=0, ema_gamma=6.94))
    assert trainer.amp == (amp == "bf16")
    losses = [trainer.train_step() for _ in range(2)]
    assert all(math.isfinite(v) for v in losses)


def test_trainer_learns_interval_weights():
    process = diffkit.EDM()
    weighting = IntervalWeighting(interval_clusters(process, 3, "snr"))
    loss = DiffusionLoss(process, "edm", noise_levels="lognormal", intervals=weighting)
    model = MLP(dim=2, hidden=16, depth=1, time_scale=250)
    trainer = Trainer(model, loss, toy("rings", 500), TrainConfig(steps=5, batch_size=64, lr=1e-2, progress=False,
                                                                  checkpoint_every=0))
    trainer.train()
    assert weighting.log_vars.abs().sum() > 0  # the task log-variances are trained with the network
    assert loss.config()["intervals"]["method"] == "uncertainty"
