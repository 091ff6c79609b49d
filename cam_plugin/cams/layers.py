"""Finding the layers a CAM can be taken from, and picking the default one.

One probe pass with hooks on every module records, in execution order, each
module's output shape, how often it ran, and whether the class scores depend
on its spatial positions (a backward pass from the logits). The default
target layer is the last module with a spatial output that the scores depend
on: ``layer4`` for ResNet, ``features`` for VGG, DenseNet, MobileNet,
EfficientNet and ConvNeXt, ``norm`` for Swin, and the last block's
``ln_1`` for ViT (the final blocks' patch tokens never reach the class token).
"""

from dataclasses import dataclass

import torch

from .capture import CamError, SpatialLayout, eval_mode, infer_layout, logits_of
from .capture import layer_hooks

# Modules that only pool globally or rearrange: their output is never a
# better CAM source than their input
_PASS_THROUGH_TYPES = {
    "AdaptiveAvgPool2d",
    "AdaptiveMaxPool2d",
    "AdaptiveAvgPool1d",
    "Identity",
    "Dropout",
    "Dropout2d",
    "Flatten",
    "Permute",
}


@dataclass
class LayerCandidate:
    """A module's behaviour during the probe pass."""

    name: str
    type: str
    order: int
    shape: tuple
    calls: int
    layout: SpatialLayout = None
    connected: bool = False
    output_id: int = 0

    @property
    def channels(self):
        if self.layout is None:
            return None
        if self.layout.kind == "nchw":
            return self.shape[1]
        return self.shape[-1]

    @property
    def usable(self):
        return (
            self.layout is not None
            and self.calls == 1
            and self.connected
            and self.type not in _PASS_THROUGH_TYPES
        )


def probe_layers(model, input_shape, device=None):
    """Runs one forward and backward pass on a random input and records every
    module's output.

    Args:
        model: a ``torch.nn.Module`` (or a hookable TorchScript wrapper)
        input_shape: the (C, H, W) shape of one model input
        device (None): the device to probe on; defaults to the model's

    Returns:
        a list of :class:`LayerCandidate`, in execution order
    """
    return probe_model(model, input_shape, device=device)[0]


def probe_model(model, input_shape, device=None):
    """:func:`probe_layers`, also returning what the same pass shows of the
    model's output.

    Returns:
        a ``(candidates, num_outputs)`` tuple: the list of
        :class:`LayerCandidate` and the number of logits per input
    """
    if device is None:
        device = _model_device(model)

    names = [name for name, _ in model.named_modules() if name]
    # scripted submodules keep their class name in ``original_name``
    types = {
        name: getattr(m, "original_name", type(m).__name__)
        for name, m in model.named_modules()
        if name
    }
    records = {}
    outputs = {}
    order = [0]

    def make_hook(name):
        def hook(module, inputs, output):
            rec = records.get(name)
            if rec is None:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else ()
                rec = LayerCandidate(name, types[name], order[0], shape, 0)
                records[name] = rec

            rec.calls += 1
            rec.order = order[0]
            order[0] += 1
            if isinstance(output, torch.Tensor):
                rec.output_id = id(output)
                if output.requires_grad:
                    output.retain_grad()
                outputs[name] = output

        return hook

    hooks = layer_hooks(model)
    handles = []
    try:
        for name in names:
            handles.append(hooks.register_hook(name, make_hook(name)))

        generator = torch.Generator().manual_seed(0)
        x = torch.randn((1,) + tuple(input_shape), generator=generator)
        x = x.to(device).requires_grad_(True)
        with eval_mode(model), torch.enable_grad():
            logits = logits_of(_call_with_live_weights(model, hooks, x))
            logits.max(dim=1).values.sum().backward()
    finally:
        for handle in handles:
            handle.remove()

    input_hw = tuple(input_shape[-2:])
    for name, rec in records.items():
        out = outputs.get(name)
        if out is None or not rec.shape:
            continue
        # a module run again on another shape (one Dropout shared by a
        # block's attention windows and its tokens, in Hugging Face Swin)
        # has no one layout; a leading dimension other than the batch
        # (windows of a window attention, flattened into it) is no map
        if tuple(out.shape) != rec.shape or rec.shape[0] != x.shape[0]:
            continue

        rec.layout = infer_layout(rec.shape, input_hw)
        if rec.layout is None or out.grad is None:
            continue

        grad = rec.layout.to_nchw(out.grad)
        rec.connected = bool(grad.abs().sum() > 0)

    _clear_grads(model)

    return sorted(records.values(), key=lambda r: r.order), logits.shape[1]


def default_layer(candidates):
    """Picks the default target layer from probe results.

    Several modules can finish with the very same output tensor (a
    ``Sequential`` and its last child); the outermost one is named.
    """
    usable = [c for c in candidates if c.usable]
    if not usable:
        raise CamError(
            "The model has no layer with a spatial output that the class "
            "scores depend on, so no CAM can be computed. Layers seen: "
            + ", ".join(f"{c.name} {c.shape}" for c in candidates[-10:])
        )

    last = usable[-1]
    same = [c for c in usable if c.output_id == last.output_id]
    return min(same, key=lambda c: (c.name.count("."), c.order)).name


def check_layer(candidates, layer_name):
    """Validates a user-chosen layer against the probe results.

    Returns:
        the :class:`LayerCandidate`

    Raises:
        CamError: naming the problem and listing usable layers
    """
    by_name = {c.name: c for c in candidates}
    usable = [c.name for c in candidates if c.usable]
    hint = _names_hint(usable)

    cand = by_name.get(layer_name)
    if cand is None:
        raise CamError(
            f"The model has no layer named '{layer_name}' (or it did not run "
            f"in the forward pass). Usable layers: {hint}"
        )

    if cand.calls != 1:
        raise CamError(
            f"Layer '{layer_name}' runs {cand.calls} times in one forward "
            f"pass, so its output is ambiguous. Usable layers: {hint}"
        )

    if cand.layout is None:
        raise CamError(
            f"Layer '{layer_name}' has output shape {cand.shape}, which has "
            f"no spatial grid. Usable layers: {hint}"
        )

    if not cand.connected:
        raise CamError(
            f"The class scores do not depend on the spatial output of layer "
            f"'{layer_name}' (its gradient is zero or missing), so its CAM "
            f"would be empty. Usable layers: {hint}"
        )

    return cand


def _names_hint(names, limit=15):
    if not names:
        return "(none)"

    names = list(reversed(names))
    text = ", ".join(names[:limit])
    if len(names) > limit:
        text += f", ... ({len(names) - limit} more)"

    return text


def _call_with_live_weights(model, hooks, x):
    # Freshly initialised models often zero their classifier (torchvision's
    # ViT does), which would make every gradient zero. Dependency is a
    # property of the structure, so the probe lends all-zero weights small
    # random values for this one call (where the model can be lent weights)
    if hooks.overrides_parameters:
        generator = torch.Generator().manual_seed(1)
        overrides = {}
        for name, p in model.named_parameters():
            if p.numel() > 1 and not torch.any(p):
                noise = torch.randn(p.shape, generator=generator) * 0.02
                overrides[name] = noise.to(device=p.device, dtype=p.dtype)

        if overrides:
            return torch.func.functional_call(model, overrides, (x,), strict=False)

    return model(x)


def _model_device(model):
    for p in model.parameters():
        return p.device

    for b in model.buffers():
        return b.device

    return torch.device("cpu")


def _clear_grads(model):
    for p in model.parameters():
        p.grad = None
