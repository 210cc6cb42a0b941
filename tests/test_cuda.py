"""The methods, the trainer and bf16 autocast on a CUDA device (skipped where there is none).

Run on a GPU machine by scripts/gpu-check.sh: every method's gradient on CUDA against the plain
autograd reference computed there too (float64), bf16 autocast on CUDA against float32, and a
short training run (also under bf16) on the GPU.
"""
from __future__ import annotations

import pytest
import torch

import robustbp.methods as methods
from robustbp.methods.linbp import relu_calls
from robustbp.methods.tangent import image_tangents
from robustbp.training import TrainConfig, train

from .reference import relative_error
from .test_amp import BF16_TOLERANCE, ACCEPTS_BF16, amp_case, relative_gradient_error
from .test_methods import ARCHITECTURES, CASES, TOLERANCE, _method, build, method_grads, reference_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def on_cuda(architecture: str):
    model, x, y = build(architecture)
    return model.cuda(), x.cuda(), y.cuda()


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize("case", list(CASES))
def test_gradient_matches_reference_on_cuda(case, architecture):
    spec, reference = CASES[case]
    model, x, y = on_cuda(architecture)
    if case.startswith("linbp") and relu_calls(model, x) < spec["first"]:
        pytest.skip("fewer ReLU calls than LinBP's `first` (the refusal is tested on the CPU)")
    got, _ = method_grads(model, _method(spec), x, y)
    assert all(g.is_cuda for g in got)
    assert relative_error(got, reference(reference_for(model, x, y))) <= TOLERANCE


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_tangent_and_jacobian_methods_match_reference_on_cuda(architecture):
    model, x, y = on_cuda(architecture)
    tangents = image_tangents(x, sigma=1.0)
    got, _ = method_grads(model, methods.get("tangent-prop", beta=0.5), x, y)
    assert relative_error(got, reference_for(model, x, y).tangent_prop(0.5, tangents)) <= TOLERANCE
    got, _ = method_grads(model, methods.get("fast-tangent-prop", beta=0.5), x, y)
    assert relative_error(got, reference_for(model, x, y).fast_tangent_prop(0.5, tangents)) <= TOLERANCE
    classes = model(x).shape[1]
    got, _ = method_grads(model, methods.get("jacobian-frobenius", beta=0.4, n_proj=-1), x, y)
    projections = torch.eye(classes, dtype=x.dtype, device=x.device).unsqueeze(1).expand(classes, x.shape[0], classes)
    assert relative_error(got, reference_for(model, x, y).jacobian_frobenius(0.4, projections)) <= TOLERANCE
    got, _ = method_grads(model, methods.get("jacobian-spectral", beta=0.4, n_iter=2), x, y)
    reference = reference_for(model, x, y, 123)
    reference.main_loss()  # the dropout masks are drawn first, as the method draws them
    assert relative_error(got, reference.jacobian_spectral(0.4, torch.randn_like(x), 2)) <= TOLERANCE


@pytest.mark.parametrize("name", ACCEPTS_BF16)
def test_bf16_autocast_gradient_on_cuda(name):
    assert relative_gradient_error(*amp_case(name, "cuda")) <= BF16_TOLERANCE[name]


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_training_on_cuda(amp, tmp_path):
    config = TrainConfig(dataset="digits", model="mlp-2x256", method="loss-ibp", epochs=2, batch_size=32,
                         train_size=128, augment=True, device="cuda", amp=amp)
    result = train(config, tmp_path / "run", progress=False)
    assert result.status == "complete" and result.history[-1]["test_error"] < 90
    assert all(p.is_cuda for p in result.model.parameters())
    resumed = train(config.replace(epochs=3), tmp_path / "run", resume=True, progress=False)
    assert [e["epoch"] for e in resumed.history] == [1, 2, 3]
