"""timm models as CAM classifiers: a model instance (what
``timm.create_model`` returns) or ``"timm:<name>"``.

-   **Preprocessing**: the model's evaluation transforms, as timm resolves
    them (``timm.data.resolve_model_data_config`` and ``create_transform(...,
    is_training=False)``): a torchvision resize, centre crop and
    normalisation that :mod:`cam_plugin.frames` maps back exactly (timm's
    ``MaybeToTensor`` becomes torchvision's ``ToTensor``, the same for a PIL
    image; the ``border`` crop mode's steps are probed). A fixed-size
    model built for another input size than its pretrained config's
    (``img_size=...``) is fed that size.
-   **Classes**: the pretrained config's ``label_names`` (with their
    ``label_descriptions``) where it has them; otherwise, for the ImageNet
    class counts timm knows (1000: the ImageNet-1k names of
    :func:`cam_plugin.imagenet_classes`; 21k, 12k, 22k: timm's
    ``ImageNetInfo`` lemmas); otherwise None.
-   **Target layer**: a ViT that classifies from its class token
    (``global_pool="token"``: ViT, DeiT, distilled DeiT) takes its maps from
    the last block's ``norm1``, whose patch tokens that block's attention
    reads into the class token (the generic probe would pick the last
    block's ``qkv``). ResNet (``layer4``), EfficientNet (``bn2``), ConvNeXt
    (``stages``), Swin (``norm``, NHWC), RegNet (``s4``) and the rest are
    the generic probe's pick.

``timm`` is imported only here, when such a model is used.
"""

import torch
import torchvision.transforms as T

from .models import TIMM_PREFIX, Classifier, ModelError, ModelNotLocalError, imagenet_classes
from .models import split_named_spec


def _timm():
    try:
        import timm
        import timm.data  # noqa: F401
    except ImportError:
        raise ModelError("timm models need the timm package: pip install timm") from None
    return timm


def classifier_from_timm(model, name=None):
    """A :class:`cam_plugin.models.Classifier` of a timm model.

    Args:
        model: a timm model (``timm.create_model``)
        name (None): how the run records where the model came from
    """
    _timm()
    if name is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        arch = cfg.get("architecture") or type(model).__name__
        tag = cfg.get("tag")
        name = f"{TIMM_PREFIX}{arch}" + (f".{tag}" if tag else "")
    return Classifier(
        model, timm_transforms(model), timm_classes(model), name, target_layer=default_timm_layer(model)
    )


def timm_transforms(model):
    """The model's evaluation transforms, from its resolved data config."""
    timm = _timm()
    cfg = dict(timm.data.resolve_model_data_config(model))
    size = _fixed_input_size(model)
    if size is not None:
        cfg["input_size"] = (cfg.get("input_size", (3,))[0],) + size
    return _known_steps(timm.data.create_transform(**cfg, is_training=False))


def _fixed_input_size(model):
    # the data config is the pretrained one; a patch embedding that only
    # takes one size (a ViT built with img_size=...) says which
    embed = getattr(model, "patch_embed", None)
    img_size = getattr(embed, "img_size", None)
    if img_size is None or not getattr(embed, "strict_img_size", False):
        return None
    if getattr(embed, "dynamic_img_pad", False) or getattr(model, "dynamic_img_size", False):
        return None
    return tuple(int(s) for s in img_size)


def _known_steps(transform):
    # timm's MaybeToTensor is ToTensor for PIL images, under a name that
    # frames does not know (it would probe the window instead)
    if isinstance(transform, T.Compose):
        return T.Compose([_known_steps(t) for t in transform.transforms])
    if type(transform).__name__ == "MaybeToTensor":
        return T.ToTensor()
    return transform


def timm_classes(model):
    """The class names of a timm model in output order, or None."""
    timm = _timm()
    num_classes = getattr(model, "num_classes", None)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("label_names")
    if names and len(names) == num_classes:
        descriptions = cfg.get("label_descriptions") or {}
        return [_short(descriptions.get(n, n)) for n in names]

    subset = timm.data.infer_imagenet_subset(model)
    if subset is None:
        return None
    if subset == "imagenet-1k":
        return imagenet_classes()
    info = timm.data.ImageNetInfo(subset)
    if info.num_classes() != num_classes:
        return None
    return [_short(d) for d in info.label_descriptions()]


def _short(description):
    # WordNet lemmas: "tench, Tinca tinca" -> "tench"
    return str(description).split(",")[0].strip()


def default_timm_layer(model):
    """The last block's ``norm1`` of a class-token ViT; None for every
    other model, left to the generic probe."""
    blocks = getattr(model, "blocks", None)
    if getattr(model, "global_pool", None) != "token" or not isinstance(blocks, torch.nn.Sequential):
        return None
    if not len(blocks) or not hasattr(blocks[-1], "norm1"):
        return None
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    return f"{prefix}.{len(blocks) - 1}.norm1"


def timm_spec(spec):
    """The model name of ``"timm:<name>"`` and whether ``":none"`` (random
    weights) was asked for."""
    return split_named_spec(
        spec, TIMM_PREFIX, "Name the timm model: 'timm:<name>', e.g. 'timm:resnet50.a1_in1k'"
    )


def _check_name(timm, name):
    if name.startswith("hf-hub:") or timm.is_model(name):
        return
    # the names that share the longest start with this one
    parts = name.split(".")[0].split("_")
    close = []
    while parts and not close:
        close = timm.list_models(f"{'_'.join(parts)}*")[:10]
        parts.pop()
    close = close or timm.list_models()[:10]
    raise ModelError(
        f"'{name}' is not a timm model. timm models include: {', '.join(close)}, ..."
    )


def load_timm_classifier(spec):
    """The classifier of ``"timm:<name>"``: ``timm.create_model(name,
    pretrained=True)``, whose weights timm downloads on first use.
    ``"timm:<name>:none"`` builds it with random weights (nothing is
    downloaded): its layers, transforms and class names are the real
    model's.

    Raises:
        ModelError: for an unknown name or a failed download
    """
    timm = _timm()
    name, random = timm_spec(spec)
    _check_name(timm, name)
    if random:
        if name.startswith("hf-hub:"):
            raise ModelNotLocalError(_HUB_PROBE.format(name=name))
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        return classifier_from_timm(model.eval(), f"{TIMM_PREFIX}{name} (random weights)")

    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # noqa: BLE001
        # the hub, the cache and model code raise many types
        raise ModelError(
            f"Could not load the timm model '{name}' with its pretrained weights "
            f"({type(e).__name__}: {e}). timm downloads them on first use (from "
            "the Hugging Face Hub), which needs network access; without it, copy "
            f"a Hugging Face cache holding them, or use 'timm:{name}:none' for "
            "random weights"
        ) from e
    return classifier_from_timm(model.eval(), f"{TIMM_PREFIX}{name}")


_HUB_PROBE = (
    "'{name}' is defined by its config on the Hugging Face Hub, which is not "
    "downloaded while a model is only being chosen: name its timm "
    "architecture instead ('timm:<architecture>.<tag>') to list its layers"
)


def timm_probe_spec(spec):
    """The random-weights form of ``"timm:<name>"``, for listing layers
    without downloading (see :func:`cam_plugin.models.layer_probe_spec`)."""
    timm = _timm()
    name, _ = timm_spec(spec)
    _check_name(timm, name)
    if name.startswith("hf-hub:"):
        raise ModelNotLocalError(_HUB_PROBE.format(name=name))
    return f"{TIMM_PREFIX}{name}:none"
