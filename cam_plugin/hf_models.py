"""Hugging Face Transformers image classifiers as CAM classifiers: an
``AutoModelForImageClassification`` instance, alone or with its image
processor (``(model, processor)``, or ``transforms=processor``), or
``"hf:<repo id or directory>"``, which loads both with ``from_pretrained``.

-   **Classes** come from ``config.id2label`` (the ``LABEL_0``, ``LABEL_1``
    ... that Transformers fills in when a config names none are no names:
    such a model's predictions are labelled with output indices, as for
    any model without names).
-   **Logits** are the output object's ``.logits``.
-   **Target layer**: a ViT, DeiT or BEiT (and data2vec-vision, ViT-MSN)
    that classifies from its class token takes its maps from the last
    block's ``layernorm_before``: its patch tokens are what that block's
    attention reads into the class token, while after the attention they
    reach the class token no more (the generic probe would pick the last
    block's value projection). Distillation and other leading tokens are
    dropped by the layout. A BEiT with mean pooling, Swin (its final
    ``layernorm``, a token grid) and ConvNeXt (its last stage) are left to
    the generic probe, which picks those.
-   **Preprocessing**: the processor is translated into an equivalent
    torchvision ``Compose`` (resize, centre crop, rescale and normalise,
    as the processor computes them), so the maps are placed back in the
    full image frame exactly (:mod:`cam_plugin.frames`); the translation is
    checked against the processor on a test image when it is made. A
    processor that does more (padding, other resize rules, its own steps)
    is used as it is, and its window found by probing. Without a
    processor, the ImageNet resize/crop/normalisation at the config's
    ``image_size`` is used, as for a bare module: give the processor for
    the model's own preprocessing.

``transformers`` is imported only here, when such a model is used.
"""

import numpy as np
import torch
import torchvision.transforms.v2 as T2
from PIL import Image

from .cifar_resnet import IMAGENET_MEAN, IMAGENET_STD
from .models import HF_PREFIX, Classifier, ModelError, ModelNotLocalError, split_named_spec

#: model types that classify from the class token after the last block,
#: whose encoder blocks name their first norm ``layernorm_before``
CLASS_TOKEN_MODEL_TYPES = ("vit", "deit", "beit", "data2vec-vision", "vit_msn")

# the largest difference (in normalised units, per gray level and unit
# std) tolerated between a translated processor and the processor itself:
# float rounding and a gray level of resampling, not a pixel of shift
_GRAY_LEVELS = 2.0


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ModelError(
            "Hugging Face models need the transformers package: pip install transformers"
        ) from None
    return transformers


def classifier_from_hf(model, processor=None, name=None):
    """A :class:`cam_plugin.models.Classifier` of a Transformers image
    classifier.

    Args:
        model: a ``PreTrainedModel`` for image classification (what
            ``AutoModelForImageClassification`` loads)
        processor (None): its image processor (``AutoImageProcessor``);
            None: ImageNet preprocessing at the config's ``image_size``
        name (None): how the run records where the model came from

    Raises:
        ModelError: for a model that is not an image classifier
    """
    tr = _transformers()
    kind = type(model).__name__
    if not isinstance(model, tr.PreTrainedModel) or not _is_image_classifier(model):
        raise ModelError(
            f"A {kind} is not a Hugging Face image classifier: CAMs need what "
            "AutoModelForImageClassification loads (class scores as .logits)"
        )
    if processor is not None and not isinstance(processor, tr.ImageProcessingMixin):
        raise ModelError(
            f"The second item of (model, processor) is a {type(processor).__name__}, "
            "not a Hugging Face image processor (AutoImageProcessor)"
        )

    config = model.config
    transforms = (
        processor_transforms(processor) if processor is not None else config_transforms(config)
    )
    if name is None:
        source = getattr(config, "_name_or_path", "") or ""
        name = f"{HF_PREFIX}{source}" if source else f"huggingface:{kind}"
    return Classifier(
        model, transforms, hf_classes(config), name, target_layer=default_hf_layer(model)
    )


def _is_image_classifier(model):
    return any(
        c.__name__.endswith(("ForImageClassification", "ForImageClassificationWithTeacher"))
        for c in type(model).__mro__
    )


def hf_classes(config):
    """The class names of a Transformers config in output order, from
    ``id2label``; None where it has none (or only the ``LABEL_<i>``
    placeholders Transformers fills in)."""
    id2label = getattr(config, "id2label", None) or {}
    num_labels = getattr(config, "num_labels", len(id2label))
    # ids are ints, or strings in a config read from JSON by other tools
    names = [id2label.get(i, id2label.get(str(i))) for i in range(num_labels)]
    if not names or any(n is None for n in names):
        return None
    if all(str(n) == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return [str(n) for n in names]


def default_hf_layer(model):
    """The target layer of a class-token ViT, DeiT or BEiT: the last
    block's ``layernorm_before``; None for every other model, left to the
    generic probe (see the module docstring)."""
    config = model.config
    if getattr(config, "model_type", None) not in CLASS_TOKEN_MODEL_TYPES:
        return None
    if getattr(config, "use_mean_pooling", False):
        # a BEiT that averages its patch tokens: the last block's output
        # reaches the scores whole, which the probe finds
        return None
    norms = [n for n, _ in model.named_modules() if n.endswith("layernorm_before")]
    return norms[-1] if norms else None


def config_transforms(config):
    """The preprocessing of a model given without its processor: ImageNet
    resize (by 256/224), centre crop to the config's ``image_size`` and
    normalisation, as for a bare module."""
    size = getattr(config, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
    return T2.Compose(
        [
            T2.Resize(int(round(min(h, w) * 256 / 224))),
            T2.CenterCrop((h, w)),
            T2.PILToTensor(),
            T2.ToDtype(torch.float32, scale=True),
            T2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ProcessorCrop:
    """A centre crop as Transformers' processors compute it: offsets
    ``int((size - crop) / 2)`` (torchvision's ``CenterCrop`` rounds, a
    pixel apart when the difference is 3 mod 4), zero padding centred where
    the crop is larger than the image. :func:`cam_plugin.frames.input_window`
    reads its geometry from :meth:`crop_box`."""

    def __init__(self, height, width):
        self.height, self.width = int(height), int(width)

    def crop_box(self, width, height):
        """``(left, top, width, height)`` of the crop in an image of the
        given size (negative where it pads)."""
        return (
            _crop_offset(width, self.width),
            _crop_offset(height, self.height),
            self.width,
            self.height,
        )

    def __call__(self, image):
        if isinstance(image, Image.Image):
            left, top, w, h = self.crop_box(*image.size)
            # PIL fills what lies outside the image with zeros
            return image.crop((left, top, left + w, top + h))
        left, top, w, h = self.crop_box(image.shape[-1], image.shape[-2])
        # torchvision's crop pads with zeros outside the image
        return T2.functional.crop(image, top, left, h, w)

    def __repr__(self):
        return f"ProcessorCrop(height={self.height}, width={self.width})"


def _crop_offset(size, crop):
    if crop > size:
        return -((crop - size) // 2)
    return int((size - crop) / 2.0)


class ProcessorTransforms:
    """An image processor as a transform (PIL image -> (3, H, W) tensor),
    for a processor that has no torchvision equivalent: its window in the
    image is found by probing (:func:`cam_plugin.frames.probe_window`)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        out = self.processor(images=image, return_tensors="pt")["pixel_values"]
        return torch.as_tensor(out)[0].float()

    def __repr__(self):
        return f"ProcessorTransforms({type(self.processor).__name__})"


class _Untranslatable(Exception):
    pass


def processor_transforms(processor):
    """The preprocessing of a Transformers image processor as a transform
    from a PIL image to a (3, H, W) tensor.

    An equivalent torchvision ``Compose`` where the processor is a resize
    (to a height and width, or of the shortest edge), an optional centre
    crop (ConvNeXt's ``crop_pct`` included), rescaling and normalisation,
    computed as the processor computes them (on uint8 tensors for the
    torchvision-backed processors, with PIL for the others), so that
    :mod:`cam_plugin.frames` places maps exactly; it is checked against
    the processor on a test image. Otherwise a
    :class:`ProcessorTransforms` calling the processor itself.
    """
    try:
        compose = translate_processor(processor)
    except _Untranslatable:
        return ProcessorTransforms(processor)

    if processor_difference(compose, processor) > _tolerance(processor):
        return ProcessorTransforms(processor)
    return compose


def translate_processor(processor):
    """The torchvision ``Compose`` equivalent to an image processor.

    Raises:
        _Untranslatable: for a processor with steps it cannot express
    """
    get = lambda key, default=None: getattr(processor, key, default)  # noqa: E731
    if get("do_pad"):
        raise _Untranslatable("padding")

    on_tensors = _torchvision_backed(processor)
    interpolation = _interpolation(get("resample"))
    steps = [T2.PILToTensor()] if on_tensors else []

    if get("do_resize", True):
        shortest = _size_value(get("size"), "shortest_edge")
        height = _size_value(get("size"), "height")
        width = _size_value(get("size"), "width")
        other = [
            k for k in ("longest_edge", "max_height", "max_width")
            if _size_value(get("size"), k)
        ]
        if other:
            raise _Untranslatable(f"size with {other}")
        if get("crop_pct") is not None and type(processor).__name__.startswith("ConvNext"):
            if not shortest:
                raise _Untranslatable("ConvNeXt resize without shortest_edge")
            # ConvNeXt's rule: below 384, resize the short side to
            # shortest_edge / crop_pct and crop a square; from 384, warp
            if shortest < 384:
                steps += [
                    T2.Resize(int(shortest / get("crop_pct")), interpolation=interpolation),
                    ProcessorCrop(shortest, shortest),
                ]
            else:
                steps.append(T2.Resize((shortest, shortest), interpolation=interpolation))
        elif height and width:
            steps.append(T2.Resize((height, width), interpolation=interpolation))
        elif shortest:
            steps.append(T2.Resize(shortest, interpolation=interpolation))
        else:
            raise _Untranslatable(f"size {get('size')}")

    if get("do_center_crop"):
        height = _size_value(get("crop_size"), "height")
        width = _size_value(get("crop_size"), "width")
        if not (height and width):
            raise _Untranslatable(f"crop_size {get('crop_size')}")
        steps.append(ProcessorCrop(height, width))

    steps += [T2.PILToTensor()] if not on_tensors else []
    steps.append(T2.ToDtype(torch.float32, scale=True))
    # the processor: x * rescale_factor (when do_rescale), then (x - mean) /
    # std (when do_normalize); from x / 255 that is one Normalize
    scale = 255.0 * float(get("rescale_factor", 1 / 255)) if get("do_rescale", True) else 255.0
    if get("do_normalize", True):
        mean, std = _per_channel(get("image_mean")), _per_channel(get("image_std"))
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    steps.append(T2.Normalize([m / scale for m in mean], [s / scale for s in std]))
    return T2.Compose(steps)


def _torchvision_backed(processor):
    # Transformers 5's processors and 4's "Fast" ones resize uint8 tensors
    # with torchvision; the others (PIL backend, 4's slow ones) with PIL
    names = {c.__name__ for c in type(processor).__mro__}
    return bool(names & {"TorchvisionBackend", "BaseImageProcessorFast"})


def _interpolation(resample):
    modes = T2.InterpolationMode
    if resample is None:
        return modes.BILINEAR
    if isinstance(resample, modes):
        return resample
    # PIL's resampling codes, which processors store
    by_code = {0: modes.NEAREST, 1: modes.LANCZOS, 2: modes.BILINEAR, 3: modes.BICUBIC, 4: modes.BOX, 5: modes.HAMMING}
    try:
        return by_code[int(resample)]
    except (KeyError, TypeError, ValueError):
        raise _Untranslatable(f"resample {resample}") from None


def _size_value(size, key):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    if isinstance(size, int):
        return size if key == "shortest_edge" else None
    # Transformers 5's SizeDict
    return getattr(size, key, None)


def _per_channel(value):
    if value is None:
        raise _Untranslatable("normalisation without mean or std")
    if isinstance(value, (int, float)):
        return [float(value)] * 3
    return [float(v) for v in value]


def _tolerance(processor):
    std = getattr(processor, "image_std", None) if getattr(processor, "do_normalize", True) else None
    std = min(_per_channel(std)) if std is not None else 1.0
    return _GRAY_LEVELS / 255.0 / std


def test_image(width=83, height=61, seed=0):
    """A deterministic RGB image of odd, unequal sides whose fine texture
    shows a pixel of shift, for checking a transform against a
    processor."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    smooth = np.stack([xs * 255 / width, ys * 255 / height, (xs + ys) * 127 / (width + height)], -1)
    noise = rng.integers(0, 96, size=(height, width, 3))
    return Image.fromarray(np.clip(smooth * 0.6 + noise, 0, 255).astype(np.uint8), "RGB")


def processor_difference(transform, processor, image=None):
    """The largest absolute difference between the transform's tensor and
    the processor's ``pixel_values`` for an image (:func:`test_image` by
    default); infinite where their shapes differ."""
    image = test_image() if image is None else image
    ours = torch.as_tensor(transform(image)).float()
    theirs = ProcessorTransforms(processor)(image)
    if ours.shape != theirs.shape:
        return float("inf")
    return float((ours - theirs).abs().max())


def hf_spec(spec):
    """The repo id (or directory) of ``"hf:<repo id>"`` and whether
    ``":none"`` (random weights) was asked for."""
    return split_named_spec(
        spec, HF_PREFIX, "Name the Hugging Face model: 'hf:<repo id>', e.g. 'hf:google/vit-base-patch16-224'"
    )


def load_hf_classifier(spec):
    """The classifier of ``"hf:<repo id or directory>"``: model and image
    processor from ``from_pretrained`` (downloaded on first use into the
    Hugging Face cache). ``"hf:<repo id>:none"`` builds the model from its
    config with random weights, reading only files already cached
    (nothing is downloaded): its layers are the real model's.

    Raises:
        ModelError: for a model that cannot be loaded, saying why
    """
    tr = _transformers()
    repo, random = hf_spec(spec)
    if random:
        config = _cached_config(tr, repo)
        torch.manual_seed(0)
        model = tr.AutoModelForImageClassification.from_config(config)
        return classifier_from_hf(
            model, _processor(tr, repo, local_only=True), f"{HF_PREFIX}{repo} (random weights)"
        )

    try:
        model = tr.AutoModelForImageClassification.from_pretrained(repo)
    except Exception as e:  # noqa: BLE001
        # the hub, the cache and model code raise many types
        raise ModelError(
            f"Could not load the Hugging Face model '{repo}' ({type(e).__name__}: "
            f"{e}). from_pretrained downloads it on first use, which needs network "
            "access (and, for a private model, a token); without it, download it "
            "elsewhere (huggingface-cli download) and copy the cache, or give "
            "'hf:<local directory>'"
        ) from e
    return classifier_from_hf(model, _processor(tr, repo), f"{HF_PREFIX}{repo}")


def _processor(tr, repo, local_only=False):
    # a model without a processor config falls back to config_transforms
    try:
        return tr.AutoImageProcessor.from_pretrained(repo, local_files_only=local_only)
    except Exception:  # noqa: BLE001
        return None


def _cached_config(tr, repo):
    try:
        return tr.AutoConfig.from_pretrained(repo, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelNotLocalError(
            f"The layers of the Hugging Face model '{repo}' cannot be listed "
            "yet: its config is not in the local Hugging Face cache, and "
            "nothing is downloaded while a model is only being chosen. Load it "
            f"once (cam_plugin.load_classifier('hf:{repo}'), or a run with it), "
            f"or give a local directory ({type(e).__name__}: {e})"
        ) from None


def hf_probe_spec(spec):
    """The random-weights form of ``"hf:<repo id>"``, for listing layers
    without downloading (see :func:`cam_plugin.models.layer_probe_spec`);
    refused with a ModelError where the config is not cached."""
    tr = _transformers()
    repo, _ = hf_spec(spec)
    config = _cached_config(tr, repo)
    mapping = tr.models.auto.modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    if getattr(config, "model_type", None) not in mapping:
        raise ModelError(
            f"The Hugging Face model '{repo}' ({getattr(config, 'model_type', '?')}) "
            "is not an image classifier (AutoModelForImageClassification)"
        )
    return f"{HF_PREFIX}{repo}:none"
