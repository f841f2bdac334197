"""Training: typed run configs, schedules, the loop, checkpoints."""

from bloodcell.training.config import TrainConfig
from bloodcell.training.loop import train

__all__ = ["TrainConfig", "train"]
