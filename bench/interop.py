#!/usr/bin/env python
"""Sampling throughput with a diffusers UNet: diffkit's samplers driving the UNet of a diffusers `DDIMPipeline`
against the pipeline's own loop, same UNet, same batch, same number of model calls (NFE).

* ``diffusers DDIMPipeline``: `pipe(batch_size, num_inference_steps=NFE, eta=0, output_type="pt")`;
* ``diffkit ddim``: `diffkit.sample(Denoiser.from_diffusers(pipe.unet, pipe.scheduler), noise, solver="ddim",
  steps=NFE, schedule="leading")` (the same algorithm and timesteps; images equal to float tolerance, see
  tests/test_pipeline_interop.py);
* ``diffkit default``: `diffkit.sample(den, noise, nfe=NFE)` (the library's default solver for the budget).

The UNet is a randomly initialized UNet2DModel built from a config (no download; 32x32x3, widths 32/64/64, attention
at 8x8, ~1.1 M parameters). Runs are interleaved round by round (order alternating) so that a load another process
puts on the machine hits every loop alike; the headline ratio is the median CPU time of the pipeline over that of
diffkit (> 1: diffkit is faster), wall-clock ratios alongside.

    python bench/interop.py             # 10 rounds, batch 8, NFE 20, 1 torch thread; writes BENCHMARKS.md block
    python bench/interop.py --quick     # smoke run, prints only
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import diffkit

ROOT = Path(__file__).resolve().parents[1]


def build(size: int = 32):
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
                                 layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")).eval()
    sch = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False)
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=sch)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.nfe = 2, 4
    torch.set_num_threads(args.threads)
    pipe = build()
    params = sum(q.numel() for q in pipe.unet.parameters())
    den = diffkit.Denoiser.from_diffusers(pipe.unet, pipe.scheduler)
    B, nfe = args.batch, args.nfe

    def run_pipeline(seed):
        return pipe(batch_size=B, generator=torch.Generator().manual_seed(seed), num_inference_steps=nfe, eta=0.0,
                    output_type="pt").images

    def run_ddim(seed):
        noise = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        x = diffkit.sample(den, noise, solver="ddim", steps=nfe, schedule="leading", schedule_options={"offset": 0})
        return (x / 2 + 0.5).clamp(0, 1)

    def run_default(seed):
        noise = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        return (diffkit.sample(den, noise, nfe=nfe) / 2 + 0.5).clamp(0, 1)

    loops = {"diffusers DDIMPipeline": run_pipeline, "diffkit ddim": run_ddim, "diffkit default": run_default}
    with torch.no_grad():
        diff = float((run_ddim(0) - run_pipeline(0)).abs().max())  # also the warm-up
        run_default(0)
        cpu, wall = {k: [] for k in loops}, {k: [] for k in loops}
        names = list(loops)
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                c0, w0 = time.process_time(), time.perf_counter()
                loops[name](r + 1)
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - w0)
    med = {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in loops}
    ref_cpu, ref_wall = med["diffusers DDIMPipeline"]
    lines = [f"### Sampling throughput with a diffusers UNet: diffkit vs the diffusers pipeline loop (NFE {nfe})", "",
             f"Same randomly initialized `UNet2DModel` ({params / 1e6:.2f} M parameters, 32x32x3) and scheduler "
             f"(DDIM, linear betas); batch {B}, {nfe} model calls per sample set, {args.threads} torch thread, "
             f"{args.rounds} interleaved rounds (order alternating), median per round. Ratio = pipeline time / "
             "diffkit time (> 1: diffkit faster). diffkit ddim and the pipeline give the same images (max abs "
             f"difference {diff:.1e} in [0, 1] units). Machine: {platform.machine()} CPU with 2 cores shared with "
             "other benchmark jobs, so wall times are noisy; CPU time is the headline.", "",
             f"Command: `python bench/interop.py{' --quick' if args.quick else ''}`", "",
             "| loop | CPU s / batch | wall s / batch | throughput ratio (CPU) | ratio (wall) |",
             "|---|---:|---:|---:|---:|"]
    for k, (c, w) in med.items():
        lines.append(f"| {k} | {c:.3f} | {w:.3f} | {ref_cpu / c:.2f}x | {ref_wall / w:.2f}x |")
    ratio = ref_cpu / med["diffkit ddim"][0]
    lines += ["", f"Target: diffkit's throughput >= 1.0x the pipeline's at the same NFE (same DDIM algorithm): "
              f"{ratio:.2f}x **{'PASS' if ratio >= 1.0 else 'FAIL'}**"]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        from diffkit.benchmark import write_block

        write_block(ROOT / "BENCHMARKS.md", text, marker="bench/interop.py")
        print("wrote its block of BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
