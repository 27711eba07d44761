#!/usr/bin/env python
"""Training throughput of diffkit's UNet loop against diffusers' `UNet2DModel` of comparable size.

Three loops train on the same 16x16 class-conditional digits batches (batch size, optimizer and thread count
identical; one torch thread):

* ``diffkit Trainer``: `diffkit.train.Trainer.train_step` with diffkit's UNet (EDM loss, data sampling, gradient
  clipping; EMA disabled so that the work matches the plain loops);
* ``diffkit UNet, plain loop`` and ``diffusers UNet2DModel, plain loop``: the same plain ε-prediction loop
  (x_t = sqrt(ᾱ) x0 + sqrt(1-ᾱ) eps at a random timestep, MSE, backward, AdamW step).

The diffusers model uses the same widths (32, 64, 64), one ResNet per level (two in the decoder, as diffkit),
attention at 8x8 and in the middle block, scale-shift time conditioning and a class embedding, so both models
have about 1.2 M parameters (counted and reported). Timing is interleaved step by step (order alternating), so a load
that another process puts on the machine hits all loops alike, and measured both by wall clock and by process
CPU time; the headline ratio uses CPU time. Peak memory is, in a fresh subprocess per loop, the peak resident set
(VmHWM, reset through /proc/self/clear_refs once the model and data are built) minus the resident set then.

    python bench/training.py            # 32 interleaved rounds, batch 64, 1 thread; writes BENCHMARKS.md section
    python bench/training.py --quick    # smoke run, prints only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MARKER = "bench/training.py"
LOOPS = ("diffkit_trainer", "diffkit_plain", "diffusers_plain")


def diffkit_unet():
    from diffkit.models import UNet

    return UNet(image_size=16, in_channels=1, channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
                attention_resolutions=(8,), num_heads=2, num_classes=10, time_scale=1.0)


def diffusers_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=11,
                       attention_head_dim=32, norm_num_groups=32, resnet_time_scale_shift="scale_shift")


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


class PlainLoop:
    """The plain ε-prediction loop shared by both models (DDPM, Ho et al. 2020, Alg. 1)."""

    def __init__(self, model, call, batch: int, seed: int = 0):
        from diffkit.data import digits

        self.model, self.call, self.batch = model, call, batch
        self.data = digits(16)
        self.g = torch.Generator().manual_seed(seed)
        self.abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step(self):
        idx = torch.randint(0, len(self.data), (self.batch,), generator=self.g)
        x0, label = self.data.x[idx], self.data.labels[idx]
        t = torch.randint(0, 1000, (self.batch,), generator=self.g)
        eps = torch.randn(x0.shape, generator=self.g)
        a = self.abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = (self.call(self.model, xt, t, label) - eps).pow(2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class TrainerLoop:
    def __init__(self, batch: int, seed: int = 0):
        from diffkit import EDM
        from diffkit.data import digits
        from diffkit.train import DiffusionLoss, TrainConfig, Trainer

        self.model = diffkit_unet()
        loss = DiffusionLoss(EDM(), "edm", noise_levels="lognormal", label_dropout=0.1)
        cfg = TrainConfig(batch_size=batch, ema_decay=None, progress=False, checkpoint_every=0, seed=seed)
        self.trainer = Trainer(self.model, loss, digits(16), cfg)

    def step(self):
        self.trainer.train_step()


def make_loop(name: str, batch: int):
    if name == "diffkit_trainer":
        loop = TrainerLoop(batch)
        return loop, loop.model
    if name == "diffkit_plain":
        m = diffkit_unet()
        return PlainLoop(m, lambda m, x, t, y: m(x, t.float(), label=y), batch), m
    if name == "diffusers_plain":
        m = diffusers_unet()
        return PlainLoop(m, lambda m, x, t, y: m(x, t, class_labels=y).sample, batch), m
    raise ValueError(name)


def _status_kib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def memory_child(name: str, batch: int, steps: int, threads: int) -> None:
    """Run in a fresh process: print the peak resident-set growth (MiB) over `steps` training steps. The peak is
    VmHWM after resetting it through /proc/self/clear_refs (ru_maxrss would carry the parent's peak over fork and
    exec)."""
    torch.set_num_threads(threads)
    loop, _ = make_loop(name, batch)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = _status_kib("VmRSS")
    for _ in range(steps):
        loop.step()
    peak = _status_kib("VmHWM")
    print(json.dumps({"loop": name, "peak_rss_growth_mib": (peak - before) / 1024, "peak_rss_mib": peak / 1024}))


def measure_memory(batch: int, steps: int, threads: int) -> dict:
    out = {}
    for name in LOOPS:
        res = subprocess.run([sys.executable, __file__, "--memory-child", name, "--batch", str(batch), "--steps",
                              str(steps), "--threads", str(threads)], capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            raise RuntimeError(f"memory run of {name} failed: {res.stderr[-2000:]}")
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def measure_throughput(batch: int, rounds: int, steps: int, warmup: int) -> dict:
    """Interleave single steps of every loop (order alternating each round); time each step by wall clock and by
    process CPU time (time.process_time: with one torch thread the work itself, largely insensitive to other
    processes on the machine)."""
    loops = {name: make_loop(name, batch) for name in LOOPS}
    for loop, _ in loops.values():
        for _ in range(warmup):
            loop.step()
    wall = {name: [] for name in LOOPS}
    cpu = {name: [] for name in LOOPS}
    for r in range(rounds * steps):
        order = LOOPS if r % 2 == 0 else tuple(reversed(LOOPS))
        for name in order:
            loop = loops[name][0]
            w0, c0 = time.perf_counter(), time.process_time()
            loop.step()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    params = {name: n_params(m) for name, (_, m) in loops.items()}
    ref = "diffusers_plain"
    return {"images_per_s": {n: batch * len(v) / sum(v) for n, v in wall.items()},
            "images_per_cpu_s": {n: batch * len(v) / sum(v) for n, v in cpu.items()},
            "ratio_vs_diffusers": {n: sum(cpu[ref]) / sum(cpu[n]) for n in LOOPS},
            "ratio_vs_diffusers_wall": {n: sum(wall[ref]) / sum(wall[n]) for n in LOOPS},
            "ratio_vs_diffusers_wall_median": {n: statistics.median(b / a for a, b in zip(wall[n], wall[ref]))
                                               for n in LOOPS},
            "step_seconds_wall": wall, "step_seconds_cpu": cpu, "params": params}


def write_markdown(res: dict) -> None:
    th, mem = res["throughput"], res["memory"]
    names = {"diffkit_trainer": "diffkit `Trainer` (EDM loss) + diffkit UNet",
             "diffkit_plain": "plain loop + diffkit `UNet`", "diffusers_plain": "plain loop + diffusers `UNet2DModel`"}
    lines = ["## Training throughput (`bench/training.py`)", "",
             f"16x16 class-conditional digits, batch {res['batch']}, AdamW, {res['threads']} CPU thread(s), "
             f"{res['rounds'] * res['steps']} rounds of one step of every loop, interleaved (order alternating). "
             f"Ratio = diffusers loop time / loop time, from process CPU time (one torch thread: the work itself, "
             f"little affected by other processes on the machine); wall-clock ratios are given too. Peak memory: "
             f"peak resident set (VmHWM, reset before the steps) over {res['memory_steps']} steps minus the resident "
             f"set before them, in a fresh subprocess per loop (Linux /proc). torch {res['torch']}, "
             f"diffusers {res['diffusers']}, {res['machine']}. Other processes may share the CPU; interleaving "
             f"exposes every loop to the same load.", "",
             "| loop | parameters | images/CPU-s | images/s (wall) | ratio vs diffusers (CPU) | ratio (wall) | "
             "peak RSS growth (MiB) | peak RSS (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n in LOOPS:
        lines.append(f"| {names[n]} | {th['params'][n]:,} | {th['images_per_cpu_s'][n]:.1f} | "
                     f"{th['images_per_s'][n]:.1f} | {th['ratio_vs_diffusers'][n]:.3f}x | "
                     f"{th['ratio_vs_diffusers_wall'][n]:.3f}x | {mem[n]['peak_rss_growth_mib']:.0f} | "
                     f"{mem[n]['peak_rss_mib']:.0f} |")
    lines += ["", f"Command: `{res['command']}`"]
    from diffkit.benchmark import write_block

    write_block(ROOT / "BENCHMARKS.md", "\n".join(lines), MARKER)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.batch, args.steps, args.threads)
        return 0
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.steps, args.batch = 2, 1, 16
    mem_steps = 2 if args.quick else 5
    import diffusers

    res = {"batch": args.batch, "rounds": args.rounds, "steps": args.steps, "threads": args.threads,
           "memory_steps": mem_steps, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "command": "python bench/training.py" + (" --quick" if args.quick else "")}
    res["throughput"] = measure_throughput(args.batch, args.rounds, args.steps, warmup=1)
    res["memory"] = measure_memory(args.batch, mem_steps, args.threads)
    th = res["throughput"]
    for n in LOOPS:
        print(f"{n:16s} params {th['params'][n]:>9,}  {th['images_per_cpu_s'][n]:7.1f} img/CPU-s  "
              f"{th['images_per_s'][n]:7.1f} img/s  ratio {th['ratio_vs_diffusers'][n]:.3f}x (CPU) "
              f"{th['ratio_vs_diffusers_wall'][n]:.3f}x (wall)  "
              f"peak RSS +{res['memory'][n]['peak_rss_growth_mib']:.0f} MiB")
    if not args.quick:
        out = ROOT / "bench" / "results" / "training.json"
        from diffkit.checkpoint import atomic_write

        atomic_write(out, json.dumps(res, indent=1).encode())
        write_markdown(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
