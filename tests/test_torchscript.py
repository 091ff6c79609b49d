"""HookableScriptModule against the eager models it was scripted or traced from."""

import contextlib
import warnings
from typing import List

import pytest
import torch
import torchvision

from cam_plugin.cams import torchscript
from cam_plugin.cams.torchscript import HookableScriptModule

# Scripted and traced models must match the eager ones to float precision
TOL = dict(rtol=1e-4, atol=1e-5)


class _Stage(torch.nn.Module):
    def __init__(self, channels, residual):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(channels)
        self.act = torch.nn.ReLU()
        self.residual = residual
        self.repeats = 2

    def forward(self, x):
        y = x
        for _ in range(self.repeats):
            y = self.act(self.bn(self.conv(y)))
        if self.residual:
            y = y + x
        return y


def _pool(x: torch.Tensor) -> torch.Tensor:
    return x.mean((2, 3))


class _Custom(torch.nn.Module):
    """Control flow on module attributes, a loop over a ModuleList, a list
    that is appended to, an exception, a call of a TorchScript function."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.stages = torch.nn.ModuleList([_Stage(8, True), _Stage(8, False)])
        self.head = torch.nn.Linear(8, num_classes)
        self.scale = 0.5

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("expected a batch of images")
        x = self.stem(x)
        outputs: List[torch.Tensor] = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        x = torch.stack(outputs, 0).sum(0) * self.scale
        return self.head(_pool(x))


class _NoGradCounter(torch.nn.Module):
    """A ``with torch.no_grad():`` block, which can raise, between layers."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        h = self.body(x)
        with torch.no_grad():
            self.seen.add_(1)
            if bool(h.isnan().any()):
                raise ValueError("not a number")
        return self.head(h)


# name -> (constructor, layer to hook, nested layers to hook together)
MODELS = {
    "resnet18": (torchvision.models.resnet18, "layer4", ["layer4", "layer4.1", "layer4.1.conv2"]),
    "mobilenet_v3_small": (
        torchvision.models.mobilenet_v3_small,
        "features",
        ["features", "features.4", "features.4.block.2", "features.4.block.2.fc1"],
    ),
    "custom": (_Custom, "stages.1", ["stages", "stages.0", "stages.0.act", "stages.1.conv"]),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The inputs are tiny: worker threads cost more than they save, and a
    # lot more on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize_batchnorm_stats(model, generator):
    # Default running stats make batch norm nearly the identity; random
    # ones let a wrong buffer or a wrong order of ops show
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(
                torch.randn(module.running_mean.shape, generator=generator) * 0.1
            )
            module.running_var.copy_(
                torch.rand(module.running_var.shape, generator=generator) + 0.5
            )


@contextlib.contextmanager
def _quiet_jit():
    # torch.jit is deprecated in favour of torch.export, with a
    # FutureWarning or a DeprecationWarning depending on the torch version
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _build(name, mode, directory):
    """The eager model, its TorchScript version saved, loaded and wrapped,
    and an input."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    eager = MODELS[name][0]().eval()
    with torch.no_grad():
        _randomize_batchnorm_stats(eager, generator)

    x = torch.randn(2, 3, 32, 32, generator=generator)
    path = directory / f"{name}-{mode}.pt"
    with _quiet_jit():
        scripted = (
            torch.jit.script(eager)
            if mode == "script"
            else torch.jit.trace(eager, x, check_trace=False)
        )
        torch.jit.save(scripted, str(path))
        loaded = torch.jit.load(str(path))

    return eager, HookableScriptModule(loaded), x


@pytest.fixture(
    scope="module",
    params=[(name, mode) for name in MODELS for mode in ("script", "trace")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def case(request, tmp_path_factory):
    """(eager model, wrapped TorchScript model, input, model name, mode)."""
    name, mode = request.param
    return _build(name, mode, tmp_path_factory.mktemp("torchscript")) + (name, mode)


def _recorder(calls, name=None):
    def hook(module, inputs, output):
        calls.append((name, output.detach().clone()))

    return hook


def _assert_same_calls(expected, actual):
    assert [n for n, _ in actual] == [n for n, _ in expected]
    for (_, a), (_, b) in zip(actual, expected):
        torch.testing.assert_close(a, b, **TOL)


def test_output_matches_without_hooks(case):
    eager, wrapped, x, _, _ = case
    with torch.no_grad():
        out = wrapped(x)
        torch.testing.assert_close(out, wrapped.scripted(x))
        torch.testing.assert_close(out, eager(x), **TOL)


def test_no_hooks_runs_natively(case, monkeypatch):
    _, wrapped, x, name, _ = case
    handle = wrapped.register_layer_hook(MODELS[name][1], lambda m, i, o: None)
    handle.remove()

    def fail(*args):
        raise AssertionError("interpreted without hooks")

    monkeypatch.setattr(torchscript, "_Interpreter", fail)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), wrapped.scripted(x))


def test_nested_hooks_match_eager_hooks(case):
    # Every call of every hooked layer, in order, as eager forward hooks see them
    eager, wrapped, x, name, _ = case
    expected, actual = [], []
    handles = [
        eager.get_submodule(layer).register_forward_hook(_recorder(expected, layer))
        for layer in MODELS[name][2]
    ]
    handles += [
        wrapped.register_layer_hook(layer, _recorder(actual, layer)) for layer in MODELS[name][2]
    ]
    try:
        with torch.no_grad():
            expected_out = eager(x)
            out = wrapped(x)
    finally:
        for handle in handles:
            handle.remove()

    assert len(expected) >= len(MODELS[name][2])
    _assert_same_calls(expected, actual)
    # Hooks that return None leave the output alone
    torch.testing.assert_close(out, expected_out, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(out, wrapped.scripted(x))


def test_hooks_on_every_module_match_eager_hooks(case):
    eager, wrapped, x, _, _ = case
    names = [n for n, _ in wrapped.named_modules() if n]
    expected, actual = [], []
    handles = [eager.get_submodule(n).register_forward_hook(_recorder(expected, n)) for n in names]
    handles += [wrapped.register_layer_hook(n, _recorder(actual, n)) for n in names]
    try:
        with torch.no_grad():
            torch.testing.assert_close(wrapped(x), eager(x), **TOL)
    finally:
        for handle in handles:
            handle.remove()

    _assert_same_calls(expected, actual)


def test_hook_captures_the_layer_output(case):
    eager, wrapped, x, name, _ = case
    layer = MODELS[name][1]
    expected, actual = [], []
    handles = [
        eager.get_submodule(layer).register_forward_hook(_recorder(expected)),
        wrapped.register_layer_hook(layer, _recorder(actual)),
    ]
    try:
        with torch.no_grad():
            eager(x)
            wrapped(x)
    finally:
        for handle in handles:
            handle.remove()

    assert len(actual) == 1 and actual[0][1].ndim == 4
    _assert_same_calls(expected, actual)


@pytest.mark.parametrize("factor", [0.0, -2.0])
def test_replacing_hook_changes_the_logits(case, factor):
    eager, wrapped, x, name, _ = case
    layer = MODELS[name][1]

    def scale(module, inputs, output):
        return output * factor

    with torch.no_grad():
        plain = eager(x)
        handles = [
            eager.get_submodule(layer).register_forward_hook(scale),
            wrapped.register_layer_hook(layer, scale),
        ]
        try:
            expected = eager(x)
            actual = wrapped(x)
        finally:
            for handle in handles:
                handle.remove()

    assert not torch.allclose(expected, plain, **TOL)
    torch.testing.assert_close(actual, expected, **TOL)


def _leaf_gradient(model, register, x, k):
    """d logits[0, k] / d layer output, with the layer output made a leaf by
    a hook during a forward pass under torch.no_grad()."""
    leaves = []

    def make_leaf(module, inputs, output):
        torch.set_grad_enabled(True)
        leaf = output.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf.clone()

    handle = register(make_leaf)
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()

    assert len(leaves) == 1
    (grad,) = torch.autograd.grad(logits[0, k], leaves[0])
    return logits.detach(), grad


def test_gradient_with_respect_to_a_hooked_leaf(case):
    eager, wrapped, x, name, _ = case
    layer = MODELS[name][1]
    k = 3
    logits, expected = _leaf_gradient(eager, eager.get_submodule(layer).register_forward_hook, x, k)
    actual_logits, actual = _leaf_gradient(
        wrapped, lambda hook: wrapped.register_layer_hook(layer, hook), x, k
    )

    assert expected.abs().sum() > 0
    torch.testing.assert_close(actual_logits, logits, **TOL)
    torch.testing.assert_close(actual, expected, **TOL)


def test_gradient_with_respect_to_the_input(case):
    # Autograd through the interpreted graphs, including in-place ops
    eager, wrapped, x, name, _ = case
    grads = []
    for model, register in (
        (eager, lambda hook: eager.get_submodule(MODELS[name][1]).register_forward_hook(hook)),
        (wrapped, lambda hook: wrapped.register_layer_hook(MODELS[name][1], hook)),
    ):
        handle = register(lambda m, i, o: None)
        try:
            xg = x.clone().requires_grad_(True)
            model(xg)[:, 1].sum().backward()
        finally:
            handle.remove()
        grads.append(xg.grad)

    torch.testing.assert_close(grads[1], grads[0], **TOL)


def test_removed_hook_is_not_called(case):
    eager, wrapped, x, name, _ = case
    layer = MODELS[name][1]
    calls = []
    kept = wrapped.register_layer_hook(layer, _recorder(calls, "kept"))
    removed = wrapped.register_layer_hook(layer, lambda m, i, o: o * 0)
    removed.remove()
    try:
        with torch.no_grad():
            out = wrapped(x)
    finally:
        kept.remove()

    assert [n for n, _ in calls] == ["kept"]
    with torch.no_grad():
        torch.testing.assert_close(out, eager(x), **TOL)
        kept.remove()  # a second remove is harmless, as with nn.Module
        wrapped(x)
    assert len(calls) == 1


def test_unknown_layer_raises(case):
    eager, wrapped, _, name, _ = case
    with pytest.raises(ValueError, match="no_such_layer") as info:
        wrapped.register_layer_hook("no_such_layer", lambda m, i, o: None)
    assert all(child in str(info.value) for child, _ in eager.named_children())

    # A wrong last part lists the siblings it could have been
    parent = MODELS[name][2][-1].rsplit(".", 1)[0]
    with pytest.raises(ValueError) as info:
        wrapped.register_layer_hook(f"{parent}.nope", lambda m, i, o: None)
    assert all(
        f"{parent}.{child}" in str(info.value)
        for child, _ in eager.get_submodule(parent).named_children()
    )


def test_names_are_the_scripted_model_names(case):
    eager, wrapped, _, _, _ = case
    names = [n for n, _ in wrapped.named_modules()]
    assert names == [n for n, _ in eager.named_modules()]
    assert wrapped.get_submodule("") is wrapped
    assert list(wrapped.modules()) == [m for _, m in wrapped.named_modules()]
    for name in names[1:]:
        assert wrapped.get_submodule(name) is dict(wrapped.named_modules())[name]
    with pytest.raises(AttributeError):
        wrapped.get_submodule("no_such_layer")

    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in eager.named_parameters()]
    assert [n for n, _ in wrapped.named_buffers()] == [n for n, _ in eager.named_buffers()]
    assert len(wrapped.state_dict()) == len(eager.state_dict())


def test_module_api_reaches_the_scripted_model(case):
    _, wrapped, x, name, _ = case
    layer = MODELS[name][1]
    wrapped.train()
    try:
        assert all(m.training for m in wrapped.modules())
    finally:
        wrapped.eval()
    assert not any(m.training for m in wrapped.modules())

    calls = []
    handle = wrapped.register_layer_hook(layer, _recorder(calls))
    try:
        wrapped.double()
        with torch.no_grad():
            out = wrapped(x.double())
    finally:
        wrapped.float()
        handle.remove()

    assert out.dtype == torch.float64 and calls[0][1].dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in wrapped.parameters())


def test_keyword_arguments(case):
    _, wrapped, x, name, _ = case
    handle = wrapped.register_layer_hook(MODELS[name][1], lambda m, i, o: None)
    try:
        with torch.no_grad():
            torch.testing.assert_close(wrapped(x=x), wrapped.scripted(x))
    finally:
        handle.remove()


def test_exception_in_an_interpreted_graph(tmp_path):
    # Only the scripted custom model checks its input
    _, wrapped, x = _build("custom", "script", tmp_path)
    handle = wrapped.register_layer_hook("stages.1", lambda m, i, o: None)
    try:
        with pytest.raises(torch.jit.Error, match="expected a batch of images"):
            wrapped(x[0])
    finally:
        handle.remove()


def test_hook_on_the_whole_model(case):
    eager, wrapped, x, _, _ = case
    seen = []

    def hook(module, inputs, output):
        seen.append((module, inputs))
        return output + 1

    handle = wrapped.register_layer_hook("", hook)
    try:
        with torch.no_grad():
            out = wrapped(x)
    finally:
        handle.remove()

    assert seen[0][0] is wrapped and seen[0][1][0] is x
    with torch.no_grad():
        torch.testing.assert_close(out, eager(x) + 1, **TOL)


def test_no_grad_block_and_exceptions(tmp_path):
    path = tmp_path / "no_grad.pt"
    with _quiet_jit():
        torch.jit.save(torch.jit.script(_NoGradCounter()), str(path))
        wrapped = HookableScriptModule(torch.jit.load(str(path)))

    x = torch.randn(3, 4, requires_grad=True)
    expected = wrapped.scripted(x)
    calls = []
    handle = wrapped.register_layer_hook("body", _recorder(calls))
    try:
        out = wrapped(x)
        # The block ended: the head ran with gradients on again
        assert out.requires_grad
        torch.testing.assert_close(out, expected)
        assert wrapped.scripted.seen.item() == 2 and len(calls) == 1

        with pytest.raises(torch.jit.Error, match="not a number"):
            wrapped(torch.full((3, 4), float("nan")))
        # The exception left the no_grad() block
        assert torch.is_grad_enabled()
    finally:
        handle.remove()


def test_rejects_eager_modules():
    with pytest.raises(TypeError):
        HookableScriptModule(torch.nn.Linear(2, 2))
