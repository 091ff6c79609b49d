"""Turning what the user names as "the model" into a classifier with its
preprocessing and class names.

Accepted forms:

-   a ``torch.nn.Module`` (transforms default to ImageNet resize/crop/normalise)
-   a :class:`Classifier` (module, transforms and classes together)
-   a torchvision classifier name, optionally with a weights enum value:
    ``"resnet50"`` (its ``DEFAULT`` weights), ``"resnet50:IMAGENET1K_V1"``,
    ``"resnet50:none"`` (random initialisation); weights download on first
    use as torchvision does
-   a path to a TorchScript file
-   ``"<architecture>:<checkpoint path>"``: a torchvision architecture or
    ``cifar10_resnet20`` with a state-dict checkpoint (the number of classes
    is read from the checkpoint)
"""

import hashlib
import os
import zipfile
from dataclasses import dataclass, field

import torch
import torchvision
import torchvision.transforms as T

from .cifar_resnet import CIFAR10_CLASSES, IMAGENET_MEAN, IMAGENET_STD
from .cifar_resnet import load_resnet20_checkpoint


class ModelError(ValueError):
    """A model that cannot be loaded or used, with what to do about it."""


@dataclass
class Classifier:
    """A classifier with its preprocessing and class names.

    Attributes:
        module: the ``torch.nn.Module`` (or hookable TorchScript wrapper)
        transforms: a callable from a PIL image to a (3, H, W) float tensor
        classes: the class names indexed by model output, or None
        name: a short description of where the model came from
        fingerprint: a hash of the weights, so re-runs can tell models apart
    """

    module: torch.nn.Module
    transforms: callable = None
    classes: list = None
    name: str = ""
    fingerprint: str = field(default="", repr=False)


def imagenet_transforms(resize=256, crop=224):
    return T.Compose(
        [
            T.Resize(resize),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def cifar_transforms():
    return T.Compose(
        [
            T.Resize(32),
            T.CenterCrop(32),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def torchvision_classifier_names():
    """The torchvision image-classification model names."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_weight_names(name):
    """The weights enum values of a torchvision classifier, default first."""
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return []

    default = enum.DEFAULT.name if hasattr(enum, "DEFAULT") else None
    names = [w.name for w in enum]
    if default in names:
        names.remove(default)
        names.insert(0, default)

    return names


def load_classifier(model, transforms=None, classes=None):
    """Resolves a model specification into a :class:`Classifier`.

    Args:
        model: see the module docstring
        transforms (None): overrides the model's default preprocessing
        classes (None): overrides the model's class names

    Returns:
        a :class:`Classifier` in eval mode
    """
    if isinstance(model, Classifier):
        clf = Classifier(
            model.module, model.transforms, model.classes, model.name, model.fingerprint
        )
    elif isinstance(model, torch.nn.Module):
        clf = Classifier(model, None, None, type(model).__name__)
    elif isinstance(model, (str, os.PathLike)):
        clf = _load_from_string(os.fspath(model))
    else:
        raise ModelError(
            f"Unsupported model of type {type(model).__name__}: pass a "
            "torch.nn.Module, a torchvision model name or a TorchScript path"
        )

    if transforms is not None:
        clf.transforms = transforms
    if clf.transforms is None:
        clf.transforms = imagenet_transforms()
    if classes is not None:
        clf.classes = [str(c) for c in classes]
    if not clf.fingerprint:
        clf.fingerprint = weights_fingerprint(clf.module)

    clf.module.eval()
    return clf


def _load_from_string(spec):
    if os.path.isfile(spec):
        return _load_file(spec)

    arch, sep, arg = spec.partition(":")
    arch = arch.strip()
    arg = arg.strip()

    if sep and arg and (os.path.sep in arg or os.path.isfile(arg)):
        return _load_checkpoint(arch, arg)

    if arch == "cifar10_resnet20":
        raise ModelError(
            "cifar10_resnet20 needs its checkpoint: 'cifar10_resnet20:<path to .th>'"
        )

    return _load_torchvision(arch, arg or None)


def _load_torchvision(name, weights):
    names = torchvision_classifier_names()
    if name not in names:
        raise ModelError(
            f"'{name}' is neither a file nor a torchvision classifier. "
            f"Torchvision classifiers include: {', '.join(names[:12])}, ..."
        )

    if weights is not None and weights.lower() == "none":
        module = torchvision.models.get_model(name, weights=None)
        return Classifier(module, None, None, f"{name} (random weights)")

    enum = torchvision.models.get_model_weights(name)
    try:
        weight = enum.DEFAULT if weights is None else enum[weights]
    except KeyError:
        raise ModelError(
            f"Unknown weights '{weights}' for {name}; available: "
            f"{', '.join(torchvision_weight_names(name))}"
        ) from None

    try:
        module = torchvision.models.get_model(name, weights=weight)
    except Exception as e:
        raise ModelError(
            f"Could not load {name} weights {weight.name} ({e}). Torchvision "
            "downloads weights on first use; without network access, place "
            f"the file in {torch.hub.get_dir()}/checkpoints"
        ) from e

    return Classifier(
        module,
        weight.transforms(),
        list(weight.meta.get("categories") or []) or None,
        f"{name}:{weight.name}",
    )


def _load_checkpoint(arch, path):
    if not os.path.isfile(path):
        raise ModelError(f"Checkpoint not found: {path}")

    if arch == "cifar10_resnet20":
        module = load_resnet20_checkpoint(path)
        return Classifier(
            module, cifar_transforms(), list(CIFAR10_CLASSES), f"cifar10_resnet20:{path}"
        )

    if arch not in torchvision_classifier_names():
        raise ModelError(
            f"Unknown architecture '{arch}' for checkpoint {path}: use a "
            "torchvision classifier name or cifar10_resnet20"
        )

    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ModelError(f"{path} does not hold a state dict")

    state = {k.removeprefix("module."): v for k, v in state.items()}
    num_classes = _num_classes_of(state)
    module = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(f"{path} does not fit architecture {arch}: {e}") from None

    return Classifier(module, None, None, f"{arch}:{path}")


def _num_classes_of(state):
    last = None
    for key, value in state.items():
        if key.endswith("weight") and getattr(value, "ndim", 0) == 2:
            last = value
    if last is None:
        raise ModelError("Cannot find the classifier layer in the checkpoint")
    return int(last.shape[0])


def _load_file(path):
    if _is_torchscript(path):
        from .cams.torchscript import HookableScriptModule

        scripted = torch.jit.load(path, map_location="cpu")
        return Classifier(HookableScriptModule(scripted), None, None, f"torchscript:{path}")

    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, torch.nn.Module):
        return Classifier(obj, None, None, f"{type(obj).__name__}:{path}")

    raise ModelError(
        f"{path} holds a {type(obj).__name__}, not a model. For a state dict, "
        "name its architecture: '<architecture>:<path>'"
    )


def _is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False

    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def weights_fingerprint(module):
    """A short hash of a model's parameters and buffers."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        t = tensor.detach()
        digest.update(str(tuple(t.shape)).encode())
        if t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
            digest.update(t.cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())

    return digest.hexdigest()[:16]


def input_shape_of(transforms, size=(256, 256)):
    """The (C, H, W) shape the transforms give a blank image of ``size``."""
    from PIL import Image

    out = transforms(Image.new("RGB", size, (127, 127, 127)))
    if not isinstance(out, torch.Tensor) or out.ndim != 3:
        raise ModelError(
            "transforms must turn a PIL image into a (channels, height, width) "
            f"tensor; got {type(out).__name__} {getattr(out, 'shape', '')}"
        )

    return tuple(out.shape)
