"""bfloat16 autocast: each method's gradient under torch.autocast(bfloat16) against its float32
gradient, the refusals (a method with a `bf16_refusal`, float16), and the linearity check of the
passes, which must take bfloat16 rounding for what it is.

The error is ‖g_bf16 − g_fp32‖ / ‖g_fp32‖ over all parameters, on 64 of scikit-learn's digits and a
small CNN with a train-mode BatchNorm, each penalty weighted so that it moves the gradient as much
as the main loss or more. bfloat16 keeps 8 bits of mantissa, so plain backpropagation (`standard`)
is already about 3e-2 off; each tolerance is about twice the error measured on CPU (BF16_TOLERANCE).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import robustbp.methods as methods
from robustbp import passes
from robustbp.layers import Normalize
from robustbp.methods import base
from robustbp.methods.standard import Standard
from robustbp.passes import NotLinearizable
from robustbp.training import TrainConfig, train

from .helpers import one_thread_per_module  # noqa: F401 (autouse fixture)

# Penalty weights that make each penalty count in the gradient (|penalty part| ≳ |main part|).
PARAMS = {
    "loss-ibp": {"beta": 1.0, "p": 1}, "double-backprop": {"beta": 1.0, "p": 2}, "prediction-ibp": {"beta": 1.0},
    "tangent-prop": {"beta": 1.0}, "fast-tangent-prop": {"beta": 3.0}, "jacobian-frobenius": {"beta": 1.0},
    "jacobian-spectral": {"beta": 1.0}, "spectral-bound": {"beta": 0.3}, "weight-decay": {"beta": 0.1},
    "adversarial": {"eps": 0.1}, "adversarial-backprop": {"eps": 0.08},
}
# Relative error allowed under bf16 autocast, per method: about twice what this test measures on
# CPU (in brackets; over other batches, and without the BatchNorm, the errors stay within 2x of
# these). Plain backpropagation's own error sets the scale. Directions decided by signs (loss-ibp
# at p = 1 and prediction-ibp propagate sign(g), the adversarial methods step along sign(g)) flip
# where a component of g is within bfloat16's rounding of zero, and a random projection or start
# (jacobian-frobenius, jacobian-spectral) sums terms of both signs: these are 2-4x standard's error,
# rounding noise rather than a bias.
BF16_TOLERANCE = {
    "standard": 0.06,              # [0.030]
    "linbp": 0.03,                 # [0.010]
    "weight-decay": 0.04,          # [0.013] the penalty itself is computed in float32
    "spectral-bound": 0.04,        # [0.015] the power iteration on the weights in float32
    "double-backprop": 0.07,       # [0.032]
    "tangent-prop": 0.06,          # [0.028] the tangent vectors in float32
    "fast-tangent-prop": 0.07,     # [0.035]
    "jacobian-frobenius": 0.16,    # [0.080] one random projection
    "jacobian-spectral": 0.16,     # [0.083] one power iteration from a random start
    "adversarial": 0.16,           # [0.083] x* = x + ε·sign(g)
    "adversarial-backprop": 0.18,  # [0.088]
    "loss-ibp": 0.22,              # [0.112] p = 1: sign(g)
    "prediction-ibp": 0.22,        # [0.113] v = sign(g)
}
ACCEPTS_BF16 = sorted(BF16_TOLERANCE)


def cnn() -> nn.Module:
    return nn.Sequential(
        Normalize(0.3, 0.35), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def digits(count: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    from robustbp import data

    train_set, _ = data.load("digits")
    return train_set.images[:count], train_set.labels[:count]


def amp_case(name: str, device: str = "cpu"):
    """(model in train mode, method, x, y) on `device` for the bf16 comparison of method `name`."""
    torch.manual_seed(0)
    x, y = digits()
    return cnn().to(device).train(), methods.get(name, **PARAMS.get(name, {})), x.to(device), y.to(device)


def gradient(model: nn.Module, method, x: torch.Tensor, y: torch.Tensor, amp: bool) -> torch.Tensor:
    """The flattened gradient of one step on a copy of the model (a fresh copy of the method, so
    that persistent state such as spectral-bound's vectors starts alike), the same random draws."""
    model, method = copy.deepcopy(model), copy.deepcopy(method)
    torch.manual_seed(5)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        method.backward(model, x, y)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def relative_gradient_error(model, method, x, y) -> float:
    want = gradient(model, method, x, y, amp=False)
    got = gradient(model, method, x, y, amp=True)
    return float((got - want).norm() / want.norm())


def test_every_method_says_whether_it_takes_bf16():
    assert set(ACCEPTS_BF16) == {name for name in methods.available() if not base.method_class(name).bf16_refusal}


@pytest.mark.parametrize("name", ACCEPTS_BF16)
def test_bf16_autocast_gradient_is_close_to_float32(name):
    assert relative_gradient_error(*amp_case(name)) <= BF16_TOLERANCE[name]


def tiny(**changes) -> TrainConfig:
    base_settings = dict(dataset="digits", model="mlp-2x256", epochs=1, batch_size=32, train_size=96, lr=0.05,
                         seed=3, method="loss-ibp", method_params={"beta": 0.1})
    return TrainConfig(**{**base_settings, **changes})


def test_training_under_bf16_autocast_runs_and_stays_close(tmp_path):
    result = train(tiny(amp="bf16", epochs=2), tmp_path / "run", progress=False)
    reference = train(tiny(epochs=2), None, progress=False)
    assert result.status == "complete" and result.config.amp == "bf16"
    got, want = result.history[-1], reference.history[-1]
    assert got["loss"] == pytest.approx(want["loss"], rel=0.05)
    for key, value in result.model.state_dict().items():
        assert value.dtype == torch.float32, key  # the weights stay float32; only the step computes in bf16


class Unsound(Standard):
    """A method that says bf16 would make its gradient unsound."""

    bf16_refusal = "its penalty is the small difference of two large terms, which bfloat16 rounding swamps"


def test_a_method_with_a_bf16_refusal_is_refused(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    methods.register("unsound")(Unsound)
    model, _, x, y = amp_case("standard")
    with pytest.raises(ValueError, match="unsound refuses bfloat16 autocast: its penalty is the small difference"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            methods.get("unsound").backward(model, x, y)
    methods.get("unsound").backward(model, x, y)  # float32 is fine
    with pytest.raises(ValueError, match="--amp bf16 is refused by unsound: its penalty is the small difference"):
        train(tiny(method="unsound", method_params={}, amp="bf16"), None, progress=False)


def test_fp16_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="amp fp16 is not supported: float16 needs a gradient scaler, which multiplies "
                                         "the loss"):
        TrainConfig(amp="fp16")
    with pytest.raises(ValueError, match="amp must be one of none, bf16"):
        TrainConfig(amp="fp8")
    model, method, x, y = amp_case("loss-ibp")
    with pytest.raises(ValueError, match="loss-ibp: float16 autocast is not supported: float16 needs a gradient scaler"):
        with torch.autocast("cpu", dtype=torch.float16):
            method.backward(model, x, y)


def test_linearity_check_takes_bf16_rounding_for_rounding_but_still_catches_a_nonlinear_replay(monkeypatch):
    """The replays of a deep network under bf16 are about 1e-2 apart (float32's 1e-3 tolerance
    would refuse it); a replay that is not linear is still refused."""
    from robustbp import models

    torch.manual_seed(0)
    model = models.get("vgg16-bn", in_channels=1, image_size=32, num_classes=10).train()
    x, y = torch.rand(4, 1, 32, 32), torch.arange(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        methods.get("loss-ibp", beta=0.1).backward(model, x, y)

    relu_of_tangent = lambda self, step, tangents, args, kwargs: torch.relu(tangents[(0,)])  # noqa: E731
    monkeypatch.setattr(passes._Replaying, "_linear_piecewise", relu_of_tangent)
    model, method, x, y = amp_case("loss-ibp")
    with pytest.raises(NotLinearizable, match="its replay is not linear"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            method.backward(model, x, y)
