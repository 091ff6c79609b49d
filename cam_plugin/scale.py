"""How a CAM run's heatmaps are scaled in the App: each to its own maximum
(``"map"``) or all to the largest value of their field in the dataset
(``"dataset"``), see :func:`cam_plugin.heatmaps.display_range`.

Only the labels' ``range`` changes, in one server-side update of the
field's samples (no PNG is rewritten, no label is loaded); the run's record
keeps each heatmap field's scale (``heatmap_scale``: field -> scale), which
the run applies again whenever it finishes a call, so that samples added
later (and a larger maximum among them) are scaled alike. The fields'
descriptions say which scale they are drawn with.
"""

from datetime import datetime

from . import appearance
from .heatmaps import DISPLAY_THRESHOLD, HEATMAP_RANGE, PNG_MAX, check_scale
from .runs import records
from .runs.records import RunError

#: the record entry holding each heatmap field's scale
RECORD_KEY = "heatmap_scale"


def set_heatmap_scale(samples, heatmap_field, scale):
    """Switches a heatmap field of a :func:`cam_plugin.compute_cams` run to
    another display scale, on every sample of the dataset that has it.

    Args:
        samples: a dataset or view (the scale applies to the whole
            dataset's field)
        heatmap_field: a heatmap field a CAM run made (``cam``, ``cam_gt``,
            ...)
        scale: ``"map"`` (each map scaled to its own maximum) or
            ``"dataset"`` (one scale for the dataset: the same raw value,
            the same colour on every sample)

    The run's colorscales get their colour tables again as well (see
    :mod:`cam_plugin.appearance`), should the scheme have been saved from
    the App's colour settings, which store it without them.

    Returns:
        the dataset-wide maximum of the field's raw values (None if no
        sample has a map)

    Raises:
        RunError: when the field is not a heatmap field of one of the
            plugin's CAM runs (a field of the user's or of another tool is
            never touched)
    """
    check_scale(scale)
    dataset = samples._root_dataset
    key, config = _owning_run(samples, heatmap_field)
    records.RunRecord.of(dataset, key).update(**{f"{RECORD_KEY}.{heatmap_field}": scale})
    # the colour tables again too: a scheme saved from the App's colour
    # settings is stored without them (see cam_plugin.appearance)
    appearance.apply_color_scheme(dataset, config.get("targets") or {})
    dataset.save()
    return apply_field_scale(dataset, key, config, heatmap_field, scale)


def apply_run_scales(dataset, run_key, scale=None):
    """Applies a CAM run's recorded scales to its heatmap fields (and
    describes them); with ``scale``, records that scale for all of them
    first. What the run does at the end of every call."""
    record = records.RunRecord.of(dataset, run_key)
    config = record.read() or {}
    scales = _scales_of(config)
    if scale is not None:
        scales = {f: check_scale(scale) for f in scales}
    if scales != config.get(RECORD_KEY):
        # a new run records its (default) scale, so that get_run says it
        record.update(**{RECORD_KEY: scales})
        config = dict(config, **{RECORD_KEY: scales})
    return {field: apply_field_scale(dataset, run_key, config, field, s) for field, s in scales.items()}


def apply_field_scale(dataset, run_key, config, field, scale):
    """Sets the ranges of one heatmap field's labels for ``scale`` and
    describes the field; returns the field's dataset-wide raw maximum."""
    coll = dataset._sample_collection
    peak = dataset_max(dataset, field)
    present = {field: {"$type": "object"}}
    now = datetime.utcnow()
    if scale == "dataset" and peak:
        raw_max = f"${field}.raw_max"
        stop = {"$divide": [PNG_MAX * peak, raw_max]}
        wanted = [{"$multiply": [DISPLAY_THRESHOLD, stop]}, stop]
        scaled = {f"{field}.raw_max": {"$gt": 0}}
        coll.update_many(
            dict(scaled, **{"$expr": {"$ne": [f"${field}.range", wanted]}}),
            [{"$set": {f"{field}.range": wanted, "last_modified_at": now}}],
        )
        # maps that are zero everywhere (or have no maximum) keep the
        # per-map range: there is nothing to scale
        others = {"$and": [present, {f"{field}.raw_max": {"$not": {"$gt": 0}}}]}
    else:
        others = present
    default = [float(v) for v in HEATMAP_RANGE]
    coll.update_many(
        {"$and": [others, {f"{field}.range": {"$ne": default}}]},
        {"$set": {f"{field}.range": default, "last_modified_at": now}},
    )
    _describe(dataset, run_key, config, field, scale, peak)
    return peak


def dataset_max(dataset, field):
    """The largest ``raw_max`` of a heatmap field over the dataset's samples
    (None when no sample has a non-zero map)."""
    result = list(
        dataset._sample_collection.aggregate(
            [
                {"$match": {f"{field}.raw_max": {"$gt": 0}}},
                {"$group": {"_id": None, "peak": {"$max": f"${field}.raw_max"}}},
            ]
        )
    )
    return float(result[0]["peak"]) if result else None


def _owning_run(samples, field):
    owner = records.field_owners(samples).get(field)
    config = records.get_run(samples, owner, derive=False) if owner is not None else None
    if config is None or config.get("method") != records.CAM_RUN or field not in _heatmap_fields(config):
        whose = (
            "is not a field of this plugin" if owner is None
            else f"belongs to run '{owner}' but is not one of its heatmaps"
        )
        raise RunError(
            f"Field '{field}' {whose}: only the heatmap fields of a compute_cams "
            "run can be rescaled"
        )
    return owner, config


def _heatmap_fields(config):
    return list((config.get("targets") or {}).values())


def _scales_of(config):
    recorded = config.get(RECORD_KEY) or {}
    return {f: recorded.get(f, "map") for f in _heatmap_fields(config)}


def _subject(dataset, config, target, field):
    if target == "pred":
        return "the predicted class"
    if target == "gt":
        label_field = config.get("label_field")
        return f"the ground-truth class ({label_field})" if label_field else "the ground-truth class"
    if target.startswith("top") and target[3:].isdigit():
        rank = int(target[3:])
        suffix = {2: "nd", 3: "rd"}.get(rank if rank < 20 else rank % 10, "th")
        return f"the {rank}{suffix} most probable class"
    doc = dataset._sample_collection.find_one(
        {f"{field}.target": {"$type": "string"}}, {f"{field}.target": 1}
    )
    name = (doc or {}).get(field, {}).get("target")
    return f"the class '{name}'" if name else "a fixed class"


def _describe(dataset, run_key, config, field, scale, peak):
    target = next((t for t, f in (config.get("targets") or {}).items() if f == field), "")
    appearance.describe_heatmap(
        dataset,
        field,
        method=config.get("cam_method"),
        subject=_subject(dataset, config, target, field),
        scale=scale,
        dataset_max=peak,
        run_key=run_key,
    )
