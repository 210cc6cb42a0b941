"""Training: the config, the loop, checkpoints and run folders. Public names are in `robustbp.train`."""
from robustbp.training.config import SCHEDULES, TrainConfig, make_scheduler, parse_schedule
from robustbp.training.loop import NonFiniteLoss, TrainResult, error_rate, prepare_data, train
from robustbp.training.runs import load_run, read_config, read_history

__all__ = [
    "SCHEDULES",
    "NonFiniteLoss",
    "TrainConfig",
    "TrainResult",
    "error_rate",
    "load_run",
    "make_scheduler",
    "parse_schedule",
    "prepare_data",
    "read_config",
    "read_history",
    "train",
]
