"""The trainer: exact resume, atomic checkpoints, the non-finite-loss stop, history, schedules, load_run.

Tiny runs: scikit-learn's 8×8 digits and the 2×256 MLP, a few hundred images, a few epochs.
"""
from __future__ import annotations

import json
import math
import os
import signal
import stat

import pytest
import torch
from torch import nn

from robustbp import methods, models
from robustbp.layers import Normalize
from robustbp.methods import StepStats
from robustbp.training import (
    NonFiniteLoss,
    TrainConfig,
    load_run,
    make_scheduler,
    parse_schedule,
    prepare_data,
    read_history,
    train,
)
from robustbp.training import loop, runs

from .helpers import one_thread_per_module  # noqa: F401 (autouse fixture)


def tiny(**changes) -> TrainConfig:
    base = dict(dataset="digits", model="mlp-2x256", epochs=3, batch_size=32, train_size=320, lr=0.05,
                schedule="exp:0.9", seed=3)
    base.update(changes)
    return TrainConfig(**base)


class CountingLoss:
    """Cross-entropy per sample that calls `action(call)` before the n-th call (1-based)."""

    def __init__(self, at: int, action):
        self.calls, self.at, self.action = 0, at, action

    def __call__(self, logits, labels):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        if self.calls == self.at:
            result = self.action(loss)
            if result is not None:
                return result
        return loss


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def without_times(history):
    return [{k: v for k, v in e.items() if k not in ("seconds", "eval_seconds")} for e in history]


# ------------------------------------------------------------------------------ resume
# dropout and augmentation make the run draw from both the torch RNG and the generators.
RESUME_CONFIG = dict(dropout=0.2, augment=True, method="loss-ibp", method_params={"beta": 0.01, "p": 1})


def test_resume_after_ctrl_c_mid_epoch_is_bit_identical(tmp_path):
    config = tiny(**RESUME_CONFIG)
    reference = train(config, tmp_path / "straight", progress=False)
    assert reference.status == "complete"

    steps_per_epoch = 10  # 320 images / batch 32
    ctrl_c = CountingLoss(at=steps_per_epoch + 4, action=lambda loss: signal.raise_signal(signal.SIGINT))
    interrupted = train(config, tmp_path / "run", progress=False, loss_fn=ctrl_c)
    assert interrupted.status == "interrupted"
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert (saved["epoch"], saved["step"]) == (1, 4)  # stopped after the step under way
    assert read_history(tmp_path / "run")["status"] == "interrupted"
    assert not (tmp_path / "run" / "model.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back

    resumed = train(config, tmp_path / "run", resume=True, progress=False)
    assert resumed.status == "complete"
    assert_same_weights(resumed.model, reference.model)
    assert without_times(resumed.history) == without_times(reference.history)
    final, _ = load_run(tmp_path / "run")
    assert_same_weights(final, reference.model)


def test_resume_after_hard_interrupt_keeps_last_epoch_and_is_bit_identical(tmp_path):
    config = tiny(**RESUME_CONFIG)
    reference = train(config, None, progress=False)

    def hard_stop(loss):
        raise KeyboardInterrupt  # a second Ctrl-C: no time to save this state

    interrupted = train(config, tmp_path / "run", progress=False, loss_fn=CountingLoss(at=25, action=hard_stop))
    assert interrupted.status == "interrupted"
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert (saved["epoch"], saved["step"]) == (2, 0)  # the end of epoch 2 is the last good state
    resumed = train(config, tmp_path / "run", resume=True, progress=False)
    assert_same_weights(resumed.model, reference.model)


@pytest.mark.parametrize("method", methods.available())
def test_every_method_resumes_exactly(method, tmp_path):
    """Methods that keep state between steps (spectral-bound) save it through state_dict(model)."""
    config = tiny(method=method, epochs=2, train_size=96, lr=0.01)
    reference = train(config, None, progress=False)
    ctrl_c = CountingLoss(at=4, action=lambda loss: signal.raise_signal(signal.SIGINT))
    assert train(config, tmp_path / "run", progress=False, loss_fn=ctrl_c).status == "interrupted"
    resumed = train(config, tmp_path / "run", resume=True, progress=False)
    assert_same_weights(resumed.model, reference.model)


def test_resume_can_extend_the_epochs(tmp_path):
    full = train(tiny(epochs=3), None, progress=False)
    train(tiny(epochs=1), tmp_path / "run", progress=False)
    extended = train(tiny(epochs=3), tmp_path / "run", resume=True, progress=False)
    assert [e["epoch"] for e in extended.history] == [1, 2, 3]
    assert_same_weights(extended.model, full.model)


def test_resume_refuses_fewer_epochs_than_already_trained(tmp_path):
    run = tmp_path / "run"
    train(tiny(epochs=3), run, progress=False)
    model_file = (run / "model.pt").read_bytes()
    with pytest.raises(ValueError, match=r"with epochs 2: it has already trained 3 epochs; resume with epochs >= 3"):
        train(tiny(epochs=2), run, resume=True, progress=False)
    assert (run / "model.pt").read_bytes() == model_file
    assert [e["epoch"] for e in read_history(run)["epochs"]] == [1, 2, 3]

    ctrl_c = CountingLoss(at=10 + 4, action=lambda loss: signal.raise_signal(signal.SIGINT))
    assert train(tiny(), tmp_path / "mid", progress=False, loss_fn=ctrl_c).status == "interrupted"
    with pytest.raises(ValueError, match=r"already trained 1 epoch and 4 steps of epoch 2; resume with epochs >= 2"):
        train(tiny(epochs=1), tmp_path / "mid", resume=True, progress=False)


def test_resume_refuses_other_settings_and_missing_checkpoints(tmp_path):
    train(tiny(epochs=1), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(tiny(epochs=2, lr=0.5), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny(epochs=1), tmp_path / "run", progress=False)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(tiny(), tmp_path / "empty", resume=True, progress=False)
    again = train(tiny(epochs=1), tmp_path / "run", overwrite=True, progress=False)
    assert again.status == "complete"


# ------------------------------------------------------------------- atomic checkpoints
def crashing_save(obj, file, *args, **kwargs):
    file.write(b"half a checkpoint")
    raise OSError("disk full (simulated crash while writing)")


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny(epochs=1), run, progress=False)
    before = torch.load(run / "checkpoint.pt", weights_only=False)

    saves = {"n": 0}
    real_save = torch.save

    def save_then_crash(obj, file, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] >= 2:  # the first write succeeds, then the disk "fails"
            return crashing_save(obj, file)
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(OSError, match="simulated crash"):
        train(tiny(epochs=3), run, resume=True, progress=False)
    monkeypatch.setattr(torch, "save", real_save)

    after = torch.load(run / "checkpoint.pt", weights_only=False)  # still a whole file
    assert after["epoch"] == 2  # the one good write of the resumed run
    assert before["epoch"] == 1
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temporary file was removed
    model, _ = load_run(run)  # and the run still loads
    assert isinstance(model, torch.nn.Module)


def test_atomic_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError):
        runs.save_torch({"a": 1}, path)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    runs.save_torch({"a": torch.ones(2)}, path)
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError):
        runs.save_torch({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_run_files_have_ordinary_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        train(tiny(epochs=1, train_size=64), tmp_path / "run", progress=False)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir()}
    assert modes == {"checkpoint.pt": 0o644, "config.json": 0o644, "history.json": 0o644, "model.pt": 0o644}


# ------------------------------------------------------------------ older run folders
FORMAT_1_CHECKPOINT = {"format", "config", "model_args", "epoch", "step", "partial", "model", "optimizer",
                       "scheduler", "rng", "method", "history"}
FORMAT_3_ADDITIONS = {"world_size", "other_ranks"}


def as_format_1(folder):
    """Rewrite a run folder as robustbp wrote it in format 1: the fields of format 3 but those it
    added for several processes, and "method" None for a method without state."""
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=False)
    assert set(checkpoint) - FORMAT_3_ADDITIONS == FORMAT_1_CHECKPOINT
    for name in FORMAT_3_ADDITIONS & set(checkpoint):
        del checkpoint[name]
    checkpoint["format"] = 1
    checkpoint["method"] = checkpoint["method"] or None
    torch.save(checkpoint, folder / "checkpoint.pt")
    if (folder / "model.pt").exists():
        final = torch.load(folder / "model.pt", weights_only=False)
        assert set(final) == {"format", "config", "model_args", "state_dict"}
        torch.save({**final, "format": 1}, folder / "model.pt")


def test_format_1_runs_load_and_resume_exactly(tmp_path):
    config = tiny(epochs=2)
    reference = train(config, None, progress=False)
    ctrl_c = CountingLoss(at=10 + 4, action=lambda loss: signal.raise_signal(signal.SIGINT))
    assert train(config, tmp_path / "run", progress=False, loss_fn=ctrl_c).status == "interrupted"
    as_format_1(tmp_path / "run")
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["method"] is None

    resumed = train(config, tmp_path / "run", resume=True, progress=False)
    assert_same_weights(resumed.model, reference.model)
    assert without_times(resumed.history) == without_times(reference.history)
    as_format_1(tmp_path / "run")
    model, loaded_config = load_run(tmp_path / "run")
    assert loaded_config == config
    assert_same_weights(model, reference.model)
    extended = train(config.replace(epochs=3), tmp_path / "run", resume=True, progress=False)
    assert [e["epoch"] for e in extended.history] == [1, 2, 3]


def test_a_newer_format_is_refused_clearly(tmp_path):
    run = tmp_path / "run"
    train(tiny(epochs=1), run, progress=False)
    for name in ("checkpoint.pt", "model.pt"):
        saved = torch.load(run / name, weights_only=False)
        torch.save({**saved, "format": runs.FORMAT + 1}, run / name)
    with pytest.raises(ValueError, match=f"format {runs.FORMAT + 1}, written by a newer robustbp"):
        load_run(run)
    with pytest.raises(ValueError, match="written by a newer robustbp"):
        train(tiny(epochs=2), run, resume=True, progress=False)


# -------------------------------------------------------------------------- non-finite
def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    poison = CountingLoss(at=13, action=lambda loss: loss * float("nan"))  # epoch 2, step 3
    with pytest.raises(NonFiniteLoss, match=r"epoch 2, step 3 of 10") as caught:
        train(tiny(), run, progress=False, loss_fn=poison)
    assert "checkpoint" in str(caught.value) and "epoch 1" in str(caught.value)
    saved = torch.load(run / "checkpoint.pt", weights_only=False)
    assert (saved["epoch"], saved["step"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    history = read_history(run)
    assert history["status"] == "diverged" and "epoch 2, step 3" in history["message"]
    assert len(history["epochs"]) == 1
    assert not (run / "model.pt").exists()


def test_huge_learning_rate_diverges_with_a_clear_error(tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss .* at epoch \d+, step \d+ of \d+"):
        train(tiny(lr=1e12, momentum=0.0, schedule="constant", epochs=5), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


# ----------------------------------------------------------------------------- history
def test_run_folder_and_history_contents(tmp_path):
    config = tiny(val_size=100, method="loss-ibp", method_params={"beta": 0.05, "p": 2}, schedule="exp:0.5")
    result = train(config, tmp_path / "run", progress=False)
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["checkpoint.pt", "config.json", "history.json", "model.pt"]
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == config.to_dict()
    history = read_history(tmp_path / "run")
    assert history["status"] == "complete"
    epochs = history["epochs"]
    assert epochs == result.history
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert [e["lr"] for e in epochs] == pytest.approx([0.05, 0.025, 0.0125])
    for e in epochs:
        assert set(e) == {"epoch", "lr", "loss", "main_loss", "penalty", "train_error", "val_error", "val_loss",
                          "test_error", "seconds", "eval_seconds"}
        for key in ("train_error", "val_error", "test_error"):
            assert 0.0 <= e[key] <= 100.0
        assert e["penalty"] > 0 and e["loss"] == pytest.approx(e["main_loss"] + e["penalty"])
        assert e["seconds"] > 0 and e["eval_seconds"] >= 0
    assert epochs[-1]["test_error"] < 50  # it learned something
    assert result.data_stats == {"train": 320, "val": 100, "test": 360}
    assert all(e["val_loss"] > 0 for e in epochs)


def test_validation_loss_is_the_mean_cross_entropy_in_eval_mode():
    from robustbp.training.loop import mean_cross_entropy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    x, y = torch.rand(300, 1, 8, 8), torch.randint(0, 3, (300,))
    got = mean_cross_entropy(model, x, y, batch_size=128)
    model.eval()
    want = float(torch.nn.functional.cross_entropy(model(x), y))
    assert got == pytest.approx(want, rel=1e-6)
    model.train()
    mean_cross_entropy(model, x, y)
    assert model.training and model[2].training


def test_train_error_comes_from_the_clean_forward_pass(tmp_path):
    """For standard BP the running error is exactly that of the clean batches it trained on."""
    config = tiny(epochs=1, lr=1e-9, momentum=0.0, schedule="constant", batch_size=320)
    result = train(config, None, progress=False)
    splits = prepare_data(config)
    with torch.no_grad():
        wrong = (result.model(splits.train.images).argmax(1) != splits.train.labels).sum().item() / 320
    assert result.history[0]["train_error"] == pytest.approx(100 * wrong, abs=1e-6)


@pytest.mark.parametrize("method", methods.available())
def test_every_registered_method_trains(method, tmp_path):
    config = tiny(method=method, epochs=1, train_size=64, lr=0.01)
    result = train(config, tmp_path / method, progress=False)
    (epoch,) = result.history
    assert math.isfinite(epoch["loss"]) and 0 <= epoch["test_error"] <= 100
    assert epoch["train_error"] is not None


class MethodWithoutState:
    """A method as written before Method had state_dict: a name and backward, and no correct count."""

    name = "plain"

    def __init__(self, loss_fn=None):
        self.standard = methods.get("standard", **({"loss_fn": loss_fn} if loss_fn else {}))

    def backward(self, model, x, y):
        stats = self.standard.backward(model, x, y)
        return StepStats(stats.loss, stats.main_loss, stats.reg_loss, None)


def test_a_method_without_state_dict_trains_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "make_method", lambda config, loss_fn=None: MethodWithoutState(loss_fn))
    reference = train(tiny(epochs=2), None, progress=False)
    ctrl_c = CountingLoss(at=4, action=lambda loss: signal.raise_signal(signal.SIGINT))
    assert train(tiny(epochs=2), tmp_path / "run", progress=False, loss_fn=ctrl_c).status == "interrupted"
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["method"] == {}
    resumed = train(tiny(epochs=2), tmp_path / "run", resume=True, progress=False)
    assert_same_weights(resumed.model, reference.model)
    assert [e["train_error"] for e in resumed.history] == [None, None]  # no count reported


def test_training_keeps_a_frozen_batchnorm_frozen(tmp_path, monkeypatch):
    built = []

    def frozen_batchnorm_mlp(in_channels, image_size, num_classes, mean, std):
        """Two hidden layers with BatchNorm; the builder freezes the first BatchNorm (eval mode)."""
        model = nn.Sequential(
            Normalize(mean, std), nn.Flatten(), nn.Linear(in_channels * image_size[0] * image_size[1], 16),
            nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes),
        )
        model[3].eval()
        built.append(model)
        return model

    monkeypatch.setattr(models.registry, "_REGISTRY", dict(models.registry._REGISTRY))
    models.register("frozen-bn-mlp")(frozen_batchnorm_mlp)
    modes = []

    def loss_fn(logits, labels):
        modes.append((built[-1][3].training, built[-1][6].training))
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")

    result = train(tiny(model="frozen-bn-mlp", epochs=2, train_size=64, val_size=50), None, progress=False, loss_fn=loss_fn)
    assert modes == [(False, True)] * 4  # 2 epochs of 2 steps, evaluated after each
    frozen, trained = result.model[3], result.model[6]
    assert frozen.num_batches_tracked.item() == 0 and torch.equal(frozen.running_mean, torch.zeros(16))
    assert trained.num_batches_tracked.item() == 4


# ------------------------------------------------------------------- config, schedules
def test_schedules_follow_the_papers():
    def lrs(schedule, epochs=6):
        model = torch.nn.Linear(1, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = make_scheduler(schedule, optimizer, epochs)
        out = []
        for _ in range(epochs):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    assert lrs("constant") == [1.0] * 6
    assert lrs("exp:0.98") == pytest.approx([0.98**k for k in range(6)])
    assert lrs("step:2") == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    assert lrs("step:3:0.1") == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1])
    assert lrs("cosine", 4) == pytest.approx([(1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)])
    for bad in ("exp", "exp:1.5", "exp:0", "step:0", "step:1.5", "linear", "cosine:3", "exp:nan"):
        with pytest.raises(ValueError, match="invalid schedule"):
            parse_schedule(bad)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(epochs=-1), "epochs must be a whole number >= 1"),
        (dict(epochs=0), "epochs"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(lr=float("nan")), "lr must be a finite number"),
        (dict(batch_size=0), "batch_size"),
        (dict(momentum=1.0), "momentum"),
        (dict(weight_decay=-1e-4), "weight_decay"),
        (dict(val_size=-0.1), "val_size"),
        (dict(val_size=2.5), "val_size"),
        (dict(train_size=0), "train_size"),
        (dict(schedule="exp:2"), "invalid schedule"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_invalid_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**change)


def test_config_round_trip_and_unknown_keys(tmp_path):
    config = tiny(method="loss-ibp", method_params={"beta": 0.03, "p": 1})
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainConfig.from_dict({"epoch": 3})
    (tmp_path / "spec.toml").write_text('model = "lenet"\nlr = 0.05\n[method_params]\nbeta = 0.01\n')
    from_file = TrainConfig.from_file(tmp_path / "spec.toml", method="jacobian-spectral")
    assert from_file.differences(TrainConfig()) == ["model", "method", "method_params", "lr"]


def test_unknown_names_and_oversized_subsets_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        train(tiny(method="no-such-method"), None, progress=False)
    with pytest.raises(ValueError, match="unknown dataset"):
        train(tiny(dataset="no-such-data"), None, progress=False)
    with pytest.raises(ValueError, match="unknown model"):
        train(tiny(model="no-such-model"), None, progress=False)
    with pytest.raises(ValueError, match="train_size 5000 is larger"):
        train(tiny(train_size=5000), None, progress=False)


# ------------------------------------------------------------------------------ load_run
def test_load_run_gives_the_trained_model_in_eval_mode(tmp_path):
    result = train(tiny(epochs=1, dropout=0.3), tmp_path / "run", progress=False)
    model, config = load_run(tmp_path / "run")
    assert config == result.config and not model.training
    assert_same_weights(model, result.model)
    model2, _ = load_run(tmp_path / "run" / "checkpoint.pt")
    assert_same_weights(model2, result.model)


def test_load_run_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no trained model"):
        load_run(tmp_path / "empty")
    train(tiny(epochs=1), tmp_path / "run", progress=False)
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    saved["model_args"]["name"] = "mlp-3x256"  # a checkpoint that does not fit its model
    torch.save(saved, tmp_path / "run" / "model.pt")
    with pytest.raises(ValueError, match="does not match model 'mlp-3x256'"):
        load_run(tmp_path / "run")
    (tmp_path / "run" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_run(tmp_path / "run")


def test_training_does_not_touch_the_callers_random_state():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(tiny(epochs=1, train_size=64), None, progress=False)
    assert torch.equal(torch.rand(3), expected)
