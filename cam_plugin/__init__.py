"""cam_plugin: where a classifier looks, for every sample of a FiftyOne dataset.

The public API. Each function is a thin, documented entry point over the
internal modules:

-   :func:`compute_cams`: predictions and class activation maps as
    ``fo.Classification`` and ``fo.Heatmap`` fields
-   :func:`compute_attention`: how much of each map falls on the labelled
    object, as scalar fields; :func:`compute_label_attention`, each class's
    maps of a multi-label run against that class's objects
-   :func:`compute_reliance`: whether each prediction depends on the
    background, by painting the object or the background over;
    :func:`reliance_summary`, per class
-   :func:`compute_context`: the share of each map on each context class
    (grass, sky, other objects), as ``fo.Classifications``;
    :func:`context_summary` and :func:`context_view`, per class
-   :func:`attention_views`, :func:`class_summary`: the samples where the
    model looked at the wrong place, and the classes that do it most;
    :func:`label_summary`, every class of a multi-label run
-   :func:`list_runs`, :func:`get_run`, :func:`delete_run`: the runs
    registered on a dataset; :func:`set_heatmap_scale`: heatmaps coloured
    per map or on one dataset-wide scale
-   :func:`load_classifier`, :func:`layer_candidates`: models and the layers
    a CAM can be taken from; :func:`imagenet_classes`,
    :func:`read_class_names`: class names for a model without them;
    :class:`ClassMap`: ground truth in another vocabulary than the model's
-   what the App's forms offer and check before anything runs:
    :func:`model_layers` (layers without loading a checkpoint),
    :func:`torchvision_classifiers`, :func:`torchvision_weights`,
    :func:`is_torchscript_file`, :func:`is_exported_program_file`,
    :func:`check_fields`, :func:`reliance_fields`, :data:`REGION_TYPES`, :func:`metric_field`,
    :func:`attention_fields`, :data:`VIEW_DESCRIPTIONS`,
    :func:`saved_view_name`, :func:`class_view` and :class:`Thresholds`

The CAM math (:mod:`cam_plugin.cams`) is torch-only and usable on its own.
"""

import functools
import os

from .cams import METHODS, CamError, CamExtractor
from .class_map import LABEL_RULES, ClassMap, ClassMapError
from .models import (
    ClassNamesWarning,
    Classifier,
    ModelError,
    ModelNotLocalError,
    imagenet_classes,
    load_classifier,
    read_class_names,
)

__version__ = "0.1.0"

# the set-up's MongoDB 6.0 would otherwise be announced on every connection
from . import notices as _notices  # noqa: E402

_notices.install()


def __getattr__(name):
    # FiftyOne-facing names load on first use, so the CAM math
    # (cam_plugin.cams, models, frames, batches) imports without FiftyOne
    if name == "RunError":
        from .runs import RunError

        return RunError
    if name in ("RunSummary", "CamRunSummary"):
        from .runs.base import RunSummary

        return RunSummary
    if name == "Thresholds":
        from .views import Thresholds

        return Thresholds
    if name in ("AttentionField", "ViewsError"):
        from . import views

        return getattr(views, name)
    if name == "VIEW_DESCRIPTIONS":
        # the attention views' names and what each shows
        from .views import VIEW_DESCRIPTIONS

        return VIEW_DESCRIPTIONS
    if name == "REGION_TYPES":
        # the label types compute_attention takes as object regions
        from .runs.attention import REGION_TYPES

        return REGION_TYPES
    if name in ("views", "runs", "heatmaps"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cam_plugin' has no attribute '{name}'")


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
    chunk_size=None,
    heatmap_size=256,
    heatmap_scale=None,
    output_dir=None,
    run_key=None,
    overwrite=False,
    retry_failed=False,
    num_shards=1,
    shard=None,
    delegate=False,
    trust_checkpoint=False,
    store_logits=False,
    class_map=None,
    label_rule=None,
    multilabel=False,
    threshold=0.5,
    progress=None,
):
    """Computes predictions and class activation maps for every sample.

    Writes, per sample, in one update of its document after its files:

    -   ``pred_field``: an ``fo.Classification`` (label, confidence, and
        the logits with ``store_logits=True``)
    -   ``heatmap_field``: an ``fo.Heatmap`` for the predicted class, whose
        ``map_path`` is a 16-bit PNG in the full image frame holding the
        non-negative CAM values proportional to their raw values (the raw
        maximum is the label's ``raw_max``; ``range`` says how the App
        draws it, see ``heatmap_scale``)
    -   ``<heatmap_field>_gt``: the same for the ground-truth class, when
        ``label_field`` is given
    -   ``<heatmap_field>_error``: why a sample failed, for samples that did
    -   with a ``class_map`` or a ``label_field`` of objects:
        ``<heatmap_field>_gt_class``, the image's class the sample is judged
        by (an ``fo.Classification`` of a dataset class), and
        ``<heatmap_field>_correct``, whether the prediction is one of that
        class's model classes; both are empty for a sample whose labels map
        to nothing (see ``class_map``)

    The run is registered on the dataset under ``run_key``. Calling again
    with the same arguments continues it: after an interruption (even
    ``kill -9``) only the samples not yet done are computed, and a finished
    run picks up samples added since. A run only ever writes and deletes
    fields it created and files in its own directory.

    Args:
        samples: a ``fo.Dataset`` or ``fo.DatasetView`` of images (patches,
            frames and clips views are refused; of a grouped dataset, the
            current slice is processed)
        model: a ``torch.nn.Module``, a :class:`Classifier`, a torchvision
            classifier name (``"resnet50"`` or ``"resnet50:IMAGENET1K_V2"``),
            a TorchScript file path, a ``torch.export`` archive path
            (``.pt2``, exported with a dynamic batch dimension),
            ``"<architecture>:<checkpoint>"``, a FiftyOne
            ``TorchImageModel`` (its network, transforms and classes, as
            ``apply_model`` uses them) or a FiftyOne zoo name
            ``"zoo:<name>"`` (e.g. ``"zoo:resnet50-imagenet-torch"``,
            downloaded on first use as the zoo does), a Hugging Face image
            classifier (alone or as ``(model, image processor)``) or
            ``"hf:<repo id>"``, a timm model or ``"timm:<name>"`` (see
            :mod:`cam_plugin.models` for every form)
        label_field (None): the ground-truth labels, which add the
            ground-truth-class maps: an ``fo.Classification`` field, or an
            ``fo.Detections`` / ``fo.Polylines`` field, whose image class is
            given by ``label_rule``
        pred_field ("cam_prediction"): the predictions field
        heatmap_field ("cam"): the predicted-class heatmap field
        method ("gradcam"): one of :data:`METHODS` (``cam``, ``gradcam``,
            ``gradcam++``, ``xgradcam``, ``layercam``, ``hirescam``,
            ``scorecam``, ``eigencam``, ``ablationcam``, ``guided-gradcam``,
            ``gradcam-counterfactual``) or ``"pgc:<ClassName>"`` for a
            method of the optional grad-cam package
        target_layer (None): the layer name; None picks the last layer with
            a spatial output that the class scores depend on
        classes (None): the class names in model-output order: a list;
            ``"imagenet"`` (this exact word, any case) for the ImageNet-1k
            names (:func:`imagenet_classes`); or the path (a ``str`` other
            than ``"imagenet"``, or an ``os.PathLike``; a file called
            imagenet is ``"./imagenet"``) of a text file with one name per
            line (:func:`read_class_names`). By default the torchvision
            weights' categories; a model without any is labelled with its
            output indices and a :class:`ClassNamesWarning` says so when
            the run starts. The run checks that the model has one output
            per name and records the names, so continuing it with the same
            argument (or the same names as a list) resumes it
        transforms (None): a callable from a PIL image to a (3, H, W)
            tensor; by default the weights' own transforms, else ImageNet
            resize 256 / centre-crop 224 / normalise
        targets (None): which maps to compute: ``"pred"``, ``"gt"``,
            ``"top<k>"``, ``"class:<name>"``; default pred (+ gt with labels)
        batch_size (None): images per batch (64 on CUDA, 16 on CPU)
        num_workers (None): image-decoding worker processes
        device (None): ``"cuda"``, ``"cpu"``...; CUDA when available
        mixed_precision (False): run the forward pass in CUDA autocast
        chunk_size (None): images per extra forward pass of Score-CAM and
            Ablation-CAM (64 on CPU, 256 on CUDA); lower it if they run out
            of memory
        heatmap_size (256): the longest side of the heatmap files; the full
            image frame is kept, only the resolution is capped
        heatmap_scale (None): how the App colours the heatmaps: ``"map"``,
            each map scaled to its own maximum (``range`` ``[6554,
            65535]``: its peak gets the colorscale's last colour, its
            weakest 10% is transparent), or ``"dataset"``, one scale for
            the dataset (each field's largest raw value gets the last
            colour, and the same raw value the same colour on every
            sample). Only the labels' ``range`` differs; it is recorded
            (``get_run(...)["heatmap_scale"]``), applied again to samples
            added later, and can be switched with
            :func:`set_heatmap_scale`. None: the run's recorded scale,
            ``"map"`` for a new run
        output_dir (None): the root under which the run's own directory is
            made (``<output_dir>/<dataset>-<dataset id>/<run key>-<uid>``);
            default under ``fo.config.default_dataset_dir``. Workers of a
            sharded run must all see it at the same path
        run_key (None): the run's key; defaults to ``heatmap_field``
        overwrite (False): delete an existing run with this key (its fields
            and files) and compute it again; never touches fields the
            plugin did not create
        retry_failed (False): compute samples that failed before again
        num_shards (1): split the view into this many disjoint shards (by a
            hash of the sample id); with ``delegate=True`` each becomes a
            delegated operation
        shard (None): compute only this shard (what each delegated
            operation does); None computes every shard no live worker holds
        delegate (False): queue the shards as delegated operations for
            ``fiftyone delegated launch`` workers instead of computing here;
            needs a model given by name or path
        trust_checkpoint (False): allow a checkpoint file that can only be
            loaded by full unpickling (which runs code from the file); only
            for files you trust, and never from the App
        store_logits (False): also store each prediction's logits (one float
            per class) in its ``logits`` attribute, as FiftyOne's
            ``apply_model(store_logits=True)`` does; part of the run's
            configuration, so a run continues only with the same choice
        class_map (None): the ground truth's classes in the model's terms:
            a dict from dataset class to a model class or a list of them
            (``{"dog": [the 118 ImageNet dog breeds], "car": ["sports
            car", "convertible", "cab", ...]}``), a
            :class:`~cam_plugin.class_map.ClassMap`, or the path of a JSON
            file (such a dict) or a CSV file (rows ``dataset class, model
            class[, ...]``). A prediction is correct when it is one of the
            sample's class's model classes, and the ground-truth map is
            taken for the one of them the model scores highest. Samples
            whose labels map to nothing get predictions and
            predicted-class maps only; the run's summary warns how many,
            and :func:`class_summary` counts them as unmapped. Recorded in
            the run, so the views and the summary judge by the same map.
            None: labels must be model class names (an ``fo.Classification``
            label that is not one is refused; objects whose class is not
            one are left out by ``label_rule``)
        label_rule (None): how an image labelled with objects gets its
            class: ``"largest"`` (the default), its largest object's class
            among those the class map covers (boxes by area, closed or
            filled polylines by polygon area); ``"all"``, every object's
            class a label of the image, is the rule of multi-label runs
            (the only one they take, and their default)
        multilabel (False): the model is multi-label (independent sigmoid
            scores, e.g. trained with ``BCEWithLogitsLoss``). Then
            ``pred_field`` is an ``fo.Classifications`` of every class whose
            probability reaches ``threshold`` (most probable first, possibly
            none); each class gets its own ``fo.Heatmap`` field
            ``<heatmap_field>_<class>`` (as ``targets=["class:<name>"]``
            names it), holding a map for the samples that are predicted or
            labelled with the class, with the class's probability in the
            heatmap's ``confidence``; ``targets`` may only name classes
            (default: all, at most 256). The ground truth is an
            ``fo.Classifications`` (or ``fo.Classification``) field, or
            objects (each object's class is a label, ``label_rule="all"``);
            the labels the run judged by are stored in
            ``<heatmap_field>_gt_labels``. Measure each class's maps
            against that class's objects with
            :func:`compute_label_attention`; :func:`attention_views` and
            :func:`class_summary` take a class's field, and
            :func:`label_summary` ranks every class. No ``class_map`` yet
        threshold (0.5): the probability from which a multi-label run
            predicts a class
        progress (None): True/False for a progress bar, or a callback
            receiving the ``fiftyone.core.utils.ProgressBar``

    Returns:
        a :class:`cam_plugin.runs.base.RunSummary`
    """
    # every argument, as iter_compute_cams takes them
    arguments = dict(locals())
    return _drain(iter_compute_cams(**arguments))


def iter_compute_cams(samples, model, **kwargs):
    """:func:`compute_cams` as a generator: yields ``(done, total)`` after
    each batch and returns the :class:`cam_plugin.runs.base.RunSummary`
    (what the App's operators use to report progress). Takes the same
    arguments."""
    from .runs import cams, sharding

    params, options = _split_options(kwargs)
    # a display setting, not part of what is computed: the run type applies
    # it when it finishes (cam_plugin.scale)
    heatmap_scale = params.pop("heatmap_scale", None)
    if heatmap_scale is not None:
        from .heatmaps import check_scale

        check_scale(heatmap_scale)
    if options.pop("delegate", False):
        summary = sharding.queue(cams.CamRunType, "compute_cams", samples, model, params, options)
        if heatmap_scale is not None:
            # recorded (and applied to what is stored) here; each worker
            # applies the recorded scale again when it finishes
            from .scale import apply_run_scales

            apply_run_scales(samples._root_dataset, summary.key, heatmap_scale)
        return summary
    run = cams.CamRunType(samples, model, **params)
    run.heatmap_scale = heatmap_scale
    return (yield from sharding.steps(run, options))


# the arguments of compute_* that steer the run rather than say what it computes
_RUN_OPTIONS = ("overwrite", "retry_failed", "num_shards", "shard", "delegate", "output_dir", "progress")


def _split_options(kwargs):
    options = {k: kwargs.pop(k) for k in _RUN_OPTIONS if k in kwargs}
    if "output_dir" in options:
        options["output_root"] = options.pop("output_dir")
    return kwargs, options


def _drain(steps):
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def compute_attention(
    samples,
    heatmap_field="cam",
    region_field=None,
    *,
    label_field=None,
    gt_heatmap_field=None,
    region_classes="gt",
    mask_values=None,
    heatmap_threshold=0.5,
    tolerance=15.0,
    border=0.1,
    top_fraction=0.2,
    run_key=None,
    overwrite=False,
    retry_failed=False,
    batch_size=256,
    device=None,
    num_shards=1,
    shard=None,
    delegate=False,
    progress=None,
):
    """Measures how much of each heatmap falls on the labelled object.

    Writes, for the heatmap field ``F`` and its ground-truth-class twin
    (``F_gt`` when ``compute_cams`` made one; the same region is used for
    both):

    -   ``F_object_energy``: the share of the map's mass inside the region
        (energy-based pointing game, Wang et al., 2020), in [0, 1]
    -   ``F_object_area``: the share of the image the region covers, in
        [0, 1] (the energy a uniform map would get)
    -   ``F_pointing_hit``: whether the map's maximum lies within
        ``tolerance`` image pixels of the region (pointing game, Zhang et
        al., 2018)
    -   ``F_border_energy``: the share of the mass on the image's border band
        (``border`` of each side), computed with or without regions
    -   ``F_pred_gt_agreement``: the IoU of the top-``top_fraction`` pixels of
        the predicted- and ground-truth-class maps
    -   ``F_attention_error``: why a sample could not be measured (its map is
        unreadable, or zero everywhere)

    Like :func:`compute_cams`, the run resumes, picks up new samples when
    called again, and shards (``num_shards``, ``shard``, ``delegate``).

    Args:
        samples: a dataset or view with heatmaps from :func:`compute_cams`
            (or any ``fo.Heatmap`` field)
        heatmap_field ("cam"): the heatmap field
        region_field (None): the labelled objects: ``fo.Detections`` (with or
            without instance masks), ``fo.Polylines`` (closed or filled),
            ``fo.Segmentation`` or ``fo.Heatmap``; None computes only the
            region-free metrics
        label_field (None): the ground-truth ``fo.Classification`` field;
            defaults to the one the CAM run used (for a run with a
            ``class_map`` or objects as ground truth, its
            ``<heatmap_field>_gt_class``, each image's class)
        gt_heatmap_field (None): the ground-truth-class heatmap field;
            defaults to the CAM run's
        region_classes ("gt"): ``"gt"``: the objects labelled with the
            sample's ground-truth class (all objects when it has none or none
            matches); ``"all"``: all labelled objects; or a list of names
        mask_values (None): for segmentations, the mask values that are
            objects (default: all non-zero values)
        heatmap_threshold (0.5): for heatmap regions, the fraction of the
            range above which a pixel is object
        tolerance (15.0): the pointing game's tolerance in image pixels
        border (0.1): the border band's width as a fraction of each side
        top_fraction (0.2): the share of pixels compared by the agreement
        run_key (None): defaults to ``<heatmap_field>_attention``
        overwrite (False): replace an earlier attention run with this key
        retry_failed (False): measure samples that failed before again
        batch_size (256): maps processed together
        device (None): where the metrics are computed (CUDA if available)
        num_shards, shard, delegate: as for :func:`compute_cams`
        progress (None): a progress bar (True/False) or a callback

    Returns:
        a :class:`cam_plugin.runs.base.RunSummary`
    """
    # every argument, as iter_compute_attention takes them
    arguments = dict(locals())
    return _drain(iter_compute_attention(**arguments))


def iter_compute_attention(samples, heatmap_field="cam", region_field=None, **kwargs):
    """:func:`compute_attention` as a generator of ``(done, total)``
    returning the summary; takes the same arguments."""
    from .runs import attention, sharding

    params, options = _split_options(kwargs)
    args = (heatmap_field, region_field)
    if options.pop("delegate", False):
        return sharding.queue(
            attention.AttentionRunType, "compute_attention", samples, args, params, options
        )
    return (yield from sharding.steps(attention.AttentionRunType(samples, *args, **params), options))


def compute_label_attention(samples, region_field, heatmap_field="cam", *, classes=None, **kwargs):
    """:func:`compute_attention` for each class of a multi-label CAM run
    (``compute_cams(multilabel=True)``): each class's heatmap field is
    measured against the objects of that class in ``region_field`` (a
    sample labelled with no such object gets ``object_area`` 0 and is left
    out of the views that compare with objects).

    Args:
        samples: the dataset or view of the CAM run
        region_field: the labelled objects (as for :func:`compute_attention`)
        heatmap_field ("cam"): the ``heatmap_field`` the CAM run was given
        classes (None): the classes to measure; default all of the run's
        **kwargs: the other arguments of :func:`compute_attention` (one run
            per class, keyed ``<class field>_attention``)

    Returns:
        a dict from class name to its :class:`~cam_plugin.runs.base.RunSummary`
    """
    if "run_key" in kwargs:
        raise CamError(
            "compute_label_attention makes one run per class, keyed <class field>_attention; "
            "it takes no run_key"
        )
    class_fields = _label_fields(samples, heatmap_field)
    if classes is not None:
        unknown = [c for c in classes if c not in class_fields]
        if unknown:
            raise CamError(
                f"{', '.join(map(repr, unknown))}: not a class of the multi-label run of "
                f"'{heatmap_field}' ({', '.join(list(class_fields)[:10])} ...)"
            )
        class_fields = {c: class_fields[c] for c in classes}
    return {
        name: compute_attention(samples, field, region_field, **kwargs)
        for name, field in class_fields.items()
        if samples.exists(field).limit(1).count()
    }


def compute_reliance(
    samples,
    model=None,
    *,
    region_field,
    pred_field="cam_prediction",
    prefix="cam",
    region_classes=None,
    fill="mean",
    seed=0,
    classes=None,
    transforms=None,
    label_field=None,
    mask_values=None,
    heatmap_threshold=0.5,
    batch_size=None,
    num_workers=None,
    device=None,
    run_key=None,
    overwrite=False,
    retry_failed=False,
    num_shards=1,
    shard=None,
    delegate=False,
    trust_checkpoint=False,
    progress=None,
):
    """Tests, by intervention, whether each prediction depends on the
    background: every image goes through the model as it is, with its
    background painted over and with its labelled object painted over (one
    decode, one batch).

    With ``p(.)`` the softmax probability of the class the model predicts
    on the unmodified image, writes, for ``P = prefix``:

    -   ``P_bg_removed_confidence``: p with every pixel outside the region
        replaced by the fill (``P_bg_removed_label``: the top class then)
    -   ``P_obj_removed_confidence``: p with every pixel inside the region
        replaced (``P_obj_removed_label``: the top class then)
    -   ``P_bg_reliance = (p_obj_removed - p_bg_removed) / p``: near +1 when
        the background carries the prediction, near -1 when the object does
    -   ``P_bg_flip``, ``P_obj_flip``: whether the top class changes
    -   ``P_reliance_class``: the class measured; ``P_reliance_error``: why
        a sample could not be tested (no labelled object, say)

    The run resumes, picks up new samples and shards like
    :func:`compute_cams`. :func:`reliance_summary` ranks the classes; the
    attention views of the CAM run's heatmaps gain
    ``confirmed_background_reliance`` and ``unfaithful_heatmap``.

    Args:
        samples: a dataset or view
        model (None): the classifier, as for :func:`compute_cams`; default
            the model the CAM run that made ``pred_field`` loaded by name or
            path
        region_field: the labelled objects, exactly as
            :func:`compute_attention` takes them (boxes, instance masks,
            polylines, semantic masks), rasterised in the full image
        pred_field ("cam_prediction"): the CAM run's predictions: its
            model, class names, ground truth and heatmaps are this run's
            defaults (nothing is read from the field itself)
        prefix ("cam"): the fields' prefix
        region_classes (None): as for :func:`compute_attention`: None or
            ``"gt"``, the objects of the image's ground-truth class (all
            objects when none has it); ``"all"``; or a list of names
        fill ("mean"): what replaces the removed pixels: ``"mean"`` (the
            ImageNet mean colour (124, 116, 104)), ``"blur"`` (a strong
            Gaussian blur of the image) or ``"swap"`` (the background of
            another sample of another class, its own objects painted out:
            ImageNet-9's Mixed-Rand)
        seed (0): for ``"swap"``, which sample lends each its background
            (the same in every shard and process)
        classes, transforms, trust_checkpoint: as for :func:`compute_cams`
            (default: the CAM run's class names)
        label_field (None): the image's class (``fo.Classification``) that
            picks the region's objects; default the CAM run's
        mask_values, heatmap_threshold: as for :func:`compute_attention`
        batch_size (None): images per batch (each sent three times), 16 on
            CPU and 64 on CUDA; halved on out-of-memory
        num_workers (None): decoding processes
        device (None): CUDA if available
        run_key (None): defaults to ``<prefix>_reliance``
        overwrite, retry_failed, num_shards, shard, delegate, progress: as
            for :func:`compute_cams`

    Returns:
        a :class:`cam_plugin.runs.base.RunSummary`
    """
    arguments = dict(locals())
    return _drain(iter_compute_reliance(**arguments))


def iter_compute_reliance(samples, model=None, **kwargs):
    """:func:`compute_reliance` as a generator of ``(done, total)``
    returning the summary; takes the same arguments."""
    from .runs import reliance, sharding

    params, options = _split_options(kwargs)
    params["model"] = model
    if options.pop("delegate", False):
        return sharding.queue(reliance.RelianceRunType, "compute_reliance", samples, (), params, options)
    return (yield from sharding.steps(reliance.RelianceRunType(samples, **params), options))


def discover_cues(
    samples,
    model=None,
    *,
    heatmap_field="cam",
    region_field=None,
    region_classes="gt",
    context_field=None,
    num_groups=None,
    min_share=0.05,
    fraction=0.5,
    max_on_object=0.5,
    dims=64,
    seed=0,
    brain_key=None,
    classes=None,
    transforms=None,
    label_field=None,
    batch_size=None,
    num_workers=None,
    device=None,
    run_key=None,
    trust_checkpoint=False,
    overwrite=False,
    retry_failed=False,
    num_shards=1,
    shard=None,
    delegate=False,
    output_dir=None,
    progress=None,
):
    """Finds the places off the object that the maps of ``heatmap_field``
    attend to, embeds them with the CAM run's own layer, and groups similar
    ones into cues (a watermark, snow, a ruler...).

    Per sample, the hotspots (connected regions of the stored map above
    ``fraction`` of its maximum, holding at least ``min_share`` of its mass,
    with at most ``max_on_object`` of their mass on the labelled region)
    are written as ``fo.Detections`` in ``<heatmap_field>_hotspots``, in the
    full image frame, with ``share``, ``mean_attention``, ``on_object``,
    ``embedding`` (the target layer's features pooled under the map inside
    the hotspot, randomly projected to ``dims`` dimensions, unit length)
    and, with context labels, ``context`` and ``context_share``. When the
    last sample is done the hotspots are grouped (:func:`group_cues`): each
    gets ``group`` and ``label`` (its group's name), each group a saved
    view of its samples and one of its patches, and the Embeddings panel a
    visualization of the patches under ``brain_key``.

    Args:
        samples: a dataset or view with the CAM run's heatmaps
        model (None): the model; defaults to the CAM run's (required when
            that was an in-memory model)
        heatmap_field ("cam"): the CAM run's ``fo.Heatmap`` field
        region_field (None): the labelled objects; None: all of each map
            counts as off the object
        region_classes ("gt"): which objects form the region, as for
            :func:`compute_attention`
        context_field (None): labels that name hotspots (grass, sky...);
            defaults to the field a :func:`compute_context` run of
            ``heatmap_field`` used
        num_groups (None): the number of cues; None chooses it (silhouette)
        min_share, fraction, max_on_object: the hotspot rule (above)
        dims (64): the embeddings' size when the layer is wider
        seed (0): the projection's and the grouping's seed
        brain_key (None): the visualization's key, default
            ``<run_key>_viz``; False computes none
        classes, transforms, label_field, batch_size, num_workers, device,
            trust_checkpoint: as for :func:`compute_reliance`
        run_key (None): defaults to ``<heatmap_field>_cues``
        overwrite, retry_failed, num_shards, shard, delegate, output_dir,
            progress: as for :func:`compute_cams`

    Returns:
        a :class:`cam_plugin.runs.base.RunSummary`; the groups are
        :func:`cue_groups`
    """
    arguments = dict(locals())
    return _drain(iter_discover_cues(**arguments))


def iter_discover_cues(samples, model=None, **kwargs):
    """:func:`discover_cues` as a generator of ``(done, total)`` returning
    the summary; takes the same arguments."""
    from .runs import cues, sharding

    params, options = _split_options(kwargs)
    params["model"] = model
    if options.pop("delegate", False):
        return sharding.queue(cues.CuesRunType, "discover_cues", samples, (), params, options)
    return (yield from sharding.steps(cues.CuesRunType(samples, **params), options))


def group_cues(samples, heatmap_field="cam", *, num_groups=None, brain_key=None, seed=0):
    """Groups the hotspots of a finished :func:`discover_cues` run again
    (``discover_cues`` does so when its last sample is done): k-means on
    their embeddings, the number of groups chosen by silhouette unless
    ``num_groups`` is given; groups are numbered by the mistakes they
    explain (the samples whose prediction is wrong), named by their
    dominant context class (``grass``: a hotspot's context is the class
    under most of its mass, never the class of its own image or object)
    when it is that of most of their hotspots on any context label and of
    a quarter of all, else ``cue 1``, ``cue 2``... Replaces the earlier
    grouping's labels, saved views and visualization.

    Returns:
        a list of :class:`cam_plugin.runs.cues.CueGroup`, group 1 first
    """
    from .runs import cues

    return cues.group_cues(samples, heatmap_field, num_groups=num_groups, brain_key=brain_key, seed=seed)


def hotspots_field(heatmap_field="cam"):
    """The field :func:`discover_cues` writes a heatmap field's hotspots
    to: ``<heatmap_field>_hotspots``."""
    return f"{heatmap_field}_hotspots"


def cue_groups(samples, heatmap_field="cam"):
    """The cue groups of the :func:`discover_cues` run over
    ``heatmap_field`` (:class:`cam_plugin.runs.cues.CueGroup`, group 1
    first; empty until every sample is done)."""
    from .runs import cues

    return cues.cue_groups(samples, heatmap_field)


def reliance_summary(samples, prefix="cam", *, label_field=None, min_samples=5):
    """Per class, what the background intervention of
    :func:`compute_reliance` (fields ``<prefix>_*``) found, most
    background-reliant class first: a list of dicts with ``class`` (the
    ground-truth class, else the predicted one), ``samples``,
    ``mean_reliance``, ``bg_flip_rate`` (the share of predictions that
    change without the background), ``obj_flip_rate`` and, with ground
    truth, ``accuracy`` and ``accuracy_without_background`` (with the
    run's fill: for ``fill="swap"``, ImageNet-9's Mixed-Rand) and
    ``background_gap``, their difference. Classes with fewer than
    ``min_samples`` tested samples are ranked last."""
    from .summaries import reliance_summary as summarise

    return summarise(samples, prefix, label_field=label_field, min_samples=min_samples)


def reliance_fields(prefix="cam", fill="mean"):
    """The fields :func:`compute_reliance` writes for ``prefix`` (and
    ``fill``: ``"swap"`` adds ``<prefix>_swap_source``), as
    ``{name: (field type, None)}``, what :func:`check_fields` takes."""
    from .runs.reliance import reliance_fields as fields

    return fields(prefix, fill)


def reliance_view(samples, class_name, prefix="cam", *, label_field=None):
    """The tested samples of one class (ground truth, else the predicted
    class), the most background-reliant first: what a bar of the App's
    reliance chart opens."""
    from .summaries import reliance_view as build

    return build(samples, class_name, prefix, label_field=label_field)


def compute_context(
    samples,
    heatmap_field="cam",
    context_field=None,
    *,
    min_share=0.01,
    classes=None,
    run_key=None,
    overwrite=False,
    retry_failed=False,
    batch_size=256,
    device=None,
    num_shards=1,
    shard=None,
    delegate=False,
    progress=None,
):
    """Names what each map looks at with the dataset's own labels: per
    sample, the share of the map's mass on each context class, written as
    ``fo.Classifications`` in ``<heatmap_field>_context`` (label = the
    class, confidence = its share, every class with a share of at least
    ``min_share``, largest first), so that the App's sidebar filters it
    ("attention on grass above 30%"). ``<heatmap_field>_context_error``
    says why a sample could not be measured.

    Shares are computed at the stored map's resolution, the labels sampled
    at its pixel centres, as :func:`compute_attention` does. Objects of one
    class that overlap count once per pixel.

    Args:
        samples: a dataset or view with heatmaps
        heatmap_field ("cam"): the ``fo.Heatmap`` field
        context_field: a semantic segmentation (``fo.Segmentation``, its
            classes named by the dataset's ``mask_targets``; values without
            a name count under their number, 0 without a name not at all),
            or objects (``fo.Detections``, ``fo.Polylines``) named by label
        min_share (0.01): the smallest share stored
        classes (None): only these context classes
        run_key (None): defaults to ``<heatmap_field>_context``
        overwrite, retry_failed, num_shards, shard, delegate, progress: as
            for :func:`compute_cams`
        batch_size (256): maps read together
        device (None): where the shares are computed

    Returns:
        a :class:`cam_plugin.runs.base.RunSummary`
    """
    arguments = dict(locals())
    return _drain(iter_compute_context(**arguments))


def iter_compute_context(samples, heatmap_field="cam", context_field=None, **kwargs):
    """:func:`compute_context` as a generator of ``(done, total)``
    returning the summary; takes the same arguments."""
    from .runs import context, sharding

    params, options = _split_options(kwargs)
    args = (heatmap_field, context_field)
    if options.pop("delegate", False):
        return sharding.queue(context.ContextRunType, "compute_context", samples, args, params, options)
    return (yield from sharding.steps(context.ContextRunType(samples, *args, **params), options))


def context_summary(samples, heatmap_field="cam", *, by="gt", label_field=None, pred_field=None, min_samples=5):
    """Per class (``by="gt"``: ground truth, ``"pred"``: prediction), the
    context classes ranked by the mean share of attention they get, over
    all its samples and over its misclassified ones ("for horse, 38% of
    attention falls on grass; 61% among the misclassified"). Needs
    :func:`compute_context`. Returns a list of
    :class:`cam_plugin.summaries.ContextRow`, the class with the most
    attention on one context class first."""
    from .summaries import context_summary as summarise

    return summarise(samples, heatmap_field, by=by, label_field=label_field, pred_field=pred_field,
                     min_samples=min_samples)


def context_view(samples, class_name, context_class, heatmap_field="cam", *, by="gt", misclassified=False,
                 min_share=0.0, label_field=None, pred_field=None):
    """The samples of one class whose map puts attention on one context
    class (at least ``min_share`` of it), most first: what a cell of the
    App's class-by-context matrix opens. ``label_field``/``pred_field`` as
    for :func:`context_summary`."""
    from .summaries import context_view as build

    return build(samples, heatmap_field, class_name, context_class, by=by, misclassified=misclassified,
                 min_share=min_share, label_field=label_field, pred_field=pred_field)


def _label_fields(samples, heatmap_field):
    """The class -> heatmap field map of the multi-label CAM run given
    ``heatmap_field``."""
    from .runs import multilabel_run

    config = multilabel_run(samples, heatmap_field)
    if config is not None:
        return dict(config["class_fields"])
    raise CamError(
        f"No multi-label CAM run made the heatmaps of '{heatmap_field}' on this dataset: "
        "run compute_cams(..., multilabel=True) first"
    )


def metric_field(heatmap_field, metric):
    """The field :func:`compute_attention` writes a metric of a heatmap
    field to: ``<heatmap_field>_<metric>`` (``metric`` e.g.
    ``"object_energy"``)."""
    from .runs.attention import metric_field as name_of

    return name_of(heatmap_field, metric)


def attention_views(
    samples,
    heatmap_field="cam",
    label_field=None,
    pred_field=None,
    *,
    background_focus=0.15,
    object_focus=0.4,
    max_object_area=0.6,
    confidence=0.8,
    border_energy=0.6,
    save=True,
):
    """The views that find where the model looked at the wrong place.

    Attention is judged by the *focus*, ``(energy - area) / (1 - area)``:
    0 for a uniform map, 1 for all mass on the object, negative when it
    avoids the object. Samples whose object covers more than
    ``max_object_area`` of the image are left out of every view.

    Views (saved on the dataset as ``<heatmap_field>_<name>`` unless
    ``save=False``):

    -   ``misclassified_background``: wrong, focus < ``background_focus``
    -   ``misclassified_on_object``: wrong, focus >= ``object_focus``
    -   ``correct_background``: right, focus < ``background_focus``
    -   ``qa_confident_disagreement``: wrong, confidence >= ``confidence``,
        focus >= ``object_focus`` (check the label)
    -   ``qa_unlabelled_attention``: confident, the peak outside every
        labelled object and focus < ``background_focus`` (an object may be
        missing from the labels)
    -   ``border_attention``: at least ``border_energy`` of the map's mass
        on the image's border band (a watermark, a frame, padding)

    A run without ground truth gets the last two only. For one class's
    field of a multi-label run (``compute_cams(multilabel=True)``), the
    views judge that class: wrong is labelled but not predicted or
    predicted but not labelled, confidence is the class's probability,
    ``qa_confident_disagreement`` is labelled, looked at, and given a
    probability of at most ``1 - confidence``, and ``qa_unlabelled_attention``
    is predicted with confidence where no object of the class is labelled
    or the peak is off every one of them.

    Returns:
        a dict from view name to ``fo.DatasetView``
    """
    from .views import Thresholds
    from .views import attention_views as build

    thresholds = Thresholds(
        background_focus, object_focus, max_object_area, confidence, border_energy=border_energy
    )
    return build(samples, heatmap_field, label_field, pred_field, thresholds, save=save)


def class_summary(
    samples,
    heatmap_field="cam",
    label_field=None,
    pred_field=None,
    *,
    background_focus=0.15,
    max_object_area=0.6,
    min_samples=5,
):
    """Per ground-truth class, how often and how strongly attention falls off
    the object, the most affected class first: a list of dicts with
    ``class``, ``samples``, ``off_object``, ``off_object_share``,
    ``off_object_low`` and ``off_object_high`` (the share's 95% Wilson
    interval), ``enough_samples``, ``mean_focus``, ``mean_object_energy``,
    ``accuracy`` and ``misclassified_background``.

    Classes are ranked by the lower end of the interval, so one sample at
    100% does not outrank fifty at 60%; classes with fewer than
    ``min_samples`` measured samples are ranked last.

    For a run with a ``class_map`` (or objects as ground truth) the classes
    are the dataset's, ``accuracy`` counts a prediction in the class's set
    as right, and the returned list (a ``ClassSummary``) also has
    ``unmapped``, the samples whose labels map to nothing, and
    ``unmapped_labels``, how many of them carry each label."""
    from .views import Thresholds
    from .views import class_summary as summarise

    thresholds = Thresholds(
        background_focus=background_focus, max_object_area=max_object_area, min_samples=min_samples
    )
    return summarise(samples, heatmap_field, label_field, pred_field, thresholds)


def label_summary(samples, heatmap_field="cam", *, background_focus=0.15, max_object_area=0.6, min_samples=5):
    """:func:`class_summary` for every class of a multi-label CAM run
    (``compute_cams(multilabel=True, heatmap_field=...)``), ranked together:
    per class, over the samples labelled with it, how often its map falls
    off that class's objects, and its recall (``accuracy``); each row also
    has the class's ``heatmap_field``. Needs
    :func:`compute_label_attention` first."""
    from .views import Thresholds
    from .views import label_summary as summarise

    thresholds = Thresholds(
        background_focus=background_focus, max_object_area=max_object_area, min_samples=min_samples
    )
    return summarise(samples, heatmap_field, thresholds)


def class_view(
    samples,
    class_name,
    heatmap_field="cam",
    label_field=None,
    pred_field=None,
    *,
    background_focus=0.15,
    max_object_area=0.6,
):
    """The samples of one ground-truth class whose attention is off the
    object (focus < ``background_focus``), as a ``fo.DatasetView``: the
    ``off_object`` samples of that class's :func:`class_summary` row."""
    from .views import Thresholds
    from .views import class_view as build

    thresholds = Thresholds(background_focus=background_focus, max_object_area=max_object_area)
    return build(samples, heatmap_field, label_field, pred_field, class_name, thresholds)


def attention_fields(samples):
    """The heatmap fields of a collection that have attention metrics, each
    as an ``AttentionField``: its ground-truth and predictions fields, and
    ``problem``, the sentence saying why the views and the per-class
    summary cannot use it (None when they can). Usable fields come first."""
    from .views import attention_fields as described

    return described(samples)


def saved_view_name(heatmap_field, name):
    """The name :func:`attention_views` saves a view under:
    ``<heatmap_field>_<name>``, ``name`` a key of :data:`VIEW_DESCRIPTIONS`."""
    from .views import saved_view_name as name_of

    return name_of(heatmap_field, name)


def list_runs(samples, method=None):
    """The keys of this plugin's runs on a dataset.

    Args:
        samples: a dataset or view
        method (None): ``"cams"``, ``"attention"``, ``"reliance"``,
            ``"context"`` or ``"cues"`` to list one kind
    """
    from . import runs

    kinds = {
        "cams": runs.CAM_RUN,
        "attention": runs.ATTENTION_RUN,
        "reliance": runs.records.RELIANCE_RUN,
        "context": runs.records.CONTEXT_RUN,
        "cues": runs.records.CUES_RUN,
        None: None,
    }
    return runs.list_runs(samples, method=kinds.get(method, method))


def get_run(samples, run_key):
    """A run's configuration and state as a dict: ``status``
    (``completed`` once every sample of its view is done), ``counts``
    (``samples``, ``processed``, ``failed``, ``todo``, ``errors``),
    ``files_dir``, ``fields`` and ``shards`` (per shard: ``state``
    ``running``/``stale``/``done``/``failed``, worker, heartbeat)."""
    from . import runs

    return runs.get_run(samples, run_key)


def set_heatmap_scale(samples, heatmap_field, scale):
    """Switches how the App colours a heatmap field of a
    :func:`compute_cams` run, on every sample of the dataset that has it:
    ``"map"`` (each map scaled to its own maximum) or ``"dataset"`` (one
    scale for the dataset: the field's largest raw value gets the
    colorscale's last colour, and the same raw value the same colour on
    every sample).

    Only the labels' ``range`` changes (no file is rewritten); the choice is
    recorded in the run (``get_run(...)["heatmap_scale"]``), applied again
    when the run adds samples, and stated in the field's description (the
    App's sidebar tooltip). Only fields a CAM run of this plugin made are
    touched.

    Returns:
        the field's largest raw value over the dataset (None if no map)

    Raises:
        RunError: when the field is not a heatmap field of a CAM run
    """
    from .scale import set_heatmap_scale as rescale

    return rescale(samples, heatmap_field, scale)


def delete_run(samples, run_key):
    """Deletes a run, its fields, the heatmap files it owns and the
    attention runs computed from it. Nothing else is touched: a clone's copy
    of a run deletes no files of the dataset it was cloned from.

    Refuses while a live worker runs one of its shards."""
    from . import runs

    config = runs.get_run(samples, run_key)
    live = runs.records.live_shards(config)
    if live:
        from .runs.base import _live_message

        raise runs.RunError(_live_message(run_key, live, "cannot be deleted"))
    runs.delete_run(samples, run_key)


def check_fields(samples, run_key, fields):
    """Checks output fields before a run writes them: refuses invalid names,
    FiftyOne's own fields, fields of another type and fields this plugin did
    not create or another run owns (what a run with key ``run_key`` would
    refuse when it starts).

    Args:
        samples: a dataset or view
        run_key: the key of the run that would write the fields
        fields: a dict from field name to ``(field type, embedded document
            type or None)``, e.g. ``{"cam": (fo.EmbeddedDocumentField,
            fo.Heatmap)}``

    Raises:
        RunError: naming the field and the conflict
    """
    from .runs import records

    records.check_fields(samples, run_key, fields)


def layer_candidates(model, transforms=None, trust_checkpoint=False):
    """The layers a CAM can be taken from, last first, and the default one.

    Args:
        model: anything :func:`load_classifier` accepts
        transforms (None): the model's preprocessing, which sets the probe
            input's size
        trust_checkpoint (False): whether a file given by path may be fully
            unpickled (see :func:`load_classifier`); by default a pickled
            model is refused, since loading it would run code from the file

    Returns:
        a tuple ``(names, default)``
    """
    clf = load_classifier(model, transforms=transforms, trust_checkpoint=trust_checkpoint)
    return _layers_of(clf)


def _layers_of(clf):
    from .cams import default_layer, probe_layers
    from .models import input_shape_of

    candidates = probe_layers(clf.module, input_shape_of(clf.transforms))
    names = [c.name for c in reversed(candidates) if c.usable]
    return names, clf.target_layer or default_layer(candidates)


def model_layers(spec):
    """The layers a CAM can be taken from, last first, and the default one,
    of a model specification, without loading any checkpoint: what a form
    may offer before the user has run anything.

    A torchvision name or ``"<architecture>:<checkpoint>"`` is probed as the
    architecture with random weights (which alone decide the layers; the
    checkpoint is only checked to exist, and nothing is downloaded); a
    TorchScript file, which runs no Python, is loaded. Results are cached
    (a rewritten file is probed again).

    Args:
        spec: a model specification string (see :func:`compute_cams`)

    Returns:
        a tuple ``(names, default)``

    Raises:
        ModelError: for a missing checkpoint, an unknown architecture, or a
            file that is neither TorchScript nor named with its
            architecture (a pickled model is never opened here, since
            loading it would run code from the file)
    """
    from .models import layer_probe_spec

    probe_spec, path = layer_probe_spec(os.fspath(spec))
    mtime = os.path.getmtime(path) if path is not None else None
    names, default, _ = _probe(probe_spec, mtime)
    return list(names), default


@functools.lru_cache(maxsize=32)
def _probe(probe_spec, mtime):
    """The layers, default layer and class names of a probe specification,
    from one load (a form asks for both on every change).

    mtime: the probed file's, so that a rewritten file is probed again."""
    clf = load_classifier(probe_spec)
    names, default = _layers_of(clf)
    return tuple(names), default, tuple(clf.classes) if clf.classes else None


def model_classes(spec):
    """The class names a model specification brings, without downloading
    or unpickling anything (what a form may show while the user types): a
    torchvision name's weights' categories, and the names of zoo, Hugging
    Face (config cached) and timm models, from their random-weights probe.
    None for a model without names of its own (a file, a checkpoint, a
    torchvision architecture with ``:none``): pass ``classes`` for those.

    Raises:
        ModelError: as :func:`model_layers` (``ModelNotLocalError`` where the
            names would need a download)
    """
    from .models import HF_PREFIX, TIMM_PREFIX, ZOO_PREFIX, layer_probe_spec, torchvision_categories

    spec = os.fspath(spec)
    if not spec.startswith((ZOO_PREFIX, HF_PREFIX, TIMM_PREFIX)):
        if os.path.isfile(spec):
            return None
        return torchvision_categories(spec)
    probe_spec, path = layer_probe_spec(spec)
    # (the same probe, and cache entry, as model_layers')
    return _probe(probe_spec, os.path.getmtime(path) if path is not None else None)[2]


def torchvision_classifiers():
    """The names of torchvision's image classifiers, sorted."""
    from .models import torchvision_classifier_names

    return torchvision_classifier_names()


@functools.lru_cache(maxsize=1)
def zoo_classifiers():
    """The FiftyOne zoo's torchvision image classifiers (``"zoo:<name>"``),
    from the zoo's manifest shipped with FiftyOne: nothing is downloaded.
    (The zoo's Transformers classifiers are Hugging Face models: use their
    ids, ``"hf:<id>"``; its CLIP models are zero-shot, not classifiers.)"""
    import fiftyone.zoo as foz

    names = []
    for name in foz.list_zoo_models(tags="classification"):
        deployment = foz.get_zoo_model(name).default_deployment_config_dict or {}
        if deployment.get("type", "").endswith(".TorchvisionImageModel"):
            names.append(name)
    return sorted(names)


@functools.lru_cache(maxsize=1)
def timm_model_names():
    """The model names timm knows (``"timm:<name>"``, pretrained tags
    included), or an empty list when timm is not installed."""
    try:
        import timm
    except ImportError:
        return []
    return timm.list_models(pretrained=True)


def torchvision_weights(name):
    """The weights of a torchvision classifier (its weights enum's values),
    the default first; empty for a name that is not one."""
    from .models import torchvision_weight_names

    return torchvision_weight_names(name)


def is_torchscript_file(path):
    """Whether ``path`` is a TorchScript archive, from its zip listing alone
    (nothing in the file is loaded)."""
    from .models import is_torchscript_file as looks_like_torchscript

    return looks_like_torchscript(path)


def is_exported_program_file(path):
    """Whether ``path`` is a ``torch.export`` archive (``.pt2``), from its zip
    listing and format marker alone (nothing in the file is loaded). Such a
    file needs no architecture; it is checked to hold no code before it is
    loaded (see :mod:`cam_plugin.cams.exported`)."""
    from .models import is_exported_program_file as looks_exported

    return looks_exported(path)
