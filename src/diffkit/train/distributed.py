"""Data parallelism: the `Trainer` under ``torchrun`` (DistributedDataParallel, gloo on CPU, nccl on GPU) and
sharded sampling with per-sample seeds.

Training draws every global batch (indices, noise, noise levels, label dropout) from one generator that all ranks
share, then each rank takes its contiguous slice, so a run on W ranks with global batch B follows the same
trajectory as one process with batch B (up to the order of floating-point reductions). Sampling gives rank r
a contiguous block of the N sample indices; sample i is drawn from its own seed, so the gathered N samples do
not depend on the number of ranks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "world", "is_main", "barrier", "shard_range", "sample_sharded", "all_gather_rows"]


def init_distributed(backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR ...) if there is
    one and it is not joined yet; gloo on CPU, nccl when CUDA is available. Returns whether training is
    distributed ("PyTorch Distributed: Experiences on Accelerating Data Parallel Training", Li et al. 2020)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous block [start, stop) of n items for `rank` (the first n % world ranks get one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def all_gather_rows(x: torch.Tensor, n_total: int) -> torch.Tensor:
    """Concatenate every rank's rows (in rank order; blocks from `shard_range`) on every rank."""
    rank, ws = world()
    if ws == 1:
        return x
    sizes = [shard_range(n_total, r, ws)[1] - shard_range(n_total, r, ws)[0] for r in range(ws)]
    rows = max(sizes)
    pad = torch.zeros((rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    pad[: len(x)] = x
    out = [torch.empty_like(pad) for _ in range(ws)]
    dist.all_gather(out, pad.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def sample_sharded(denoiser, n: int, shape: Sequence[int], *, seeds: Sequence[int] | None = None,
                   cond: dict | None = None, batch_size: int = 256, dtype=torch.float32, device=None,
                   **sample_kwargs) -> torch.Tensor:
    """Draw n samples across all ranks and return all of them on every rank: sample i starts from
    `diffkit.noise.randn(..., seeds=[seeds[i]])` and uses seeds[i] for its step noise ("Denoising Diffusion
    Probabilistic Models", Ho et al. 2020, Alg. 2, one noise stream per sample), so the result is the same for any
    number of ranks and any batch size. `cond` holds per-sample tensors (n, ...); other keyword arguments go to
    `diffkit.sample`. `device` (of the noise; default: that of the network's weights, else the CPU)."""
    from ..denoiser import network_device
    from ..noise import randn
    from ..solvers import sample

    if device is None:
        device = network_device(denoiser) or "cpu"
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} samples")
    rank, ws = world()
    start, stop = shard_range(n, rank, ws)
    outs = []
    for i in range(start, stop, batch_size):
        j = min(i + batch_size, stop)
        s = seeds[i:j]
        noise = randn((j - i,) + tuple(shape), seeds=s, dtype=dtype, device=device)
        c = {k: v[i:j].to(noise.device) if isinstance(v, torch.Tensor) else v for k, v in (cond or {}).items()}
        with torch.no_grad():
            outs.append(sample(denoiser, noise, cond=c, seeds=s, **sample_kwargs))
    local = torch.cat(outs) if outs else torch.empty((0,) + tuple(shape), dtype=dtype, device=device)
    return all_gather_rows(local, n)
