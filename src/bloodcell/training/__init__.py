"""Training: typed run configs and presets, schedules, the loop and its steps, checkpoints."""

from bloodcell.training.config import PRESETS, TrainConfig, preset_config
from bloodcell.training.loop import make_optimizer, train

__all__ = ["PRESETS", "TrainConfig", "make_optimizer", "preset_config", "train"]
