"""The spine: setup, the training loop, evaluation, checkpoints, distributed wrapping."""

from slipstream.train.config import TrainConfig
from slipstream.train.loop import Trainer
from slipstream.train.optim import OptimConfig

__all__ = ["OptimConfig", "TrainConfig", "Trainer"]
