"""Methods under DistributedDataParallel: two CPU processes (gloo) each take half of a batch;
every rank must end with the average of the two halves' gradients, as for loss.backward()."""
from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import robustbp.methods as methods

DETERMINISTIC = [
    ("standard", {}), ("loss-ibp", {"beta": 0.5, "p": 2}), ("double-backprop", {"beta": 0.5}),
    ("prediction-ibp", {"beta": 0.5}), ("tangent-prop", {"beta": 0.5}), ("fast-tangent-prop", {"beta": 0.5}),
    ("adversarial", {"eps": 0.1}), ("adversarial-backprop", {"eps": 0.1}),
    ("jacobian-frobenius", {"beta": 0.5, "n_proj": -1}), ("weight-decay", {"beta": 0.1}), ("linbp", {}),
]


def make_batch():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 4)
    ).double().eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64, generator=generator)
    y = torch.arange(8) % 4
    return model, x, y


def flat_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _worker(rank, world, port, results):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, x, y = make_batch()
    half = slice(rank * 4, (rank + 1) * 4)
    for name, kwargs in DETERMINISTIC:
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
        methods.get(name, **kwargs).backward(ddp, x[half], y[half])
        results[(rank, name)] = flat_grads(ddp.module).tolist()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_every_deterministic_method_averages_gradients_under_ddp():
    with mp.get_context("spawn").Manager() as manager:
        results = manager.dict()
        mp.start_processes(_worker, args=(2, free_port(), results), nprocs=2, start_method="spawn")
        results = dict(results)
    model, x, y = make_batch()
    for name, kwargs in DETERMINISTIC:
        halves = []
        for rank in range(2):
            single = copy.deepcopy(model)
            methods.get(name, **kwargs).backward(single, x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])
            halves.append(flat_grads(single))
        want = (halves[0] + halves[1]) / 2
        for rank in range(2):
            got = torch.tensor(results[(rank, name)], dtype=torch.float64)
            assert float((got - want).norm() / want.norm()) <= 1e-10, name
