"""Every method on models written the way users write them (tests/zoo.py), against the reference
that runs the model's own forward (tests/reference.py), in float64.

test_reference_* check the reference itself: against the old interpreter-based reference on the
plain module-style networks, and the held-derivative forward against the plain forward.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import robustbp.methods as methods
from robustbp.methods.tangent import image_tangents
from robustbp.passes import UnsupportedModule

from . import zoo
from .helpers import one_thread  # noqa: F401 (autouse fixture)
from .reference import Reference, relative_error
from .reference_interpreter import Reference as InterpreterReference
from .test_methods import ARCHITECTURES, CASES, TOLERANCE, _draw_after_masks, _method, method_grads, reference_for
from .test_methods import build as build_architecture

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

SEED = 123  # test_methods.method_grads and reference_for seed the global generator with it
CONV_AND_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _has_mode_dependent_layers(name) -> bool:
    model = zoo.MODELS[name].make()
    return any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)) for m in model.modules())


# every zoo model in the mode it is built in by default (train where that is fine), and again in
# eval mode where BatchNorm or dropout make the modes differ
SETTINGS = [(name, zoo.MODELS[name].train_mode_ok) for name in zoo.MODELS] + [
    (name, False) for name in zoo.MODELS if zoo.MODELS[name].train_mode_ok and _has_mode_dependent_layers(name)
]
SETTING_IDS = [f"{name}-{'train' if train else 'eval'}" for name, train in SETTINGS]


def _user_tangents(x):
    """None for images (the method's own image tangents), fixed random directions otherwise."""
    return None if zoo.is_image(x) else zoo.user_tangents(x)


def _tangents_of(x, user):
    return image_tangents(x, sigma=1.0) if user is None else user(x)


def _classes(model, x) -> int:
    with torch.no_grad():
        return copy.deepcopy(model)(x).shape[1]


def relu_calls(model, x, y) -> int:
    """ReLU calls on activations in one forward, as the reference counts them."""
    reference = Reference(copy.deepcopy(model), x, y)
    with torch.no_grad():
        reference.logits()
    return reference.relu_calls


def _dropout_active(model) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in model.modules())


# ---- the comparisons: each case -> (got, want) ----
def _from_cases(case):
    spec, definition = CASES[case]

    def run(model, x, y):
        got, _ = method_grads(model, _method(spec), x, y, seed=SEED)
        return got, definition(reference_for(model, x, y, SEED))

    return run


def _tangent(name, beta):
    def run(model, x, y):
        user = _user_tangents(x)
        got, _ = method_grads(model, methods.get(name, beta=beta, sigma=1.0, tangents=user), x, y, seed=SEED)
        reference = reference_for(model, x, y, SEED)
        definition = reference.tangent_prop if name == "tangent-prop" else reference.fast_tangent_prop
        return got, definition(beta, _tangents_of(x, user))

    return run


def _frobenius(n_proj):
    def run(model, x, y):
        got, _ = method_grads(model, methods.get("jacobian-frobenius", beta=0.4, n_proj=n_proj), x, y, seed=SEED)
        classes = _classes(model, x)
        if n_proj == -1:
            reference = reference_for(model, x, y, SEED)
            projections = torch.eye(classes, dtype=x.dtype).unsqueeze(1).expand(classes, x.shape[0], classes)
        else:
            reference, projections = _draw_after_masks(
                model, x, y, SEED, lambda: torch.randn(n_proj, x.shape[0], classes, dtype=x.dtype)
            )
            projections = projections / projections.norm(dim=2, keepdim=True)
        return got, reference.jacobian_frobenius(0.4, projections)

    return run


def _spectral(n_iter):
    def run(model, x, y):
        got, _ = method_grads(model, methods.get("jacobian-spectral", beta=0.4, n_iter=n_iter), x, y, seed=SEED)
        reference, v0 = _draw_after_masks(model, x, y, SEED, lambda: torch.randn_like(x))
        return got, reference.jacobian_spectral(0.4, v0, n_iter)

    return run


def _weight_decay(model, x, y):
    beta = 0.05
    got, _ = method_grads(model, methods.get("weight-decay", beta=beta), x, y, seed=SEED)
    reference = reference_for(model, x, y, SEED)
    main = reference.main_loss()  # first: hook-set weights (spectral_norm, prune) are those of this forward
    weights = [m.weight for m in reference.model.modules() if isinstance(m, CONV_AND_LINEAR)]
    return got, reference.grad(main + beta * sum((w ** 2).sum() for w in weights))


ZOO_CASES = {case: _from_cases(case) for case in CASES} | {
    "tangent-prop": _tangent("tangent-prop", 0.5),
    "fast-tangent-prop": _tangent("fast-tangent-prop", 0.5),
    "jacobian-frobenius-1": _frobenius(1),
    "jacobian-frobenius-exact": _frobenius(-1),
    "jacobian-spectral-1": _spectral(1),
    "jacobian-spectral-3": _spectral(3),
    "weight-decay": _weight_decay,
}


@pytest.mark.parametrize("case", list(ZOO_CASES))
@pytest.mark.parametrize("name, train", SETTINGS, ids=SETTING_IDS)
def test_gradient_matches_reference(name, train, case):
    model, x, y = zoo.build(name, train=train)
    if case.startswith("linbp"):
        first = CASES[case][0]["first"]
        calls = relu_calls(model, x, y)
        if calls < first:  # no ReLU at all, or `first` beyond the last ReLU call: one clear error
            with pytest.raises(ValueError, match="ReLU" if calls == 0 else None):
                methods.get("linbp", first=first).backward(copy.deepcopy(model), x, y)
            return
    got, want = ZOO_CASES[case](model, x, y)
    assert relative_error(got, want) <= TOLERANCE


@pytest.mark.parametrize("name", [name for name in zoo.MODELS])
def test_linbp_refuses_first_beyond_the_last_relu(name):
    model, x, y = zoo.build(name)
    calls = relu_calls(model, x, y)
    with pytest.raises(ValueError, match="ReLU"):
        methods.get("linbp", first=calls + 1).backward(model, x, y)


def test_linbp_on_the_tutorial_lenet():
    model, x, y = zoo.build("lenet")
    standard, _ = method_grads(model, methods.get("standard"), x, y)
    assert relu_calls(model, x, y) == 4
    for first in (1, 2, 3, 4):
        got, _ = method_grads(model, methods.get("linbp", first=first), x, y)
        assert relative_error(got, reference_for(model, x, y).linbp(first)) <= TOLERANCE
        assert relative_error(got, standard) > 1e-3


@pytest.mark.parametrize("name", methods.available())
@pytest.mark.parametrize("model_name", ["lenet", "basic-block", "weight-norm", "vit"])
def test_each_parameter_hook_fires_once(model_name, name):
    """One backward(...) reaches every parameter once, as loss.backward() does."""
    model, x, y = zoo.build(model_name)
    if name == "linbp" and relu_calls(model, x, y) == 0:
        pytest.skip("LinBP refuses a model without ReLU")
    counts = {}
    for index, param in enumerate(model.parameters()):
        counts[index] = 0
        param.register_hook(lambda grad, index=index: counts.__setitem__(index, counts[index] + 1))
    torch.manual_seed(SEED)
    methods.get(name).backward(model, x, y)
    assert counts == {index: 1 for index in counts}


def _zero_beta_kwargs(name, x):
    if name in ("adversarial", "adversarial-backprop"):
        return dict(eps=0.0)
    kwargs = dict(beta=0.0)
    if name in ("tangent-prop", "fast-tangent-prop") and not zoo.is_image(x):
        kwargs["tangents"] = zoo.user_tangents(x)
    return kwargs


ZERO_BETA_METHODS = sorted(set(methods.available()) - {"standard", "linbp"})
ALL_MODELS = [("zoo", name) for name in zoo.MODELS] + [("architecture", name) for name in ARCHITECTURES]


@pytest.mark.parametrize("name", ZERO_BETA_METHODS)
@pytest.mark.parametrize("family, model_name", ALL_MODELS, ids=[name for _, name in ALL_MODELS])
def test_zero_beta_is_standard(family, model_name, name):
    """β = 0 (ε = 0 for the adversarial methods) gives the plain loss's gradient: a rule that is
    wrong even for the main loss fails here at once."""
    model, x, y = zoo.build(model_name) if family == "zoo" else build_architecture(model_name)
    if name.startswith("adversarial") and _dropout_active(model):
        pytest.skip("two forwards draw two dropout masks")
    got, _ = method_grads(model, methods.get(name, **_zero_beta_kwargs(name, x)), x, y, seed=SEED)
    want, _ = method_grads(model, methods.get("standard"), x, y, seed=SEED)
    assert relative_error(got, want) <= 1e-10


@pytest.mark.parametrize("p", [1, 2])
def test_dropout2d_model_in_eval_then_train_mode(p):
    """The same model object, eval mode first, then train mode: nothing learned in one mode is
    carried into the other."""
    model, x, y = zoo.build("dropout2d", train=False)
    for train in (False, True, False):
        model.train(train)
        for param in model.parameters():
            param.grad = None
        torch.manual_seed(SEED)
        methods.get("loss-ibp", beta=0.7, p=p).backward(model, x, y)
        got = [param.grad.clone() for param in model.parameters()]
        want = reference_for(model, x, y, SEED).loss_ibp(0.7, p)
        assert relative_error(got, want) <= TOLERANCE


def test_compiled_model_is_refused():
    """torch.compile's wrapper hides the operations: one clear error, before anything is compiled."""
    import torch._dynamo

    model, x, y = zoo.build("lenet")
    with torch._dynamo.config.patch(disable=True), pytest.raises(UnsupportedModule, match="torch.compile"):
        methods.get("loss-ibp").backward(torch.compile(model), x, y)  # were it called, it would run eagerly


# ---- the reference itself ----
INTERPRETER_DEFINITIONS = {
    "main-loss": lambda r, x: [r.main_loss()],
    "logits-frozen-statistics": lambda r, x: [r.logits(freeze_statistics=True)],
    "logits-held": lambda r, x: [r.logits(freeze_derivatives=True, freeze_statistics=True)],
    "logits-linbp": lambda r, x: [r.logits(linbp_first=1)],
    "jacobians": lambda r, x: [r.jacobians(freeze_statistics=True)],
    "held-input-grads": lambda r, x: [r.held_input_grads()],
    "exact-input-grads": lambda r, x: [r.exact_input_grads()],
    "loss-ibp-p1": lambda r, x: r.loss_ibp(0.3, 1),
    "loss-ibp-p2": lambda r, x: r.loss_ibp(0.7, 2),
    "double-backprop-p1": lambda r, x: r.double_backprop(0.3, 1),
    "double-backprop-p2": lambda r, x: r.double_backprop(0.7, 2),
    "curvature-term": lambda r, x: r.curvature_term(0.5, 2),
    "prediction-ibp-sign": lambda r, x: r.prediction_ibp(0.2, "sign"),
    "prediction-ibp-grad": lambda r, x: r.prediction_ibp(2.0, "grad"),
    "tangent-prop": lambda r, x: r.tangent_prop(0.5, image_tangents(x)),
    "fast-tangent-prop": lambda r, x: r.fast_tangent_prop(0.5, image_tangents(x)),
    "jacobian-frobenius": lambda r, x: r.jacobian_frobenius(  # a first forward draws the masks, then the projections
        0.4, torch.nn.functional.normalize(torch.randn(2, x.shape[0], r.logits().shape[1], dtype=x.dtype), dim=2)
    ),
    "jacobian-spectral": lambda r, x: r.jacobian_spectral(0.4, torch.randn_like(x), 3),
    "adversarial": lambda r, x: r.adversarial(0.1, 0.3, "sign"),
    "linbp-1": lambda r, x: r.linbp(1),
    "linbp-2": lambda r, x: r.linbp(2),
}


@pytest.mark.parametrize("definition", list(INTERPRETER_DEFINITIONS))
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_reference_matches_the_interpreter(architecture, definition):
    """On plain module-style networks the model's own forward under the mode gives the numbers of
    the old interpreter-based reference, for every definition (dropout masks included)."""
    model, x, y = build_architecture(architecture)
    compute = INTERPRETER_DEFINITIONS[definition]
    results = []
    for make in (Reference, InterpreterReference):
        torch.manual_seed(SEED)
        reference = make(copy.deepcopy(model), x, y)
        results.append(compute(reference, x))
    new, old = results
    assert relative_error(new, old) <= 1e-10


def _both_jacobians(reference, **flags):
    """(per-class Jacobians, the diagonal blocks of the full Jacobian, its largest off-diagonal entry)."""
    _, per_class = reference._logits_and_jacobians(**flags)
    full = torch.autograd.functional.jacobian(lambda inp: reference.logits(inp, **flags), reference.x)
    index = torch.arange(reference.batch)
    blocks = full.flatten(3)
    off_diagonal = blocks.clone()
    off_diagonal[index, :, index, :] = 0
    return per_class, blocks[index, :, index, :], off_diagonal.abs().max()


@pytest.mark.parametrize("name, train", SETTINGS, ids=SETTING_IDS)
def test_reference_held_forward_keeps_values_and_jacobian(name, train):
    """Held derivatives change no value and no first derivative in x (torch.func.jacrev), and with
    frozen statistics the class-by-class Jacobians are the full Jacobian's diagonal blocks."""
    model, x, y = zoo.build(name, train=train)
    torch.manual_seed(SEED)
    reference = Reference(copy.deepcopy(model), x, y)
    plain = reference.logits()
    frozen = reference.logits(freeze_statistics=True)
    held = reference.logits(freeze_derivatives=True, freeze_statistics=True)
    assert torch.allclose(frozen, plain, rtol=1e-12, atol=1e-12)
    assert torch.allclose(held, plain, rtol=1e-12, atol=1e-12)
    for m in reference.model.modules():  # jacrev forbids BatchNorm's in-place count of batches
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.num_batches_tracked = None
    jacobian_frozen = torch.func.jacrev(lambda inp: reference.logits(inp, freeze_statistics=True))(x)
    jacobian_held = torch.func.jacrev(
        lambda inp: reference.logits(inp, freeze_derivatives=True, freeze_statistics=True)
    )(x)
    assert torch.allclose(jacobian_held, jacobian_frozen, rtol=1e-10, atol=1e-12)
    for flags in (dict(freeze_statistics=True), dict(freeze_statistics=True, freeze_derivatives=True)):
        per_class, diagonal, off_diagonal = _both_jacobians(reference, **flags)
        assert torch.allclose(per_class, diagonal, rtol=1e-10, atol=1e-12)
        assert off_diagonal == 0
        assert torch.allclose(diagonal, jacobian_frozen.flatten(3)[range(5), :, range(5), :], rtol=1e-10, atol=1e-12)
    norms = per_class.flatten(1).norm(dim=1)
    assert norms.min() > 1e-3 * norms.max(), "a sample's Jacobian vanishes (dead ReLUs): pick another model"


@pytest.mark.parametrize("name, train", SETTINGS, ids=SETTING_IDS)
def test_reference_held_input_grads(name, train):
    """Held input gradients are the exact ones for piecewise-linear models; for every model they no
    longer depend on the point (∂g/∂x = 0), while the exact ones do for smooth models."""
    model, x, y = zoo.build(name, train=train)
    torch.manual_seed(SEED)
    reference = Reference(copy.deepcopy(model), x, y)
    held, exact = reference.held_input_grads(), reference.exact_input_grads()
    probe = torch.randn_like(held)
    (second,) = torch.autograd.grad((held * probe).sum(), reference.x, allow_unused=True)
    assert second is None or torch.count_nonzero(second) == 0
    if name in zoo.PIECEWISE_LINEAR:
        assert torch.allclose(held, exact, rtol=1e-10, atol=1e-12)
    else:
        (second,) = torch.autograd.grad((exact * probe).sum(), reference.x, allow_unused=True)
        assert second is not None and second.abs().max() > 1e-6
        # the penalty's parameter gradient is not the exact one, but close to it
        assert relative_error(reference.loss_ibp(0.5, 2), reference.double_backprop(0.5, 2)) > 1e-8


class _SequentialLeNet(nn.Sequential):
    """The tutorial LeNet written with modules only, for the interpreter-based reference."""

    def __init__(self, lenet):
        super().__init__(
            lenet.conv1, nn.ReLU(), nn.MaxPool2d(2), lenet.conv2, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            lenet.fc1, nn.ReLU(), lenet.fc2, nn.ReLU(), lenet.fc3,
        )


@pytest.mark.parametrize("definition", ["logits-held", "loss-ibp-p1", "double-backprop-p2", "prediction-ibp-sign",
                                        "linbp-1", "linbp-2", "tangent-prop", "fast-tangent-prop"])
def test_reference_functional_relus_are_module_relus(definition):
    """The tutorial LeNet (F.relu, x.relu(), F.max_pool2d, torch.flatten) gives the numbers the
    interpreter gives for the same network written with nn.ReLU modules."""
    model, x, y = zoo.build("lenet")
    compute = INTERPRETER_DEFINITIONS[definition]
    new = compute(Reference(copy.deepcopy(model), x, y), x)
    sequential = _SequentialLeNet(copy.deepcopy(model))
    old = compute(InterpreterReference(sequential, x, y), x)
    assert relative_error(new, old) <= 1e-10
    for first in (3, 4):
        new = Reference(copy.deepcopy(model), x, y).linbp(first)
        old = InterpreterReference(_SequentialLeNet(copy.deepcopy(model)), x, y).linbp(first)
        assert relative_error(new, old) <= 1e-10


class _OutOfPlaceBasicBlock(zoo.BasicBlock):
    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("definition", ["logits-held", "loss-ibp-p2", "double-backprop-p1", "linbp-1", "linbp-2",
                                        "jacobian-spectral", "fast-tangent-prop"])
def test_reference_in_place_calls_are_out_of_place_calls(definition, train):
    """nn.ReLU(inplace=True) called twice and `out += identity` give what the out-of-place block gives."""
    model, x, y = zoo.build("basic-block", train=train)
    out_of_place = copy.deepcopy(model)
    block = out_of_place[3]
    out_of_place[3] = _OutOfPlaceBasicBlock(4).double().train(train)
    out_of_place[3].load_state_dict(block.state_dict())
    out_of_place[2] = nn.ReLU()
    compute = INTERPRETER_DEFINITIONS[definition]
    results = []
    for network in (model, out_of_place):
        torch.manual_seed(SEED)
        results.append(compute(Reference(copy.deepcopy(network), x, y), x))
    assert relative_error(*results) <= 1e-10


class _InPlaceStatements(nn.Module):
    """In-place calls written as statements, whose result is not rebound."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.skip = nn.Linear(16, 12), nn.Linear(12, 12), nn.Linear(16, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        x = x.flatten(1)
        h = self.first(x)
        h.relu_()
        h = self.second(h)
        h.mul_(2.0)
        h.add_(self.skip(x))
        torch.tanh_(h)
        return self.head(h)


class _OutOfPlaceStatements(_InPlaceStatements):
    def forward(self, x):
        x = x.flatten(1)
        h = torch.relu(self.first(x))
        return self.head(torch.tanh(self.second(h) * 2.0 + self.skip(x)))


@pytest.mark.parametrize("definition", ["logits-held", "loss-ibp-p1", "loss-ibp-p2", "double-backprop-p2",
                                        "linbp-1", "prediction-ibp-grad"])
def test_reference_in_place_statements(definition):
    """h.relu_(), h.add_(...), torch.tanh_(h) as statements: the numbers of the out-of-place network."""
    torch.manual_seed(0)
    in_place = _InPlaceStatements().double()
    out_of_place = _OutOfPlaceStatements().double()
    out_of_place.load_state_dict(in_place.state_dict())
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    compute = INTERPRETER_DEFINITIONS[definition]
    results = [compute(Reference(network, x, y), x) for network in (in_place, out_of_place)]
    assert relative_error(*results) <= 1e-10


@pytest.mark.parametrize("name", ["standard", "adversarial", "adversarial-backprop", "weight-decay", "spectral-bound"])
def test_methods_that_never_look_inside_run_on_a_compiled_model(name):
    """As the README says: these run a torch.compile'd model (here with compilation disabled, so the
    wrapper runs the module eagerly) and give the module's own gradient."""
    import torch._dynamo

    model, x, y = zoo.build("lenet")
    compiled = torch.compile(copy.deepcopy(model))
    with torch._dynamo.config.patch(disable=True):
        got, _ = method_grads(compiled, methods.get(name), x, y, seed=SEED)
    want, _ = method_grads(model, methods.get(name), x, y, seed=SEED)
    assert relative_error(got, want) <= 1e-12
