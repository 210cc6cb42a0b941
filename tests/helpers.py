"""Helpers shared by several test modules: one-thread fixtures, synthetic images, a short training loop."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn


@contextmanager
def single_thread() -> Iterator[None]:
    """Torch on one thread inside the block; the previous thread count is put back after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    with single_thread():
        yield


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_module():
    """One thread for a whole module: fast and deterministic on a shared machine."""
    with single_thread():
        yield


def synthetic_data(n: int, seed: int = 0, classes: int = 3):
    """Images (n, 1, 8, 8) in [0, 1] labelled by a random linear rule."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=generator)
    w = torch.randn(classes, 64, generator=generator)
    return x, ((x.flatten(1) - 0.5) @ w.T).argmax(dim=1)


def trained(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 200) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()
