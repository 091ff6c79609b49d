"""cam_plugin: where a classifier looks, for every sample of a FiftyOne dataset.

The public API. Each function is a thin, documented entry point over the
internal modules:

-   :func:`compute_cams`: predictions and class activation maps as
    ``fo.Classification`` and ``fo.Heatmap`` fields
-   :func:`list_runs`, :func:`get_run`, :func:`delete_run`: the runs
    registered on a dataset
-   :func:`load_classifier`, :func:`layer_candidates`: models and the layers
    a CAM can be taken from

The CAM math (:mod:`cam_plugin.cams`) is torch-only and usable on its own.
"""

from .cams import METHODS, CamError, CamExtractor
from .models import Classifier, ModelError, load_classifier
from .runs import RunError

__version__ = "0.1.0"


def compute_cams(
    samples,
    model,
    *,
    label_field=None,
    pred_field="cam_prediction",
    heatmap_field="cam",
    method="gradcam",
    target_layer=None,
    classes=None,
    transforms=None,
    targets=None,
    batch_size=None,
    num_workers=None,
    device=None,
    mixed_precision=False,
    heatmap_size=512,
    output_dir=None,
    run_key=None,
    overwrite=False,
    progress=None,
):
    """Computes predictions and class activation maps for every sample.

    Writes, per sample:

    -   ``pred_field``: an ``fo.Classification`` (label, confidence, logits)
    -   ``heatmap_field``: an ``fo.Heatmap`` for the predicted class, whose
        ``map_path`` is a 16-bit PNG in the full image frame holding the
        non-negative CAM values proportional to their raw values (the raw
        maximum is the label's ``raw_max``; ``range`` is ``[0, 65535]``)
    -   ``<heatmap_field>_gt``: the same for the ground-truth class, when
        ``label_field`` is given
    -   ``<heatmap_field>_error``: why a sample failed, for samples that did

    The run is registered on the dataset under ``run_key``. Calling again
    with the same arguments after an interruption resumes it, processing
    only the samples not yet done.

    Args:
        samples: a ``fo.Dataset`` or ``fo.DatasetView``
        model: a ``torch.nn.Module``, a :class:`Classifier`, a torchvision
            classifier name (``"resnet50"`` or ``"resnet50:IMAGENET1K_V2"``),
            a TorchScript file path, or ``"<architecture>:<checkpoint>"``
        label_field (None): an ``fo.Classification`` field of ground-truth
            labels; adds the ground-truth-class maps
        pred_field ("cam_prediction"): the predictions field
        heatmap_field ("cam"): the predicted-class heatmap field
        method ("gradcam"): one of :data:`METHODS` (``cam``, ``gradcam``,
            ``gradcam++``, ``xgradcam``, ``layercam``, ``hirescam``,
            ``scorecam``, ``eigencam``, ``ablationcam``, ``guided-gradcam``,
            ``gradcam-counterfactual``) or ``"pgc:<ClassName>"`` for a
            method of the optional grad-cam package
        target_layer (None): the layer name; None picks the last layer with
            a spatial output that the class scores depend on
        classes (None): class names in model-output order; by default the
            torchvision weights' categories
        transforms (None): a callable from a PIL image to a (3, H, W)
            tensor; by default the weights' own transforms, else ImageNet
            resize 256 / centre-crop 224 / normalise
        targets (None): which maps to compute: ``"pred"``, ``"gt"``,
            ``"top<k>"``, ``"class:<name>"``; default pred (+ gt with labels)
        batch_size (None): images per batch (64 on CUDA, 16 on CPU)
        num_workers (None): image-decoding worker processes
        device (None): ``"cuda"``, ``"cpu"``...; CUDA when available
        mixed_precision (False): run the forward pass in CUDA autocast
        heatmap_size (512): the longest side of the heatmap files; the full
            image frame is kept, only the resolution is capped
        output_dir (None): where heatmap files go (in ``<output_dir>/<run
            key>``); default under ``fo.config.default_dataset_dir``
        run_key (None): the run's key; defaults to ``heatmap_field``
        overwrite (False): replace a finished run with the same key, or a
            field the user already has
        progress (None): True/False for a progress bar, or a callback
            receiving the ``fiftyone.core.utils.ProgressBar``

    Returns:
        a :class:`cam_plugin.pipeline.CamRunSummary`
    """
    from .pipeline import CamRun

    return CamRun(
        samples,
        model,
        label_field=label_field,
        pred_field=pred_field,
        heatmap_field=heatmap_field,
        method=method,
        target_layer=target_layer,
        classes=classes,
        transforms=transforms,
        targets=targets,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        mixed_precision=mixed_precision,
        heatmap_size=heatmap_size,
        output_dir=output_dir,
        run_key=run_key,
        overwrite=overwrite,
        progress=progress,
    ).run()


def list_runs(samples, method=None):
    """The keys of this plugin's runs on a dataset.

    Args:
        samples: a dataset or view
        method (None): ``"cams"`` or ``"attention"`` to list one kind
    """
    from . import runs

    kinds = {"cams": runs.CAM_RUN, "attention": runs.ATTENTION_RUN, None: None}
    return runs.list_runs(samples, method=kinds.get(method, method))


def get_run(samples, run_key):
    """A run's configuration and state (status, counts) as a dict."""
    from . import runs

    return runs.get_run(samples, run_key)


def delete_run(samples, run_key):
    """Deletes a run, its fields, its heatmap files and the attention runs
    computed from it. Nothing else is touched."""
    from . import runs

    runs.delete_run(samples, run_key)


def layer_candidates(model, transforms=None):
    """The layers a CAM can be taken from, last first, and the default one.

    Returns:
        a tuple ``(names, default)``
    """
    from .cams import default_layer, probe_layers
    from .models import input_shape_of

    clf = load_classifier(model, transforms=transforms)
    candidates = probe_layers(clf.module, input_shape_of(clf.transforms))
    names = [c.name for c in reversed(candidates) if c.usable]
    return names, default_layer(candidates)
