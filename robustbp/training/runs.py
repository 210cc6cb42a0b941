"""Run folders: what a run writes, when a folder may be written or resumed, and reading a run back.

    runs/x/config.json     the TrainConfig, every setting
    runs/x/history.json    {"status": ..., "epochs": [per-epoch numbers]} (and "message" if it diverged)
    runs/x/checkpoint.pt   a Checkpoint: everything needed to resume
    runs/x/model.pt        the final weights and the arguments that rebuild the model

Every file goes through `robustbp.io.write_atomic`: a crash while writing leaves the previous
version intact, and the file gets ordinary permissions (0644 under umask 022).
"""
from __future__ import annotations

import dataclasses
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbp.io import write_atomic, write_text
from robustbp.training.config import RESUMABLE_CHANGES, TrainConfig

CONFIG = "config.json"
HISTORY = "history.json"
CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
# 3: a checkpoint also holds world_size and other_ranks (a run of several processes); 2 and 1
# are read as one process's. 2: a checkpoint's "method" is always the method's state dict ({} for
# most methods); 1 stored None for a method without state_dict. model.pt is the same in all.
FORMAT = 3


@dataclass
class Checkpoint:
    """Everything needed to resume a run exactly; checkpoint.pt holds these fields and "format"."""

    config: dict[str, Any]
    model_args: dict[str, Any]
    epoch: int                       # epochs completed
    step: int                        # steps completed in the epoch under way
    partial: dict[str, float]        # that epoch's running sums (empty between epochs)
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, torch.Tensor]     # torch, shuffle, augment; cuda and epoch_shuffle when used
    method: dict[str, Any]           # method.state_dict(model)
    history: list[dict[str, Any]]
    world_size: int = 1              # processes the run trains with
    # What differs between processes, for ranks 1..N-1 ({"rng": ..., "method": ...} each); rank
    # 0's is in rng and method, and everything else is the same on every rank.
    other_ranks: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def progress(self) -> str:
        """'epoch 2' or 'epoch 2, step 4': how far the run got."""
        return f"epoch {self.epoch}" + (f", step {self.step}" if self.step else "")


# ----------------------------------------------------------------------------- writing
def save_torch(obj: Any, path: str | Path) -> None:
    write_atomic(path, lambda file: torch.save(obj, file))


def save_json(obj: Any, path: str | Path) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_config(folder: Path, config: TrainConfig) -> None:
    save_json(config.to_dict(), folder / CONFIG)


def save_history(folder: Path, status: str, epochs: list[dict[str, Any]], message: str | None = None) -> None:
    record: dict[str, Any] = {"status": status, "epochs": epochs}
    if message:
        record["message"] = message
    save_json(record, folder / HISTORY)


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> None:
    fields = {f.name: getattr(checkpoint, f.name) for f in dataclasses.fields(Checkpoint)}
    save_torch({"format": FORMAT, **fields}, folder / CHECKPOINT)


def save_model(folder: Path, config: TrainConfig, model_args: dict[str, Any], model: nn.Module) -> None:
    final = {"format": FORMAT, "config": config.to_dict(), "model_args": model_args, "state_dict": model.state_dict()}
    save_torch(final, folder / MODEL)


# ------------------------------------------------------------------ the folder's policy
def check_run_folder(out: Path | None, config: TrainConfig, resume: bool, overwrite: bool,
                     world_size: int = 1) -> Checkpoint | None:
    """Check the folder without changing it; return the checkpoint to resume from, if any.

    An existing run is refused unless `resume` or `overwrite`. Resuming needs its checkpoint, the
    same settings except RESUMABLE_CHANGES, at least as many epochs as it already trained, and the
    same number of processes (`world_size`).
    """
    if out is None:
        if resume:
            raise ValueError("resume needs the run folder (out_dir) to resume from")
        return None
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if resume:
        return checkpoint_to_resume(out, config, world_size)
    if ((out / CHECKPOINT).exists() or (out / MODEL).exists()) and not overwrite:
        raise ValueError(f"{out} already holds a run; resume it, or overwrite it, or choose another folder")
    return None


def checkpoint_to_resume(out: Path, config: TrainConfig, world_size: int = 1) -> Checkpoint:
    path = out / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume in {out}: it holds no {CHECKPOINT}")
    checkpoint = read_checkpoint(path)
    if checkpoint.world_size != world_size:
        raise ValueError(f"cannot resume {out} with {processes(world_size)}: it was trained with "
                         f"{processes(checkpoint.world_size)}; resume it with --nproc {checkpoint.world_size}")
    before = TrainConfig.from_dict(checkpoint.config)
    changed = [name for name in config.differences(before) if name not in RESUMABLE_CHANGES]
    if changed:
        detail = ", ".join(f"{n}: {getattr(before, n)!r} -> {getattr(config, n)!r}" for n in changed)
        raise ValueError(f"cannot resume {out} with different settings ({detail}); only {', '.join(RESUMABLE_CHANGES)} may change")
    needed = checkpoint.epoch + (1 if checkpoint.step else 0)
    if config.epochs < needed:
        done = f"{checkpoint.epoch} epoch{'' if checkpoint.epoch == 1 else 's'}"
        if checkpoint.step:
            done += f" and {checkpoint.step} step{'' if checkpoint.step == 1 else 's'} of epoch {needed}"
        raise ValueError(f"cannot resume {out} with epochs {config.epochs}: it has already trained {done}; "
                         f"resume with epochs >= {needed} to continue or extend it")
    return checkpoint


def processes(count: int) -> str:
    return f"{count} process{'' if count == 1 else 'es'}"


def check_model_args(checkpoint: Checkpoint, model_args: dict[str, Any], out: Path) -> None:
    """The resumed run must build the same model from the same data."""
    if checkpoint.model_args != model_args:
        raise ValueError(
            f"the checkpoint in {out} was trained on other data or another model "
            f"({checkpoint.model_args} != {model_args})"
        )


def prepare_run_folder(out: Path | None, resume: bool) -> None:
    """Create the folder; for a new or overwritten run, remove an earlier run's files."""
    if out is None or resume:
        return
    for name in (CHECKPOINT, MODEL, HISTORY):
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------- reading
def read_torch(path: Path) -> Any:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, AttributeError, ImportError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if isinstance(saved, dict) and saved.get("format", 1) > FORMAT:
        raise ValueError(f"{path} has format {saved['format']}, written by a newer robustbp; "
                         f"this version reads formats up to {FORMAT}")
    return saved


def read_checkpoint(path: Path) -> Checkpoint:
    """The Checkpoint in `path`, of any format up to FORMAT."""
    saved = read_torch(path)
    fields = dataclasses.fields(Checkpoint)
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if not isinstance(saved, dict) or name not in saved]
    if missing:
        raise ValueError(f"{path} is not a robustbp checkpoint (it lacks {', '.join(missing)})")
    values = {f.name: saved[f.name] for f in fields if f.name in saved}  # formats 1 and 2: one process
    if values["method"] is None:  # format 1, a method without state
        values["method"] = {}
    return Checkpoint(**values)


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
