"""The training loop: `train(config, out_dir)` runs any registered method with SGD + momentum.

Each step: zero the gradients, `method.backward(model, x, y)` (which fills `.grad`), check the
loss is finite, `optimizer.step()`. The whole dataset stays in memory as tensors and batches are
indexed directly. Shuffling and augmentation draw from explicit generators seeded from the
config, so a run is reproducible from `config.json`, and a resumed run ends with the same
weights (bit for bit on the CPU) as one that was never interrupted.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbp.training import runs
from robustbp.training.config import RESUMABLE_CHANGES, TrainConfig, make_scheduler


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


@dataclass
class TrainResult:
    model: nn.Module
    config: TrainConfig
    history: list[dict[str, Any]]
    status: str                      # "complete" or "interrupted"
    out_dir: Path | None = None
    data_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


@dataclass
class Splits:
    train: Any
    val: Any | None
    test: Any


def prepare_data(config: TrainConfig, data: tuple | None = None) -> Splits:
    """(train, validation, test) ImageSets: the validation split is drawn first, then the
    training subset of `train_size` images from what remains; both seeded by `config.seed`."""
    from robustbp import data as datasets

    if data is None:
        train_set, test_set = datasets.load(config.dataset, config.data_dir)
    else:
        train_set, test_set = data
    val_set = None
    if config.val_size > 0:
        size = int(config.val_size) if config.val_size >= 1 else config.val_size
        train_set, val_set = datasets.split_validation(train_set, size, seed=config.seed)
    if config.train_size is not None:
        if config.train_size > len(train_set):
            raise ValueError(
                f"train_size {config.train_size} is larger than the {len(train_set)} training images of {config.dataset}"
            )
        train_set = datasets.subset(train_set, config.train_size, seed=config.seed)
    return Splits(train_set, val_set, test_set)


def model_args_for(config: TrainConfig, train_set) -> dict[str, Any]:
    """What `models.get` needs, computed from the training set (saved so a run loads without its data)."""
    from robustbp import data as datasets

    mean, std = datasets.channel_stats(train_set)
    channels, height, width = train_set.shape
    return {
        "name": config.model,
        "in_channels": channels,
        "image_size": height if height == width else (height, width),
        "num_classes": train_set.num_classes,
        "mean": [float(v) for v in torch.as_tensor(mean).flatten()],
        "std": [float(v) for v in torch.as_tensor(std).flatten()],
        "dropout": config.dropout,
        "activation": config.activation,
    }


def make_method(config: TrainConfig, loss_fn=None):
    from robustbp import methods

    kwargs = dict(config.method_params)
    if loss_fn is not None:
        kwargs["loss_fn"] = loss_fn
    return methods.get(config.method, **kwargs)


@torch.no_grad()
def error_rate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Percent of `images` that `model` misclassifies, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), dtype=torch.int64, device=labels.device)
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        wrong += (logits.argmax(1) != labels[start : start + batch_size]).sum()
    model.train(was_training)
    return 100.0 * wrong.item() / max(len(labels), 1)


class CleanBatchAccuracy:
    """Counts correct predictions on the clean batch from the method's own first forward pass,
    so the progress bar's accuracy costs no extra forward pass. A forward hook takes the first
    call whose input is the batch itself (the same storage) outside any torch.func transform;
    for a method that never makes such a call, `fallback` runs one eval-mode forward pass."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0
        self.x = self.y = None
        self.captured = False
        self.handle = model.register_forward_hook(self._hook)

    def arm(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.captured = x, y, False

    def _hook(self, module, inputs, output) -> None:
        if self.captured or self.x is None or not inputs:
            return
        try:
            if torch._C._functorch.maybe_current_level() is not None:
                return
            first = inputs[0]
            same = first is self.x or (first.shape == self.x.shape and first.data_ptr() == self.x.data_ptr())
            if not same or output.dim() != 2 or output.shape[0] != self.y.shape[0]:
                return
        except (AttributeError, RuntimeError, TypeError):
            return
        self._count(output)

    @torch.no_grad()
    def _count(self, logits: torch.Tensor) -> None:
        self.correct += (logits.detach().argmax(1) == self.y).sum()
        self.seen += self.y.shape[0]
        self.captured = True

    @torch.no_grad()
    def fallback(self) -> None:
        if self.captured or self.x is None:
            return
        was_training = self.model.training
        self.model.eval()
        self.handle.remove()
        try:
            self._count(self.model(self.x))
        finally:
            self.handle = self.model.register_forward_hook(self._hook)
            self.model.train(was_training)

    def reset(self, correct: int = 0, seen: int = 0) -> None:
        self.correct.fill_(correct)
        self.seen = seen

    def error(self) -> float | None:
        return None if self.seen == 0 else 100.0 * (1.0 - self.correct.item() / self.seen)

    def close(self) -> None:
        self.handle.remove()


class StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step (it then saves a checkpoint);
    a second one interrupts at once. Only in the main thread, where Python delivers signals."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self.previous = None

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nrobustbp: stopping after this step to save a checkpoint (Ctrl-C again to quit at once)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.default_int_handler)


def train(
    config: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    data: tuple | None = None,
    loss_fn=None,
    progress: bool = True,
    catch_sigint: bool = True,
) -> TrainResult:
    """Train `config.model` on `config.dataset` with `config.method`; return a TrainResult.

    out_dir: the run folder (config.json, history.json, checkpoint.pt, model.pt); None keeps
      everything in memory. An existing run there is an error unless `resume` (continue it
      from its checkpoint; the config must match except for RESUMABLE_CHANGES) or `overwrite`.
    data: (train, test) ImageSets to use instead of loading `config.dataset`.
    loss_fn: per-sample loss given to the method (default cross-entropy).
    Ctrl-C saves a checkpoint after the current step and returns with status "interrupted".
    Raises NonFiniteLoss (naming the epoch and step) if the loss becomes NaN or infinite.

    History (history.json, TrainResult.history), one record per epoch: epoch, lr (used during
    the epoch), loss = main_loss + penalty (means over the epoch's training samples),
    train_error (running error of the clean training batches as the method saw them, in train
    mode, while the weights changed), val_error and test_error (eval mode, after the epoch;
    val_error None without a validation split), seconds (training steps only) and eval_seconds.
    Errors are in percent.
    """
    config.validate()
    out = Path(out_dir) if out_dir is not None else None
    saved = _check_run_folder(out, config, resume, overwrite)
    splits = prepare_data(config, data)
    method = make_method(config, loss_fn)
    device = check_device(config.device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        state = _Run(config, out, splits, method, device, saved, progress)  # builds the model: may still fail
        _prepare_run_folder(out, resume)  # only now touch the disk
        return state.run(catch_sigint)


def check_device(name: str) -> torch.device:
    """torch.device(name), or a ValueError when it is not a device or not available here."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"invalid device {name!r}: {error}") from None
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: hasattr(torch.backends, "mps") and torch.backends.mps.is_available()}
    if not available.get(device.type, lambda: True)():
        raise ValueError(f"device {name!r} is not available on this machine (try --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_run_folder(out: Path | None, config: TrainConfig, resume: bool, overwrite: bool) -> dict | None:
    """Check the folder without changing it; return the checkpoint to resume from, if any."""
    if out is None:
        if resume:
            raise ValueError("resume needs the run folder (out_dir) to resume from")
        return None
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    checkpoint = out / runs.CHECKPOINT
    if resume:
        if not checkpoint.is_file():
            raise FileNotFoundError(f"nothing to resume in {out}: it holds no {runs.CHECKPOINT}")
        saved = runs.read_torch(checkpoint)
        before = TrainConfig.from_dict(saved["config"])
        changed = [name for name in config.differences(before) if name not in RESUMABLE_CHANGES]
        if changed:
            detail = ", ".join(f"{n}: {getattr(before, n)!r} -> {getattr(config, n)!r}" for n in changed)
            raise ValueError(f"cannot resume {out} with different settings ({detail}); only {', '.join(RESUMABLE_CHANGES)} may change")
        return saved
    if (checkpoint.exists() or (out / runs.MODEL).exists()) and not overwrite:
        raise ValueError(f"{out} already holds a run; resume it, or overwrite it, or choose another folder")
    return None


def _prepare_run_folder(out: Path | None, resume: bool) -> None:
    if out is None or resume:
        return
    for name in (runs.CHECKPOINT, runs.MODEL, runs.HISTORY):  # an overwritten run's files
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


class _Run:
    """The state of one run; `run()` is the epoch loop."""

    def __init__(self, config, out, splits, method, device, saved, progress):
        from robustbp import data as datasets

        self.config, self.out, self.method, self.device, self.progress = config, out, method, device, progress
        self.splits = splits
        self.x = splits.train.images.to(device)
        self.y = splits.train.labels.to(device)
        self.model_args = model_args_for(config, splits.train)
        torch.manual_seed(config.seed)
        self.model = runs.build_model(self.model_args).to(device)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        self.scheduler = make_scheduler(config.schedule, self.optimizer, config.epochs)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.augment_rng = torch.Generator().manual_seed(config.seed + 1)
        self.augment = None
        if config.augment:  # the paper's setting for the dataset; MNIST's for data given directly
            known = config.dataset in datasets.available()
            self.augment = datasets.Augment.paper(config.dataset) if known else datasets.Augment()
        self.history: list[dict[str, Any]] = []
        self.epoch = 0           # epochs completed
        self.step = 0            # steps completed in the epoch under way
        self.partial: dict[str, float] = {}
        self.epoch_shuffle_state = None
        self.last_good = "none yet"
        if saved is not None:
            self._restore(saved)

    # --- checkpoints -------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "shuffle": self.shuffle.get_state(), "augment": self.augment_rng.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.epoch_shuffle_state is not None:
            rng["epoch_shuffle"] = self.epoch_shuffle_state
        return {
            "format": runs.FORMAT,
            "config": self.config.to_dict(),
            "model_args": self.model_args,
            "epoch": self.epoch,
            "step": self.step,
            "partial": dict(self.partial),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "method": self.method.state_dict(self.model) if hasattr(self.method, "state_dict") else None,
            "history": self.history,
        }

    def _restore(self, saved: dict[str, Any]) -> None:
        if saved.get("model_args") != self.model_args:
            raise ValueError(
                f"the checkpoint in {self.out} was trained on other data or another model "
                f"({saved.get('model_args')} != {self.model_args})"
            )
        runs.load_state(self.model, saved["model"], self.out / runs.CHECKPOINT, self.config.model)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        rng = saved["rng"]
        torch.set_rng_state(rng["torch"])
        self.shuffle.set_state(rng["shuffle"])
        self.augment_rng.set_state(rng["augment"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.epoch_shuffle_state = rng.get("epoch_shuffle")
        if saved.get("method") is not None and hasattr(self.method, "load_state_dict"):
            # a method's state between steps (e.g. power-iteration vectors); optional protocol
            self.method.load_state_dict(self.model, saved["method"])
        self.epoch, self.step = saved["epoch"], saved["step"]
        self.partial = dict(saved["partial"])
        self.history = list(saved["history"])
        self.last_good = f"epoch {self.epoch}" + (f", step {self.step}" if self.step else "")

    def _save(self, status: str) -> None:
        if self.out is None:
            return
        runs.save_json(self.config.to_dict(), self.out / runs.CONFIG)
        runs.save_torch(self._state(), self.out / runs.CHECKPOINT)
        self._save_history(status)
        self.last_good = f"epoch {self.epoch}" + (f", step {self.step}" if self.step else "")

    def _save_history(self, status: str, message: str | None = None) -> None:
        if self.out is None:
            return
        record = {"status": status, "epochs": self.history}
        if message:
            record["message"] = message
        runs.save_json(record, self.out / runs.HISTORY)

    def _save_final(self) -> None:
        if self.out is None:
            return
        final = {
            "format": runs.FORMAT,
            "config": self.config.to_dict(),
            "model_args": self.model_args,
            "state_dict": self.model.state_dict(),
        }
        runs.save_torch(final, self.out / runs.MODEL)

    def _describe(self) -> str:
        config = self.config
        params = ", ".join(f"{k}={v}" for k, v in config.method_params.items())
        val = f", {len(self.splits.val)} validation" if self.splits.val is not None else ""
        where = f" -> {self.out}" if self.out is not None else ""
        start = f" (resuming after {self.last_good})" if self.epoch or self.step else ""
        return (f"training {config.model} on {config.dataset} ({len(self.y)} images{val}) with {config.method}"
                f"{f' ({params})' if params else ''}, {config.epochs} epochs{where}{start}")

    # --- the loop ------------------------------------------------------------------------------
    def run(self, catch_sigint: bool) -> TrainResult:
        if self.progress:
            print(self._describe(), file=sys.stderr)
        if self.out is not None and self.epoch == 0 and self.step == 0:
            self._save("running")  # config.json at once, and a checkpoint to resume from
        counter = CleanBatchAccuracy(self.model, self.device)
        status = "complete"
        try:
            with StopRequest(catch_sigint) as stop:
                while self.epoch < self.config.epochs:
                    if not self._train_epoch(counter, stop):
                        status = "interrupted"
                        break
                    self._end_epoch(counter)
                    if stop.requested:
                        status = "interrupted" if self.epoch < self.config.epochs else "complete"
                        break
        except KeyboardInterrupt:
            # A second Ctrl-C (or one outside the main thread): the model may be half-way
            # through a step, so keep the checkpoint saved last rather than save this state.
            status = "interrupted"
            self._save_history("interrupted")
        finally:
            counter.close()
        if status == "complete":
            self._save_history("complete")
            self._save_final()
        elif self.out is not None:
            print(f"robustbp: interrupted; the checkpoint in {self.out} holds the run up to {self.last_good}; "
                  f"continue it with: robustbp train --resume --out {self.out}", file=sys.stderr)
        return TrainResult(
            model=self.model.eval(),
            config=self.config,
            history=self.history,
            status=status,
            out_dir=self.out,
            data_stats={"train": len(self.y), "val": len(self.splits.val) if self.splits.val else 0,
                        "test": len(self.splits.test)},
        )

    def _train_epoch(self, counter: CleanBatchAccuracy, stop: StopRequest) -> bool:
        """Steps through one epoch (or the rest of it); False if stopped by Ctrl-C."""
        from tqdm import tqdm

        config, n = self.config, len(self.y)
        batch = config.batch_size
        steps = math.ceil(n / batch)
        epoch = self.epoch + 1
        if self.step == 0:
            self.epoch_shuffle_state = self.shuffle.get_state()
            order = torch.randperm(n, generator=self.shuffle)
            self.partial = {"loss": 0.0, "main_loss": 0.0, "reg_loss": 0.0, "samples": 0, "correct": 0, "seen": 0, "seconds": 0.0}
        else:  # resuming mid-epoch: redraw this epoch's order, then continue the generator where it was
            current = self.shuffle.get_state()
            self.shuffle.set_state(self.epoch_shuffle_state)
            order = torch.randperm(n, generator=self.shuffle)
            self.shuffle.set_state(current)
        order = order.to(self.device)
        sums = self.partial
        counter.reset(int(sums["correct"]), int(sums["seen"]))
        self.model.train()
        bar = tqdm(total=steps, initial=self.step, desc=f"epoch {epoch}/{config.epochs}", leave=False,
                   disable=not self.progress, dynamic_ncols=True, file=sys.stderr)
        started = time.perf_counter()
        seconds_before = sums["seconds"]
        shown = self.step
        try:
            for step in range(self.step, steps):
                index = order[step * batch : (step + 1) * batch]
                x, y = self.x[index], self.y[index]
                if self.augment is not None:
                    x = self.augment(x, self.augment_rng)
                self.optimizer.zero_grad(set_to_none=True)
                counter.arm(x, y)
                stats = self.method.backward(self.model, x, y)
                if not math.isfinite(stats.loss):
                    self._diverged(epoch, step + 1, steps, stats)
                self.optimizer.step()
                size = y.shape[0]
                sums["loss"] += stats.loss * size
                sums["main_loss"] += stats.main_loss * size
                sums["reg_loss"] += stats.reg_loss * size
                sums["samples"] += size
                self.step = step + 1
                last = self.step == steps
                if self.step % config.log_every == 0 or last or stop.requested:
                    counter.fallback()
                    if self.progress:
                        bar.update(self.step - shown)
                        shown = self.step
                        bar.set_postfix_str(self._postfix(counter), refresh=False)
                if stop.requested and not last:
                    sums["seconds"] = seconds_before + time.perf_counter() - started
                    sums["correct"], sums["seen"] = int(counter.correct.item()), counter.seen
                    self._save("interrupted")
                    return False
        finally:
            bar.close()
        sums["seconds"] = seconds_before + time.perf_counter() - started
        sums["correct"], sums["seen"] = int(counter.correct.item()), counter.seen
        return True

    def _postfix(self, counter: CleanBatchAccuracy) -> str:
        sums = self.partial
        samples = max(sums["samples"], 1)
        error = counter.error()
        accuracy = "" if error is None else f" acc={100 - error:.1f}%"
        return f"loss={sums['loss'] / samples:.4f} pen={sums['reg_loss'] / samples:.4g}{accuracy}"

    def _diverged(self, epoch: int, step: int, steps: int, stats) -> None:
        kept = f"the last good checkpoint ({self.last_good}) is kept in {self.out / runs.CHECKPOINT}" if self.out else "nothing was saved (no run folder)"
        message = (
            f"non-finite loss ({stats.loss}: main {stats.main_loss}, penalty {stats.reg_loss}) "
            f"at epoch {epoch}, step {step} of {steps}; training stopped and {kept}. "
            f"Try a smaller learning rate (lr={self.config.lr}) or penalty weight."
        )
        self._save_history("diverged", message)
        raise NonFiniteLoss(message)

    def _end_epoch(self, counter: CleanBatchAccuracy) -> None:
        sums = self.partial
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        started = time.perf_counter()
        val_error = error_rate(self.model, self.splits.val.images.to(self.device), self.splits.val.labels.to(self.device)) if self.splits.val else None
        test_error = error_rate(self.model, self.splits.test.images.to(self.device), self.splits.test.labels.to(self.device))
        samples = max(sums["samples"], 1)
        record = {
            "epoch": self.epoch + 1,
            "lr": lr,
            "loss": sums["loss"] / samples,
            "main_loss": sums["main_loss"] / samples,
            "penalty": sums["reg_loss"] / samples,
            "train_error": counter.error(),
            "val_error": val_error,
            "test_error": test_error,
            "seconds": sums["seconds"],
            "eval_seconds": time.perf_counter() - started,
        }
        self.history.append(record)
        self.epoch += 1
        self.step = 0
        self.partial = {}
        self.epoch_shuffle_state = None
        self._save("running" if self.epoch < self.config.epochs else "complete")
        if self.progress:
            print(format_epoch(record, self.config.epochs), file=sys.stderr)


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    def pct(value):
        return "-" if value is None else f"{value:.2f}%"

    val = f"  val {pct(record['val_error'])}" if record.get("val_error") is not None else ""
    return (
        f"epoch {record['epoch']}/{epochs}  loss {record['loss']:.4f}  penalty {record['penalty']:.4g}  "
        f"train {pct(record['train_error'])}{val}  test {pct(record['test_error'])}  "
        f"lr {record['lr']:.3g}  {record['seconds']:.1f} s"
    )
