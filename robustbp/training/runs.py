"""A run folder on disk, and reading a trained run back.

    runs/x/config.json     the TrainConfig, every setting
    runs/x/history.json    {"status": ..., "epochs": [per-epoch numbers]}
    runs/x/checkpoint.pt   everything needed to resume (model, optimizer, scheduler, RNG states, ...)
    runs/x/model.pt        the final weights and the arguments that rebuild the model

Every file is written atomically: to a temporary file in the same folder, then `os.replace`d
over the old one, so a crash while writing leaves the previous version intact.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbp.io import write_atomic, write_text
from robustbp.training.config import TrainConfig

CONFIG = "config.json"
HISTORY = "history.json"
CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
FORMAT = 1


def save_torch(obj: Any, path: str | Path) -> None:
    write_atomic(path, lambda file: torch.save(obj, file))


def save_json(obj: Any, path: str | Path) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def build_model(model_args: dict[str, Any]) -> nn.Module:
    """The registry model described by `model_args` (name, in_channels, image_size, ...)."""
    from robustbp import models

    args = dict(model_args)
    return models.get(args.pop("name"), **args)


def load_state(model: nn.Module, state_dict: dict[str, torch.Tensor], source: Path, name: str) -> None:
    """load_state_dict, with one clear error when the checkpoint does not fit the model."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise ValueError(f"{source} does not match model {name!r}: {detail}") from None


def load_run(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """(model in eval mode, its TrainConfig) from a run folder (or its model.pt / checkpoint.pt).

    Uses model.pt when the run finished, else the last checkpoint of an unfinished run.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run folder {path} does not exist")
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        path = folder / MODEL if (folder / MODEL).is_file() else folder / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"{folder} holds no trained model (neither {MODEL} nor {CHECKPOINT})")
    saved = read_torch(path)
    if not isinstance(saved, dict) or "model_args" not in saved or ("model" not in saved and "state_dict" not in saved):
        raise ValueError(f"{path} is not a robustbp model or checkpoint file")
    config = TrainConfig.from_dict(saved["config"]) if "config" in saved else read_config(folder)
    model = build_model(saved["model_args"])
    load_state(model, saved.get("state_dict", saved.get("model")), path, saved["model_args"]["name"])
    return model.to(device).eval(), config


def read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, AttributeError, ImportError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None


def read_config(folder: str | Path) -> TrainConfig:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {CONFIG}")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        raise ValueError(f"cannot read {path}: {error}") from None


def read_history(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / HISTORY
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {HISTORY}")
    return json.loads(path.read_text())
