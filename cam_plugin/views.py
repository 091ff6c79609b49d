"""Views that find where the model looked at the wrong place, and the
per-class summary of attention off the object.

Object energy alone misleads for large objects: a uniform map already puts
80% of its mass on a box covering 80% of the image. The views therefore use
the *focus*, energy rescaled by the object's area,

    focus = (object_energy - object_area) / (1 - object_area)

which is 0 for attention spread uniformly, 1 for attention entirely on the
object and negative for attention that avoids it; and they leave out
samples whose object covers more than ``max_object_area`` of the image,
where no map can tell object from background.

A prediction is right when it equals the ground-truth label; for a run
with a class map or objects as ground truth (see
:mod:`cam_plugin.class_map`), when it is one of the model classes of the
image's class, as the run judged and stored it (``<heatmap_field>_gt_class``
and ``<heatmap_field>_correct``). Samples whose labels map to nothing are
left out of the views that compare with the ground truth, kept in
``qa_unlabelled_attention`` (which needs none) and counted by the
summary's ``unmapped``.

A run without ground truth gets the views that need none
(:data:`GROUND_TRUTH_FREE_VIEWS`): where a confident prediction looked
outside every labelled object, and attention on the image's border.

A multi-label run (``compute_cams(multilabel=True)``) has one heatmap field
per class, and each is a view set of its own: for the class ``c`` of the
field, a sample is *labelled* when ``c`` is among its ground-truth labels
and *predicted* when its probability reaches the run's threshold; wrong is
labelled but not predicted (a miss) or predicted but not labelled, and
the region is the objects of class ``c`` (:func:`cam_plugin.compute_label_attention`).
"""

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

import fiftyone as fo
from fiftyone import ViewField as F

from . import runs
from .runs.attention import metric_field


class ViewsError(ValueError):
    """Views that cannot be built as asked."""


@dataclass
class Thresholds:
    """When attention counts as off or on the object.

    Attributes:
        background_focus: focus below this is "looking at the background"
        object_focus: focus at or above this is "looking at the object"
        max_object_area: samples whose object covers more of the image than
            this are left out (no map can tell object from background)
        confidence: predictions at least this confident count as
            "confident" in the annotation-QA views
        min_samples: the per-class summary ranks classes with fewer
            measured samples last: one sample at 100% says little
        border_energy: a map with at least this share of its mass in the
            image's border band (10% of each side) is "on the border"; a
            uniform map puts 36% there
    """

    background_focus: float = 0.15
    object_focus: float = 0.4
    max_object_area: float = 0.6
    confidence: float = 0.8
    min_samples: int = 5
    border_energy: float = 0.6


def wilson_interval(k, n, z=1.96):
    """The Wilson score interval (95% by default) of a share of ``k`` in
    ``n``: honest for small ``n`` and for shares near 0 or 1, where the
    normal approximation is not."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


VIEW_DESCRIPTIONS = {
    "misclassified_background": "Wrong prediction while the attention is mostly off the object: "
    "the model likely used context (a spurious cue)",
    "misclassified_on_object": "Wrong prediction while looking at the object: confusable classes "
    "or a wrong label",
    "correct_background": "Right prediction for the wrong reason: attention off the object",
    "qa_confident_disagreement": "Confident prediction disagreeing with the label while looking "
    "at the object: check the label",
    "qa_unlabelled_attention": "Confident prediction whose attention peak is outside every "
    "labelled object and mostly off them: an object may be missing from the labels",
    "border_attention": "Attention mostly on the image's border: a watermark, a frame, padding "
    "or a caption may be the cue",
}

#: the views built for a heatmap field whose run had no ground truth
GROUND_TRUTH_FREE_VIEWS = ("qa_unlabelled_attention", "border_attention")

#: the views added for a heatmap field once :func:`cam_plugin.compute_reliance`
#: tested its run's predictions by intervention
RELIANCE_VIEW_DESCRIPTIONS = {
    "confirmed_background_reliance": "Wrong prediction, attention off the object, and the "
    "intervention agrees: the prediction survives removing the object or dies without the "
    "background",
    "confirmed_correct_background": "Right prediction, attention off the object, and the "
    "intervention agrees: right for the wrong reason, confirmed",
    "unfaithful_heatmap": "The heatmap and the intervention disagree: attention on the object "
    "while only the background carries the prediction, or off it while only the object "
    "does. Do not trust these maps",
}


def view_description(name):
    """What a view of :func:`build_views` shows (one sentence or two)."""
    return VIEW_DESCRIPTIONS.get(name) or RELIANCE_VIEW_DESCRIPTIONS[name]


def view_names(samples, heatmap_field):
    """The names of the views :func:`build_views` makes for a field."""
    field = describe_field(samples, heatmap_field)
    names = list(VIEW_DESCRIPTIONS) if field.label_field is not None else list(GROUND_TRUTH_FREE_VIEWS)
    if field.reliance_prefix is not None:
        names += [
            n for n in RELIANCE_VIEW_DESCRIPTIONS if field.label_field is not None or n == "unfaithful_heatmap"
        ]
    return names


@dataclass(frozen=True)
class AttentionField:
    """A heatmap field with attention metrics, and whether the views and
    the per-class summary can use it.

    Attributes:
        heatmap_field: the ``fo.Heatmap`` field
        label_field: the ground-truth ``fo.Classification`` field its run
            used, or None
        pred_field: the predictions field of its run, or None
        problem: why the views cannot use it (one sentence saying what to
            do), or None when they can
        correct_field: for a run judging by a class map, its boolean
            field of right and wrong predictions (``label_field`` is then
            its field of each image's class); None otherwise
        source_field: the labels a run with a class map read its
            ground truth from (``label_field`` of compute_cams), or None
        label_class: for one class's field of a multi-label run, that
            class (``label_field`` is then the run's
            ``<heatmap_field>_gt_labels``); None otherwise
        summary_problem: why :func:`class_summary` cannot use it (it needs
            ground truth), or None when it can
        reliance_prefix: the prefix of the fields of the
            :func:`cam_plugin.compute_reliance` run that tested its run's
            predictions, or None
    """

    heatmap_field: str
    label_field: str = None
    pred_field: str = None
    problem: str = None
    correct_field: str = None
    source_field: str = None
    label_class: str = None
    summary_problem: str = None
    reliance_prefix: str = None

    @property
    def usable(self):
        """Whether the views can use it."""
        return self.problem is None

    @property
    def summarisable(self):
        """Whether the per-class summary can use it."""
        return self.problem is None and self.summary_problem is None


def _attention_config(samples, heatmap_field):
    for key in runs.list_runs(samples, runs.ATTENTION_RUN):
        config = runs.get_run(samples, key, derive=False)
        if config.get("heatmap_field") == heatmap_field or config.get("gt_heatmap_field") == heatmap_field:
            return config
    return {}


def reliance_prefix(samples, heatmap_field, pred_field=None):
    """The prefix of the reliance run that tested the predictions of the
    run that made ``heatmap_field`` (one whose prefix is the field's name
    first, then by run key), or None."""
    found = []
    schema = samples.get_field_schema()
    for key in runs.list_runs(samples, runs.records.RELIANCE_RUN):
        config = runs.get_run(samples, key, derive=False)
        prefix = config.get("prefix")
        if config.get("heatmap_field") == heatmap_field and (
            pred_field is None or config.get("pred_field") == pred_field
        ) and f"{prefix}_bg_reliance" in schema:
            found.append((prefix != heatmap_field, key, prefix))
    return min(found)[2] if found else None


def describe_field(samples, heatmap_field, label_field=None, pred_field=None):
    """The :class:`AttentionField` of one heatmap field: its ground truth
    and predictions (given, or those of the runs that made and measured it)
    and what, if anything, keeps the views from using it."""
    schema = samples.get_field_schema()
    owner = runs.field_owners(samples).get(heatmap_field)
    config = runs.get_run(samples, owner, derive=False) if owner else {}
    measured = _attention_config(samples, heatmap_field)
    correct_field = source_field = label_class = None
    if config.get("multilabel"):
        label_class = runs.records.label_class(config, heatmap_field)
        if label_field in (None, config.get("label_field")):
            # the labels the run judged by (None for a run without any)
            label_field = config.get("gt_class_field")
    elif config.get("correct_field") and label_field in (
        None, config.get("label_field"), config.get("gt_class_field")
    ):
        # judged by the run's class map: its stored classes and verdicts
        correct_field, source_field = config["correct_field"], config.get("label_field")
        label_field = config.get("gt_class_field")
    if not config.get("multilabel"):
        label_field = label_field or config.get("label_field") or measured.get("label_field")
    pred_field = pred_field or config.get("pred_field")
    no_truth = None

    prefix = reliance_prefix(samples, heatmap_field, pred_field) if label_class is None else None

    def field(problem):
        return AttentionField(
            heatmap_field, label_field, pred_field, problem, correct_field, source_field,
            label_class, no_truth, prefix,
        )

    if heatmap_field not in schema:
        return field(f"'{heatmap_field}' is not a field of this dataset")
    if metric_field(heatmap_field, "object_energy") not in schema:
        return field(
            f"'{heatmap_field}' has no attention metrics on objects yet: run "
            f"'Compute attention metrics' (compute_attention) on it with a region field"
        )
    if label_field is None:
        # the views that need no ground truth still work
        no_truth = (
            f"'{heatmap_field}' was computed without ground truth, and the summary compares "
            "predictions with it: compute the maps again with a ground-truth field "
            "(compute_cams(label_field=...)), or pass label_field"
        )
    elif label_field not in schema:
        return field(f"the ground-truth field '{label_field}' of '{heatmap_field}' no longer exists")
    if pred_field is None:
        return field(
            f"'{heatmap_field}' was not made by compute_cams, so its predictions are "
            "unknown: pass pred_field"
        )
    if pred_field not in schema:
        return field(f"the predictions field '{pred_field}' of '{heatmap_field}' no longer exists")
    if correct_field is not None and correct_field not in schema:
        return field(f"the field '{correct_field}' of '{heatmap_field}' no longer exists")
    return field(None)


def attention_fields(samples):
    """Every heatmap field of the collection with attention metrics, as
    :class:`AttentionField` values (usable ones first, then by name)."""
    schema = samples.get_field_schema()
    names = sorted(
        name
        for name, f in schema.items()
        if isinstance(f, fo.EmbeddedDocumentField)
        and issubclass(f.document_type, fo.Heatmap)
        and (
            metric_field(name, "object_energy") in schema
            or metric_field(name, "border_energy") in schema
        )
    )
    described = [describe_field(samples, name) for name in names]
    return sorted(described, key=lambda f: (not f.usable, f.heatmap_field))


def _fields(samples, heatmap_field, label_field, pred_field, summary=False):
    field = describe_field(samples, heatmap_field, label_field, pred_field)
    problem = field.problem or (field.summary_problem if summary else None)
    if problem:
        raise ViewsError(problem[0].upper() + problem[1:])
    return field


def _expressions(field, t):
    """The query expressions the views are made of, for one
    :class:`AttentionField` under the thresholds ``t``."""
    heatmap_field, label_field, pred_field = field.heatmap_field, field.label_field, field.pred_field
    energy = F(metric_field(heatmap_field, "object_energy"))
    area = F(metric_field(heatmap_field, "object_area"))
    hit = F(metric_field(heatmap_field, "pointing_hit"))
    border = F(metric_field(heatmap_field, "border_energy"))
    e = {
        # focus < x  <=>  energy < area + x * (1 - area), with no division
        "measured": (energy != None) & (area != None) & (area <= t.max_object_area),  # noqa: E711
        "background": energy < area + t.background_focus * (1 - area),
        "on_object": energy >= area + t.object_focus * (1 - area),
        "missed": hit == False,  # noqa: E712 (a query expression)
        "border": border >= t.border_energy,
    }
    if field.label_class is not None:
        # one class of a multi-label run: the class's probability is on
        # its heatmap; a sample without an object of the class has area 0
        c = field.label_class
        labelled = F(f"{label_field}.classifications").filter(F("label") == c).length() > 0
        predicted = F(f"{pred_field}.classifications").filter(F("label") == c).length() > 0
        e.update(
            measured=e["measured"] & (area > 0),
            labelled=labelled,
            wrong=labelled != predicted,
            right=labelled & predicted,
            confident=F(f"{heatmap_field}.confidence") >= t.confidence,
            # the model is sure the labelled class is not there
            confident_absent=labelled & ~predicted & (F(f"{heatmap_field}.confidence") <= 1 - t.confidence),
        )
        return e
    if field.reliance_prefix is not None:
        # the intervention's verdicts (cam_plugin.runs.reliance): with the
        # object painted over the class survives, or without the background
        # it dies; "only" is both at once
        obj_flip = F(f"{field.reliance_prefix}_obj_flip")
        bg_flip = F(f"{field.reliance_prefix}_bg_flip")
        e.update(
            # tested, and the class tested is the run's prediction (a
            # reliance run of another model explains other predictions)
            tested=(F(f"{field.reliance_prefix}_bg_reliance") != None)  # noqa: E711
            & (F(f"{field.reliance_prefix}_reliance_class") == F(f"{pred_field}.label")),
            background_carries=(obj_flip == False) | (bg_flip == True),  # noqa: E712
            only_background=(obj_flip == False) & (bg_flip == True),  # noqa: E712
            only_object=(obj_flip == True) & (bg_flip == False),  # noqa: E712
        )
    correct = field.correct_field
    e["confident"] = F(f"{pred_field}.confidence") >= t.confidence
    if label_field is None:
        return e
    e["wrong"] = (
        (F(correct) == False) if correct  # noqa: E712
        else F(f"{pred_field}.label") != F(f"{label_field}.label")
    )
    e["right"] = (
        (F(correct) == True) if correct  # noqa: E712
        else F(f"{pred_field}.label") == F(f"{label_field}.label")
    )
    e["confident_disagreement"] = e["wrong"] & e["confident"]
    return e


def build_views(samples, heatmap_field="cam", label_field=None, pred_field=None, thresholds=None):
    """The attention views, unsaved: a dict from view name to view (the
    names of :data:`VIEW_DESCRIPTIONS`; only those of
    :data:`GROUND_TRUTH_FREE_VIEWS` for a field without ground truth)."""
    t = thresholds or Thresholds()
    field = _fields(samples, heatmap_field, label_field, pred_field)
    label_field, pred_field = field.label_field, field.pred_field
    e = _expressions(field, t)
    # (metrics imply the map they were measured on)
    predicted = samples.exists(pred_field)
    views = {}
    if label_field is not None:
        base = samples.exists(label_field).exists(pred_field).match(e["measured"])
        views = {
            "misclassified_background": base.match(e["wrong"] & e["background"]),
            "misclassified_on_object": base.match(e["wrong"] & e["on_object"]),
            "correct_background": base.match(e["right"] & e["background"]),
        }
        if field.label_class is not None:
            # labelled, looked at the object, and sure it is not there
            views["qa_confident_disagreement"] = base.match(e["confident_absent"] & e["on_object"])
        else:
            views["qa_confident_disagreement"] = base.match(e["confident_disagreement"] & e["on_object"])
    if field.label_class is not None:
        # a confident class with no labelled object of it, or whose peak is
        # off every one of them: an object may be missing from the labels
        unlabelled = samples.exists(pred_field).exists(heatmap_field).match(e["confident"])
        off = e["measured"] & e["missed"] & e["background"]
        if label_field is not None:
            # (the stored labels of every computed sample; None where the
            # sample has no labels at all, or they could not be read)
            unlabelled = unlabelled.exists(label_field).match(~e["labelled"] | off)
        else:
            # no ground truth: the peak is off every labelled object of the
            # class, or there is none of them
            area = F(metric_field(heatmap_field, "object_area"))
            unlabelled = unlabelled.match((area == 0) | off)
        views["qa_unlabelled_attention"] = unlabelled
    else:
        # needs no image class: with a class map, the samples whose labels
        # map to nothing are measured against their boxes all the same
        views["qa_unlabelled_attention"] = predicted.match(
            e["measured"] & e["confident"] & e["missed"] & e["background"]
        )
    views["border_attention"] = predicted.match(e["border"])
    if field.reliance_prefix is not None:
        tested = predicted.match(e["measured"] & e["tested"])
        if label_field is not None:
            judged = tested.exists(label_field)
            views["confirmed_background_reliance"] = judged.match(
                e["wrong"] & e["background"] & e["background_carries"]
            )
            views["confirmed_correct_background"] = judged.match(
                e["right"] & e["background"] & e["background_carries"]
            )
        views["unfaithful_heatmap"] = tested.match(
            (e["on_object"] & e["only_background"]) | (e["background"] & e["only_object"])
        )
    return views


def saved_view_name(heatmap_field, name):
    return f"{heatmap_field}_{name}"


def attention_views(
    samples,
    heatmap_field="cam",
    label_field=None,
    pred_field=None,
    thresholds=None,
    save=True,
):
    """Builds (and by default saves on the dataset) the attention views.

    Saved views are named ``<heatmap_field>_<view name>`` and replace earlier
    ones of the same name, so they follow the current thresholds.
    """
    views = build_views(samples, heatmap_field, label_field, pred_field, thresholds)
    if save:
        dataset = samples._root_dataset
        t = thresholds or Thresholds()
        for name, view in views.items():
            dataset.save_view(
                saved_view_name(heatmap_field, name),
                view,
                description=f"{view_description(name)} (background focus < "
                f"{t.background_focus}, object focus >= {t.object_focus}, object area <= "
                f"{t.max_object_area}, confidence >= {t.confidence})",
                overwrite=True,
            )
    return views


class ClassSummary(list):
    """The per-class rows of :func:`class_summary` (a list of dicts, most
    off-object class first), and the samples no row counts.

    Attributes:
        unmapped: samples with a prediction whose ground-truth labels map to
            nothing under the run's class map (or that have no object), so
            they are judged in no class; 0 for runs without a class map
        unmapped_labels: per label of the run's ground truth, how many of
            those samples carry it (e.g. ``{"person": 61}``): what a larger
            class map could cover
    """

    def __init__(self, rows=(), unmapped=0, unmapped_labels=None):
        super().__init__(rows)
        self.unmapped = unmapped
        self.unmapped_labels = dict(unmapped_labels or {})


def _unmapped(samples, field):
    """The samples with a prediction but no image class, and the labels of
    the ground truth they were read from."""
    from collections import Counter

    if field.correct_field is None:
        return 0, {}
    unjudged = samples.exists(field.pred_field).exists(field.label_field, False)
    labels = Counter()
    source = samples.get_field(field.source_field) if field.source_field else None
    if isinstance(source, fo.EmbeddedDocumentField):
        doc_type = source.document_type
        path = field.source_field + (
            ".detections.label" if issubclass(doc_type, fo.Detections)
            else ".polylines.label" if issubclass(doc_type, fo.Polylines)
            else ".label"
        )
        for value in unjudged.values(path):
            names = value if isinstance(value, list) else [value]
            labels.update({n for n in names if n is not None})
    return unjudged.count(), dict(labels.most_common())


def class_summary(samples, heatmap_field="cam", label_field=None, pred_field=None, thresholds=None):
    """Per ground-truth class: how often and how strongly attention falls off
    the object, ranked with the most off-object class first.

    Classes are ranked by the lower end of the 95% Wilson interval of their
    off-object share, so a class needs both a high share and the samples to
    back it; classes with fewer than ``thresholds.min_samples`` measured
    samples come last whatever their share.

    Returns:
        a list of dicts with ``class``, ``samples`` (measured ones),
        ``off_object`` (count), ``off_object_share``, ``off_object_low`` and
        ``off_object_high`` (its 95% interval), ``enough_samples``,
        ``mean_focus``, ``mean_object_energy``, ``accuracy`` and
        ``misclassified_background`` (count), as a :class:`ClassSummary`
        whose ``unmapped`` counts the samples a class map judged in no
        class. For one class's field of a multi-label run, the one row of
        that class over the samples labelled with it (``accuracy`` is then
        its recall); :func:`label_summary` ranks every class
    """
    t = thresholds or Thresholds()
    field = _fields(samples, heatmap_field, label_field, pred_field, summary=True)
    label_field, pred_field, correct_field = field.label_field, field.pred_field, field.correct_field
    e = _expressions(field, t)
    measured = samples.exists(label_field).exists(pred_field).match(e["measured"])
    if field.label_class is not None:
        c = field.label_class
        predicted, energy, area = measured.match(e["labelled"]).values(
            [
                f"{pred_field}.classifications.label",
                metric_field(heatmap_field, "object_energy"),
                metric_field(heatmap_field, "object_area"),
            ]
        )
        rows = _summary_rows([c] * len(energy), [c in (p or []) for p in predicted], energy, area, t)
        return ClassSummary(rows)
    gt, pred, energy, area, *verdicts = measured.values(
        [
            f"{label_field}.label",
            f"{pred_field}.label",
            metric_field(heatmap_field, "object_energy"),
            metric_field(heatmap_field, "object_area"),
        ]
        + ([correct_field] if correct_field else [])
    )
    right = verdicts[0] if correct_field else [p == g for p, g in zip(pred, gt)]
    return ClassSummary(_summary_rows(gt, right, energy, area, t), *_unmapped(samples, field))


def _summary_rows(gt, right, energy, area, t):
    """The ranked rows of :func:`class_summary` from each measured sample's
    class, verdict, object energy and object area."""
    by_class = defaultdict(list)
    for g, r, en, ar in zip(gt, right, energy, area):
        by_class[g].append((bool(r), en, ar))

    rows = []
    for name, items in by_class.items():
        right = np.array([r for r, _, _ in items])
        en = np.array([x for _, x, _ in items], dtype=np.float64)
        ar = np.array([x for _, _, x in items], dtype=np.float64)
        # an object covering the whole image leaves no background to tell
        # attention apart from: its focus is 0 (neither on nor off), and
        # "off" uses the views' division-free form of focus < threshold
        covered = ar >= 1
        focus = np.where(covered, 0.0, (en - ar) / np.where(covered, 1.0, 1 - ar))
        off = ~covered & (en < ar + t.background_focus * (1 - ar))
        low, high = wilson_interval(int(off.sum()), len(items))
        rows.append(
            {
                "class": name,
                "samples": len(items),
                "off_object": int(off.sum()),
                "off_object_share": float(off.mean()),
                "off_object_low": low,
                "off_object_high": high,
                "enough_samples": len(items) >= t.min_samples,
                "mean_focus": float(focus.mean()),
                "mean_object_energy": float(en.mean()),
                "accuracy": float(right.mean()),
                "misclassified_background": int((off & ~right).sum()),
            }
        )

    rows.sort(key=_rank)
    return rows


def _rank(row):
    return (
        not row["enough_samples"],
        -row["off_object_low"],
        -row["off_object_share"],
        row["mean_focus"],
        row["class"],
    )


def label_summary(samples, heatmap_field="cam", thresholds=None):
    """:func:`class_summary` for every class of a multi-label run, ranked
    together: per class, over the samples labelled with it, how often its
    map falls off its objects, and its recall (``accuracy``). Each row
    also names the class's ``heatmap_field``. Classes whose field has no
    attention metrics yet (:func:`cam_plugin.compute_label_attention`) are
    left out.

    Args:
        heatmap_field ("cam"): the ``heatmap_field`` the multi-label CAM run
            was given
    """
    config = runs.multilabel_run(samples, heatmap_field)
    if config is None:
        raise ViewsError(
            f"No multi-label CAM run made the heatmaps of '{heatmap_field}': for a "
            "single-label run, use class_summary"
        )
    schema = samples.get_field_schema()
    measured = [f for f in config["class_fields"].values() if metric_field(f, "object_energy") in schema]
    if not measured:
        raise ViewsError(
            f"No class of '{heatmap_field}' has attention metrics on objects yet: run "
            "compute_label_attention with a region field"
        )
    rows = [
        dict(row, heatmap_field=field)
        for field in measured
        for row in class_summary(samples, field, thresholds=thresholds)
    ]
    rows.sort(key=_rank)
    return ClassSummary(rows)


def class_view(samples, heatmap_field, label_field, pred_field, class_name, thresholds=None):
    """The samples of one ground-truth class whose attention is off the
    object (what a bar of the summary plot opens)."""
    t = thresholds or Thresholds()
    field = _fields(samples, heatmap_field, label_field, pred_field, summary=True)
    label_field, pred_field = field.label_field, field.pred_field
    e = _expressions(field, t)
    if field.label_class is not None:
        if class_name != field.label_class:
            return samples.limit(0)
        return (
            samples.exists(label_field).exists(pred_field)
            .match(e["labelled"] & e["measured"] & e["background"])
        )
    return (
        samples.match(F(f"{label_field}.label") == class_name)
        .exists(pred_field)
        .match(e["measured"] & e["background"])
    )
