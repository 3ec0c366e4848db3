"""trainlib: a small, fast, raw-PyTorch distributed training library."""
from .version import __version__
from .config import Config, ConfigError, DataConfig, LogConfig, OptimConfig, TrainerConfig
from .metrics import Metric
from .trainer import Trainer
from .callbacks import Callback
from .freezing import FreezeSchedule
from .inference import load_model
from .preemption import Preempted
from .recipe import Recipe, available_recipes, find_recipe

__all__ = ["Trainer", "TrainerConfig", "OptimConfig", "DataConfig", "LogConfig", "Config", "ConfigError",
           "Metric", "Callback", "FreezeSchedule", "load_model", "Preempted", "Recipe", "find_recipe",
           "available_recipes", "__version__"]
