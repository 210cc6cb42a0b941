"""The training loop: `train(config, out_dir)` runs any registered method with SGD + momentum.

Each step: zero the gradients, `method.backward(model, x, y)` (which fills `.grad`), check the
loss is finite, `optimizer.step()`. The whole dataset stays in memory as tensors, batches are
indexed directly and moved to the device one at a time. Shuffling and augmentation draw from
explicit generators seeded from the config, so a run is reproducible from `config.json`, and a
resumed run ends with the same weights (bit for bit on the CPU) as one that was never
interrupted. The loop never sets the model's train/eval mode except inside
`robustbp.modes.eval_mode` for evaluation, so a submodule the model's builder put in eval mode (a
frozen BatchNorm) stays so.

Several processes (`robustbp.training.distributed`): every rank shuffles alike and takes its slice
of each global batch (augmented with that slice's rows of the whole batch's random draws), the
model steps inside DistributedDataParallel, and one all-reduce per step sums the batch's
statistics, agrees on a non-finite loss and on a Ctrl-C. Rank 0 evaluates, prints and writes;
checkpoints hold every rank's random state and method state. With `amp="bf16"` each step runs
under torch.autocast with bfloat16, for the methods that accept it (`Method.bf16_refusal`).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbp.modes import eval_mode
from robustbp.training import distributed, runs
from robustbp.training.config import TrainConfig, make_scheduler
from robustbp.training.data import Splits, augmentation, model_args_for, prepare_data
from robustbp.training.distributed import World
from robustbp.training.interrupt import StopRequest
from robustbp.training.progress import Progress, bar_text, describe, format_epoch


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


@dataclass
class TrainResult:
    model: nn.Module                 # in eval mode
    config: TrainConfig
    history: list[dict[str, Any]]
    status: str                      # "complete" or "interrupted"
    out_dir: Path | None = None
    data_stats: dict[str, Any] = field(default_factory=dict)
    rank: int = 0                    # this process's rank in a run of several (0: the one that wrote)

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


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
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train `config.model` on `config.dataset` with `config.method`; return a TrainResult.

    out_dir: the run folder (config.json, history.json, checkpoint.pt, model.pt); None keeps
      everything in memory. An existing run there is an error unless `resume` (continue it
      from its checkpoint; the config must match except for RESUMABLE_CHANGES, and may extend
      but not shorten the epochs already trained) or `overwrite`.
    data: (train, test) ImageSets to use instead of loading `config.dataset`.
    loss_fn: per-sample loss given to the method (default cross-entropy).
    on_epoch: called with each epoch's history record as it is made (a study's progress lines),
      on rank 0.
    Ctrl-C saves a checkpoint after the current step and returns with status "interrupted".
    Raises NonFiniteLoss (naming the epoch and step) if the loss becomes NaN or infinite.

    Under a launcher that sets WORLD_SIZE > 1 (torchrun; `robustbp train --nproc N`), or inside a
    process group already started, this trains data-parallel (see `robustbp.training.distributed`):
    `config.batch_size` is the global batch and must divide by the number of processes, and a
    checkpoint resumes only with the number of processes it was trained with.

    History (history.json, TrainResult.history), one record per epoch: epoch, lr (used during
    the epoch), loss = main_loss + penalty (means over the epoch's training samples),
    train_error (error of the clean training batches in the method's own forward passes, in
    train mode, while the weights changed; None if the method reports no count), val_error,
    val_loss (mean cross-entropy) and test_error (eval mode, after the epoch; the val_ ones None
    without a validation split), seconds
    (training steps only) and eval_seconds. Errors are in percent.
    """
    config.validate()
    out = Path(out_dir) if out_dir is not None else None
    world, device = distributed.join(config.device)
    try:
        distributed.check_batch_size(config.batch_size, world.size)
        checkpoint = runs.check_run_folder(out, config, resume, overwrite, world.size)
        splits = prepare_data(config, data)
        distributed.check_steps(len(splits.train), config.batch_size, world.size)
        method = make_method(config, loss_fn)
        check_amp(method, config.amp)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            trainer = Trainer(config, out, splits, method, device, checkpoint, Progress(progress and world.is_main),
                              world)  # may still fail
            trainer.on_epoch = on_epoch
            world.barrier()  # every rank has read the folder before rank 0 changes it
            if world.is_main:
                runs.prepare_run_folder(out, resume)  # only now touch the disk
            return trainer.run(catch_sigint)
    finally:
        world.close()


def make_method(config: TrainConfig, loss_fn=None):
    from robustbp import methods

    kwargs = dict(config.method_params)
    if loss_fn is not None:
        kwargs["loss_fn"] = loss_fn
    return methods.get(config.method, **kwargs)


def check_amp(method, amp: str) -> None:
    """Refuse mixed precision for a method whose gradient it would make unsound (Method.bf16_refusal)."""
    refusal = getattr(method, "bf16_refusal", "")
    if amp == "bf16" and refusal:
        raise ValueError(f"--amp bf16 is refused by {method.name}: {refusal}")


def autocast(device: torch.device, amp: str):
    """The context a training step runs in: bfloat16 autocast on the device's type, or nothing."""
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def percent_error(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of `images` the model misclassifies in eval mode (every submodule's mode is restored)."""
    from robustbp.evaluate.metrics import accuracy

    with eval_mode(model):
        return 100.0 * (1.0 - accuracy(model, images, labels))


def mean_cross_entropy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Mean cross-entropy over `images` in eval mode: the validation loss model selection may use."""
    total = 0.0
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(images[start:start + batch_size])
            total += float(torch.nn.functional.cross_entropy(logits, labels[start:start + batch_size], reduction="sum"))
    return total / len(images)


def method_state(method, model: nn.Module) -> dict[str, Any]:
    """The method's state between steps (e.g. power-iteration vectors); {} for a method without."""
    state_dict = getattr(method, "state_dict", None)
    return state_dict(model) if state_dict is not None else {}


def load_method_state(method, model: nn.Module, state: dict[str, Any]) -> None:
    load_state_dict = getattr(method, "load_state_dict", None)
    if load_state_dict is not None:
        load_state_dict(model, state)
    elif state:
        raise ValueError(f"method {method.name!r} cannot take back its saved state ({', '.join(sorted(state))})")


def new_sums() -> dict[str, float]:
    """An epoch's running sums: losses times samples, clean-batch correct/seen counts, seconds."""
    return {"loss": 0.0, "main_loss": 0.0, "reg_loss": 0.0, "samples": 0, "correct": 0, "seen": 0, "seconds": 0.0}


# What one step adds up over the processes (one all-reduce): the epoch's sums, then how many
# processes saw a non-finite loss and how many were asked to stop (Ctrl-C).
STEP_TOTALS = ("loss", "main_loss", "reg_loss", "samples", "correct", "seen", "non_finite", "stop")

# Rank r > 0 draws its own random numbers (dropout masks, projections) from seed + r·RANK_SEED_STRIDE;
# rank 0 draws what a single process would.
RANK_SEED_STRIDE = 100_003


def step_values(stats, size: int, stop_requested: bool) -> list[float]:
    """One process's STEP_TOTALS for a step of `size` samples."""
    counted = stats.correct is not None  # a method may report no count
    return [stats.loss * size, stats.main_loss * size, stats.reg_loss * size, size,
            stats.correct if counted else 0, size if counted else 0, not math.isfinite(stats.loss), stop_requested]


def to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict with its tensors on the CPU (to gather from other processes and save)."""
    return {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in state.items()}


class Trainer:
    """One run: the model, optimizer, scheduler and generators, and how far it got; `run()` is the loop."""

    def __init__(self, config: TrainConfig, out: Path | None, splits: Splits, method, device: torch.device,
                 checkpoint: runs.Checkpoint | None, progress: Progress, world: World | None = None):
        self.config, self.out, self.splits, self.method = config, out, splits, method
        self.device, self.progress = device, progress
        self.world = world or World(device=device)
        self.on_epoch: Callable[[dict[str, Any]], None] | None = None
        self.x, self.y = splits.train.images, splits.train.labels  # each batch moves to the device on its own
        if device.type == "cuda":
            self.x, self.y = self.x.pin_memory(), self.y.pin_memory()
        self.model_args = model_args_for(config, splits.train)
        torch.manual_seed(config.seed)
        self.model = runs.build_model(self.model_args).to(device)
        self.trained = self._parallel(self.model)  # what the method steps: the model, or its DDP wrapper
        if self.world.rank > 0:
            torch.manual_seed(config.seed + RANK_SEED_STRIDE * self.world.rank)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        self.scheduler = make_scheduler(config.schedule, self.optimizer, config.epochs)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.augment_rng = torch.Generator().manual_seed(config.seed + 1)
        self.augment = augmentation(config)
        self.history: list[dict[str, Any]] = []
        self.epoch = 0           # epochs completed
        self.step = 0            # steps completed in the epoch under way
        self.sums: dict[str, float] = {}
        self.epoch_shuffle_state = None
        self.last_good: str | None = None
        if checkpoint is not None:
            self._restore(checkpoint)

    def _parallel(self, model: nn.Module) -> nn.Module:
        """The model inside DistributedDataParallel when several processes train it (BatchNorm in
        train mode then normalizes with each process's own slice of the batch)."""
        if self.world.size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    # --- checkpoints -------------------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        """What differs between processes: the global random state(s) and the method's state."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"rng": rng, "method": to_cpu(method_state(self.method, self.trained))}

    def _checkpoint(self) -> runs.Checkpoint:
        """The run as it stands; every process takes part (their states are gathered)."""
        first, *others = self.world.gather(self._rank_state())
        rng = {**first["rng"], "shuffle": self.shuffle.get_state(), "augment": self.augment_rng.get_state()}
        if self.epoch_shuffle_state is not None:
            rng["epoch_shuffle"] = self.epoch_shuffle_state
        return runs.Checkpoint(
            config=self.config.to_dict(),
            model_args=self.model_args,
            epoch=self.epoch,
            step=self.step,
            partial=dict(self.sums),
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            rng=rng,
            method=first["method"],
            history=self.history,
            world_size=self.world.size,
            other_ranks=others,
        )

    def _restore(self, checkpoint: runs.Checkpoint) -> None:
        runs.check_model_args(checkpoint, self.model_args, self.out)
        runs.load_state(self.model, checkpoint.model, self.out / runs.CHECKPOINT, self.config.model)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        rank = self.world.rank
        own = {"rng": checkpoint.rng, "method": checkpoint.method} if rank == 0 else checkpoint.other_ranks[rank - 1]
        torch.set_rng_state(own["rng"]["torch"])
        if "cuda" in own["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(own["rng"]["cuda"], self.device)
        self.shuffle.set_state(checkpoint.rng["shuffle"])
        self.augment_rng.set_state(checkpoint.rng["augment"])
        self.epoch_shuffle_state = checkpoint.rng.get("epoch_shuffle")
        load_method_state(self.method, self.trained, own["method"])
        self.epoch, self.step = checkpoint.epoch, checkpoint.step
        self.sums = dict(checkpoint.partial)
        self.history = list(checkpoint.history)
        self.last_good = checkpoint.progress

    def _save(self, status: str) -> None:
        if self.out is None:
            return
        checkpoint = self._checkpoint()
        if self.world.is_main:
            runs.save_config(self.out, self.config)
            runs.save_checkpoint(self.out, checkpoint)
            runs.save_history(self.out, status, self.history)
        self.world.barrier()  # no process goes on (and reads the folder) before the files are written
        self.last_good = checkpoint.progress

    def _save_history(self, status: str, message: str | None = None) -> None:
        if self.out is not None and self.world.is_main:
            runs.save_history(self.out, status, self.history, message)

    # --- the loop ------------------------------------------------------------------------------
    def run(self, catch_sigint: bool) -> TrainResult:
        val_images = len(self.splits.val) if self.splits.val is not None else 0
        self.progress.line(describe(self.config, len(self.y), val_images, self.out, self.last_good, self.world.size))
        if self.last_good is None:
            self._save("running")  # config.json at once, and a checkpoint to resume from
        status, stopped_at_once = "complete", False
        try:
            with StopRequest(catch_sigint) as stop:
                while self.epoch < self.config.epochs:
                    if not self._train_epoch(stop):
                        status = "interrupted"
                        break
                    self._end_epoch()
                    if self._stop_agreed(stop):
                        status = "interrupted" if self.epoch < self.config.epochs else "complete"
                        break
        except KeyboardInterrupt:
            # A second Ctrl-C (or one outside the main thread): the model may be half-way
            # through a step, so keep the checkpoint saved last rather than save this state.
            status, stopped_at_once = "interrupted", True
            self._save_history("interrupted")
        if status == "complete":
            self._save_history("complete")
            if self.out is not None and self.world.is_main:
                runs.save_model(self.out, self.config, self.model_args, self.model)
        elif self.out is not None and self.world.is_main:
            print(f"robustbp: interrupted; the checkpoint in {self.out} holds the run up to {self.last_good}; "
                  f"continue it with: robustbp train --resume --out {self.out}", file=sys.stderr)
        if not stopped_at_once:
            self.world.barrier()  # model.pt is written before any process goes on
        return TrainResult(
            model=self.model.eval(),
            config=self.config,
            history=self.history,
            status=status,
            out_dir=self.out,
            data_stats={"train": len(self.y), "val": val_images, "test": len(self.splits.test)},
            rank=self.world.rank,
        )

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether any process was asked to stop (every process gets the same answer)."""
        return self.world.sum([stop.requested])[0] > 0

    def _epoch_order(self, n: int) -> torch.Tensor:
        """This epoch's shuffled order; resuming mid-epoch redraws it and leaves the generator where it was."""
        if self.step == 0:
            self.epoch_shuffle_state = self.shuffle.get_state()
            return torch.randperm(n, generator=self.shuffle)
        current = self.shuffle.get_state()
        self.shuffle.set_state(self.epoch_shuffle_state)
        order = torch.randperm(n, generator=self.shuffle)
        self.shuffle.set_state(current)
        return order

    def _batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's slice of the global batch `index`, on the device, augmented as the slice's
        rows of the whole batch would be."""
        rows = distributed.rank_rows(index.shape[0], self.world)
        mine = index[rows]
        x = self.x[mine].to(self.device, non_blocking=True)
        y = self.y[mine].to(self.device, non_blocking=True)
        if self.augment is not None:
            draws = self.augment.draw(index.shape[0], self.augment_rng)
            x = self.augment.apply(x, draws[rows] if draws is not None else None)
        return x, y

    def _train_epoch(self, stop: StopRequest) -> bool:
        """Steps through one epoch (or the rest of it); False if stopped by Ctrl-C."""
        config, n = self.config, len(self.y)
        batch = config.batch_size
        steps = distributed.steps_per_epoch(n, batch, self.world.size)
        order = self._epoch_order(n)
        if self.step == 0:
            self.sums = new_sums()
        sums = self.sums
        bar = self.progress.bar(self.epoch + 1, config.epochs, steps, self.step)
        started = time.perf_counter()
        seconds_before = sums["seconds"]
        try:
            for step in range(self.step, steps):
                x, y = self._batch(order[step * batch : (step + 1) * batch])
                self.optimizer.zero_grad(set_to_none=True)
                with autocast(self.device, self.config.amp):
                    stats = self.method.backward(self.trained, x, y)
                totals = dict(zip(STEP_TOTALS, self.world.sum(step_values(stats, y.shape[0], stop.requested))))
                if totals["non_finite"]:
                    self._diverged(step + 1, steps, totals)
                self.optimizer.step()
                for key in ("loss", "main_loss", "reg_loss", "samples", "correct", "seen"):
                    sums[key] += totals[key]
                self.step = step + 1
                last = self.step == steps
                stopping = totals["stop"] > 0
                if self.step % config.log_every == 0 or last or stopping:
                    bar.update(self.step - bar.n)
                    bar.set_postfix_str(bar_text(sums), refresh=False)
                if stopping and not last:
                    sums["seconds"] = seconds_before + time.perf_counter() - started
                    self._save("interrupted")
                    return False
        finally:
            bar.close()
        sums["seconds"] = seconds_before + time.perf_counter() - started
        return True

    def _diverged(self, step: int, steps: int, totals: dict[str, float]) -> None:
        if self.out is not None:
            kept = f"the last good checkpoint ({self.last_good}) is kept in {self.out / runs.CHECKPOINT}"
        else:
            kept = "nothing was saved (no run folder)"
        samples = totals["samples"]
        where = f" in {int(totals['non_finite'])} of {self.world.size} processes" if self.world.size > 1 else ""
        message = (
            f"non-finite loss ({totals['loss'] / samples}: main {totals['main_loss'] / samples}, "
            f"penalty {totals['reg_loss'] / samples}) at epoch {self.epoch + 1}, step {step} of {steps}{where}; "
            f"training stopped and {kept}. Try a smaller learning rate (lr={self.config.lr}) or penalty weight."
        )
        self._save_history("diverged", message)
        raise NonFiniteLoss(message)

    def _end_epoch(self) -> None:
        sums = self.sums
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        record = self._epoch_record(lr, sums) if self.world.is_main else None
        record = self.world.from_main(record)  # every process keeps the same history
        self.history.append(record)
        if self.on_epoch is not None and self.world.is_main:
            self.on_epoch(record)
        self.epoch += 1
        self.step = 0
        self.sums = {}
        self.epoch_shuffle_state = None
        self._save("running" if self.epoch < self.config.epochs else "complete")
        self.progress.line(format_epoch(record, self.config.epochs))

    def _epoch_record(self, lr: float, sums: dict[str, float]) -> dict[str, Any]:
        """The epoch's history record: its training sums, and the evaluation (rank 0 alone evaluates)."""
        started = time.perf_counter()
        val, test = self.splits.val, self.splits.test
        val_error = percent_error(self.model, val.images.to(self.device), val.labels.to(self.device)) if val else None
        val_loss = mean_cross_entropy(self.model, val.images.to(self.device), val.labels.to(self.device)) if val else None
        test_error = percent_error(self.model, test.images.to(self.device), test.labels.to(self.device))
        samples = max(sums["samples"], 1)
        return {
            "epoch": self.epoch + 1,
            "lr": lr,
            "loss": sums["loss"] / samples,
            "main_loss": sums["main_loss"] / samples,
            "penalty": sums["reg_loss"] / samples,
            "train_error": 100.0 * (1.0 - sums["correct"] / sums["seen"]) if sums["seen"] else None,
            "val_error": val_error,
            "val_loss": val_loss,
            "test_error": test_error,
            "seconds": sums["seconds"],
            "eval_seconds": time.perf_counter() - started,
        }
