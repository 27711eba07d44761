"""The library on a CUDA device: every solver, the denoiser's conversions, guidance, calibration, training and the
command line keep the device (and dtype) of their inputs and agree with the CPU. Skipped where torch sees no GPU
(CI runs on CPU); run on a GPU machine with `pytest tests/test_cuda.py`."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch

import diffkit
from diffkit import EDM, VP, Denoiser, Flow
from diffkit.models import MLP
from diffkit.solvers import get_solver

# DIFFKIT_TEST_DEVICE=cpu runs the module on the CPU against itself (a check of the tests, not of a device)
CUDA = torch.device(os.environ.get("DIFFKIT_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")
DIM = 4
DETERMINISTIC = [s for s in diffkit.solvers() if not get_solver(s).stochastic]
STOCHASTIC = [s for s in diffkit.solvers() if get_solver(s).stochastic]
PROCESSES = {"edm": EDM, "vp_discrete": lambda: VP.discrete("scaled_linear"), "flow": Flow}


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 matmuls would make the GPU differ from the CPU by ~1e-3 for reasons unrelated to the library."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def net_pair(num_classes: int = 0, time_scale: float = 1.0) -> tuple[MLP, MLP]:
    """The same small MLP on the CPU and on the GPU (eval mode: no dropout)."""
    torch.manual_seed(0)
    cpu = MLP(dim=DIM, hidden=32, depth=2, num_classes=num_classes, time_scale=time_scale).eval()
    return cpu, copy.deepcopy(cpu).to(CUDA)


def den_pair(process: str = "edm", prediction: str = "eps", num_classes: int = 0) -> tuple[Denoiser, Denoiser]:
    proc = PROCESSES[process]()
    cpu, gpu = net_pair(num_classes, time_scale=1e-3 if process == "vp_discrete" else 1.0)
    return Denoiser(cpu, proc, prediction), Denoiser(gpu, proc, prediction)


def close(gpu: torch.Tensor, cpu: torch.Tensor, rtol: float = 2e-4):
    """GPU result on the GPU, same dtype, equal to the CPU result up to float32 rounding (relative to its scale,
    absolute below 1)."""
    assert gpu.device.type == CUDA.type
    assert gpu.dtype == cpu.dtype
    assert torch.isfinite(gpu).all()
    scale = max(float(cpu.abs().max()), 1.0)  # absolute near 0 (an untrained x0-network's outputs are ~1e-3)
    err = float((gpu.cpu() - cpu).abs().max()) / scale
    assert err < rtol, f"GPU and CPU differ by {err:.2e} (relative to max |x| = {scale:.3g})"


@pytest.mark.parametrize("solver", DETERMINISTIC)
@torch.no_grad()
def test_deterministic_solver_on_gpu_matches_cpu(solver):
    den_c, den_g = den_pair()
    noise = torch.randn(64, DIM, generator=torch.Generator().manual_seed(1))
    nfe = max(12, get_solver(solver).min_nfe)
    x_c, info_c = diffkit.sample(den_c, noise, solver=solver, nfe=nfe, return_info=True)
    x_g, info_g = diffkit.sample(den_g, noise.to(CUDA), solver=solver, nfe=nfe, return_info=True)
    close(x_g, x_c, rtol=1e-3 if get_solver(solver).adaptive else 2e-4)
    assert info_g["nfe"] == info_c["nfe"] <= nfe


@pytest.mark.parametrize("process", sorted(PROCESSES))
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
@torch.no_grad()
def test_default_sampler_every_process_and_prediction_on_gpu(process, prediction):
    den_c, den_g = den_pair(process, prediction)
    noise = torch.randn(32, DIM, generator=torch.Generator().manual_seed(2))
    close(diffkit.sample(den_g, noise.to(CUDA), nfe=8), diffkit.sample(den_c, noise, nfe=8))


def ring_denoiser() -> Denoiser:
    """The exact ring testbed under EDM (a stochastic sampler needs a sensible score; an untrained network's can
    make Langevin correctors diverge)."""
    from diffkit.testbeds import GaussianMixture

    return GaussianMixture.ring().denoiser(EDM(), "eps")


@pytest.mark.parametrize("solver", STOCHASTIC)
@torch.no_grad()
def test_stochastic_solver_on_gpu_with_a_cuda_generator(solver):
    """A CUDA generator drives the noise on the GPU; the same seed gives the same samples."""
    den = ring_denoiser()
    noise = torch.randn(64, 2, device=CUDA, dtype=torch.float64, generator=torch.Generator(CUDA).manual_seed(3))
    nfe = max(12, get_solver(solver).min_nfe)
    runs = [diffkit.sample(den, noise, solver=solver, nfe=nfe, generator=torch.Generator(CUDA).manual_seed(4))
            for _ in range(2)]
    assert runs[0].device.type == CUDA.type and torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("solver", STOCHASTIC)
@torch.no_grad()
def test_stochastic_solver_per_sample_seeds_match_cpu(solver):
    """`seeds=` draws every sample's noise from its own CPU generator: the GPU run reproduces the CPU run."""
    den = ring_denoiser()
    noise = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    seeds = list(range(16))
    nfe = max(10, get_solver(solver).min_nfe)
    close(diffkit.sample(den, noise.to(CUDA), solver=solver, nfe=nfe, seeds=seeds),
          diffkit.sample(den, noise, solver=solver, nfe=nfe, seeds=seeds), rtol=1e-9)


@torch.no_grad()
def test_denoiser_keeps_device_and_dtype():
    den_c, den_g = den_pair("vp_discrete", "v")
    x = torch.randn(8, DIM, generator=torch.Generator().manual_seed(6))
    for sigma in (2.5, torch.full((8,), 2.5), torch.linspace(0.1, 10.0, 8)):
        s_g = sigma.to(CUDA) if isinstance(sigma, torch.Tensor) else sigma
        close(den_g(x.to(CUDA), s_g), den_c(x, sigma))
    den64 = Denoiser(copy.deepcopy(den_g.model).to(torch.float64), den_g.process, "v")
    assert den64(x.to(CUDA, torch.float64), 2.5).dtype == torch.float64


@torch.no_grad()
def test_exact_testbed_denoiser_on_gpu():
    """GaussianMixture's closed forms work on GPU inputs (its parameters follow the input's device)."""
    den = ring_denoiser()
    noise = torch.randn(128, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x_c = diffkit.sample(den, noise, nfe=10)
    x_g = diffkit.sample(den, noise.to(CUDA), nfe=10)
    close(x_g, x_c, rtol=1e-9)


@torch.no_grad()
def test_cfg_guidance_on_gpu_matches_cpu():
    from diffkit.guidance import CFG, CFGPlusPlus

    den_c, den_g = den_pair(num_classes=3)
    noise = torch.randn(30, DIM, generator=torch.Generator().manual_seed(8))
    labels = torch.arange(30) % 3
    for guide, arg in ((CFG, 2.5), (CFGPlusPlus, 0.5)):
        x_c = diffkit.sample(guide(den_c, arg), noise, solver="dpmpp_2m", nfe=10, cond={"label": labels})
        x_g = diffkit.sample(guide(den_g, arg), noise.to(CUDA), solver="dpmpp_2m", nfe=10,
                             cond={"label": labels.to(CUDA)})
        close(x_g, x_c)
        # labels left on the CPU are batched with the GPU state on its device
        close(diffkit.sample(guide(den_g, arg), noise.to(CUDA), solver="dpmpp_2m", nfe=10, cond={"label": labels}),
              x_c)


@torch.no_grad()
def test_exact_testbed_guidance_on_gpu():
    """The labelled ring's closed forms under CFG from GPU noise (labels on the GPU)."""
    den = ring_denoiser()
    noise = torch.randn(40, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    labels = torch.arange(40) % 8
    from diffkit.guidance import CFG

    x_c = diffkit.sample(CFG(den, 3.0), noise, nfe=10, cond={"label": labels})
    x_g = diffkit.sample(CFG(den, 3.0), noise.to(CUDA), nfe=10, cond={"label": labels.to(CUDA)})
    close(x_g, x_c, rtol=1e-9)


def test_sample_sharded_defaults_to_the_network_device():
    from diffkit.train import sample_sharded

    den_c, den_g = den_pair()
    x_g = sample_sharded(den_g, 12, (DIM,), solver="dpmpp_2m", nfe=8, batch_size=5)
    x_c = sample_sharded(den_c, 12, (DIM,), solver="dpmpp_2m", nfe=8, batch_size=5)
    close(x_g, x_c)


def test_calibrated_plan_on_gpu(tmp_path):
    """Calibration runs on GPU tensors (the optimiser differentiates through the GPU network), never does worse
    than its start, and its saved plan samples on either device with the same result."""
    den_c, den_g = den_pair()
    g = torch.Generator().manual_seed(9)
    noises, heldout = torch.randn(128, DIM, generator=g), torch.randn(64, DIM, generator=g)
    plan = diffkit.calibrate(den_g, 5, noises=noises.to(CUDA), heldout=heldout.to(CUDA), method="joint", budget=20)
    m = plan.metrics
    assert m["error"] <= m["start_error"] * (1 + 1e-6)
    path = plan.save(tmp_path / "plan.json")
    loaded = diffkit.SolverPlan.load(path)
    with torch.no_grad():
        x_g = diffkit.sample(den_g, heldout.to(CUDA), plan=loaded)
        x_c = diffkit.sample(den_c, heldout, plan=loaded)
    close(x_g, x_c)
    assert json.loads(Path(path).read_text())["nfe"] == 5
    assert all(isinstance(v, float) for v in loaded.sigmas)  # no device tensors leaked into the JSON


def test_chunked_calibration_on_gpu():
    """batch_size on the GPU: the chunked loss and gradient (with respect to the levels through the GPU network,
    and to the coefficients) equal the full-batch ones, and the plan agrees with the CPU's."""
    from diffkit.calibrate.fitting import Problem

    den_c, den_g = den_pair()
    g = torch.Generator().manual_seed(10)
    noises = torch.randn(40, DIM, generator=g)
    grads = {}
    for name, den, bs in (("full", den_g, None), ("chunked", den_g, 7), ("cpu", den_c, 7)):
        dev = CUDA if den is den_g else torch.device("cpu")
        x0 = den.process.noise_to_canonical(noises.to(dev), den.process.sigma_bar_max)
        spec, grid, opts, _ = diffkit.solvers.plan("dpmpp_2m", process=den.process, nfe=5)
        problem = Problem(den, x0, x0 * 0.01, None, spec.name, opts, [float(s) for s in grid], den.process,
                          batch_size=bs)
        tau, alpha, B = (v.clone().requires_grad_(True) for v in problem.base())
        loss = problem.loss(tau, alpha, B)
        loss.backward()
        grads[name] = [t.detach() for t in (loss, tau.grad, alpha.grad, B.grad)]
    for full, chunked, cpu in zip(grads["full"], grads["chunked"], grads["cpu"]):
        close(chunked, full.cpu())
        close(full, cpu)


def test_training_on_gpu_then_sampling_and_loading_on_cpu(tmp_path):
    """A few training steps on the GPU (bf16 autocast where supported), EMA, export; the exported model loads and
    samples on the CPU, and `Trainer.denoiser()` samples from CPU noise moved to its device."""
    from diffkit.checkpoint import load_denoiser
    from diffkit.data import toy
    from diffkit.train import DiffusionLoss, TrainConfig, Trainer

    data = toy("moons", 512)
    model = MLP(dim=2, hidden=32, depth=2, time_scale=1000)
    trainer = Trainer(model, DiffusionLoss(Flow(), "flow", noise_levels="logit_normal"), data,
                      TrainConfig(steps=20, batch_size=64, lr=2e-3, progress=False, checkpoint_every=10),
                      out_dir=tmp_path / "run", device=CUDA)
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.history)
    assert next(trainer.model.parameters()).device.type == CUDA.type
    den = trainer.denoiser()
    with torch.no_grad():
        x = diffkit.sample(den, torch.randn(100, 2, device=CUDA), nfe=8)
    assert x.device.type == CUDA.type and torch.isfinite(x).all()
    trainer.export(tmp_path / "export")
    den_cpu = load_denoiser(tmp_path / "export")
    with torch.no_grad():
        x_cpu = diffkit.sample(den_cpu, torch.randn(100, 2), nfe=8)
    assert x_cpu.device.type == "cpu" and torch.isfinite(x_cpu).all()


def test_training_resumes_on_gpu(tmp_path):
    """Resume from the newest checkpoint on the GPU: the run continues where it stopped."""
    from diffkit.data import toy
    from diffkit.train import DiffusionLoss, TrainConfig, Trainer

    data = toy("moons", 256)

    def make(steps):
        torch.manual_seed(0)
        return Trainer(MLP(dim=2, hidden=16, depth=1), DiffusionLoss(EDM(), "edm"), data,
                       TrainConfig(steps=steps, batch_size=32, progress=False, checkpoint_every=5, amp="none"),
                       out_dir=tmp_path / "run", device=CUDA)

    make(10).train()
    second = make(15)
    second.train()
    assert second.step == 15


def test_cli_sample_on_gpu(tmp_path):
    """`diffkit sample --device cuda` with the shipped digits model gives the CPU's samples (UNet convolutions:
    cuDNN and the CPU agree to float32 rounding, amplified a little by the solver)."""
    import numpy as np

    from diffkit.cli import main

    x = {}
    for device in ("cpu", CUDA.type):
        out = tmp_path / device
        assert main(["sample", "--n", "2", "--nfe", "6", "--device", device, "--out", str(out), "--seed", "3",
                     "--no-progress"]) == 0
        x[device] = np.load(out / "samples.npz")["x"]
        assert (out / "grid.png").is_file()
    assert x["cpu"].shape == x[CUDA.type].shape == (20, 1, 16, 16)
    assert np.abs(x["cpu"] - x[CUDA.type]).max() < 1e-3


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_image_models_train_in_bf16_and_sample_with_guidance_on_gpu(arch, tmp_path):
    """A few bf16-autocast training steps of a small UNet / DiT on the GPU, then CFG and (UNet) PAG sampling on
    the GPU; the exported model reloads on the CPU and reproduces the GPU samples."""
    from diffkit.checkpoint import load_denoiser
    from diffkit.data import from_tensors
    from diffkit.guidance import CFG, PAG
    from diffkit.models import DiT, UNet
    from diffkit.train import DiffusionLoss, TrainConfig, Trainer

    g = torch.Generator().manual_seed(11)
    data = from_tensors(torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, labels=torch.arange(64) % 4)
    if arch == "unet":
        model = UNet(image_size=8, in_channels=1, channels=16, channel_mults=(1, 2), num_res_blocks=1,
                     attention_resolutions=(4,), groups=8, num_classes=4)
    else:
        model = DiT(image_size=8, in_channels=1, patch_size=2, hidden=32, depth=2, num_heads=2, num_classes=4)
    amp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "none"
    trainer = Trainer(model, DiffusionLoss(EDM(), "edm", noise_levels="lognormal"), data,
                      TrainConfig(steps=4, batch_size=16, progress=False, amp=amp), out_dir=tmp_path / "run",
                      device=CUDA)
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.history if "loss" in h)
    den = trainer.denoiser()
    noise = torch.randn(8, 1, 8, 8, generator=g)
    labels = torch.arange(8) % 4
    with torch.no_grad():
        x = diffkit.sample(CFG(den, 2.0), noise.to(CUDA), nfe=6, cond={"label": labels.to(CUDA)})
        assert x.device.type == CUDA.type and torch.isfinite(x).all()
        if arch == "unet":
            pag = PAG(den, 1.5, cfg_scale=2.0)
            x_pag = diffkit.sample(pag, noise.to(CUDA), nfe=6, cond={"label": labels.to(CUDA)})
            assert torch.isfinite(x_pag).all() and not torch.allclose(x_pag, x)
    trainer.export(tmp_path / "export")
    den_cpu = load_denoiser(tmp_path / "export")
    with torch.no_grad():
        x_cpu = diffkit.sample(CFG(den_cpu, 2.0), noise, nfe=6, cond={"label": labels})
    close(x, x_cpu, rtol=1e-3)


def test_cli_calibrate_then_sample_with_the_plan_on_gpu(tmp_path):
    """`diffkit calibrate --device cuda` on the shipped digits model, then `diffkit sample --plan` on the GPU."""
    import numpy as np

    from diffkit.cli import main

    plan = tmp_path / "plan.json"
    assert main(["calibrate", "--nfe", "5", "--noises", "32", "--heldout", "16", "--budget", "5", "--teacher-nfe",
                 "20", "--device", CUDA.type, "--out", str(plan), "--no-progress"]) == 0
    meta = json.loads(plan.read_text())
    assert meta["nfe"] == 5 and meta["metrics"]["error"] <= meta["metrics"]["start_error"] * (1 + 1e-6)
    out = tmp_path / "samples"
    assert main(["sample", "--plan", str(plan), "--n", "1", "--device", CUDA.type, "--out", str(out),
                 "--no-progress"]) == 0
    assert np.isfinite(np.load(out / "samples.npz")["x"]).all()
