"""diffusers interoperability: Denoiser.from_diffusers on tiny randomly initialized diffusers networks built from
configs (no downloads). diffkit's DDIM reproduces diffusers' DDIMScheduler loop on the same UNet and noise."""

import pytest
import torch

import diffkit

diffusers = pytest.importorskip("diffusers")
F64 = torch.float64


def tiny_unet(**kw):
    torch.manual_seed(0)
    cfg = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
               down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
               norm_num_groups=8)
    cfg.update(kw)
    return diffusers.UNet2DModel(**cfg).to(F64).eval()


def ddim_loop(unet, scheduler, noise, steps, **cond):
    scheduler.set_timesteps(steps)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t, **cond).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("spacing, offset, prediction, steps", [("leading", 1, "epsilon", 50),
                                                                 ("trailing", 0, "v_prediction", 20)])
def test_ddim_matches_diffusers(spacing, offset, prediction, steps):
    """DDIM (eta = 0) from the same x_T, 50 steps with SD's leading spacing: diffkit's ddim on the same spacing equals
    diffusers' loop to float tolerance (diffusers keeps its ᾱ table in float32: ~1e-8 relative). (diffusers'
    DDIM 'linspace' is not comparable: it rounds the grid but steps to t - T//n.)"""
    unet = tiny_unet()
    sch = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=True,
                                  clip_sample=False, prediction_type=prediction)
    den = diffkit.Denoiser.from_diffusers(unet, sch)
    assert den.prediction == {"epsilon": "eps", "v_prediction": "v"}[prediction]
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        ref = ddim_loop(unet, sch, noise, steps)
        ours = diffkit.sample(den, noise, solver="ddim", steps=steps, schedule=spacing,
                              schedule_options={"offset": offset} if spacing == "leading" else None)
    scale = float(ref.abs().max())
    assert float((ours - ref).abs().max()) < 1e-6 * scale


def test_conditioning_passes_through_to_a_conditional_unet():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, norm_num_groups=8, attention_head_dim=4).to(F64).eval()
    sch = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    den = diffkit.Denoiser.from_diffusers(unet, sch)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    emb = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(3), dtype=F64)
    with torch.no_grad():
        ref = ddim_loop(unet, sch, noise, 10, encoder_hidden_states=emb)
        ours = diffkit.sample(den, noise, solver="ddim", steps=10, schedule="trailing",
                              cond={"encoder_hidden_states": emb})
        other = diffkit.sample(den, noise, solver="ddim", steps=10, schedule="trailing",
                               cond={"encoder_hidden_states": -emb})
        fast = diffkit.sample(den, noise, solver="unipc", nfe=8, cond={"encoder_hidden_states": emb})
    assert float((ours - ref).abs().max()) < 1e-6 * float(ref.abs().max())
    assert float((other - ours).abs().max()) > 1e-3  # the conditioning reaches the network
    assert fast.shape == noise.shape and torch.isfinite(fast).all()


def test_process_and_prediction_from_scheduler_config():
    from diffkit.models.from_diffusers import process_from_scheduler

    sch = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
    process, prediction, scale = process_from_scheduler(sch)
    assert prediction == "x0" and scale == 1.0
    torch.testing.assert_close(process.alphas_cumprod, sch.alphas_cumprod.to(F64), rtol=1e-6, atol=1e-7)
    flow, prediction, scale = process_from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert isinstance(flow, diffkit.Flow) and flow.shift == 3.0 and prediction == "flow" and scale == 1000.0
    zsnr = diffusers.DDIMScheduler(rescale_betas_zero_snr=True)
    process, _, _ = process_from_scheduler(zsnr)  # terminal ᾱ = 0 is clamped, σ̄_max stays finite
    assert process.sigma_bar(torch.tensor(998.0)) < process.sigma_bar_max < float("inf")


def test_unknown_prediction_type_is_a_clear_error():
    sch = diffusers.DDIMScheduler()
    sch.register_to_config(prediction_type="mystery")
    with pytest.raises(ValueError, match="epsilon"):
        diffkit.Denoiser.from_diffusers(tiny_unet(), sch)


def test_k_diffusion_style_denoiser_wraps_directly():
    from diffkit.testbeds import GaussianMixture

    gm = GaussianMixture.ring()
    den = diffkit.Denoiser.from_k_diffusion(lambda x, sigma: gm.denoise(x, sigma), 0.002, 80.0)
    x = torch.randn(5, 2, dtype=F64) * 3
    torch.testing.assert_close(den(x, 1.5), gm.denoise(x, 1.5), rtol=1e-12, atol=1e-12)
