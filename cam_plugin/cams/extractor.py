"""The shared core of all CAM methods: one forward pass per batch, the target
layer's activations in (B, C, h, w), and on-demand gradients, masked forward
passes and layer replacements that the individual methods build on.
"""

import torch

from .capture import CamError, LayerCapture, eval_mode, infer_layout, logits_of
from .inference import InferenceModels, parallel_streams
from .layers import check_layer, default_layer, probe_model
from .registry import get_method


class CamContext:
    """What a CAM method can see and ask for, for one batch.

    Attributes:
        model: the model
        inputs: the (B, 3, H, W) model inputs
        logits: the (B, K) logits of the forward pass
        activations: the (B, C, h, w) float32 target-layer activations
        layer: the name of the target layer
        layout: the layer's :class:`SpatialLayout` for this batch
        chunk_size: the most images to send through the model at once in
            the extra forward passes of perturbation methods

    ``inference_models`` (an :class:`InferenceModels`) caches the fast copy
    of the model that those passes run on across batches; without it, one
    is built for this batch.
    """

    def __init__(
        self, model, inputs, logits, leaf, layer, layout, chunk_size, inference_models=None
    ):
        self.model = model
        self._inference_models = (
            inference_models if inference_models is not None else InferenceModels(model)
        )
        self.inputs = inputs
        self.logits = logits
        self.layer = layer
        self.layout = layout
        self.chunk_size = chunk_size
        self._leaf = leaf
        self.activations = layout.to_nchw(leaf.detach()).float()
        self.cache = {}

    def gradients(self, classes):
        """Gradients of each target class score w.r.t. the activations.

        Args:
            classes: a (B, T) long tensor of class indices

        Returns:
            a (B, T, C, h, w) float32 tensor
        """
        if not self._leaf.requires_grad:
            raise CamError("This CAM method needs gradients, which were not recorded")

        grads = []
        for t in range(classes.shape[1]):
            score = self.logits.gather(1, classes[:, t : t + 1]).sum()
            (grad,) = torch.autograd.grad(score, self._leaf, retain_graph=True)
            grads.append(self.layout.to_nchw(grad).float())

        return torch.stack(grads, dim=1)

    def forward_logits(self, inputs, replace_layer_output=None):
        """Runs the model on ``inputs`` without gradients, in chunks.

        Args:
            inputs: a (N, 3, H, W) tensor, or a callable ``(start, stop)`` that
                returns that slice of a virtual (N, ...) input so that large
                batches of masked inputs are never materialised at once
            replace_layer_output (None): an optional callable
                ``(start, stop, output) -> output`` that replaces the target
                layer's output for that slice

        Returns:
            a (N, K) float32 tensor of logits
        """
        if callable(inputs):
            make, total = inputs, inputs.total
        else:
            total = inputs.shape[0]
            make = lambda a, b: inputs[a:b]

        if replace_layer_output is not None:
            return self._forward_replaced(make, total, replace_layer_output)

        model, memory_format = self._inference_model()

        def run(start):
            stop = min(start + self.chunk_size, total)
            chunk = make(start, stop).contiguous(memory_format=memory_format)
            with torch.no_grad():  # grad mode is per thread
                return logits_of(model(chunk)).float()

        starts = range(0, total, self.chunk_size)
        with parallel_streams(self.inputs.device, len(starts)) as pool:
            results = list(pool.map(run, starts)) if pool else [run(s) for s in starts]

        return torch.cat(results, dim=0)

    def _forward_replaced(self, make, total, replace_layer_output):
        results = []
        with torch.no_grad():
            for start in range(0, total, self.chunk_size):
                stop = min(start + self.chunk_size, total)
                replace = lambda out, a=start, b=stop: replace_layer_output(a, b, out)
                with LayerCapture(self.model, self.layer, replace=replace):
                    out = self.model(make(start, stop))

                results.append(logits_of(out).float())

        return torch.cat(results, dim=0)

    def _inference_model(self):
        return self._inference_models.get(self.inputs.device)

    def to_raw_layout(self, nchw, like):
        """Converts a (N, C, h, w) tensor back into the layer's raw layout,
        taking non-spatial tokens from ``like``."""
        kind = self.layout.kind
        if kind == "nchw":
            return nchw.to(like.dtype)

        if kind == "nhwc":
            return nchw.permute(0, 2, 3, 1).to(like.dtype)

        n, c = nchw.shape[:2]
        tokens = nchw.reshape(n, c, -1).transpose(1, 2).to(like.dtype)
        extra = like[:, : self.layout.extra_tokens, :]
        if extra.shape[0] != n:
            extra = extra.expand(n, -1, -1)

        return torch.cat([extra, tokens], dim=1)

    def head_weights(self):
        """The (K, C) weight of the linear classifier on the pooled
        activations, for CAM."""
        weights = self.cache.get("head_weights")
        if weights is not None:
            return weights

        num_channels = self.activations.shape[1]
        num_classes = self.logits.shape[1]
        linear = None
        for _, module in self.model.named_modules():
            weight = getattr(module, "weight", None)
            if (
                isinstance(weight, torch.Tensor)
                and weight.ndim == 2
                and tuple(weight.shape) == (num_classes, num_channels)
            ):
                linear = weight

        if linear is None:
            raise CamError(
                f"CAM needs a linear classifier from the {num_channels} "
                f"channels of layer '{self.layer}' to the {num_classes} "
                "classes (global average pooling followed by a linear "
                "layer); none was found. Use 'gradcam', which equals CAM on "
                "such heads and works on any model"
            )

        weights = linear.detach().float()
        self.cache["head_weights"] = weights
        return weights


class CamResult:
    """The output of :class:`CamExtractor` for one batch.

    Attributes:
        logits: (B, K) float32 logits
        classes: (B, T) long tensor: the class each map explains
        valid: (B, T) bool tensor: False where a target had no class (for
            example a sample without a ground-truth label)
        maps: (B, T, h, w) float32 non-negative maps, covering the model
            input; ``h, w`` is the layer grid, or the input size for
            full-resolution methods
        target_names: the T target names
    """

    def __init__(self, logits, classes, valid, maps, target_names):
        self.logits = logits
        self.classes = classes
        self.valid = valid
        self.maps = maps
        self.target_names = target_names

    def map(self, name):
        return self.maps[:, self.target_names.index(name)]


class CamExtractor:
    """Computes one CAM method at one layer of one model, batch by batch.

    Args:
        model: a ``torch.nn.Module`` classifier in eval mode
        method: a method name from :data:`cam_plugin.cams.METHODS`
        input_shape: the (C, H, W) shape of one model input, for probing
        layer (None): the target layer name; None picks the default
        chunk_size (64): the most images per extra forward pass of the
            perturbation methods (Score-CAM, Ablation-CAM)
        autocast (False): whether to run the forward pass under CUDA mixed
            precision (maps are always computed in float32)

    Attributes:
        candidates: the layers the probe pass found
        num_outputs: the number of logits the model returns per input
    """

    def __init__(
        self,
        model,
        method,
        input_shape,
        layer=None,
        chunk_size=64,
        autocast=False,
    ):
        self.model = model
        self.method = get_method(method)
        self.chunk_size = chunk_size
        self.autocast = autocast
        self.candidates, self.num_outputs = probe_model(model, input_shape)
        self.layer = default_layer(self.candidates) if layer is None else layer
        self.layer_info = check_layer(self.candidates, self.layer)
        self.inference_models = InferenceModels(model)

    @property
    def layout(self):
        return self.layer_info.layout

    def __call__(self, inputs, targets):
        """Computes the maps for a batch.

        Args:
            inputs: a (B, 3, H, W) tensor on the model's device
            targets: a dict mapping target names to callables
                ``logits -> (B,) long tensor`` of class indices, -1 where a
                sample has no such target

        Returns:
            a :class:`CamResult`
        """
        spec = self.method
        with eval_mode(self.model):
            with torch.no_grad(), self._autocast(inputs):
                with LayerCapture(
                    self.model, self.layer, grad_from_layer=spec.needs_gradients
                ) as capture:
                    output = self.model(inputs)

            if capture.calls != 1:
                raise CamError(
                    f"Layer '{self.layer}' ran {capture.calls} times in one "
                    "forward pass; choose a layer that runs once"
                )

            logits = logits_of(output)
            layout = self._batch_layout(capture.raw.shape, inputs.shape[-2:])

            names = list(targets)
            columns = []
            for name in names:
                classes = targets[name](logits.detach())
                columns.append(classes.to(device=logits.device, dtype=torch.long))

            classes = torch.stack(columns, dim=1)
            valid = classes >= 0
            safe_classes = classes.clamp_min(0)

            ctx = CamContext(
                self.model,
                inputs,
                logits,
                capture.raw,
                self.layer,
                layout,
                self.chunk_size,
                self.inference_models,
            )
            # a target no row of the batch has a class for costs nothing (a
            # multi-label run asks for every class, each sample needs few)
            active = valid.any(0)
            if not bool(active[0]):
                active[0] = True  # one column computed gives the maps' size
            active_maps = spec.fn(ctx, safe_classes[:, active])
            active_maps = torch.nan_to_num(active_maps.float(), nan=0.0).clamp_min_(0)
            if bool(active.all()):
                maps = active_maps
            else:
                maps = active_maps.new_zeros(
                    (classes.shape[0], classes.shape[1]) + tuple(active_maps.shape[2:])
                )
                maps[:, active] = active_maps
            maps = maps * valid[:, :, None, None]

        return CamResult(
            logits.detach().float(), classes, valid, maps.detach(), names
        )

    def _autocast(self, inputs):
        enabled = bool(self.autocast) and inputs.device.type == "cuda"
        return torch.autocast(device_type=inputs.device.type, enabled=enabled)

    def _batch_layout(self, shape, input_hw):
        layout = infer_layout(tuple(shape), tuple(input_hw))
        base = self.layout
        if layout is None or layout.kind != base.kind:
            raise CamError(
                f"Layer '{self.layer}' produced an output of shape "
                f"{tuple(shape)} for an input of size {tuple(input_hw)}, "
                f"which does not match its probed layout ({base.describe()})"
            )

        return layout
