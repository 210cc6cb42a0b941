"""Training: `train(config, out_dir)` and reading a run back with `load_run`.

    from robustbp.training import TrainConfig, train, load_run
    result = train(TrainConfig(method="loss-ibp", method_params={"beta": 0.03, "p": 1}), "runs/ibp")
    model, config = load_run("runs/ibp")

config.py     TrainConfig: every setting of a run, and the learning-rate schedules
data.py       the splits a config draws, the model's arguments from the training images, augmentation
device.py     the device a run trains on (cpu, cuda, cuda:K, auto), checked to exist
distributed.py  several processes (torchrun, --nproc): the process group, each rank's slice of a batch
interrupt.py  Ctrl-C: stop after the current step and save, or at once on a second Ctrl-C
progress.py   what a run prints on stderr
runs.py       run folders and the checkpoint format: writing, refusing to overwrite, resume checks, load_run
loop.py       the loop: train(), one Trainer per run
"""
from robustbp.training.config import SCHEDULES, TrainConfig, make_scheduler, parse_schedule
from robustbp.training.data import prepare_data
from robustbp.training.device import check_device
from robustbp.training.loop import NonFiniteLoss, TrainResult, train
from robustbp.training.runs import load_run, read_config, read_history

__all__ = [
    "SCHEDULES",
    "NonFiniteLoss",
    "TrainConfig",
    "TrainResult",
    "check_device",
    "load_run",
    "make_scheduler",
    "parse_schedule",
    "prepare_data",
    "read_config",
    "read_history",
    "train",
]
