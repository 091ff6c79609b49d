"""How the plugin's heatmap fields look in the App: distinct colorscales and
field colours in the dataset's color scheme, the predicted-class heatmap
shown in the grid by default, and field descriptions (the sidebar's field
tooltip) saying what the colours mean.

Why the colorscales carry ``rgb``: the App paints a heatmap with the
``rgb`` lookup table of its field's colorscale, and falls back to the App's
default colorscale (viridis) when there is none. FiftyOne's server computes
that table when the App asks for a color scheme through GraphQL, but the
scheme a session hands to the App (``session.color_scheme``, a copy of the
dataset's made when the dataset is loaded) is sent as stored, so a stored
``{"path": ..., "name": "jet"}`` reaches the painter without a table and
every heatmap is drawn in viridis (FiftyOne 1.22). The plugin therefore
stores the table, computed from the entry's own ``name`` or ``list`` the
way FiftyOne's server computes it, next to them.
"""

import fiftyone as fo

COLORSCALES = {"pred": "jet", "gt": "viridis"}
FIELD_COLORS = {"pred": "#ff4d00", "gt": "#1f77ff"}
OTHER_COLORSCALE = "plasma"

#: what the ends of the colorscales the plugin picks look like
COLOR_WORDS = {
    "jet": ("blue", "red"),
    "viridis": ("purple", "yellow"),
    "plasma": ("blue", "yellow"),
}

METHOD_NAMES = {
    "cam": "CAM",
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
    "scorecam": "Score-CAM",
    "eigencam": "Eigen-CAM",
    "ablationcam": "Ablation-CAM",
    "guided-gradcam": "Guided Grad-CAM",
    "gradcam-counterfactual": "counterfactual Grad-CAM",
}

# the key of the plugin's own entry in a field's ``info`` (a dict, which
# the App's field tooltip does not show)
INFO_KEY = "cam_plugin"


def apply(dataset, targets):
    """Sets the App appearance of a CAM run's heatmap fields on the dataset:
    see :func:`apply_color_scheme` and :func:`show_by_default`."""
    apply_color_scheme(dataset, targets)
    if "pred" in targets:
        show_by_default(dataset, targets["pred"])
    dataset.save()


def show_by_default(dataset, field):
    """Makes a heatmap field active (checked in the sidebar) by default.

    FiftyOne leaves dense labels (heatmaps, segmentations) unchecked when a
    dataset sets no active fields; the heatmap is what this plugin is for,
    so its field joins the defaults. An explicit choice of the user's is
    extended, never replaced.
    """
    active = dataset.app_config.active_fields
    if active is None:
        active = fo.DatasetAppConfig.default_active_fields(dataset)
    if active.exclude:
        active.paths = [p for p in active.paths if p != field]
    elif field not in active.paths:
        active.paths = list(active.paths) + [field]
    dataset.app_config.active_fields = active


def apply_color_scheme(dataset, targets):
    """Gives the heatmap fields distinct colorscales (and field colours) in
    the dataset's App color scheme, without touching what the user set.

    Heatmaps are drawn with their colorscale when the scheme colours by
    value, so an unset ``color_by`` becomes ``"value"``. Every colorscale of
    the heatmap fields, the user's included, gets the ``rgb`` table the App
    paints with (see the module's docstring), computed from its own
    ``name`` or ``list``: without it the App draws them all in viridis.

    Args:
        dataset: the dataset
        targets: a dict mapping target names (``pred``, ``gt``, ...) to
            heatmap field names
    """
    scheme = dataset.app_config.color_scheme or fo.ColorScheme()
    colorscales = [dict(c) for c in scheme.colorscales or []]
    fields = list(scheme.fields or [])
    scaled = {c.get("path") for c in colorscales}
    coloured = {f.get("path") for f in fields}
    for target, field in targets.items():
        if field not in scaled:
            colorscales.append({"path": field, "name": COLORSCALES.get(target, OTHER_COLORSCALE)})
        if field not in coloured and target in FIELD_COLORS:
            fields.append({"path": field, "fieldColor": FIELD_COLORS[target]})

    ours = set(targets.values())
    for entry in colorscales:
        if entry.get("path") in ours:
            rgb = colormap(entry)
            if rgb is not None:
                entry["rgb"] = rgb

    scheme.colorscales = colorscales
    scheme.fields = fields
    if scheme.color_by is None:
        scheme.color_by = "value"
    dataset.app_config.color_scheme = scheme


def colormap(entry):
    """The App's lookup table of a colorscale entry (``name`` or ``list``):
    256 ``[r, g, b]`` colours, as FiftyOne's server computes it; None when
    the entry names no colorscale plotly knows."""
    import fiftyone.core.plots.plotly as fop

    data = entry.get("name") or [
        [item.get("value"), item.get("color")] for item in entry.get("list") or []
    ]
    if not data:
        return None
    try:
        return [list(color) for color in fop.get_colormap(data)]
    except Exception:  # an invalid name or list: the App cannot draw it either
        return None


def colorscale_of(dataset, field):
    """The name of a field's colorscale in the dataset's color scheme
    (``"custom"`` for a list of colours, None if it has none)."""
    scheme = dataset.app_config.color_scheme
    for entry in (scheme.colorscales if scheme else None) or []:
        if entry.get("path") == field:
            return entry.get("name") or ("custom" if entry.get("list") else None)
    return None


def heatmap_description(method, subject, colorscale, scale, dataset_max=None):
    """What a heatmap field's colours mean, in one short paragraph (at most
    250 characters, which the App's field tooltip shows in full)."""
    method = METHOD_NAMES.get(method, method or "CAM")
    low, high = COLOR_WORDS.get(colorscale, ("first colour", "last colour"))
    name = colorscale or "colorscale"
    if scale == "dataset":
        peak = f" ({dataset_max:.3g})" if dataset_max else ""
        return (
            f"{method} map of {subject}. {name}: {low} = weak, {high} = the dataset's "
            f"largest value{peak}. One scale for all samples: the same colour is the "
            "same value on every image. Below 10% of it: transparent."
        )
    return (
        f"{method} map of {subject}. {name}: {low} = weak, {high} = the map's own "
        "maximum. Each map is scaled to itself: colours compare places within an "
        "image, not across images. Its weakest 10%: transparent."
    )


def describe_heatmap(dataset, field, *, method, subject, scale, dataset_max=None, run_key=None):
    """Sets a heatmap field's ``description`` and ``info`` (shown in the App
    when the pointer rests on the field in the sidebar): what the map is
    of, what its colours mean, and whether it is scaled per map or
    dataset-wide.

    A description the user wrote (one the plugin did not write last) is
    kept; the plugin's ``info`` entries are updated, the user's kept.
    Saves the dataset.
    """
    schema_field = dataset.get_field(field)
    if schema_field is None:
        return
    colorscale = colorscale_of(dataset, field)
    text = heatmap_description(method, subject, colorscale, scale, dataset_max)
    info = dict(schema_field.info or {})
    ours = dict(info.get(INFO_KEY) or {})
    if schema_field.description in (None, "", ours.get("description")):
        schema_field.description = text
    low, high = COLOR_WORDS.get(colorscale, ("low", "high"))
    info["colorscale"] = f"{colorscale or 'default'} ({low} = weak, {high} = strong)"
    if scale == "dataset":
        info["scale"] = "dataset-wide: " + (
            f"{high} = {dataset_max:.3g}, the dataset's largest value" if dataset_max else "one scale"
        )
    else:
        info["scale"] = f"per map: {high} = each map's own maximum"
    info["map of"] = subject
    info["method"] = METHOD_NAMES.get(method, method)
    info[INFO_KEY] = dict(
        ours,
        run=run_key,
        scale=scale,
        dataset_max=dataset_max,
        description=text,
    )
    schema_field.info = info
    schema_field.save()
