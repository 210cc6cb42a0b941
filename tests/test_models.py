"""robustbp.models: every registered model (parametrized over `available()`) follows the rules
the gradient engine relies on, and the papers' nets have the papers' shapes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robustbp import models
from robustbp.layers import Normalize
from robustbp.passes import Linearization

SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]  # MNIST-like, CIFAR/SVHN, scikit-learn digits
ACTIVATION_TYPES = {"relu": nn.ReLU, "tanh": nn.Tanh, "logistic": nn.Sigmoid}


def leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if next(m.children(), None) is None]


def call_order(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """The leaf modules in the order forward calls them (one entry per call)."""
    calls = []
    handles = [m.register_forward_hook(lambda m, i, o: calls.append(m)) for m in leaves(model)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def supports(name: str, parameter: str) -> bool:
    return parameter in models.info(name).parameters


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", models.available())
def test_forward_shape_or_clear_error(name, shape):
    channels, height, _ = shape
    if height < models.info(name).min_image_size:
        with pytest.raises(ValueError, match=f"needs images of at least {models.info(name).min_image_size}"):
            models.get(name, in_channels=channels, image_size=height)
        return
    torch.manual_seed(0)
    model = models.get(name, in_channels=channels, image_size=height, num_classes=7)
    out = model(torch.rand(3, *shape))
    assert out.shape == (3, 7) and out.dtype == torch.float32 and torch.isfinite(out).all()
    model.eval()
    assert model(torch.rand(1, *shape)).shape == (1, 7)


@pytest.mark.parametrize("name", models.available())
def test_min_image_size_is_exact(name):
    smallest = models.info(name).min_image_size
    assert models.get(name, image_size=smallest)(torch.rand(2, 1, smallest, smallest)).shape == (2, 10)
    if smallest > 1:
        with pytest.raises(ValueError, match=f"at least {smallest}×{smallest} pixels, got {smallest - 1}×"):
            models.get(name, image_size=smallest - 1)


@pytest.mark.parametrize("name", models.available())
def test_models_take_the_fast_path(name):
    """Normalize first; every operation of the papers' models has an explicit rule (no general
    route), and parameters enter only as weights and biases, so Loss IBP uses the fused passes."""
    model = models.get(name, in_channels=3, image_size=32, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    modules = leaves(model)
    assert isinstance(modules[0], Normalize)
    assert torch.allclose(modules[0].mean.flatten(), torch.tensor([0.4, 0.5, 0.6]))
    assert torch.allclose(modules[0].std.flatten(), torch.tensor([0.2, 0.25, 0.3]))
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    tape = Linearization.record(model, x, capture_weights=True).tape
    assert tape.general_steps == [], f"{name}: operations without a rule: {tape.general_steps}"
    assert tape.fusable and tape.stackable
    captured = {id(call.weight) for call in tape.weight_calls} | {id(call.bias) for call in tape.weight_calls}
    assert all(id(p) in captured for p in model.parameters())


@pytest.mark.parametrize("name", models.available())
def test_every_parameter_gets_a_gradient(name):
    model = models.get(name, in_channels=1, image_size=28)
    model(torch.rand(4, 1, 28, 28)).logsumexp(dim=1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("name", models.available())
def test_same_seed_same_weights(name):
    torch.manual_seed(1)
    first = models.get(name).state_dict()
    torch.manual_seed(1)
    second = models.get(name).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name", models.available())
def test_dropout_on_last_internal_fc_layer(name):
    if not supports(name, "dropout"):
        with pytest.raises(ValueError, match=f"model '{name}' does not support dropout=0.5"):
            models.get(name, dropout=0.5)
        return
    assert not any(isinstance(m, nn.Dropout) for m in models.get(name).modules())
    model = models.get(name, dropout=0.5)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 and dropouts[0].p == 0.5
    calls = call_order(model, torch.rand(2, 1, 28, 28))
    linear_positions = [i for i, m in enumerate(calls) if isinstance(m, nn.Linear)]
    assert linear_positions[-2] < calls.index(dropouts[0]) == linear_positions[-1] - 1


@pytest.mark.parametrize("activation", sorted(ACTIVATION_TYPES))
@pytest.mark.parametrize("name", models.available())
def test_activation_choice(name, activation):
    if "activation" not in models.info(name).parameters:  # e.g. lenet-functional: F.relu in its forward
        if activation != "relu":
            with pytest.raises(ValueError, match="activation"):
                models.get(name, activation=activation)
        return
    model = models.get(name, activation=activation)
    used = {type(m) for m in model.modules() if isinstance(m, tuple(ACTIVATION_TYPES.values()))}
    assert used == {ACTIVATION_TYPES[activation]}


# ------------------------------------------------------------------------- the papers' shapes
def _linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _convs(model):
    return [(m.out_channels, m.kernel_size[0], m.padding[0]) for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_ibp_mnist_matches_paper():
    model = models.get("ibp-mnist")  # IBP §7.5: 25 → 12 → 12 → 5 on 28×28
    assert _convs(model) == [(32, 4, 0), (64, 5, 2)]
    assert [(m.in_features, m.out_features) for m in _linears(model)] == [(1600, 256), (256, 10)]
    assert all(m.kernel_size == 3 and m.stride == 2 for m in model.modules() if isinstance(m, nn.MaxPool2d))
    assert sum(p.numel() for p in model.parameters()) == 464_234


def test_ibp_cifar_and_svhn_match_paper():
    for size in (32, 28):  # full image, or the paper's 28×28 crop: both end at 64×2×2
        model = models.get("ibp-cifar", in_channels=3, image_size=size)
        assert _convs(model) == [(32, 5, 0), (32, 5, 2), (64, 5, 2)]
        assert [(m.in_features, m.out_features) for m in _linears(model)] == [(256, 256), (256, 10)]
    svhn = models.get("ibp-svhn", in_channels=3, image_size=32, dropout=0.5)
    assert [(m.in_features, m.out_features) for m in _linears(svhn)] == [(256, 256), (256, 256), (256, 10)]


def test_lenets_match_papers():
    lenet = models.get("lenet")  # spectral paper App. A.1: 400 → 120 → 84 → 10
    assert _convs(lenet) == [(6, 5, 2), (16, 5, 0)]
    assert [(m.in_features, m.out_features) for m in _linears(lenet)] == [(400, 120), (120, 84), (84, 10)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in lenet.modules()) == 2
    lenet5 = models.get("lenet5")
    assert [(m.in_features, m.out_features) for m in _linears(lenet5)] == [(400, 120), (120, 84), (84, 10)]
    assert sum(isinstance(m, nn.AvgPool2d) for m in lenet5.modules()) == 2


def test_vgg16_bn_layout():
    model = models.get("vgg16-bn", in_channels=3, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert _linears(model)[0].in_features == 512
    assert sum(isinstance(m, nn.MaxPool2d) for m in models.get("vgg16-bn", image_size=28).modules()) == 4


@pytest.mark.parametrize("name, widths", [
    ("mlp-2x256", [256, 256]), ("mlp-3x256", [256, 256, 256]), ("mlp-2x400", [400, 400]),
    ("mlp-2x800", [800, 800]), ("mlp-2x1200", [1200, 1200]), ("mlp-400-200-100", [400, 200, 100]),
])
def test_mlp_widths(name, widths):
    model = models.get(name, in_channels=3, image_size=32, num_classes=100)
    assert [m.out_features for m in _linears(model)] == widths + [100]
    assert _linears(model)[0].in_features == 3 * 32 * 32


def test_resnet_small_has_residual_blocks():
    from robustbp.models.resnet import BasicBlock

    model = models.get("resnet-small", in_channels=3, image_size=32)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 3
    block, x = blocks[0], torch.rand(2, 16, 8, 8)
    block.eval()
    # the skip connection: block(x) = relu(main path(x) + x)
    main = block.bn2(block.conv2(block.act1(block.bn1(block.conv1(x)))))
    torch.testing.assert_close(block(x), torch.relu(main + x))


# ------------------------------------------------------------------------------------ errors
def test_registry_errors_name_the_choices():
    with pytest.raises(ValueError, match="unknown model 'resnet-1000'; available: .*ibp-mnist.*vgg16-bn"):
        models.get("resnet-1000")
    with pytest.raises(ValueError, match="unknown activation 'gelu'; choose from relu, tanh, logistic"):
        models.get("mlp-2x256", activation="gelu")
    with pytest.raises(ValueError, match="mean must be one number or 3"):
        models.get("lenet", in_channels=3, image_size=32, mean=[0.1, 0.2])
    with pytest.raises(ValueError, match="dropout must be a probability"):
        models.get("lenet", dropout=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        models.get("lenet", num_classes=1)
    with pytest.raises(ValueError, match="image_size"):
        models.get("lenet", image_size=(28,))
    with pytest.raises(ValueError, match="already registered"):
        models.register("lenet")(lambda: None)


def test_register_new_model():
    @models.register("test-tiny", min_image_size=2)
    def tiny(in_channels, image_size, num_classes, mean, std):
        """A test model."""
        return nn.Sequential(Normalize(mean, std), nn.Flatten(),
                             nn.Linear(in_channels * image_size[0] * image_size[1], num_classes))

    try:
        assert "test-tiny" in models.available() and models.info("test-tiny").description == "A test model."
        assert models.get("test-tiny", image_size=(3, 5))(torch.rand(2, 1, 3, 5)).shape == (2, 10)
        with pytest.raises(ValueError, match="does not support activation='tanh'"):
            models.get("test-tiny", activation="tanh")
    finally:
        from robustbp.models import registry

        del registry._REGISTRY["test-tiny"]


def test_functional_lenet_is_lenet():
    """The tutorial-style LeNet computes the same function as the module-style one (same weights)
    and gets the same Loss IBP gradient."""
    import robustbp.methods as methods

    torch.manual_seed(0)
    modular = models.get("lenet", in_channels=1, image_size=28).double()
    functional = models.get("lenet-functional", in_channels=1, image_size=28).double()
    functional.load_state_dict(dict(zip(functional.state_dict(), modular.state_dict().values())))
    x, y = torch.rand(4, 1, 28, 28, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    assert torch.allclose(functional(x), modular(x), rtol=1e-12, atol=1e-12)
    for model in (modular, functional):
        methods.get("loss-ibp", beta=0.5, p=1).backward(model, x, y)
    for a, b in zip(functional.parameters(), modular.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)
