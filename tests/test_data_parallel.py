"""Data-parallel training in two CPU processes (gloo): every method ends with the same weights on
both ranks, and those of a single process for the deterministic methods; a run stopped mid-epoch
resumes exactly; a NaN on one rank stops both; `robustbp train --nproc 2` runs through torchrun;
a rank that dies ends the run. The two-process library runs share one spawn (`two_processes`)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from robustbp import methods
from robustbp.training import NonFiniteLoss, TrainConfig, read_history, train
from robustbp.training.distributed import World, rank_rows, steps_per_epoch

from .helpers import one_thread_per_module  # noqa: F401 (autouse fixture)
from .test_distributed import free_port

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo")

REPOSITORY = Path(__file__).resolve().parents[1]
# Methods that draw random numbers (projections, power-iteration starts, persistent vectors): each
# rank draws its own, so only "the same weights on both ranks" is theirs to meet.
RANDOM = {"jacobian-frobenius", "jacobian-spectral", "spectral-bound"}
# Parameters that make a step's gradient visible in a few steps on the tiny run.
PARAMS = {"loss-ibp": {"beta": 0.1}, "double-backprop": {"beta": 0.1}, "prediction-ibp": {"beta": 0.1},
          "tangent-prop": {"beta": 0.1}, "fast-tangent-prop": {"beta": 0.1}, "jacobian-frobenius": {"beta": 0.1},
          "jacobian-spectral": {"beta": 0.1}, "spectral-bound": {"beta": 0.01}, "weight-decay": {"beta": 0.01}}
CLI_SETTINGS = ["--dataset", "digits", "--model", "mlp-2x256", "--train-size", "80", "--batch-size", "32",
                "--lr", "0.05", "--seed", "3", "--epochs", "1", "--quiet"]


def tiny(method: str, **changes) -> TrainConfig:
    """80 digits, global batch 32: two full batches and a last one of 16, which two processes split."""
    base = dict(dataset="digits", model="mlp-2x256", epochs=1, batch_size=32, train_size=80, lr=0.05,
                schedule="constant", seed=3, augment=True, method=method, method_params=PARAMS.get(method, {}))
    base.update(changes)
    return TrainConfig(**base)


def every_config() -> dict[str, TrainConfig]:
    configs = {name: tiny(name) for name in methods.available()}
    configs["jacobian-frobenius exact"] = tiny("jacobian-frobenius", method_params={"beta": 0.1, "n_proj": -1})
    configs["standard with dropout"] = tiny("standard", dropout=0.3)
    return configs


def two_process_work(folder: Path, rank: int) -> None:
    """What each of the two processes does, in one process group started here (train() uses it):
    every config; a run stopped by Ctrl-C on rank 1 mid-epoch, resumed; a NaN on rank 1 alone."""
    for label, config in every_config().items():
        result = train(config, None, progress=False, catch_sigint=False)
        torch.save(result.model.state_dict(), folder / f"{label}-{rank}.pt")

    config = RESUME_CONFIG
    straight = train(config, folder / "straight", progress=False)
    ctrl_c = on_rank_1_at(STOP_AT, lambda loss: signal.raise_signal(signal.SIGINT))
    interrupted = train(config, folder / "resumed", progress=False, loss_fn=ctrl_c)
    resumed = train(config, folder / "resumed", resume=True, progress=False)
    torch.save({"straight": straight.model.state_dict(), "resumed": resumed.model.state_dict(),
                "statuses": [straight.status, interrupted.status, resumed.status]}, folder / f"resume-{rank}.pt")

    poison = on_rank_1_at(2, lambda loss: loss * float("nan"))
    try:
        train(tiny("standard"), folder / "diverged", progress=False, loss_fn=poison)
        message = None
    except NonFiniteLoss as error:
        message = str(error)
    torch.save(message, folder / f"nan-{rank}.pt")


# jacobian-spectral with dropout and augmentation draws on every rank: resuming must restore each rank's state.
RESUME_CONFIG = tiny("jacobian-spectral", epochs=2, dropout=0.3)
STOP_AT = 3 + 2  # epoch 2, step 2 (3 steps an epoch)


def on_rank_1_at(call: int, action):
    """Cross-entropy per sample that applies `action` on rank 1 at its `call`-th call (1-based)."""
    calls = {"n": 0}

    def loss_fn(logits, labels):
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        calls["n"] += 1
        if dist.get_rank() == 1 and calls["n"] == call:
            result = action(loss)
            return loss if result is None else result
        return loss

    return loss_fn


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        two_process_work(Path(folder), rank)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """The folder where two spawned processes left what `two_process_work` made."""
    folder = tmp_path_factory.mktemp("two-processes")
    mp.start_processes(_worker, args=(2, free_port(), str(folder)), nprocs=2, start_method="spawn")
    return folder


def assert_close_weights(got: dict, want: dict, label: str, rtol: float = 1e-4) -> None:
    for key in want:
        scale = float(want[key].abs().max()) + 1e-12
        assert float((got[key] - want[key]).abs().max()) <= rtol * scale, f"{label}: {key}"


def test_every_method_trains_alike_in_two_processes(two_processes):
    for label, config in every_config().items():
        ranks = [torch.load(two_processes / f"{label}-{rank}.pt") for rank in range(2)]
        for key in ranks[0]:
            assert torch.equal(ranks[0][key], ranks[1][key]), f"{label}: {key} differs between the ranks"
        if config.method in RANDOM and config.method_params.get("n_proj") != -1 or config.dropout:
            continue
        single = train(config, None, progress=False).model.state_dict()
        assert_close_weights(ranks[0], single, label)


def test_a_two_process_run_stopped_mid_epoch_resumes_to_the_same_weights(two_processes):
    for rank in range(2):
        saved = torch.load(two_processes / f"resume-{rank}.pt")
        assert saved["statuses"] == ["complete", "interrupted", "complete"]
        for key, value in saved["straight"].items():
            assert torch.equal(saved["resumed"][key], value), key
    # Ctrl-C came to rank 1 alone; both stopped after that step, and the checkpoint holds both ranks' states.
    history = read_history(two_processes / "resumed")
    assert history["status"] == "complete" and [e["epoch"] for e in history["epochs"]] == [1, 2]
    checkpoint = torch.load(two_processes / "resumed" / "checkpoint.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and len(checkpoint["other_ranks"]) == 1
    assert not torch.equal(checkpoint["rng"]["torch"], checkpoint["other_ranks"][0]["rng"]["torch"])


def test_resuming_with_another_number_of_processes_is_refused(two_processes, capsys):
    from robustbp import cli

    with pytest.raises(ValueError, match="with 1 process: it was trained with 2 processes; resume it with --nproc 2"):
        train(RESUME_CONFIG.replace(epochs=3), two_processes / "resumed", resume=True, progress=False)
    code = cli.main(["train", "--nproc", "4", "--resume", "--epochs", "3", "--out", str(two_processes / "resumed")])
    err = capsys.readouterr().err
    assert code == 1 and "with 4 processes: it was trained with 2 processes; resume it with --nproc 2" in err
    assert len(err.strip().splitlines()) == 1


def test_a_non_finite_loss_on_one_rank_stops_every_rank(two_processes):
    messages = [torch.load(two_processes / f"nan-{rank}.pt") for rank in range(2)]
    assert messages[0] == messages[1]
    assert "non-finite loss (nan: main nan, penalty 0.0) at epoch 1, step 2 of 3 in 1 of 2 processes" in messages[0]
    assert read_history(two_processes / "diverged")["status"] == "diverged"


# The methods that replay the network linearly (robustbp.passes) and so refuse nn.SyncBatchNorm.
LINEARIZED = {"loss-ibp", "double-backprop", "prediction-ibp", "tangent-prop", "fast-tangent-prop",
              "jacobian-frobenius", "jacobian-spectral"}


@pytest.mark.parametrize("name", methods.available())
def test_sync_batch_norm_is_refused_by_the_linearized_methods_alone(name):
    from torch import nn

    from robustbp.passes import UnsupportedModule

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.SyncBatchNorm(8), nn.ReLU(), nn.Linear(8, 3)).train()
    x, y = torch.rand(6, 1, 4, 4), torch.arange(6) % 3
    if name in LINEARIZED:
        with pytest.raises(UnsupportedModule, match="holds an nn.SyncBatchNorm in train mode, whose statistics come "
                                                    "from every process's batch"):
            methods.get(name).backward(model, x, y)
    else:
        methods.get(name).backward(model, x, y)  # one process: SyncBatchNorm normalizes as BatchNorm does
        assert all(p.grad is not None for p in model.parameters())


def test_last_partial_batch_is_split_or_dropped():
    assert steps_per_epoch(80, 32, 1) == 3 and steps_per_epoch(80, 32, 2) == 3  # 16 left: 8 each
    assert steps_per_epoch(81, 32, 2) == 2  # 17 left: dropped
    assert steps_per_epoch(81, 32, 1) == 3  # one process keeps every batch
    assert [rank_rows(16, World(rank=r, size=2)) for r in range(2)] == [slice(0, 8), slice(8, 16)]


# ------------------------------------------------------------------------ the command line
def test_robustbp_train_nproc_2_runs_through_torchrun(tmp_path):
    """The real command: torchrun starts `python -m robustbp train` twice; rank 0 alone writes and
    prints; the weights are a single process's (loss-ibp is deterministic)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)}
    run = subprocess.run([sys.executable, "-m", "robustbp", "train", "--nproc", "2", *CLI_SETTINGS, "--method",
                          "loss-ibp", "--beta", "0.1", "--augment", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=180, env=env, cwd=REPOSITORY)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("test error") == 1 and run.stdout.startswith(str(tmp_path / "run"))
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and checkpoint["step"] == 0 and checkpoint["epoch"] == 1
    got = torch.load(tmp_path / "run" / "model.pt", weights_only=False)["state_dict"]
    want = train(tiny("loss-ibp", schedule="exp:0.98"), None, progress=False).model.state_dict()
    assert_close_weights(got, want, "loss-ibp through --nproc 2")


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "33"], "batch size 33 does not divide among 2 processes"),
    (["--amp", "fp16"], "amp fp16 is not supported: float16 needs a gradient scaler"),
    (["--device", "cuda:7"], "cuda:7"),
])
def test_nproc_refusals_are_one_line_before_any_process_starts(args, message, capsys, tmp_path):
    from robustbp import cli

    code = cli.main(["train", "--nproc", "2", *CLI_SETTINGS, "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_nproc_under_a_launcher_is_refused(capsys, tmp_path, monkeypatch):
    from robustbp import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", "--nproc", "2", *CLI_SETTINGS, "--out", str(tmp_path / "run")]) == 1
    assert "under torchrun or another launcher leave it out" in capsys.readouterr().err


def test_without_nproc_keeps_everything_else():
    from robustbp import cli

    argv = ["train", "--nproc", "2", "--n-iter", "3", "--npr=4", "--param", "nproc=1", "--beta", "-1"]
    assert cli.without_nproc(argv) == ["train", "--n-iter", "3", "--param", "nproc=1", "--beta", "-1"]


DYING_RANK = """
    import sys
    import torch
    from robustbp.training import TrainConfig, train

    def loss_fn(logits, labels):
        if torch.distributed.get_rank() == 1:
            raise RuntimeError("injected failure on rank 1")
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")

    config = TrainConfig(dataset="digits", model="mlp-2x256", train_size=80, batch_size=32, epochs=1)
    train(config, sys.argv[1], progress=False, loss_fn=loss_fn)
"""


def test_a_rank_that_dies_ends_the_run_under_torchrun(tmp_path):
    """Under an outside torchrun (the environment variables path): rank 1 raises at its first step,
    rank 0 is left waiting in the step's all-reduce, and torchrun's agent ends it: no hang."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(DYING_RANK))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                          str(script), str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=REPOSITORY)
    assert run.returncode != 0
    assert "injected failure on rank 1" in run.stderr
    assert read_history(tmp_path / "run")["status"] == "running"  # rank 0 wrote its first checkpoint, no more
