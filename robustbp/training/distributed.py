"""Several processes: data-parallel training under torchrun, or any launcher that sets the usual
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    robustbp train --nproc 2 ...                                     # `launch`: torchrun on this machine
    torchrun --nproc-per-node 8 -m robustbp train ...                # the same, started from outside

Every process (rank) builds the same model from the same seed and computes the same shuffled
order of each epoch; each global batch of B images is cut into N contiguous slices of B/N, one
per rank (`rank_rows`), and DistributedDataParallel averages the ranks' gradients, so every rank
takes the same optimizer step and one command trains the same way whatever N is. The last
partial batch of an epoch is split evenly when it divides by N, else dropped (with N = 1 it is
always kept). Rank 0 alone writes the run folder, prints and evaluates.

The process group uses gloo on the CPU and NCCL on CUDA (each rank on cuda:LOCAL_RANK), with a
timeout of PROCESS_GROUP_TIMEOUT instead of the backends' 30 minutes, so that a rank left waiting
for a dead one fails rather than hangs (under torchrun the agent also ends every rank as soon as
one dies).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from robustbp.training.device import check_device

PROCESS_GROUP_TIMEOUT = timedelta(minutes=5)


class RunFailed(RuntimeError):
    """A process of a multi-process run failed (its own error is printed above by that process)."""


@dataclass
class World:
    """The processes one run trains with, as seen from one of them."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where the collectives' tensors live (CUDA for NCCL)
    owns_group: bool = False                    # this run started the process group, and ends it

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes, prints and evaluates."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (one all-reduce); the values themselves in one process."""
        if self.size == 1:
            return list(values)
        totals = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        return totals.tolist()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if self.size == 1:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` (picklable), on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        """End the process group if this run started it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def environment_world_size() -> int:
    """WORLD_SIZE as a launcher set it (1 when unset)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"the environment variable WORLD_SIZE must be a whole number, got {text!r}") from None
    if size < 1:
        raise ValueError(f"the environment variable WORLD_SIZE must be >= 1, got {size}")
    return size


def join(device_name: str) -> tuple[World, torch.device]:
    """This process's place among the run's processes, and the device it trains on.

    A process group someone already started (a script calling `train` under its own
    init_process_group) is used as it is; otherwise, when a launcher set WORLD_SIZE > 1, one is
    started from the environment (gloo on the CPU, NCCL on CUDA) and `World.close` ends it. With
    several processes on CUDA, each uses cuda:LOCAL_RANK."""
    device = check_device(device_name)
    started = dist.is_available() and dist.is_initialized()
    size = dist.get_world_size() if started else environment_world_size()
    if size == 1:
        return World(device=device), device
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed, which several processes need")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None and device.index != local_rank:
            raise ValueError(f"with several processes each one trains on cuda:LOCAL_RANK; this one is LOCAL_RANK "
                             f"{local_rank}, so --device {device_name} does not fit: give --device cuda")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"process with LOCAL_RANK {local_rank} has no GPU: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s); start at most that many processes per machine")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"several processes train on cpu or cuda devices, not {device.type}")
    if not started:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
    world = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, owns_group=not started,
                  device=device if dist.get_backend() == "nccl" else torch.device("cpu"))
    return world, device


def rank_rows(batch: int, world: World) -> slice:
    """This rank's contiguous rows of a global batch of `batch` samples (which divides by world.size)."""
    size = batch // world.size
    return slice(world.rank * size, (world.rank + 1) * size)


def steps_per_epoch(images: int, batch_size: int, processes: int) -> int:
    """Full batches, and the last partial one when it divides among the processes (always with one)."""
    full, rest = divmod(images, batch_size)
    return full + (1 if rest and rest % processes == 0 else 0)


def check_batch_size(batch_size: int, processes: int) -> None:
    """The global batch must divide among the processes."""
    if batch_size % processes:
        raise ValueError(f"batch size {batch_size} does not divide among {processes} processes: --batch-size is "
                         f"the global batch, cut into equal slices; use a multiple of {processes}")


def check_steps(images: int, batch_size: int, processes: int) -> None:
    """The training images must give at least one step."""
    if steps_per_epoch(images, batch_size, processes) == 0:
        raise ValueError(f"the {images} training images give no batch that divides among {processes} processes")


def check_launch(processes: int, batch_size: int, device_name: str) -> None:
    """What `launch` can check before it starts anything: the number of processes, the batch, the device."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"--nproc must be a whole number >= 1, got {processes!r}")
    if environment_world_size() > 1 or (dist.is_available() and dist.is_initialized()):
        raise ValueError("--nproc starts its own processes; under torchrun or another launcher leave it out")
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed, which --nproc needs")
    check_batch_size(batch_size, processes)
    device = check_device(device_name)
    if device.type == "cuda" and processes > torch.cuda.device_count():
        raise ValueError(f"--nproc {processes} on CUDA needs {processes} GPUs, one a process; this machine has "
                         f"{torch.cuda.device_count()}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"several processes train on cpu or cuda devices, not {device.type}")


def launch(processes: int, argv: list[str]) -> None:
    """Run `python -m robustbp ARGV` in `processes` processes on this machine through torchrun
    (torch.distributed.run, standalone rendezvous); each process learns its rank from the
    environment torchrun sets. Raises RunFailed naming the ranks that failed (the agent ends the
    other ranks as soon as one fails) and KeyboardInterrupt when the agent is interrupted."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    arguments = torchrun.parse_args(["--nproc-per-node", str(processes), "--standalone", "-m", "robustbp", *argv])
    try:
        torchrun.run(arguments)
    except ChildFailedError as error:
        failed = ", ".join(f"rank {rank} (exit status {failure.exitcode})"
                           for rank, failure in sorted(error.failures.items()))
        raise RunFailed(f"the {processes}-process run failed: {failed}; its error is printed above") from None
    except SignalException:
        raise KeyboardInterrupt from None
