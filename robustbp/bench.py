"""`robustbp bench`: the cost of one training step of each method, measured side by side.

One step = zero_grad + method.backward + optimizer.step, on a fixed random batch. The methods
run interleaved in one process (A, B, C, A, B, C, ...) after a warm-up, so that a slow moment
of a shared machine hits every method alike; each method's figure is the median over rounds
and its ratio is taken to `standard` measured in the same rounds.

    robustbp bench --model ibp-mnist --batch 128 --rounds 20
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import methods as method_registry
from . import models as model_registry

DEFAULT_METHODS = method_registry.bench_specs()  # every method, and the choices each declares worth timing


@dataclass
class MethodTiming:
    method: str
    median_ms: float
    ratio: float  # median / median of `standard`, same rounds
    saved_mib: float  # tensors autograd saved for backward during one step (CPU); peak allocated on CUDA


def parse_method(spec: str):
    """'name' or 'name:key=value/key=value' → (name, kwargs); values parsed as int, float or str."""
    name, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, rest.split("/")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bench: method option {item!r} in {spec!r} is not of the form key=value")
        for convert in (int, float):
            try:
                kwargs[key] = convert(value)
                break
            except ValueError:
                continue
        else:
            kwargs[key] = value
    return name, kwargs




def training_step(method, model: nn.Module, optimizer, x, y) -> None:
    optimizer.zero_grad(set_to_none=True)
    method.backward(model, x, y)
    optimizer.step()


def saved_tensor_mib(run) -> float:
    """MiB of distinct tensors that autograd saves for backward while `run()` executes. Each
    storage is held until the end, so that a freed one's address, reused by a later tensor, does
    not hide that tensor (the figure varied by 4.6 MiB between identical runs)."""
    seen: dict[int, torch.UntypedStorage] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storage.nbytes() for storage in seen.values()) / 2**20


def bench(
    model_name: str = "ibp-mnist",
    batch_size: int = 128,
    method_specs: tuple[str, ...] = DEFAULT_METHODS,
    rounds: int = 20,
    warmup: int = 3,
    image_size: int = 28,
    in_channels: int = 1,
    num_classes: int = 10,
    device: str = "cpu",
    seed: int = 0,
) -> list[MethodTiming]:
    """Median step time of each method over `rounds` interleaved rounds, and its ratio to standard.
    `model_name` may name several models, comma-separated ("lenet,lenet-functional"): all of them
    run in the same interleaved rounds, each method labelled "model: method", each ratio taken to
    the same model's standard."""
    if rounds < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"bench: rounds and batch size must be ≥ 1 and warmup ≥ 0, got {rounds}, {batch_size}, {warmup}")
    specs = list(dict.fromkeys(("standard", *method_specs)))
    model_names = [name.strip() for name in model_name.split(",") if name.strip()]
    x = torch.rand(batch_size, in_channels, image_size, image_size,
                   generator=torch.Generator().manual_seed(seed)).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=torch.Generator().manual_seed(seed + 1)).to(device)
    runs = []
    for one_model in model_names:
        torch.manual_seed(seed)
        base_model = model_registry.get(
            one_model, in_channels=in_channels, image_size=image_size, num_classes=num_classes
        ).to(device)
        for spec in specs:
            name, kwargs = parse_method(spec)
            model = copy.deepcopy(base_model).train()
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            label = spec if len(model_names) == 1 else f"{one_model}: {spec}"
            runs.append((label, method_registry.get(name, **kwargs), model, optimizer))

    def timed(run) -> float:
        _, method, model, optimizer = run
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        training_step(method, model, optimizer, x, y)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):
        for run in runs:
            timed(run)
    times = {spec: [] for spec, *_ in runs}
    for _ in range(rounds):
        for run in runs:
            times[run[0]].append(timed(run))
    memory = {}
    for spec, method, model, optimizer in runs:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            training_step(method, model, optimizer, x, y)
            memory[spec] = torch.cuda.max_memory_allocated() / 2**20
        else:
            memory[spec] = saved_tensor_mib(lambda: training_step(method, model, optimizer, x, y))
    medians = {spec: statistics.median(values) for spec, values in times.items()}

    def standard_of(label: str) -> float:
        return medians[label.rpartition(": ")[0] + ": standard" if ": " in label else "standard"]

    return [
        MethodTiming(spec, 1e3 * medians[spec], medians[spec] / standard_of(spec), memory[spec]) for spec in medians
    ]


SPECTRAL_SETUPS = (  # (model, channels, image size, classes, batch)
    ("lenet", 1, 28, 10, 8),
    ("lenet", 1, 28, 10, 32),
    ("ibp-cifar", 3, 32, 10, 32),
    ("ibp-cifar", 3, 32, 100, 32),
)


def spectral_cost(setups=SPECTRAL_SETUPS, repeats: int = 5, seed: int = 0):
    """Seconds per batch of the penalty's power-iteration estimate (1 iteration) against the exact
    σ_max of each sample's Jacobian: batched (vmap of jacrev + matrix 2-norm), and one sample at a
    time (torch.autograd.functional.jacobian, as a straightforward implementation would): the
    spectral paper's Fig. 5 claim. The exact cost grows with the number of classes C (C backward
    passes), the estimate's with the number of iterations."""
    from .evaluate.spectral import jacobian_spectral_norm, median_seconds
    from .power_iteration import spectral_norm_estimate

    rows = []
    for model_name, channels, size, classes, batch in setups:
        torch.manual_seed(seed)
        model = model_registry.get(model_name, in_channels=channels, image_size=size, num_classes=classes).eval()
        x = torch.rand(batch, channels, size, size)

        def exact_per_sample():
            for sample in x:
                jac = torch.autograd.functional.jacobian(lambda s: model(s.unsqueeze(0)).squeeze(0), sample)
                torch.linalg.matrix_norm(jac.flatten(1), ord=2)

        estimate_s = median_seconds(lambda: spectral_norm_estimate(model, x, n_iter=1), repeats)
        exact_s = median_seconds(lambda: jacobian_spectral_norm(model, x), max(1, repeats // 2))
        loop_s = median_seconds(exact_per_sample, 1)
        rows.append({"model": model_name, "input": [channels, size, size], "classes": classes, "batch": batch,
                     "estimate_ms": 1e3 * estimate_s, "exact_ms": 1e3 * exact_s, "exact_loop_ms": 1e3 * loop_s,
                     "speedup": exact_s / estimate_s, "speedup_over_loop": loop_s / estimate_s})
    return rows


def format_table(timings: list[MethodTiming]) -> str:
    width = max(28, *(len(t.method) + 1 for t in timings))
    lines = [f"{'method':<{width}} {'median ms':>10} {'× standard':>11} {'saved MiB':>10}"]
    lines += [f"{t.method:<{width}} {t.median_ms:>10.2f} {t.ratio:>11.2f} {t.saved_mib:>10.1f}" for t in timings]
    return "\n".join(lines)


def as_json(timings: list[MethodTiming]) -> list[dict]:
    return [asdict(t) for t in timings]


def trainer_overhead(rounds: int = 3, model_name: str = "ibp-mnist", batch_size: int = 128, seed: int = 0) -> dict:
    """One epoch of `standard` on mnist-5k through `robustbp.training` against a plain hand-written
    PyTorch loop over the same data, model and batches, interleaved; seconds of training steps."""
    import torch.nn.functional as F

    from .data import load
    from .training import TrainConfig, train
    from .training.data import model_args_for

    config = TrainConfig(dataset="mnist-5k", model=model_name, method="standard", epochs=1, batch_size=batch_size,
                         seed=seed, schedule="constant")
    train_set, test_set = load("mnist-5k")

    def trainer_epoch() -> float:
        return train(config, None, progress=False, catch_sigint=False, data=(train_set, test_set)).history[0]["seconds"]

    def plain_epoch() -> float:
        torch.manual_seed(seed)
        model = model_registry.get(**model_args_for(config, train_set))
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
        start = time.perf_counter()
        for first in range(0, len(order), batch_size):
            index = order[first:first + batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(train_set.images[index]), train_set.labels[index]).backward()
            optimizer.step()
        return time.perf_counter() - start

    trainer_times, plain_times = [], []
    for _ in range(rounds):
        trainer_times.append(trainer_epoch())
        plain_times.append(plain_epoch())
    trainer_s, plain_s = statistics.median(trainer_times), statistics.median(plain_times)
    return {"trainer_s": trainer_s, "plain_loop_s": plain_s, "ratio": trainer_s / plain_s, "rounds": rounds}
