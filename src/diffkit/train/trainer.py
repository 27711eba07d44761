"""`Trainer`: the training loop (AdamW, warm-up, gradient clipping, EMA, bf16 autocast, checkpoints, sample
grids, evaluation hook), identical on one process and under torchrun.

Randomness: the data order, noise, noise levels and label dropout come from one CPU generator seeded by
`TrainConfig.seed` and shared by every rank (see `diffkit.train.distributed`); dropout uses torch's global RNG.
Checkpoints store all of it, so a resumed run continues with the same losses as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..data import Dataset
from ..denoiser import Denoiser
from .distributed import barrier, init_distributed, is_main, world
from .ema import EMA
from .losses import DiffusionLoss

__all__ = ["TrainConfig", "Trainer", "lr_at", "save_grid"]


@dataclass
class TrainConfig:
    """Training hyper-parameters. `batch_size` is the global batch (split across ranks). `lr_schedule`
    'constant' or 'cosine' after `warmup_steps` of linear warm-up. EMA: `ema_decay` (fixed) or `ema_gamma`
    (power function); both None disables it. `amp`: 'auto' (bf16 on GPUs that support it), 'bf16' or 'none'."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    grad_clip: float | None = 1.0
    ema_decay: float | None = 0.999
    ema_gamma: float | None = None
    ema_warmup: bool = True
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0
    sample_count: int = 64
    sample_nfe: int = 20
    sample_solver: str | None = None
    eval_every: int = 0
    amp: str = "auto"
    seed: int = 0
    progress: bool = True
    max_minutes: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("steps must be >= 0 and batch_size >= 1")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; valid: constant, cosine")
        if self.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"unknown amp mode {self.amp!r}; valid: auto, bf16, none")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up ("Accurate, Large Minibatch SGD", Goyal et
    al. 2017, Sec. 2.2), then constant or cosine decay ("SGDR", Loshchilov & Hutter 2017, Eq. 5, no restarts)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine" and cfg.steps > cfg.warmup_steps:
        p = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * p))
    return cfg.lr


def save_grid(images: torch.Tensor, path, nrow: int | None = None, value_range=(-1.0, 1.0), scale: int = 1) -> None:
    """Save (N, C, H, W) images in `value_range` as one PNG grid (Pillow); 2-D points (N, 2) as a scatter plot."""
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = images.detach().float().cpu()
    if x.ndim == 2 and x.shape[1] == 2:
        size, img = 256, Image.new("L", (256, 256), 255)
        d = ImageDraw.Draw(img)
        lim = max(3.0, float(x.abs().max()))
        for px, py in ((x + lim) / (2 * lim) * (size - 1)).tolist():
            d.point((px, size - 1 - py), fill=0)
        img.save(path)
        return
    if x.ndim != 4:
        raise ValueError(f"save_grid needs (N, C, H, W) images or (N, 2) points; got {tuple(x.shape)}")
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    grid = torch.ones(c, rows * (h + 1) + 1, nrow * (w + 1) + 1)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + k * (w + 1): 1 + k * (w + 1) + w] = x[i]
    arr = (grid * 255).round().byte()
    arr = arr[0].numpy() if c == 1 else arr[:3].permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


class _Batches:
    """Epochs of random permutations of the dataset indices, drawn from the shared generator."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.g = n, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self, b: int) -> torch.Tensor:
        out = []
        while b > 0:
            if self.pos >= self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
            k = min(b, self.n - self.pos)
            out.append(self.perm[self.pos:self.pos + k])
            self.pos += k
            b -= k
        return torch.cat(out)


class Trainer:
    """Train `model` with `loss` (a `DiffusionLoss`) on `data` (a `diffkit.data.Dataset`): AdamW ("Decoupled
    Weight Decay Regularization", Loshchilov & Hutter 2019), warm-up, gradient-norm clipping, EMA, optional bf16
    autocast, a tqdm progress bar with loss and images/s, checkpoints in `out_dir`/checkpoints (resumed by
    `resume()`), sample grids in `out_dir`/samples, JSON-lines log in `out_dir`/log.jsonl, and `eval_fn(trainer)
    -> dict` every `eval_every` steps. Under torchrun the model is wrapped in DistributedDataParallel.

    `callbacks` are called as fn(trainer, step, loss) after every step. `conditional` (default: the model's
    `config.num_classes` > 0) passes the dataset's labels as ``label=``. `device`: default the current CUDA device
    when there is one, else the CPU (under torchrun: nccl on GPUs, gloo with `device="cpu"`); `self.device` is where
    the model lives, so sample from `trainer.denoiser()` with noise created there.
    """

    def __init__(self, model: nn.Module, loss: DiffusionLoss, data: Dataset, config: TrainConfig | None = None, *,
                 out_dir=None, eval_fn: Callable | None = None, callbacks: list[Callable] | None = None,
                 device=None, conditional: bool | None = None):
        if not isinstance(data, Dataset):
            raise TypeError("data must be a diffkit.data.Dataset (see diffkit.data.from_tensors)")
        if not isinstance(loss, DiffusionLoss):
            raise TypeError("loss must be a diffkit.train.DiffusionLoss")
        self.cfg = config or TrainConfig()
        # an explicit CPU device trains over gloo even where CUDA is available (nccl needs a GPU per rank)
        cpu = device is not None and torch.device(device).type == "cpu"
        self.distributed = init_distributed("gloo" if cpu else None)
        self.rank, self.world_size = world()
        if self.cfg.batch_size % self.world_size:
            raise ValueError(f"batch_size {self.cfg.batch_size} is not divisible by the {self.world_size} ranks")
        if device is None:
            device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.data, self.loss = data, loss.to(self.device)
        self.model = model.to(self.device)
        self.net = self.model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DDP(self.model, device_ids=ids)
        params = list(self.model.parameters()) + list(self.loss.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, betas=self.cfg.betas,
                                           weight_decay=self.cfg.weight_decay, foreach=True)
        self.ema = None
        if self.cfg.ema_gamma is not None:
            self.ema = EMA(self.model, gamma=self.cfg.ema_gamma)
        elif self.cfg.ema_decay is not None:
            self.ema = EMA(self.model, self.cfg.ema_decay, warmup=self.cfg.ema_warmup)
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.batches = _Batches(len(data), self.generator)
        self.step = 0
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.eval_fn, self.callbacks = eval_fn, list(callbacks or [])
        self.history: list[dict] = []
        if conditional is None:  # diffkit models say whether they take labels
            conditional = getattr(getattr(model, "config", None), "num_classes", 0) > 0
        if conditional and (data.labels is None or not data.num_classes):
            raise ValueError(f"a class-conditional model needs a labelled dataset; {data.name!r} has no labels")
        self.conditional = conditional
        amp = self.cfg.amp
        if amp == "auto":
            amp = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
        self.amp = amp == "bf16"

    # -- configuration --------------------------------------------------------------------------------------
    def config(self) -> dict:
        """Everything a checkpoint records about this run (model, process, prediction, EMA, data, loss, training)."""
        from ..models import model_config

        try:
            mcfg = model_config(self.model)
        except TypeError:
            mcfg = None
        return {"model": mcfg, "process": self.loss.process.config(), "prediction": self.loss.prediction,
                "ema": self.ema.config() if self.ema else None, "data": self.data.config(),
                "loss": self.loss.config(), "train": asdict(self.cfg)}

    def denoiser(self, ema: bool = True) -> Denoiser:
        """`diffkit.Denoiser` around the EMA network (or the raw one) for sampling."""
        net = self.ema.module if (ema and self.ema is not None) else self.model
        return Denoiser(net, self.loss.process, self.loss.prediction)

    # -- checkpoints ------------------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "checkpoints"

    def _state(self) -> dict:
        return {"perm": self.batches.perm.tolist(), "pos": self.batches.pos}

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (main rank only; every rank waits for it)."""
        path = None
        if self.checkpoint_dir is not None and is_main():
            path = ckpt.save_checkpoint(self.checkpoint_dir, self.step, model=self.model, optimizer=self.optimizer,
                                        ema=self.ema, loss=self.loss, generators={"train": self.generator},
                                        config=self.config(), extra={"batches": self._state()},
                                        keep=self.cfg.keep_checkpoints)
        barrier()
        return path

    def resume(self, path=None) -> bool:
        """Restore the newest checkpoint of `out_dir` (or `path`); False when there is none to resume."""
        if path is None:
            if self.checkpoint_dir is None or ckpt.latest_checkpoint(self.checkpoint_dir) is None:
                return False
            path = self.checkpoint_dir
        meta = ckpt.restore_checkpoint(path, model=self.model, optimizer=self.optimizer, ema=self.ema,
                                       loss=self.loss, generators={"train": self.generator})
        state = meta.get("extra", {}).get("batches")
        if state is None or len(state["perm"]) != len(self.data):
            raise ckpt.CheckpointError(f"checkpoint {meta['path']!r} was written for a dataset of another size")
        self.batches.perm, self.batches.pos = torch.tensor(state["perm"]), int(state["pos"])
        self.step = int(meta["step"])
        self._log({"event": "resume", "step": self.step, "checkpoint": meta["path"]})
        return True

    # -- one step ----------------------------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step on the next global batch; returns the batch loss (averaged over ranks)."""
        B, ws, r = self.cfg.batch_size, self.world_size, self.rank
        idx = self.batches.next(B)
        x0 = self.data.x[idx]
        draw = self.loss.draw(x0, self.generator)
        lo, hi = r * B // ws, (r + 1) * B // ws
        x = x0[lo:hi].to(self.device, non_blocking=True)
        cond = {}
        if self.conditional:
            cond["label"] = self.data.labels[idx][lo:hi].to(self.device)
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.step, self.cfg)
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.loss(self.net, x, cond, draw=draw[lo:hi].to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = loss.detach().float()
        if self.distributed:
            import torch.distributed as dist

            extra = [p.grad for p in self.loss.parameters() if p.grad is not None]
            for gr in extra:  # the loss's own parameters (interval weights) are outside DDP
                dist.all_reduce(gr)
                gr /= ws
            dist.all_reduce(value)
            value /= ws
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return float(value)

    # -- the loop ---------------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.out_dir is not None and is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def sample_grid(self, path=None) -> torch.Tensor:
        """Sample `sample_count` items with the EMA network (per-sample seeds 0..n-1; labels cycle through the
        classes) and save a grid PNG (main rank); returns the samples in data units."""
        from .distributed import sample_sharded

        n = self.cfg.sample_count
        cond = {}
        if self.conditional:
            cond["label"] = torch.arange(n) % self.data.num_classes
        x = sample_sharded(self.denoiser(), n, self.data.shape, cond=cond, nfe=self.cfg.sample_nfe,
                           solver=self.cfg.sample_solver, device=self.device).cpu()
        if path is None and self.out_dir is not None:
            path = self.out_dir / "samples" / f"step_{self.step:08d}.png"
        if path is not None and is_main():  # image loaders normalize to [-1, 1]; 2-D points are scattered
            save_grid(x, path, nrow=self.data.num_classes if self.conditional else None, scale=4)
        return self.data.denormalize(x)

    def train(self, steps: int | None = None, max_minutes: float | None = None) -> list[dict]:
        """Run until `steps` total optimizer steps (default: config.steps) or `max_minutes` of wall time, then
        write a final checkpoint; returns the history of logged records."""
        cfg = self.cfg
        total = cfg.steps if steps is None else steps
        max_minutes = cfg.max_minutes if max_minutes is None else max_minutes
        deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
        bar = None
        if cfg.progress and is_main():
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True)
        t_last, n_last, smooth = time.perf_counter(), 0, None
        try:
            while self.step < total:
                loss = self.train_step()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {self.step}; lower the learning rate "
                                             f"or enable gradient clipping")
                smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss
                n_last += cfg.batch_size
                for fn in self.callbacks:
                    fn(self, self.step, loss)
                if cfg.log_every and self.step % cfg.log_every == 0:
                    now = time.perf_counter()
                    ips = n_last / max(now - t_last, 1e-9)
                    t_last, n_last = now, 0
                    self._log({"step": self.step, "loss": loss, "loss_smooth": smooth, "lr": lr_at(self.step - 1, cfg),
                               "images_per_s": ips})
                    if bar is not None:
                        bar.set_postfix(loss=f"{smooth:.4f}", img_s=f"{ips:.0f}")
                if bar is not None:
                    bar.update(1)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.sample_grid()
                if cfg.eval_every and self.eval_fn is not None and self.step % cfg.eval_every == 0:
                    self._log({"step": self.step, "eval": self.eval_fn(self)})
                if deadline is not None and time.monotonic() > deadline:
                    self._log({"event": "time_limit", "step": self.step})
                    break
        finally:
            if bar is not None:
                bar.close()
        if self.checkpoint_dir is not None and ckpt.latest_checkpoint(self.checkpoint_dir) != \
                self.checkpoint_dir / f"ckpt-{self.step:08d}.json":
            self.save_checkpoint()
        return self.history

    def export(self, folder=None, ema: bool = True) -> Path:
        """Save the (EMA) network with its process, prediction, EMA settings and data normalization for sampling
        (`diffkit.checkpoint.load_denoiser`)."""
        folder = Path(folder) if folder is not None else self.out_dir / "model"
        net = self.ema.module if (ema and self.ema is not None) else self.model
        if is_main():
            ckpt.save_model(folder, net, process=self.loss.process, prediction=self.loss.prediction,
                            ema=self.ema.config() if self.ema else None, data=self.data.config(),
                            extra={"step": self.step})
        barrier()
        return folder
