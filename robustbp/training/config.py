"""`TrainConfig`: every setting of a training run, saved as `config.json` beside its results.

Config by difference (as in nanoGPT): the defaults are the IBP paper's MNIST settings
(§7.4: batch 128, exponential decay γ = 0.98 per epoch, initial step 0.1). The paper does not
state a momentum; we use momentum 0.9 with lr 0.01, the same effective step lr/(1 − momentum)
= 0.1 (lr 0.1 with momentum 0.9 diverges for loss-ibp and adversarial-backprop on ibp-mnist).
A run, a study or a command line states only what differs, e.g.

    TrainConfig(dataset="fashion-mnist", model="lenet", method="jacobian-spectral",
                method_params={"beta": 0.01}, lr=0.01, momentum=0.8, batch_size=32,
                schedule="constant", epochs=50)      # exact spectral norm paper, App. A
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from robustbp.methods.base import FLOAT16_REASON

SCHEDULES = {
    "constant": "the learning rate stays at lr",
    "exp:GAMMA": "lr·GAMMA^epoch, decayed after every epoch (IBP paper: exp:0.98 on MNIST, exp:0.99 on CIFAR)",
    "step:N[:GAMMA]": "multiply by GAMMA (default 0.5, i.e. halving) every N epochs",
    "cosine": "cosine annealing from lr to 0 over the run's epochs",
}

AMP = {
    "none": "float32 throughout",
    "bf16": "the training step under torch.autocast with bfloat16 (no gradient scaler); evaluation in float32",
}
FP16_REFUSAL = f"amp fp16 is not supported: {FLOAT16_REASON}; use --amp bf16, which needs no scaler"

# Settings that may differ when a run is resumed: they do not change what is computed
# (epochs only extends or shortens the run; with `cosine` it also reshapes the schedule).
RESUMABLE_CHANGES = ("epochs", "data_dir", "device", "log_every")


@dataclass
class TrainConfig:
    """Every setting of a training run. Errors are in percent; epochs count from 1."""

    dataset: str = "mnist-5k"
    data_dir: str | None = None          # folder holding the dataset files (default: $ROBUSTBP_DATA)
    model: str = "ibp-mnist"
    dropout: float = 0.0                 # on the last internal fully connected layer
    activation: str = "relu"
    method: str = "standard"
    method_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"beta": 0.03, "p": 1}
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0            # L2 coefficient, as torch.optim.SGD applies it
    schedule: str = "exp:0.98"           # see SCHEDULES
    augment: bool = False                # the paper's augmentation for the dataset (data.Augment.paper)
    train_size: int | None = None        # train on this many images drawn from the training set
    val_size: float = 0.0                # held-out validation images: a count (>= 1) or a fraction (< 1)
    seed: int = 0                        # model initialization, shuffling, augmentation, the method's noise
    device: str = "cpu"                  # cpu, cuda, cuda:K or auto (training.device.check_device)
    amp: str = "none"                    # see AMP
    log_every: int = 20                  # progress bar refresh, in steps

    def __post_init__(self):
        self.method_params = dict(self.method_params or {})
        self.validate()

    def validate(self) -> None:
        """One clear ValueError for the first invalid setting."""
        for name in ("dataset", "model", "method", "activation", "schedule", "device"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        _check_int("epochs", self.epochs, minimum=1)
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_int("log_every", self.log_every, minimum=1)
        if self.train_size is not None:
            _check_int("train_size", self.train_size, minimum=1)
        _check_number("lr", self.lr, low=0.0, low_inclusive=False)
        _check_number("momentum", self.momentum, low=0.0, high=1.0)
        _check_number("weight_decay", self.weight_decay, low=0.0)
        _check_number("dropout", self.dropout, low=0.0, high=1.0)
        _check_number("val_size", self.val_size, low=0.0)
        if self.val_size >= 1 and float(self.val_size) != int(self.val_size):
            raise ValueError(f"val_size must be a count (a whole number >= 1) or a fraction in [0, 1), got {self.val_size}")
        if not isinstance(self.augment, bool):
            raise ValueError(f"augment must be true or false, got {self.augment!r}")
        parse_schedule(self.schedule)
        if self.amp in ("fp16", "float16"):
            raise ValueError(FP16_REFUSAL)
        if self.amp not in AMP:
            raise ValueError(f"amp must be one of {', '.join(AMP)}, got {self.amp!r}")
        try:
            json.dumps(self.method_params)
        except TypeError as error:
            raise ValueError(f"method_params must be plain JSON values (numbers, strings, lists): {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "TrainConfig":
        """Read a JSON or TOML file holding the settings that differ from the defaults."""
        values = read_config_file(path)
        values.update(overrides)
        return cls.from_dict(values)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def differences(self, other: "TrainConfig") -> list[str]:
        """Names of the settings whose values differ."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [key for key in mine if mine[key] != theirs[key]]


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except ValueError as error:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise ValueError(f"cannot read config file {path}: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a table of settings, got {type(values).__name__}")
    return values


def parse_schedule(text: str) -> tuple[str, tuple[float, ...]]:
    """'exp:0.98' -> ('exp', (0.98,)); raises ValueError naming the accepted forms."""
    kind, _, rest = text.partition(":")
    args = rest.split(":") if rest else []
    try:
        values = tuple(float(a) for a in args)
    except ValueError:
        values = None
    ok = values is not None and all(math.isfinite(v) for v in values)
    if ok and kind in ("constant", "cosine"):
        ok = not values
    elif ok and kind == "exp":
        ok = len(values) == 1 and 0 < values[0] <= 1
    elif ok and kind == "step":
        ok = len(values) in (1, 2) and values[0] >= 1 and values[0] == int(values[0])
        ok = ok and (len(values) == 1 or 0 < values[1] <= 1)
    else:
        ok = False
    if not ok:
        raise ValueError(f"invalid schedule {text!r}; use one of: {', '.join(SCHEDULES)} (0 < GAMMA <= 1, N a whole number >= 1)")
    return kind, values


def make_scheduler(schedule: str, optimizer: torch.optim.Optimizer, epochs: int):
    """The schedule as a torch LR scheduler, stepped once at the end of every epoch."""
    kind, values = parse_schedule(schedule)
    sched = torch.optim.lr_scheduler
    if kind == "exp":
        return sched.ExponentialLR(optimizer, gamma=values[0])
    if kind == "step":
        gamma = values[1] if len(values) > 1 else 0.5
        return sched.StepLR(optimizer, step_size=int(values[0]), gamma=gamma)
    if kind == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=epochs)
    return sched.LambdaLR(optimizer, lr_lambda=_constant)


def _constant(epoch: int) -> float:  # module level, so the scheduler's state pickles
    return 1.0


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")


def _check_number(name: str, value, low: float, high: float | None = None, low_inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    below = value < low if low_inclusive else value <= low
    if below or (high is not None and value >= high):
        lower = f"{'>=' if low_inclusive else '>'} {low:g}"
        raise ValueError(f"{name} must be {lower}{f' and < {high:g}' if high is not None else ''}, got {value!r}")
