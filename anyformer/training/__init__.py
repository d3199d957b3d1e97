"""Training: run configs, the loop, schedules, checkpoints and data-parallel setup."""

from .config import DataConfig, RunConfig, TrainConfig, default_run_config, load_run_config
from .optim import build_optimizer, lr_at, param_groups
from .trainer import Trainer, TrainResult

__all__ = [
    "DataConfig", "RunConfig", "TrainConfig", "TrainResult", "Trainer", "build_optimizer", "default_run_config",
    "load_run_config", "lr_at", "param_groups",
]
