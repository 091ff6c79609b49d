"""The CAM methods, one small function each over :class:`CamContext`.

Every method maps ``(ctx, classes)`` with ``classes`` a (B, T) tensor of
class indices to (B, T, h, w) maps, computed in torch on the activations'
device and kept in raw units (ReLU applied, never min-max normalised). The
formulas follow the papers cited beside each function and, where they
differ in details, the reference implementation ``pytorch-grad-cam``.
"""

import torch
import torch.nn.functional as F

# METHODS and get_method are re-exported: they are this module's public names
from .registry import METHODS, MethodSpec, get_method, register  # noqa: F401


def _weighted_sum(weights, activations):
    # (B, T, C) x (B, C, h, w) -> (B, T, h, w)
    return torch.einsum("btc,bchw->bthw", weights, activations)


def cam(ctx, classes):
    """CAM (Zhou et al., 2016): the classifier weights of each class applied to
    the feature maps. Exact for a global-average-pooling + linear head."""
    weights = ctx.head_weights()[classes]
    return F.relu(_weighted_sum(weights, ctx.activations))


def gradcam(ctx, classes):
    """Grad-CAM (Selvaraju et al., 2017): channels weighted by their
    spatially averaged gradient."""
    grads = ctx.gradients(classes)
    return F.relu(_weighted_sum(grads.mean(dim=(3, 4)), ctx.activations))


def gradcam_counterfactual(ctx, classes):
    """Counterfactual Grad-CAM (Selvaraju et al., 2017, section 5): weights
    from the negated gradients, showing regions whose removal would raise the
    class score."""
    grads = ctx.gradients(classes)
    return F.relu(_weighted_sum(-grads.mean(dim=(3, 4)), ctx.activations))


def gradcam_plusplus(ctx, classes):
    """Grad-CAM++ (Chattopadhay et al., 2018, eq. 19), with the ReLU of eq. 7
    on the gradients."""
    grads = ctx.gradients(classes)
    acts = ctx.activations
    grads_2 = grads.pow(2)
    grads_3 = grads_2 * grads
    sum_acts = acts.sum(dim=(2, 3))[:, None, :, None, None]
    alpha = grads_2 / (2 * grads_2 + sum_acts * grads_3 + 1e-6)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    weights = (F.relu(grads) * alpha).sum(dim=(3, 4))
    return F.relu(_weighted_sum(weights, acts))


def xgradcam(ctx, classes):
    """XGrad-CAM (Fu et al., 2020): gradients weighted by normalised
    activations."""
    grads = ctx.gradients(classes)
    acts = ctx.activations
    sum_acts = acts.sum(dim=(2, 3))[:, None, :, None, None]
    weights = (grads * acts[:, None] / (sum_acts + 1e-7)).sum(dim=(3, 4))
    return F.relu(_weighted_sum(weights, acts))


def layercam(ctx, classes):
    """Layer-CAM (Jiang et al., 2021): positive gradients weight each
    activation element-wise."""
    grads = ctx.gradients(classes)
    return F.relu((F.relu(grads) * ctx.activations[:, None]).sum(dim=2))


def hirescam(ctx, classes):
    """HiResCAM (Draelos & Carin, 2020): element-wise gradient times
    activation, faithful to the model's computation."""
    grads = ctx.gradients(classes)
    return F.relu((grads * ctx.activations[:, None]).sum(dim=2))


def eigencam(ctx, classes):
    """Eigen-CAM (Muhammad & Yeasin, 2020): the activations projected on their
    first principal component. Class-agnostic. The sign of a principal
    component is arbitrary; it is fixed so that the larger extreme of the
    projection is positive (Seg-Eigen-CAM, Chung & Ying, 2025, eq. 13)."""
    acts = ctx.activations
    b, c, h, w = acts.shape
    x = acts.reshape(b, c, h * w).transpose(1, 2)
    x = x - x.mean(dim=1, keepdim=True)
    x = torch.nan_to_num(x)
    # The SVD in float64 matches LAPACK's accuracy on near-degenerate maps
    _, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    proj = (x.double() @ vh[:, 0, :, None]).squeeze(-1).float()
    flip = proj.amin(dim=1).abs() > proj.amax(dim=1).abs()
    proj = torch.where(flip[:, None], -proj, proj)
    maps = F.relu(proj.reshape(b, 1, h, w))
    return maps.expand(b, classes.shape[1], h, w)


def scorecam(ctx, classes):
    """Score-CAM (Wang et al., 2020): each channel, upsampled and normalised,
    masks the input; the softmax over channels of the masked inputs' class
    scores weights the channels.

    Masked passes run batched across images and channels. A constant
    channel masks the input to all zeros, so every such channel shares one
    score (that of a black image), computed once. Each chunk's masks are
    upsampled when that chunk runs, so memory stays at one chunk of masks
    however many channels the layer has.
    """
    acts = ctx.activations
    b, c = acts.shape[:2]
    size = ctx.inputs.shape[-2:]
    flat = acts.flatten(2)
    # bilinear upsampling of a constant grid is constant and of a varying
    # grid varies, so the low-resolution grid decides which masks are zero
    varying = flat.amax(dim=2) > flat.amin(dim=2)
    pairs = varying.nonzero()  # (N, 2) rows of (image, channel)

    t = classes.shape[1]
    scores = torch.empty(b, c, t, device=acts.device)

    zero_logits = ctx.forward_logits(torch.zeros_like(ctx.inputs[:1]))[0]
    scores[:] = zero_logits[classes][:, None, :]

    if len(pairs):
        inputs = ctx.inputs.float()

        def masked(start, stop):
            img, ch = pairs[start:stop, 0], pairs[start:stop, 1]
            up = F.interpolate(acts[img, ch][:, None], size=size, mode="bilinear", align_corners=True)
            lo = up.amin(dim=(2, 3), keepdim=True)
            hi = up.amax(dim=(2, 3), keepdim=True)
            mask = (up - lo) / (hi - lo + 1e-8)
            return (inputs[img] * mask).to(ctx.inputs.dtype)

        masked.total = len(pairs)
        logits = ctx.forward_logits(masked)
        img = pairs[:, 0]
        scores[img, pairs[:, 1]] = logits.gather(1, classes[img])

    weights = torch.softmax(scores, dim=1).transpose(1, 2)  # (B, T, C)
    return F.relu(_weighted_sum(weights, acts))


def ablationcam(ctx, classes):
    """Ablation-CAM (Desai & Ramaswamy, 2020): a channel's weight is the
    relative drop of the class score when that channel is removed.

    Removal sets the channel to zero when the layer's activations are
    non-negative (post-ReLU, as in the paper). For layers with negative
    values (pre-activation outputs) zero is not "off", so the channel is set
    far below the image's minimum instead, which a following rectifier maps
    to zero; this is also what pytorch-grad-cam does.

    Ablations of all images and channels run batched; channels that are
    zero everywhere cannot change the score when zeroed, so they get weight
    zero without a forward pass.
    """
    acts = ctx.activations
    b, c = acts.shape[:2]
    original = ctx.logits.detach().float().gather(1, classes)  # (B, T)
    lowest = acts.flatten(1).amin(dim=1)
    off_value = torch.where(lowest < 0, lowest - 1e7, torch.zeros_like(lowest))
    active = acts.flatten(2).abs().amax(dim=2) > 0
    active |= (lowest < 0)[:, None]
    pairs = active.nonzero()

    t = classes.shape[1]
    new_scores = original[:, None, :].expand(b, c, t).clone()

    if len(pairs):

        def inputs(start, stop):
            return ctx.inputs[pairs[start:stop, 0]]

        inputs.total = len(pairs)

        def replace(start, stop, output):
            img, ch = pairs[start:stop, 0], pairs[start:stop, 1]
            ablated = acts[img].clone()
            rows = torch.arange(len(img), device=acts.device)
            ablated[rows, ch] = off_value[img][:, None, None]
            return ctx.to_raw_layout(ablated, output)

        logits = ctx.forward_logits(inputs, replace_layer_output=replace)
        img = pairs[:, 0]
        new_scores[img, pairs[:, 1]] = logits.gather(1, classes[img])

    weights = (original[:, None, :] - new_scores) / original[:, None, :]
    return F.relu(_weighted_sum(weights.transpose(1, 2), acts))


def guided_gradcam(ctx, classes):
    """Guided Grad-CAM (Selvaraju et al., 2017): Grad-CAM upsampled to the
    input size times guided backpropagation (Springenberg et al., 2015).
    The per-pixel value is the largest absolute guided gradient over the
    colour channels (Simonyan et al., 2014), giving a full-resolution map."""
    from .guided import guided_backprop

    coarse = gradcam(ctx, classes)
    size = ctx.inputs.shape[-2:]
    up = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    saliency = guided_backprop(ctx.model, ctx.inputs, classes)
    return up * saliency


for _spec in (
    MethodSpec("cam", cam, False, "CAM: classifier weights on the feature maps (GAP + linear heads)"),
    MethodSpec("gradcam", gradcam, True, "Grad-CAM: channels weighted by mean gradient"),
    MethodSpec("gradcam++", gradcam_plusplus, True, "Grad-CAM++: higher-order gradient weights, better for several instances"),
    MethodSpec("xgradcam", xgradcam, True, "XGrad-CAM: gradient weights normalised by activation"),
    MethodSpec("layercam", layercam, True, "Layer-CAM: element-wise positive gradients, finer detail"),
    MethodSpec("hirescam", hirescam, True, "HiResCAM: element-wise gradient x activation, faithful"),
    MethodSpec("scorecam", scorecam, False, "Score-CAM: gradient-free, channels scored by masked forward passes (slow)"),
    MethodSpec("eigencam", eigencam, False, "Eigen-CAM: first principal component of the activations (class-agnostic)"),
    MethodSpec("ablationcam", ablationcam, False, "Ablation-CAM: score drop when each channel is removed (slow)"),
    MethodSpec("guided-gradcam", guided_gradcam, True, "Guided Grad-CAM: Grad-CAM x guided backprop, full resolution", full_resolution=True),
    MethodSpec("gradcam-counterfactual", gradcam_counterfactual, True, "Counterfactual Grad-CAM: regions that argue against the class"),
):
    register(_spec)

del _spec
