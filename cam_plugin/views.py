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
    """

    background_focus: float = 0.15
    object_focus: float = 0.4
    max_object_area: float = 0.6
    confidence: float = 0.8
    min_samples: int = 5


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
}


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
    """

    heatmap_field: str
    label_field: str = None
    pred_field: str = None
    problem: str = None
    correct_field: str = None
    source_field: str = None

    @property
    def usable(self):
        return self.problem is None


def _attention_config(samples, heatmap_field):
    for key in runs.list_runs(samples, runs.ATTENTION_RUN):
        config = runs.get_run(samples, key, derive=False)
        if config.get("heatmap_field") == heatmap_field or config.get("gt_heatmap_field") == heatmap_field:
            return config
    return {}


def describe_field(samples, heatmap_field, label_field=None, pred_field=None):
    """The :class:`AttentionField` of one heatmap field: its ground truth
    and predictions (given, or those of the runs that made and measured it)
    and what, if anything, keeps the views from using it."""
    schema = samples.get_field_schema()
    owner = runs.field_owners(samples).get(heatmap_field)
    config = runs.get_run(samples, owner, derive=False) if owner else {}
    measured = _attention_config(samples, heatmap_field)
    correct_field = source_field = None
    if config.get("correct_field") and label_field in (
        None, config.get("label_field"), config.get("gt_class_field")
    ):
        # judged by the run's class map: its stored classes and verdicts
        correct_field, source_field = config["correct_field"], config.get("label_field")
        label_field = config.get("gt_class_field")
    label_field = label_field or config.get("label_field") or measured.get("label_field")
    pred_field = pred_field or config.get("pred_field")

    def field(problem):
        return AttentionField(heatmap_field, label_field, pred_field, problem, correct_field, source_field)

    if heatmap_field not in schema:
        return field(f"'{heatmap_field}' is not a field of this dataset")
    if metric_field(heatmap_field, "object_energy") not in schema:
        return field(
            f"'{heatmap_field}' has no attention metrics on objects yet: run "
            f"'Compute attention metrics' (compute_attention) on it with a region field"
        )
    if label_field is None:
        return field(
            f"'{heatmap_field}' was computed without ground truth, and the views compare "
            "predictions with it: compute the maps again with a ground-truth field "
            "(compute_cams(label_field=...)), or pass label_field"
        )
    if label_field not in schema:
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


def _fields(samples, heatmap_field, label_field, pred_field):
    field = describe_field(samples, heatmap_field, label_field, pred_field)
    if field.problem:
        raise ViewsError(field.problem[0].upper() + field.problem[1:])
    return field


def _expressions(heatmap_field, label_field, pred_field, t, correct_field=None):
    energy = F(metric_field(heatmap_field, "object_energy"))
    area = F(metric_field(heatmap_field, "object_area"))
    hit = F(metric_field(heatmap_field, "pointing_hit"))
    # focus < x  <=>  energy < area + x * (1 - area), with no division
    return {
        "measured": (energy != None) & (area != None) & (area <= t.max_object_area),
        "background": energy < area + t.background_focus * (1 - area),
        "on_object": energy >= area + t.object_focus * (1 - area),
        "wrong": (F(correct_field) == False)  # noqa: E712 (a query expression)
        if correct_field
        else F(f"{pred_field}.label") != F(f"{label_field}.label"),
        "right": (F(correct_field) == True)  # noqa: E712
        if correct_field
        else F(f"{pred_field}.label") == F(f"{label_field}.label"),
        "confident": F(f"{pred_field}.confidence") >= t.confidence,
        "missed": hit == False,  # noqa: E712 (a query expression)
    }


def build_views(samples, heatmap_field="cam", label_field=None, pred_field=None, thresholds=None):
    """The attention views, unsaved: a dict from view name to view."""
    t = thresholds or Thresholds()
    field = _fields(samples, heatmap_field, label_field, pred_field)
    label_field, pred_field = field.label_field, field.pred_field
    e = _expressions(heatmap_field, label_field, pred_field, t, field.correct_field)
    base = samples.exists(label_field).exists(pred_field).match(e["measured"])
    # needs no image class: with a class map, the samples whose labels map
    # to nothing are measured against their boxes all the same
    unjudged = samples.exists(pred_field).match(e["measured"]) if field.correct_field else base
    return {
        "misclassified_background": base.match(e["wrong"] & e["background"]),
        "misclassified_on_object": base.match(e["wrong"] & e["on_object"]),
        "correct_background": base.match(e["right"] & e["background"]),
        "qa_confident_disagreement": base.match(e["wrong"] & e["confident"] & e["on_object"]),
        "qa_unlabelled_attention": unjudged.match(e["confident"] & e["missed"] & e["background"]),
    }


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
                description=f"{VIEW_DESCRIPTIONS[name]} (background focus < "
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
        class
    """
    t = thresholds or Thresholds()
    field = _fields(samples, heatmap_field, label_field, pred_field)
    label_field, pred_field, correct_field = field.label_field, field.pred_field, field.correct_field
    e = _expressions(heatmap_field, label_field, pred_field, t, correct_field)
    measured = samples.exists(label_field).exists(pred_field).match(e["measured"])
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

    rows.sort(
        key=lambda r: (
            not r["enough_samples"],
            -r["off_object_low"],
            -r["off_object_share"],
            r["mean_focus"],
            r["class"],
        )
    )
    return ClassSummary(rows, *_unmapped(samples, field))


def class_view(samples, heatmap_field, label_field, pred_field, class_name, thresholds=None):
    """The samples of one ground-truth class whose attention is off the
    object (what a bar of the summary plot opens)."""
    t = thresholds or Thresholds()
    field = _fields(samples, heatmap_field, label_field, pred_field)
    label_field, pred_field = field.label_field, field.pred_field
    e = _expressions(heatmap_field, label_field, pred_field, t, field.correct_field)
    return (
        samples.match(F(f"{label_field}.label") == class_name)
        .exists(pred_field)
        .match(e["measured"] & e["background"])
    )
