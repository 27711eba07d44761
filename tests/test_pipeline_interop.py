"""A diffkit sampler drives a diffusers pipeline's model end to end: DDIMPipeline built from configs (tiny random
UNet2DModel, no download) and diffkit's DDIM on the pipeline's own UNet and scheduler produce the same images from
the same generator; any other diffkit solver then runs on the same model."""

import pytest
import torch

import diffkit

diffusers = pytest.importorskip("diffusers")


def tiny_pipeline():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()
    scheduler = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False)   # DDPM's betas, leading spacing
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_diffkit_ddim_reproduces_the_ddim_pipeline():
    pipe = tiny_pipeline()
    with torch.no_grad():
        ref = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=50, eta=0.0,
                   output_type="pt").images
        den = diffkit.Denoiser.from_diffusers(pipe.unet, pipe.scheduler)
        noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))   # what the pipeline draws
        x = diffkit.sample(den, noise, solver="ddim", steps=50, schedule="leading", schedule_options={"offset": 0})
    ours = (x / 2 + 0.5).clamp(0, 1)
    assert ours.shape == ref.shape
    assert float((ours - ref).abs().max()) < 1e-4


def test_any_diffkit_solver_runs_on_the_pipeline_model():
    pipe = tiny_pipeline()
    den = diffkit.Denoiser.from_diffusers(pipe.unet, pipe.scheduler)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for solver in ("dpmpp_2m", "unipc", "heun"):
            x, info = diffkit.sample(den, noise, solver=solver, nfe=10, return_info=True)
            assert torch.isfinite(x).all() and info["nfe"] <= 10
