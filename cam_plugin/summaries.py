"""Per-class summaries of what the model relies on: the background
intervention's (:func:`reliance_summary`) and the attention on context
labels (:func:`context_summary`, :func:`context_view`)."""

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from fiftyone import ViewField as F

from . import runs
from .class_map import ClassMap
from .runs.attention import cam_run_of
from .runs.context import shares_field
from .views import ViewsError


@dataclass
class RelianceRow:
    """One class of :func:`reliance_summary`.

    Attributes:
        class_name: the ground-truth class (the predicted one without
            ground truth)
        samples: its tested samples
        mean_reliance: the mean of ``bg_reliance`` (+1: the background
            carries the predictions, -1: the object does)
        bg_flip_rate: the share of predictions that change when the
            background is removed
        obj_flip_rate: the share that change when the object is removed
        accuracy: the share of right predictions on the unmodified images
            (None without ground truth)
        accuracy_without_background: the share still right with the
            background removed (with ``fill="swap"``: on another class's
            background, ImageNet-9's Mixed-Rand)
        background_gap: ``accuracy - accuracy_without_background``
        enough_samples: at least ``min_samples`` tested samples
    """

    class_name: str
    samples: int
    mean_reliance: float
    bg_flip_rate: float
    obj_flip_rate: float
    accuracy: float = None
    accuracy_without_background: float = None
    background_gap: float = None
    enough_samples: bool = True


@dataclass
class ContextRow:
    """One class of :func:`context_summary`.

    Attributes:
        class_name: the ground-truth (or predicted) class
        samples: its samples with context shares
        misclassified: how many of them are misclassified
        shares: ``{context class: mean share of attention}`` over its
            samples, largest first (a sample without the class counts 0)
        misclassified_shares: the same over its misclassified samples
        enough_samples: at least ``min_samples`` samples
    """

    class_name: str
    samples: int
    misclassified: int
    shares: dict = field(default_factory=dict)
    misclassified_shares: dict = field(default_factory=dict)
    enough_samples: bool = True

    @property
    def top(self):
        """The context class with the most attention and its share, or
        ``(None, 0.0)``."""
        return next(iter(self.shares.items()), (None, 0.0))


def _run_config(samples, method, key, value, missing):
    """The record of the first run of ``method`` whose ``key`` is ``value``;
    :class:`ViewsError` ``missing`` when there is none."""
    for run_key in runs.list_runs(samples, method):
        config = runs.get_run(samples, run_key, derive=False)
        if config.get(key) == value:
            return config
    raise ViewsError(missing)


def _reliance_config(samples, prefix):
    return _run_config(
        samples, runs.records.RELIANCE_RUN, "prefix", prefix,
        f"No reliance run wrote the fields '{prefix}_*' on this dataset: run "
        f"compute_reliance(..., prefix='{prefix}') first",
    )


def _judge(samples, pred_field):
    """``(predicted, ground truth) -> right?`` for the CAM run that made
    ``pred_field``: by its class map when it has one, else by name."""
    _, config = cam_run_of(samples, pred_field) if pred_field else (None, {})
    if config.get("class_map"):
        class_map = ClassMap.load(config["class_map"])
        return lambda pred, gt: class_map.is_correct(gt, pred)
    return lambda pred, gt: pred == gt


def reliance_summary(samples, prefix="cam", label_field=None, min_samples=5):
    """See :func:`cam_plugin.reliance_summary`; a list of
    :class:`RelianceRow`, the most background-reliant class first."""
    config = _reliance_config(samples, prefix)
    label_field = label_field or config.get("label_field")
    if label_field and label_field not in samples.get_field_schema():
        raise ViewsError(
            f"the ground-truth field '{label_field}' of reliance run '{prefix}' no longer exists: "
            "pass label_field"
        )
    names = ["bg_reliance", "bg_flip", "obj_flip", "reliance_class", "bg_removed_label"]
    paths = [f"{prefix}_{n}" for n in names]
    tested = samples.exists(paths[0])
    if label_field:
        tested = tested.exists(label_field)
        paths.append(f"{label_field}.label")
    values = tested.values(paths)
    reliance, bg_flip, obj_flip, predicted, without_bg = values[:5]
    gt = values[5] if label_field else None
    right = _judge(samples, config.get("pred_field"))

    by_class = defaultdict(list)
    for i, cls in enumerate(gt if gt is not None else predicted):
        by_class[cls].append(i)

    rows = []
    for cls, rows_of in by_class.items():
        r = np.array([reliance[i] for i in rows_of], dtype=float)
        row = RelianceRow(
            class_name=cls,
            samples=len(rows_of),
            mean_reliance=float(r.mean()),
            bg_flip_rate=float(np.mean([bool(bg_flip[i]) for i in rows_of])),
            obj_flip_rate=float(np.mean([bool(obj_flip[i]) for i in rows_of])),
            enough_samples=len(rows_of) >= min_samples,
        )
        if gt is not None:
            row.accuracy = float(np.mean([bool(right(predicted[i], cls)) for i in rows_of]))
            row.accuracy_without_background = float(np.mean([bool(right(without_bg[i], cls)) for i in rows_of]))
            row.background_gap = row.accuracy - row.accuracy_without_background
        rows.append(row)
    rows.sort(key=lambda row: (not row.enough_samples, -row.mean_reliance, row.class_name))
    return rows


def _context_config(samples, heatmap_field):
    return _run_config(
        samples, runs.records.CONTEXT_RUN, "heatmap_field", heatmap_field,
        f"'{heatmap_field}' has no context shares yet: run compute_context(..., "
        f"heatmap_field='{heatmap_field}', context_field=...) first",
    )


def _class_fields(samples, heatmap_field, by, label_field, pred_field):
    """The predictions and ground-truth fields the context summary groups
    and judges by."""
    if by not in ("gt", "pred"):
        raise ViewsError(f"by must be 'gt' or 'pred', not {by!r}")
    from .views import describe_field

    described = describe_field(samples, heatmap_field, label_field, pred_field)
    if described.label_class is not None:
        raise ViewsError("the context summary groups single-label predictions; this is a multi-label field")
    label_field, pred_field = described.label_field, described.pred_field
    if pred_field is None:
        raise ViewsError(f"the predictions of '{heatmap_field}' are unknown: pass pred_field")
    if by == "gt" and label_field is None:
        raise ViewsError(
            f"'{heatmap_field}' was computed without ground truth: pass label_field, or by='pred'"
        )
    return label_field, pred_field


def context_summary(samples, heatmap_field="cam", by="gt", label_field=None, pred_field=None, min_samples=5):
    """See :func:`cam_plugin.context_summary`; a list of :class:`ContextRow`."""
    _context_config(samples, heatmap_field)
    label_field, pred_field = _class_fields(samples, heatmap_field, by, label_field, pred_field)
    shares_path = shares_field(heatmap_field)
    measured = samples.exists(shares_path).exists(pred_field)
    paths = [f"{shares_path}.classifications", f"{pred_field}.label"]
    if label_field:
        measured = measured.exists(label_field)
        paths.append(f"{label_field}.label")
    values = measured.values(paths)
    shares, predicted = values[0], values[1]
    gt = values[2] if label_field else [None] * len(shares)
    right = _judge(samples, pred_field)

    by_class = defaultdict(list)
    for s, p, g in zip(shares, predicted, gt):
        wrong = g is not None and not right(p, g)
        by_class[g if by == "gt" else p].append(({c.label: c.confidence for c in s or []}, wrong))

    rows = []
    for cls, items in by_class.items():
        wrong_items = [d for d, w in items if w]
        rows.append(
            ContextRow(
                class_name=cls,
                samples=len(items),
                misclassified=len(wrong_items),
                shares=_mean_shares([d for d, _ in items]),
                misclassified_shares=_mean_shares(wrong_items),
                enough_samples=len(items) >= min_samples,
            )
        )
    rows.sort(key=lambda row: (not row.enough_samples, -row.top[1], row.class_name))
    return rows


def _mean_shares(dicts):
    totals = defaultdict(float)
    for d in dicts:
        for name, share in d.items():
            totals[name] += share
    means = {name: total / len(dicts) for name, total in totals.items()} if dicts else {}
    return dict(sorted(means.items(), key=lambda x: (-x[1], x[0])))


def context_view(samples, heatmap_field, class_name, context_class, by="gt", misclassified=False,
                 min_share=0.0, label_field=None, pred_field=None):
    """See :func:`cam_plugin.context_view`."""
    _context_config(samples, heatmap_field)
    label_field, pred_field = _class_fields(samples, heatmap_field, by, label_field, pred_field)
    share = F(f"{shares_field(heatmap_field)}.classifications").filter(
        (F("label") == context_class) & (F("confidence") >= min_share)
    )
    view = samples.match(F(f"{label_field if by == 'gt' else pred_field}.label") == class_name)
    view = view.exists(pred_field).match(share.length() > 0)
    if misclassified:
        if label_field is None:
            raise ViewsError("misclassified samples need ground truth: pass label_field")
        _, config = cam_run_of(samples, pred_field)
        correct = config.get("correct_field")
        view = view.match(
            (F(correct) == False) if correct  # noqa: E712
            else F(f"{pred_field}.label") != F(f"{label_field}.label")
        )
    # most attention on the context class first
    return view.sort_by(share.map(F("confidence")).max(), reverse=True)


def reliance_view(samples, class_name, prefix="cam", label_field=None):
    """See :func:`cam_plugin.reliance_view`."""
    config = _reliance_config(samples, prefix)
    label_field = label_field or config.get("label_field")
    class_path = f"{label_field}.label" if label_field else f"{prefix}_reliance_class"
    return (
        samples.match(F(class_path) == class_name)
        .exists(f"{prefix}_bg_reliance")
        .sort_by(f"{prefix}_bg_reliance", reverse=True)
    )
