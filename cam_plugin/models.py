"""Turning what the user names as "the model" into a classifier with its
preprocessing and class names.

Accepted forms:

-   a ``torch.nn.Module`` (transforms default to ImageNet resize/crop/normalise)
-   a :class:`Classifier` (module, transforms and classes together)
-   a torchvision classifier name, optionally with a weights enum value:
    ``"resnet50"`` (its ``DEFAULT`` weights), ``"resnet50:IMAGENET1K_V1"``,
    ``"resnet50:none"`` (random initialisation); weights download on first
    use as torchvision does
-   a path to a TorchScript file (or a loaded TorchScript module)
-   a path to a ``torch.export`` archive (``.pt2``, from
    ``torch.export.save``; or a loaded ``ExportedProgram``), exported with
    a dynamic batch dimension; its submodules keep their names
    (:mod:`cam_plugin.cams.exported`)
-   a FiftyOne model, ``fiftyone.utils.torch.TorchImageModel`` (the zoo's
    torch classifiers), with its own preprocessing and classes, or a zoo
    name ``"zoo:<name>"`` (``"zoo:resnet50-imagenet-torch"``; downloaded
    as the zoo does; ``"zoo:<name>:none"``: random weights, nothing
    downloaded), see :mod:`cam_plugin.fiftyone_models`
-   a Hugging Face Transformers image classifier
    (``AutoModelForImageClassification``), alone or with its image
    processor as ``(model, processor)`` (or ``transforms=processor``), or
    ``"hf:<repo id or directory>"``, which loads both with
    ``from_pretrained`` (downloaded on first use; ``"hf:<repo id>:none"``:
    random weights from its cached config), see :mod:`cam_plugin.hf_models`
-   a timm model, or ``"timm:<name>"`` (``timm.create_model(name,
    pretrained=True)``, downloaded on first use; ``"timm:<name>:none"``:
    random weights, nothing downloaded), see :mod:`cam_plugin.timm_models`
-   ``"<architecture>:<checkpoint path>"``: a torchvision architecture or
    ``cifar10_resnet20`` with a state-dict checkpoint (the number of classes
    is read from the checkpoint); ``"cifar10_resnet20:none"`` is that
    architecture with random weights

Files are never fully unpickled unless the Python caller says it trusts
them (``trust_checkpoint=True``): checkpoints are read with
``torch.load(weights_only=True)``, which restores tensors and plain
containers only, because unpickling anything else can run code from the
file. A pickled ``nn.Module`` (``torch.save(model)``) therefore needs the
trust flag; TorchScript files run no Python and load either way. A
``.pt2`` archive is read as data first and loaded only if it holds nothing
but raw tensors and standard operators (``torch.export.load`` itself can
unpickle and run code from a crafted file; see
:func:`cam_plugin.cams.exported.check_archive`); the trust flag skips
that check.
"""

import hashlib
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field

import torch
import torchvision
import torchvision.transforms as T

from .cifar_resnet import CIFAR10_CLASSES, IMAGENET_MEAN, IMAGENET_STD
from .cifar_resnet import resnet20, resnet20_from_checkpoint

#: the architectures besides torchvision's that a checkpoint can name
CHECKPOINT_ARCHITECTURES = ("cifar10_resnet20",)


class ModelError(ValueError):
    """A model that cannot be loaded or used, with what to do about it."""


class ModelNotLocalError(ModelError):
    """A model whose layers cannot be listed without a download (a Hugging
    Face config not in the local cache, a zoo or timm model defined only by
    files on a hub). Forms, which never download while the user is still
    choosing, use the automatic layer for it instead of refusing it."""


class ClassNamesWarning(UserWarning):
    """A run whose model has no class names: its predictions are labelled
    with output indices (``"0"``, ``"1"``, ...). Issued with
    ``warnings.warn``, so it shows once in a notebook or script; silence it
    with ``warnings.simplefilter("ignore", cam_plugin.ClassNamesWarning)``."""


#: the prefix of a FiftyOne model zoo name: ``"zoo:resnet50-imagenet-torch"``
ZOO_PREFIX = "zoo:"

#: the prefix of a Hugging Face Hub id: ``"hf:google/vit-base-patch16-224"``
HF_PREFIX = "hf:"

#: the prefix of a timm model name: ``"timm:resnet50.a1_in1k"``
TIMM_PREFIX = "timm:"

#: the ``classes`` keyword naming the ImageNet-1k classes
IMAGENET = "imagenet"


def imagenet_classes():
    """The 1000 ImageNet-1k class names in the output order of torchvision's
    ImageNet classifiers (from torchvision's weights metadata; nothing is
    downloaded). A new list on every call."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def read_class_names(path):
    """The class names of a text file, one per line in model-output order:
    surrounding whitespace is stripped and blank lines are skipped (UTF-8,
    a byte-order mark is ignored).

    Raises:
        ModelError: for a file that is missing, unreadable or holds no name
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "not found"
        raise ModelError(
            f"Class names file {path}: {what} (give a text file with one class "
            "name per line, in model-output order)"
        )
    try:
        with open(path, encoding="utf-8-sig") as f:
            names = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"Cannot read class names file {path}: {e}") from None

    names = [n for n in names if n]
    if not names:
        raise ModelError(
            f"Class names file {path} holds no class names (expected one per line)"
        )
    return names


def class_names(classes):
    """Resolves a ``classes`` argument into a list of names (or None).

    Args:
        classes: None; the string ``"imagenet"`` (the keyword, whatever its
            case and surrounding spaces, even where a file of that name
            exists: give such a file as ``"./imagenet"`` or a ``Path``) for
            :func:`imagenet_classes`; any other string or ``os.PathLike``: a
            text file read by :func:`read_class_names`; or a sequence of
            names in model-output order

    Raises:
        ModelError: for an unreadable file, or a value of another type
    """
    if classes is None:
        return None
    if isinstance(classes, str) and classes.strip().lower() == IMAGENET:
        return imagenet_classes()
    if isinstance(classes, (str, os.PathLike)):
        return read_class_names(classes)
    if isinstance(classes, (bytes, dict)) or not hasattr(classes, "__iter__"):
        raise ModelError(
            f"classes must be a list of names, 'imagenet' or the path of a text "
            f"file with one name per line, not a {type(classes).__name__}"
        )
    return [str(c) for c in classes]


def classes_source(classes):
    """Where names given as ``classes`` come from, for messages: the
    keyword or the file (None for a list)."""
    if isinstance(classes, str) and classes.strip().lower() == IMAGENET:
        return "classes='imagenet' (the ImageNet-1k classes)"
    if isinstance(classes, (str, os.PathLike)):
        return f"the class names file {os.fspath(classes)}"
    return None


@dataclass
class Classifier:
    """A classifier with its preprocessing and class names.

    Attributes:
        module: the ``torch.nn.Module`` (or hookable TorchScript wrapper)
        transforms: a callable from a PIL image to a (3, H, W) float tensor
        classes: the class names indexed by model output, or None
        name: a short description of where the model came from
        fingerprint: a hash of the weights, so re-runs can tell models apart
        target_layer: the layer a run takes its maps from when it names
            none, where the model's family knows better than the probe's
            pick (the last block's ``norm1`` of a class-token ViT); None:
            the probe's pick (:func:`cam_plugin.cams.default_layer`)
    """

    module: torch.nn.Module
    transforms: callable = None
    classes: list = None
    name: str = ""
    fingerprint: str = field(default="", repr=False)
    target_layer: str = None


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


def load_classifier(model, transforms=None, classes=None, trust_checkpoint=False):
    """Resolves a model specification into a :class:`Classifier`.

    Args:
        model: see the module docstring
        transforms (None): overrides the model's default preprocessing
        classes (None): overrides the model's class names: a list in
            model-output order, ``"imagenet"`` for the ImageNet-1k names or
            the path of a text file with one name per line (see
            :func:`class_names`)
        trust_checkpoint (False): whether a file given by path may be fully
            unpickled. Without it only tensors and plain containers are
            read, and a file that needs more (a pickled ``nn.Module``) is
            refused, because unpickling it would run code from the file.
            Pass True only for a file you trust

    Returns:
        a :class:`Classifier` in eval mode
    """
    if isinstance(model, Classifier):
        clf = Classifier(
            model.module,
            model.transforms,
            model.classes,
            model.name,
            model.fingerprint,
            model.target_layer,
        )
    elif _is_hf_model(model) or _is_hf_pair(model):
        from .hf_models import classifier_from_hf

        clf = classifier_from_hf(*model) if isinstance(model, tuple) else classifier_from_hf(model)
    elif _is_timm_model(model):
        from .timm_models import classifier_from_timm

        clf = classifier_from_timm(model)
    elif _is_fiftyone_model(model):
        from .fiftyone_models import classifier_from_fiftyone

        clf = classifier_from_fiftyone(model)
    elif isinstance(model, torch.export.ExportedProgram):
        clf = _exported_classifier(model, "exported program")
    elif isinstance(model, torch.jit.ScriptModule):
        from .cams.torchscript import HookableScriptModule

        # TorchScript modules take no forward hooks; the wrapper gives them
        clf = Classifier(HookableScriptModule(model), None, None, f"torchscript:{model.original_name}")
    elif isinstance(model, torch.nn.Module):
        clf = Classifier(model, None, None, type(model).__name__)
    elif isinstance(model, (str, os.PathLike)):
        clf = _load_from_string(os.fspath(model), trust_checkpoint)
    else:
        raise ModelError(
            f"Unsupported model of type {type(model).__name__}: pass a "
            "torch.nn.Module, a torchvision model name, a TorchScript or .pt2 "
            "path, a FiftyOne TorchImageModel or 'zoo:<name>', a Hugging Face "
            "image classifier (or '(model, processor)', or 'hf:<repo id>'), a "
            "timm model or 'timm:<name>'"
        )

    if transforms is not None and _is_hf_processor(transforms):
        from .hf_models import processor_transforms

        transforms = processor_transforms(transforms)
    if transforms is not None:
        clf.transforms = transforms
    if clf.transforms is None:
        clf.transforms = imagenet_transforms()
    if classes is not None:
        clf.classes = classes
    # a Classifier may carry "imagenet" or a file path as its classes too
    clf.classes = class_names(clf.classes)
    if not clf.fingerprint:
        clf.fingerprint = weights_fingerprint(clf.module)

    clf.module.eval()
    return clf


def layer_probe_spec(spec):
    """A specification with the same layers as ``spec`` whose loading reads
    no pickle, for listing layers where no code from a file may run (the
    App's forms, which are resolved before the user has run anything).

    A torchvision name or an ``"<architecture>:<checkpoint>"`` becomes the
    architecture with random weights, ``"<architecture>:none"``, and the
    checkpoint is never opened; a TorchScript file is its own probe, since
    TorchScript runs no Python, and so is a ``.pt2`` archive, which is
    loaded only once it is checked to hold no code (see
    :mod:`cam_plugin.cams.exported`); a zoo name ``"zoo:<name>"`` becomes
    ``"zoo:<name>:none"``, its network with random weights (nothing is
    downloaded); so does ``"timm:<name>"``; ``"hf:<repo id>"`` becomes
    ``"hf:<repo id>:none"``, built from its config if that is cached (or
    the id is a local directory): nothing is downloaded, and an id never
    loaded before is refused with a ModelError saying so.

    Returns:
        a tuple ``(probe spec, the file it loads or None)``

    Raises:
        ModelError: for a missing checkpoint, an unknown architecture, or a
            file that is neither TorchScript nor named with its architecture
    """
    if os.path.isfile(spec):
        if is_torchscript_file(spec) or is_exported_program_file(spec):
            return spec, spec

        raise ModelError(
            f"{spec} is not a TorchScript file (nor a torch.export .pt2 "
            "archive): for a state-dict checkpoint, "
            f"name its architecture ('<architecture>:{spec}'); a pickled model "
            "is not opened to list its layers, because loading it would run "
            "code from the file, so export it as TorchScript"
        )

    if spec.startswith(ZOO_PREFIX):
        from .fiftyone_models import zoo_probe_spec

        return zoo_probe_spec(spec), None

    if spec.startswith(HF_PREFIX):
        from .hf_models import hf_probe_spec

        return hf_probe_spec(spec), None

    if spec.startswith(TIMM_PREFIX):
        from .timm_models import timm_probe_spec

        return timm_probe_spec(spec), None

    arch, arg, path = _split_spec(spec)
    if path is None:
        if arch == "cifar10_resnet20" and not _is_none(arg):
            raise ModelError(_NEEDS_CHECKPOINT)
        return f"{arch}:none", None

    if not os.path.isfile(path):
        raise ModelError(f"Checkpoint not found: {path}")

    _check_checkpoint_architecture(arch, path)
    return f"{arch}:none", None


_NEEDS_CHECKPOINT = (
    "cifar10_resnet20 needs its checkpoint: 'cifar10_resnet20:<path to .th>' "
    "(or 'cifar10_resnet20:none' for random weights)"
)


def _split_spec(spec):
    # "<arch>[:<weights name, none or checkpoint path>]" -> (arch, arg, path)
    arch, sep, arg = spec.partition(":")
    arch, arg = arch.strip(), arg.strip()
    # "none" is the keyword even where a file of that name exists
    is_path = sep and arg and not _is_none(arg) and (os.path.sep in arg or os.path.isfile(arg))
    return arch, arg, arg if is_path else None


def _is_none(arg):
    return arg.lower() == "none"


def split_named_spec(spec, prefix, example):
    """The name of a ``"<prefix><name>[:none]"`` specification (a zoo,
    Hugging Face or timm model) and whether ``":none"`` (random weights)
    was asked for.

    Raises:
        ModelError: for an empty name, showing ``example``
    """
    name = spec[len(prefix) :].strip()
    random = False
    if name.lower().endswith(":none"):
        name, random = name[: -len(":none")].strip(), True
    if not name:
        raise ModelError(example)
    return name, random


def _load_from_string(spec, trust_checkpoint):
    if os.path.isfile(spec):
        return _load_file(spec, trust_checkpoint)

    if spec.startswith(ZOO_PREFIX):
        from .fiftyone_models import load_zoo_classifier

        return load_zoo_classifier(spec)

    if spec.startswith(HF_PREFIX):
        from .hf_models import load_hf_classifier

        return load_hf_classifier(spec)

    if spec.startswith(TIMM_PREFIX):
        from .timm_models import load_timm_classifier

        return load_timm_classifier(spec)

    arch, arg, path = _split_spec(spec)
    if path is not None:
        return _load_checkpoint(arch, path, trust_checkpoint)

    if arch == "cifar10_resnet20":
        if not _is_none(arg):
            raise ModelError(_NEEDS_CHECKPOINT)
        return Classifier(
            resnet20().eval(), cifar_transforms(), list(CIFAR10_CLASSES), "cifar10_resnet20 (random weights)"
        )

    return _load_torchvision(arch, arg or None)


def torchvision_categories(spec):
    """The class names ``"<torchvision name>[:<weights>]"`` would bring,
    from the weights' metadata (nothing is downloaded); None for random
    weights, a checkpoint path, or a model torchvision does not have."""
    arch, arg, path = _split_spec(spec)
    if path is not None or arch == "cifar10_resnet20":
        return list(CIFAR10_CLASSES) if arch == "cifar10_resnet20" else None
    if arch not in torchvision_classifier_names() or _is_none(arg):
        return None
    enum = torchvision.models.get_model_weights(arch)
    try:
        weight = enum.DEFAULT if not arg else enum[arg]
    except KeyError:
        return None
    return list(weight.meta.get("categories") or []) or None


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


def _check_checkpoint_architecture(arch, path):
    if arch not in CHECKPOINT_ARCHITECTURES and arch not in torchvision_classifier_names():
        raise ModelError(
            f"Unknown architecture '{arch}' for checkpoint {path}: use a "
            "torchvision classifier name or cifar10_resnet20"
        )


def _load_checkpoint(arch, path, trust_checkpoint):
    if not os.path.isfile(path):
        raise ModelError(f"Checkpoint not found: {path}")

    _check_checkpoint_architecture(arch, path)
    state = _state_dict_of(read_checkpoint(path, trust_checkpoint), path)

    if arch == "cifar10_resnet20":
        try:
            module = resnet20_from_checkpoint(state)
        except (KeyError, RuntimeError) as e:
            raise ModelError(f"{path} does not fit architecture {arch}: {e}") from None

        return Classifier(
            module, cifar_transforms(), list(CIFAR10_CLASSES), f"cifar10_resnet20:{path}"
        )

    num_classes = _num_classes_of(state)
    module = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(f"{path} does not fit architecture {arch}: {e}") from None

    return Classifier(module, None, None, f"{arch}:{path}")


def _state_dict_of(checkpoint, path):
    # a bare state dict, a training checkpoint {"state_dict": ...} or, from
    # a trusted file, a whole pickled model of the named architecture
    if isinstance(checkpoint, torch.nn.Module):
        checkpoint = checkpoint.state_dict()
    if isinstance(checkpoint, dict):
        checkpoint = checkpoint.get("state_dict", checkpoint)
    if not isinstance(checkpoint, dict):
        raise ModelError(f"{path} does not hold a state dict")

    return {str(k).removeprefix("module."): v for k, v in checkpoint.items()}


def _num_classes_of(state):
    last = None
    for key, value in state.items():
        if key.endswith("weight") and getattr(value, "ndim", 0) == 2:
            last = value
    if last is None:
        raise ModelError("Cannot find the classifier layer in the checkpoint")
    return int(last.shape[0])


def _load_file(path, trust_checkpoint):
    if is_torchscript_file(path):
        from .cams.torchscript import HookableScriptModule

        try:
            scripted = torch.jit.load(path, map_location="cpu")
        except RuntimeError as e:
            raise ModelError(f"Cannot load {path} as TorchScript: {e}") from None

        return Classifier(HookableScriptModule(scripted), None, None, f"torchscript:{path}")

    if is_exported_program_file(path):
        from .cams.exported import ExportedProgramError, load_exported

        try:
            module = load_exported(path, trust=trust_checkpoint)
        except ExportedProgramError as e:
            raise ModelError(str(e)) from None
        return _exported_classifier(module, path)

    obj = read_checkpoint(path, trust_checkpoint)
    if isinstance(obj, torch.nn.Module):
        return Classifier(obj, None, None, f"{type(obj).__name__}:{path}")

    raise ModelError(
        f"{path} holds a {type(obj).__name__}, not a model. For a state dict, "
        "name its architecture: '<architecture>:<path>'"
    )


def read_checkpoint(path, trust_checkpoint=False):
    """``torch.load`` of a user's file, on the CPU.

    Untrusted files are read with ``weights_only=True``: tensors, numbers,
    strings and plain containers only. Everything else in a pickle (a
    pickled ``nn.Module``, any other class) is rebuilt by calling code that
    the file names, which a crafted file can point anywhere, so such a file
    is refused unless ``trust_checkpoint`` is True.

    Raises:
        ModelError: for a refused or unreadable file, saying what to do
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler refuses with UnpicklingError
        if not trust_checkpoint:
            raise ModelError(_refusal(path, e)) from None
        raise ModelError(f"Cannot read {path} as a PyTorch checkpoint: {e}") from e
    except Exception as e:  # noqa: BLE001
        # torch.load raises many types for a file that is no checkpoint
        # (KeyError, RuntimeError, EOFError...); from a trusted file, also
        # whatever its unpickling raises (a class that no longer imports)
        raise ModelError(
            f"Cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from e


def _refusal(path, error):
    # torch names the first class or function it refused; users recognise it
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    needs = f" (it needs {found.group(1)})" if found else ""
    return (
        f"{path} is not loaded because it is a full Python pickle{needs} and "
        "loading it would run code from the file: export the model as "
        "TorchScript (torch.jit.script or trace, then torch.jit.save), or "
        "save its state_dict() and give it as '<architecture>:<path>', or, "
        "if you trust the file, pass trust_checkpoint=True from Python"
    )


def _exported_classifier(program_or_module, source):
    from .cams.exported import ExportedProgramError, default_transforms, hookable_exported

    module = program_or_module
    if isinstance(module, torch.export.ExportedProgram):
        try:
            module = hookable_exported(module, source=source)
        except ExportedProgramError as e:
            raise ModelError(str(e)) from None
    return Classifier(module, default_transforms(module), None, f"exported:{source}")


def _is_hf_model(model):
    # without importing transformers: a model of it was built by it
    import sys

    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _is_hf_pair(model):
    return isinstance(model, tuple) and len(model) == 2 and _is_hf_model(model[0])


def _is_hf_processor(obj):
    import sys

    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(obj, transformers.ImageProcessingMixin)


def _is_timm_model(model):
    # timm's models are plain modules: one whose class timm defines, with
    # the pretrained config timm's builder gives every model
    import sys

    return (
        "timm" in sys.modules
        and isinstance(model, torch.nn.Module)
        and isinstance(getattr(model, "pretrained_cfg", None), dict)
        and any(c.__module__.startswith("timm.") for c in type(model).__mro__)
    )


def _is_fiftyone_model(model):
    # without importing FiftyOne: a FiftyOne model's class comes from it
    import sys

    core = sys.modules.get("fiftyone.core.models")
    return core is not None and isinstance(model, core.Model)


def is_exported_program_file(path):
    """Whether ``path`` is a ``torch.export`` archive (``.pt2``), from its zip
    listing and format marker alone (nothing in it is loaded)."""
    from .cams.exported import is_exported_program_file as looks_exported

    return looks_exported(path)


def is_torchscript_file(path):
    """Whether ``path`` is a TorchScript archive, from its zip listing alone
    (nothing in it is loaded)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError):
        # unreadable, or an entry name flagged UTF-8 that is not: not
        # something torch.jit.load would open either
        return False


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
