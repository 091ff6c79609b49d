"""How the plugin's heatmap fields look in the App: distinct colorscales and
field colours in the dataset's color scheme, and the predicted-class heatmap
shown in the grid by default."""

import fiftyone as fo

COLORSCALES = {"pred": "jet", "gt": "viridis"}
FIELD_COLORS = {"pred": "#ff4d00", "gt": "#1f77ff"}
OTHER_COLORSCALE = "plasma"


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
    value, so an unset ``color_by`` becomes ``"value"``.

    Args:
        dataset: the dataset
        targets: a dict mapping target names (``pred``, ``gt``, ...) to
            heatmap field names
    """
    scheme = dataset.app_config.color_scheme or fo.ColorScheme()
    colorscales = list(scheme.colorscales or [])
    fields = list(scheme.fields or [])
    scaled = {c.get("path") for c in colorscales}
    coloured = {f.get("path") for f in fields}
    for target, field in targets.items():
        if field not in scaled:
            colorscales.append({"path": field, "name": COLORSCALES.get(target, OTHER_COLORSCALE)})
        if field not in coloured and target in FIELD_COLORS:
            fields.append({"path": field, "fieldColor": FIELD_COLORS[target]})

    scheme.colorscales = colorscales
    scheme.fields = fields
    if scheme.color_by is None:
        scheme.color_by = "value"
    dataset.app_config.color_scheme = scheme
