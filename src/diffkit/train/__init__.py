"""Training diffusion and flow models: losses for every prediction type, noise-level sampling, loss weighting,
in-batch noise assignment, EMA, the `Trainer` (single process or torchrun), presets and the
``python -m diffkit.train`` entry point.
"""

from __future__ import annotations

from .distributed import init_distributed, sample_sharded, shard_range
from .ema import EMA, sigma_rel_to_gamma
from .losses import (
                     NOISE_LEVELS,
                     WEIGHTINGS,
                     DiffusionLoss,
                     Draw,
                     IntervalWeighting,
                     edm_loss,
                     eps_loss,
                     flow_loss,
                     immiscible_assignment,
                     interval_clusters,
                     loss_weight,
                     sample_noise_levels,
                     v_loss,
                     x0_loss,
)
from .trainer import TrainConfig, Trainer, lr_at, save_grid

__all__ = ["DiffusionLoss", "Draw", "eps_loss", "x0_loss", "v_loss", "flow_loss", "edm_loss", "sample_noise_levels",
           "loss_weight", "immiscible_assignment", "interval_clusters", "IntervalWeighting", "NOISE_LEVELS",
           "WEIGHTINGS", "EMA", "sigma_rel_to_gamma", "Trainer", "TrainConfig", "lr_at", "save_grid",
           "init_distributed", "sample_sharded", "shard_range"]
