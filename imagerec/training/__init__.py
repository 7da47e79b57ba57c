"""Training layer: the configuration, the loop, and PyTorch's distributed engine."""

from ._config import TrainConfig, load_config
from ._loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "load_config", "train"]
