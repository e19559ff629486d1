"""The spine: model, distributed setup, training loop, checkpoints."""

from slipstream.train.loop import TrainConfig, Trainer
from slipstream.train.model import GPT, ModelConfig, build_model
from slipstream.train.optim import OptimConfig

__all__ = ["GPT", "ModelConfig", "OptimConfig", "TrainConfig", "Trainer", "build_model"]
