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
    """

    background_focus: float = 0.15
    object_focus: float = 0.4
    max_object_area: float = 0.6
    confidence: float = 0.8


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


def _fields(samples, heatmap_field, label_field, pred_field):
    owner = runs.field_owners(samples).get(heatmap_field)
    config = runs.get_run(samples, owner) if owner else {}
    label_field = label_field or config.get("label_field")
    pred_field = pred_field or config.get("pred_field")
    if label_field is None or pred_field is None:
        raise ViewsError(
            "The views need the ground-truth field (label_field) and the "
            "predictions (pred_field); pass them, or compute the heatmaps "
            "with compute_cams(label_field=...)"
        )

    energy = metric_field(heatmap_field, "object_energy")
    if energy not in samples.get_field_schema():
        raise ViewsError(
            f"'{energy}' does not exist: run compute_attention on "
            f"'{heatmap_field}' with a region_field first"
        )
    return label_field, pred_field


def _expressions(heatmap_field, label_field, pred_field, t):
    energy = F(metric_field(heatmap_field, "object_energy"))
    area = F(metric_field(heatmap_field, "object_area"))
    hit = F(metric_field(heatmap_field, "pointing_hit"))
    # focus < x  <=>  energy < area + x * (1 - area), with no division
    return {
        "measured": (energy != None) & (area != None) & (area <= t.max_object_area),
        "background": energy < area + t.background_focus * (1 - area),
        "on_object": energy >= area + t.object_focus * (1 - area),
        "wrong": F(f"{pred_field}.label") != F(f"{label_field}.label"),
        "right": F(f"{pred_field}.label") == F(f"{label_field}.label"),
        "confident": F(f"{pred_field}.confidence") >= t.confidence,
        "missed": hit == False,  # noqa: E712 (a query expression)
    }


def build_views(samples, heatmap_field="cam", label_field=None, pred_field=None, thresholds=None):
    """The attention views, unsaved: a dict from view name to view."""
    t = thresholds or Thresholds()
    label_field, pred_field = _fields(samples, heatmap_field, label_field, pred_field)
    e = _expressions(heatmap_field, label_field, pred_field, t)
    base = samples.exists(label_field).exists(pred_field).match(e["measured"])
    return {
        "misclassified_background": base.match(e["wrong"] & e["background"]),
        "misclassified_on_object": base.match(e["wrong"] & e["on_object"]),
        "correct_background": base.match(e["right"] & e["background"]),
        "qa_confident_disagreement": base.match(e["wrong"] & e["confident"] & e["on_object"]),
        "qa_unlabelled_attention": base.match(e["confident"] & e["missed"] & e["background"]),
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


def class_summary(samples, heatmap_field="cam", label_field=None, pred_field=None, thresholds=None):
    """Per ground-truth class: how often and how strongly attention falls off
    the object, ranked with the most off-object class first.

    Returns:
        a list of dicts with ``class``, ``samples`` (measured ones),
        ``off_object`` (count), ``off_object_share``, ``mean_focus``,
        ``mean_object_energy``, ``accuracy`` and
        ``misclassified_background`` (count)
    """
    t = thresholds or Thresholds()
    label_field, pred_field = _fields(samples, heatmap_field, label_field, pred_field)
    e = _expressions(heatmap_field, label_field, pred_field, t)
    measured = samples.exists(label_field).exists(pred_field).match(e["measured"])
    gt, pred, energy, area = measured.values(
        [
            f"{label_field}.label",
            f"{pred_field}.label",
            metric_field(heatmap_field, "object_energy"),
            metric_field(heatmap_field, "object_area"),
        ]
    )

    by_class = defaultdict(list)
    for g, p, en, ar in zip(gt, pred, energy, area):
        by_class[g].append((p == g, en, ar))

    rows = []
    for name, items in by_class.items():
        right = np.array([r for r, _, _ in items])
        en = np.array([x for _, x, _ in items], dtype=np.float64)
        ar = np.array([x for _, _, x in items], dtype=np.float64)
        focus = (en - ar) / (1 - ar)
        off = focus < t.background_focus
        rows.append(
            {
                "class": name,
                "samples": len(items),
                "off_object": int(off.sum()),
                "off_object_share": float(off.mean()),
                "mean_focus": float(focus.mean()),
                "mean_object_energy": float(en.mean()),
                "accuracy": float(right.mean()),
                "misclassified_background": int((off & ~right).sum()),
            }
        )

    rows.sort(key=lambda r: (-r["off_object_share"], r["mean_focus"], r["class"]))
    return rows


def class_view(samples, heatmap_field, label_field, pred_field, class_name, thresholds=None):
    """The samples of one ground-truth class whose attention is off the
    object (what a bar of the summary plot opens)."""
    t = thresholds or Thresholds()
    label_field, pred_field = _fields(samples, heatmap_field, label_field, pred_field)
    e = _expressions(heatmap_field, label_field, pred_field, t)
    return (
        samples.match(F(f"{label_field}.label") == class_name)
        .exists(pred_field)
        .match(e["measured"] & e["background"])
    )
