"""Training layer: the configuration, the loop, and PyTorch's distributed engine."""

from ._config import TrainConfig, load_config
from ._loop import TrainResult, load_splits, train
from ._plan import Plan

__all__ = ["Plan", "TrainConfig", "TrainResult", "load_config", "load_splits", "train"]
