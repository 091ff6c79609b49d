"""Capturing a layer's output during a forward pass, in a uniform (B, C, h, w) layout.

A layer may emit NCHW feature maps (CNNs), NHWC maps (torchvision Swin) or
token sequences (ViT: class/register tokens followed by a patch grid). The
:class:`SpatialLayout` found when the layer is first probed converts any of
these to NCHW so the CAM methods only ever see one layout.
"""

import contextlib
import math
from dataclasses import dataclass

import torch

from .torchscript import HookableScriptModule


class CamError(ValueError):
    """A model, layer or target that cannot produce a class activation map."""


def logits_of(output):
    """Returns the (B, K) logits tensor of a classifier's output.

    Models may return a tensor, a dict (``{"logits": ...}``), an object with
    a ``logits`` attribute (HuggingFace style) or a tuple whose first element
    holds the logits.
    """
    if isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(output, dict):
        if "logits" in output:
            logits = output["logits"]
        else:
            tensors = [v for v in output.values() if isinstance(v, torch.Tensor)]
            if len(tensors) != 1:
                raise CamError(
                    "The model returned a dict without a 'logits' entry and "
                    f"with {len(tensors)} tensors (keys: {sorted(output)}); "
                    "return the logits under 'logits'"
                )
            logits = tensors[0]
    elif hasattr(output, "logits"):
        logits = output.logits
    elif isinstance(output, (tuple, list)) and output:
        logits = logits_of(output[0])
    else:
        raise CamError(
            f"Cannot find logits in a model output of type {type(output).__name__}"
        )

    if logits.ndim != 2:
        raise CamError(
            f"Expected classifier logits of shape (batch, classes); got "
            f"{tuple(logits.shape)}"
        )

    return logits


@dataclass(frozen=True)
class SpatialLayout:
    """How a layer's raw output maps onto a (B, C, h, w) feature map.

    Attributes:
        kind: ``"nchw"``, ``"nhwc"`` or ``"tokens"``
        grid: the (h, w) spatial grid
        extra_tokens: for token outputs, the number of leading non-spatial
            tokens (class, distillation and register tokens) that are dropped
    """

    kind: str
    grid: tuple
    extra_tokens: int = 0

    def to_nchw(self, raw):
        if self.kind == "nchw":
            return raw

        if self.kind == "nhwc":
            return raw.permute(0, 3, 1, 2)

        h, w = self.grid
        patches = raw[:, self.extra_tokens :, :]
        return patches.transpose(1, 2).reshape(raw.shape[0], raw.shape[2], h, w)

    def describe(self):
        if self.kind == "tokens":
            return (
                f"tokens -> {self.grid[0]}x{self.grid[1]} grid "
                f"({self.extra_tokens} leading token(s) dropped)"
            )

        return f"{self.kind} {self.grid[0]}x{self.grid[1]}"


def infer_layout(shape, input_hw):
    """Infers the :class:`SpatialLayout` of a layer output of the given shape.

    Args:
        shape: the shape of the layer output, batch first
        input_hw: the (H, W) of the model input

    Returns:
        a :class:`SpatialLayout`, or None if the output has no spatial grid
    """
    in_h, in_w = input_hw
    aspect = in_h / in_w

    if len(shape) == 4:
        candidates = []
        for kind, (h, w) in (("nchw", shape[2:4]), ("nhwc", shape[1:3])):
            if h < 1 or w < 1 or h > in_h or w > in_w or h * w < 2:
                continue

            # The spatial pair is the one with the input's aspect ratio; a
            # channel axis paired with a spatial one almost never matches it
            candidates.append((abs(math.log((h / w) / aspect)), kind, (h, w)))

        if not candidates:
            return None

        error, kind, grid = min(candidates, key=lambda c: (c[0], c[1] != "nchw"))
        if error > math.log(2.0):
            return None

        return SpatialLayout(kind, tuple(int(x) for x in grid))

    if len(shape) == 3:
        num_tokens = shape[1]
        for extra in range(0, 17):
            n = num_tokens - extra
            if n < 4:
                break

            h = round(math.sqrt(n * aspect))
            for hh in (h - 1, h, h + 1):
                if hh < 2 or n % hh:
                    continue

                ww = n // hh
                if ww >= 2 and abs((hh / ww) - aspect) <= 1e-6 * max(1.0, aspect):
                    return SpatialLayout("tokens", (hh, ww), extra)

        return None

    return None


class LayerCapture:
    """A forward hook on one layer that records its output and, optionally,
    makes that output the start of the autograd graph.

    With ``grad_from_layer=True``, the forward pass is meant to run under
    ``torch.no_grad()``: the hook switches gradients on and hands the rest
    of the network a fresh leaf, so back-propagation stops at the layer and
    nothing upstream is recorded.

    Use as a context manager; the hook is always removed on exit.
    """

    def __init__(self, model, layer_name, grad_from_layer=False, replace=None):
        self.model = model
        self.layer_name = layer_name
        self.grad_from_layer = grad_from_layer
        self.replace = replace
        self.raw = None
        self.calls = 0
        self._handle = None

    def _hook(self, module, inputs, output):
        self.calls += 1
        if not isinstance(output, torch.Tensor):
            raise CamError(
                f"Layer '{self.layer_name}' returns a {type(output).__name__}, "
                "not a tensor; choose a layer whose output is a feature map"
            )

        if self.replace is not None:
            output = self.replace(output)

        if not self.grad_from_layer:
            self.raw = output.detach()
            return output

        torch.set_grad_enabled(True)
        leaf = output.detach().requires_grad_(True)
        self.raw = leaf

        # A clone keeps the leaf intact when the next op works in place
        return leaf.clone()

    def __enter__(self):
        self._handle = register_output_hook(self.model, self.layer_name, self._hook)
        return self

    def __exit__(self, *args):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

        return False


class _EagerLayers:
    """The layers of an eager ``torch.nn.Module``: plain forward hooks."""

    #: ``torch.func.functional_call`` can lend the module other parameters
    overrides_parameters = True

    def __init__(self, model):
        self.model = model

    def register_hook(self, layer_name, hook):
        try:
            module = self.model.get_submodule(layer_name)
        except AttributeError:
            raise CamError(
                f"The model has no layer named '{layer_name}'. "
                f"Candidates: {', '.join(spatial_layer_names_hint(self.model))}"
            ) from None

        return module.register_forward_hook(hook)


class _ScriptLayers:
    """The layers of a TorchScript model wrapped in
    :class:`cam_plugin.cams.torchscript.HookableScriptModule`, hooked through
    its interpreter (TorchScript modules refuse Python forward hooks)."""

    # the compiled graphs read the scripted module's own parameters, which
    # torch.func.functional_call cannot swap
    overrides_parameters = False

    def __init__(self, model):
        self.model = model

    def register_hook(self, layer_name, hook):
        return self.model.register_layer_hook(layer_name, hook)


def layer_hooks(model):
    """How to hook the layers of ``model``: the one place that tells eager
    models from TorchScript ones, so that no other code needs to.

    Returns:
        an object with ``register_hook(layer_name, hook)`` (returning a
        handle whose ``remove()`` removes the hook) and
        ``overrides_parameters`` (whether ``torch.func.functional_call`` can
        run the model with other parameters)

    Raises:
        CamError: for a TorchScript module that is not wrapped
    """
    if isinstance(model, HookableScriptModule):
        return _ScriptLayers(model)

    if isinstance(model, torch.jit.ScriptModule):
        raise CamError(
            "TorchScript modules take no forward hooks: wrap it as "
            "cam_plugin.cams.torchscript.HookableScriptModule(model), or pass "
            "the saved file's path or the module to cam_plugin.load_classifier"
        )

    return _EagerLayers(model)


def register_output_hook(model, layer_name, hook):
    """Registers ``hook(module, inputs, output)`` on the named layer, of an
    eager model or a wrapped TorchScript one (see :func:`layer_hooks`)."""
    return layer_hooks(model).register_hook(layer_name, hook)


def spatial_layer_names_hint(model, limit=12):
    names = [n for n, _ in model.named_modules() if n]
    if len(names) > limit:
        names = names[-limit:]
        names.insert(0, "...")

    return names


@contextlib.contextmanager
def eval_mode(model):
    """Puts the model in eval mode for the duration, restoring its mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()
