"""FiftyOne models as CAM classifiers: a
``fiftyone.utils.torch.TorchImageModel`` (what the FiftyOne zoo's torch
classifiers are) or a zoo name ``"zoo:<name>"``.

The model's network (``model._model``), its preprocessing
(``model.transforms``, which ``apply_model`` applies to each RGB PIL image
in its data loader) and its class names (``model.classes``) are used as
they are, so the predictions are those of ``dataset.apply_model(model)``:
the arg-max class and its softmax probability, as FiftyOne's
``ClassifierOutputProcessor`` computes them. The zoo's torchvision
classifiers keep each image's own size (``image_min_dim`` 224,
``image_max_dim`` 2048: ``ragged_batches``), which CAM runs follow by
stacking only images of the same size; the maps are placed back in the
full image frame whatever the transforms do (frames probes FiftyOne's own
resize transforms with ramp images).

Models whose predictions are more than their network's output on the
transformed image (a custom ``_predict_all`` or ``_forward_pass``, a
``collate_fn``, raw inputs, an output processor that is not a
classifier's) are refused, with the reason.
"""

import torch

from .models import ZOO_PREFIX, Classifier, ModelError, ModelNotLocalError, split_named_spec


def _torch_utils():
    import fiftyone.utils.torch as fout

    return fout


def classifier_from_fiftyone(model, name=None):
    """A :class:`cam_plugin.models.Classifier` of a FiftyOne model.

    Args:
        model: a ``fiftyone.utils.torch.TorchImageModel``
        name (None): how the run records where the model came from

    Raises:
        ModelError: for a FiftyOne model that is not a torch image
            classifier whose predictions CAMs can reproduce
    """
    fout = _torch_utils()
    kind = type(model).__name__
    if not isinstance(model, fout.TorchImageModel):
        raise ModelError(
            f"A FiftyOne {kind} is not a torch image classifier: CAMs need a "
            "fiftyone.utils.torch.TorchImageModel (the zoo's '*-torch' "
            "classifiers), whose torch network they hook"
        )

    processor = getattr(model, "_output_processor", None)
    if not isinstance(processor, fout.ClassifierOutputProcessor):
        what = type(processor).__name__ if processor is not None else "no output processor"
        raise ModelError(
            f"The FiftyOne {kind} is not a classifier (it has {what}, not a "
            "ClassifierOutputProcessor): CAMs explain class scores"
        )

    base = fout.TorchImageModel
    custom = [
        m for m in ("_predict_all", "_forward_pass", "predict_all")
        if getattr(type(model), m, None) is not getattr(base, m)
    ]
    if custom:
        raise ModelError(
            f"The FiftyOne {kind} computes its predictions in its own "
            f"{', '.join(custom)}, not by its network alone on the transformed "
            "image, so its class scores cannot be explained layer by layer"
        )
    if model.has_collate_fn or model.config.raw_inputs:
        raise ModelError(
            f"The FiftyOne {kind} feeds its network "
            f"{'batches from its own collate_fn' if model.has_collate_fn else 'raw images'}, "
            "not transformed image tensors; CAMs need a model whose transforms "
            "turn an image into a (channels, height, width) tensor"
        )
    if model.transforms is None:
        raise ModelError(
            f"The FiftyOne {kind} has no transforms: CAMs need its preprocessing "
            "from an image to a tensor"
        )
    if getattr(processor, "logits_key", "logits") != "logits":
        raise ModelError(
            f"The FiftyOne {kind} reads its logits from output key "
            f"'{processor.logits_key}'; CAMs read a tensor or the 'logits' entry"
        )

    module = model._model
    if any(p.dtype == torch.float16 for p in module.parameters()):
        raise ModelError(
            f"The FiftyOne {kind} runs in half precision (use_half_precision), "
            "whose gradients are too coarse for CAMs: load it without it and "
            "pass mixed_precision=True to compute_cams instead"
        )

    classes = list(model.classes) if model.classes is not None else None
    if name is None:
        entry = getattr(model.config, "entrypoint_fcn", None)
        entry = entry if isinstance(entry, str) else getattr(entry, "__name__", None)
        name = f"fiftyone:{kind}" + (f"({entry})" if entry else "")
    return Classifier(module, model.transforms, classes, name)


def zoo_name(spec):
    """The zoo model name of ``"zoo:<name>"`` and whether ``":none"``
    (random weights) was asked for."""
    return split_named_spec(
        spec, ZOO_PREFIX, "Name the zoo model: 'zoo:<name>', e.g. 'zoo:resnet50-imagenet-torch'"
    )


def load_zoo_classifier(spec):
    """The classifier of a FiftyOne zoo model, ``"zoo:<name>"``.

    The model loads with ``fiftyone.zoo.load_zoo_model``, which downloads
    its weights on first use as the zoo does. ``"zoo:<name>:none"`` builds
    a torchvision zoo model's network with random weights instead
    (nothing is downloaded): its layers are those of the real model.

    Raises:
        ModelError: for an unknown name, a failed download, or a model
            that is not a torch image classifier
    """
    name, random = zoo_name(spec)
    if random:
        return classifier_from_fiftyone(_random_zoo_model(name), f"{ZOO_PREFIX}{name} (random weights)")

    import fiftyone.zoo as foz

    _zoo_entry(name)
    try:
        model = foz.load_zoo_model(name)
    except Exception as e:  # noqa: BLE001
        # downloads, requirements and model code raise many types
        raise ModelError(
            f"Could not load the FiftyOne zoo model '{name}' ({type(e).__name__}: "
            f"{e}). The zoo downloads a model's weights on first use (into "
            "fo.config.model_zoo_dir), which needs network access; without it, "
            "download the model elsewhere (fiftyone zoo models download "
            f"{name}) and copy that directory"
        ) from e
    return classifier_from_fiftyone(model, f"{ZOO_PREFIX}{name}")


def zoo_probe_spec(spec):
    """The random-weights form of a zoo specification, for listing layers
    without downloading (see :func:`cam_plugin.models.layer_probe_spec`)."""
    name, _ = zoo_name(spec)
    _zoo_entry(name)
    return f"{ZOO_PREFIX}{name}:none"


def _zoo_entry(name):
    import fiftyone.zoo as foz

    try:
        return foz.get_zoo_model(name)
    except Exception:  # noqa: BLE001
        torch_classifiers = [
            m for m in foz.list_zoo_models(tags="classification") if m.endswith("-torch")
        ]
        raise ModelError(
            f"'{name}' is not a FiftyOne zoo model. Its torch classifiers include: "
            f"{', '.join(torch_classifiers[:10])}, ..."
        ) from None


def _random_zoo_model(name):
    # the zoo's torchvision models build their network from a torchvision
    # entrypoint whose weights argument the config names: with weights=None,
    # the same TorchImageModel with random weights, and no download
    fout = _torch_utils()
    entry = _zoo_entry(name)
    deployment = entry.default_deployment_config_dict or {}
    config = dict(deployment.get("config") or {})
    args = dict(config.get("entrypoint_args") or {})
    if not config.get("entrypoint_fcn") or "weights" not in args:
        raise ModelNotLocalError(
            f"The zoo model '{name}' cannot be built without its download "
            "(it is not a torchvision network with a weights argument); load it "
            f"as 'zoo:{name}'"
        )
    args["weights"] = None
    config["entrypoint_args"] = args
    try:
        return fout.TorchImageModel(fout.TorchImageModelConfig(config))
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"Could not build the zoo model '{name}' with random weights: {e}") from e
