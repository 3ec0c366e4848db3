"""trainlib: a small, fast, raw-PyTorch distributed training library."""
__version__ = "0.1.0"

from .config import Config, ConfigError, DataConfig, LogConfig, OptimConfig, TrainerConfig  # noqa: E402
from .metrics import Metric  # noqa: E402
from .trainer import Trainer  # noqa: E402
from .callbacks import Callback  # noqa: E402
from .inference import load_model  # noqa: E402
from .preemption import Preempted  # noqa: E402

__all__ = ["Trainer", "TrainerConfig", "OptimConfig", "DataConfig", "LogConfig", "Config", "ConfigError",
           "Metric", "Callback", "load_model", "Preempted", "__version__"]
