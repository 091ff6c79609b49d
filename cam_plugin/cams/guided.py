"""Guided backpropagation (Springenberg et al., 2015): input gradients where
every ReLU also blocks negative gradients on the way back."""

import torch
from torch import nn

from .capture import eval_mode, logits_of


class _GuidedClamp(torch.autograd.Function):
    """Identity on an already rectified tensor; backward passes only positive
    gradients where the activation is inside its open linear range."""

    @staticmethod
    def forward(ctx, rectified, upper):
        ctx.save_for_backward(rectified)
        ctx.upper = upper
        return rectified.clone()

    @staticmethod
    def backward(ctx, grad):
        (rectified,) = ctx.saved_tensors
        passing = rectified > 0
        if ctx.upper is not None:
            passing = passing & (rectified < ctx.upper)
        return grad.clamp_min(0) * passing, None


def _guide(module, inputs, output):
    upper = 6.0 if isinstance(module, nn.ReLU6) else None
    return _GuidedClamp.apply(output, upper)


def guided_backprop(model, inputs, classes):
    """Guided-backpropagation saliency of each target class.

    ReLU and ReLU6 modules are guided; rectifications written as functions
    inside ``forward`` (``F.relu``) cannot be hooked and stay plain.

    Args:
        model: the model
        inputs: (B, 3, H, W) inputs
        classes: (B, T) class indices

    Returns:
        a (B, T, H, W) float32 tensor: per pixel, the largest absolute guided
        gradient over the colour channels
    """
    handles = [
        m.register_forward_hook(_guide)
        for m in model.modules()
        if isinstance(m, (nn.ReLU, nn.ReLU6))
    ]
    try:
        x = inputs.detach().clone().requires_grad_(True)
        with eval_mode(model), torch.enable_grad():
            logits = logits_of(model(x))
            saliency = []
            num_targets = classes.shape[1]
            for t in range(num_targets):
                score = logits.gather(1, classes[:, t : t + 1]).sum()
                (grad,) = torch.autograd.grad(
                    score, x, retain_graph=t < num_targets - 1
                )
                saliency.append(grad.abs().amax(dim=1).float())
    finally:
        for handle in handles:
            handle.remove()

    return torch.stack(saliency, dim=1)
