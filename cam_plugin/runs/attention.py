"""The attention run type: metrics of a dataset's heatmaps against its
labelled regions, written as scalar fields the App can filter on.

For a heatmap field ``F`` (and its ground-truth-class twin ``F_gt``, which
uses the same region) this writes ``F_object_energy``, ``F_object_area``,
``F_pointing_hit`` and ``F_border_energy``, plus ``F_pred_gt_agreement``
(top-20% IoU of the two maps). See :mod:`cam_plugin.metrics` for the
definitions. A sample whose map cannot be read, or is zero everywhere,
gets ``F_attention_error`` instead.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import fiftyone as fo

from ..engine import ErrorKind, SampleError
from ..heatmaps import read_levels
from ..images import ImageError, displayed_size
from ..metrics import attention_metrics, top_fraction_iou
from ..regions import default_region_classes, region_labels, region_mask
from ..store.writer import SampleOutput
from . import records
from .base import RunType, check_collection

REGION_METRICS = ("object_energy", "object_area", "pointing_hit")
AGREEMENT = "pred_gt_agreement"
REGION_TYPES = (
    fo.Detections,
    fo.Detection,
    fo.Polylines,
    fo.Polyline,
    fo.Segmentation,
    fo.Heatmap,
)


class AttentionError(ValueError):
    """Attention metrics that cannot be computed as asked."""


def metric_field(heatmap_field, metric):
    """The name of a metric field: ``<heatmap_field>_<metric>``."""
    return f"{heatmap_field}_{metric}"


def embedded_type(samples, field_name):
    """The label type an embedded-document field holds, or None."""
    field = samples.get_field(field_name)
    if isinstance(field, fo.EmbeddedDocumentField):
        return field.document_type
    return None


def cam_run_of(samples, field):
    """The key and record of the CAM run that made ``field`` (a heatmap or
    predictions field), or ``(None, {})``."""
    owner = records.field_owners(samples).get(field)
    if owner is None:
        return None, {}
    config = records.get_run(samples, owner)
    return (owner, config) if config.get("method") == records.CAM_RUN else (None, {})


def image_class_field(samples, cam_config, label_field=None):
    """The ``fo.Classification`` field of each image's class that a run
    measuring the CAM run ``cam_config``'s outputs finds its region by:
    ``label_field`` if given, else the CAM run's (a run judging by a class
    map or by objects stores each image's class in a field of its own),
    or None."""
    if label_field is None or label_field == cam_config.get("label_field"):
        label_field = cam_config.get("gt_class_field") or cam_config.get("label_field")
    if label_field is not None and embedded_type(samples, label_field) is not fo.Classification:
        raise AttentionError(
            f"label_field '{label_field}' must be an fo.Classification field (the "
            "image's class); to use objects as ground truth, pass them to "
            "compute_cams(label_field=...), whose run stores each image's class"
        )
    return label_field


def check_region_field(samples, region_field):
    """The ``{value: name}`` mask targets of a region field, after checking
    that it holds regions (:data:`REGION_TYPES`)."""
    rtype = embedded_type(samples, region_field)
    if rtype not in REGION_TYPES:
        raise AttentionError(
            f"region_field '{region_field}' must hold detections, "
            "polylines, a segmentation or a heatmap; it holds "
            f"{rtype.__name__ if rtype else 'no labels'}"
        )
    return int_mask_targets(samples, region_field)


def int_mask_targets(samples, field):
    """A segmentation field's ``{value: name}`` mask targets (the field's
    own, else the dataset's default), keyed by int."""
    masks = samples.mask_targets.get(field) or samples.default_mask_targets or {}
    try:
        return {int(k): v for k, v in masks.items()}
    except (TypeError, ValueError):
        raise AttentionError(
            f"The mask targets of '{field}' are RGB colours ({', '.join(list(map(str, masks))[:3])}): "
            "only masks of integer class values are supported; convert the masks to class ids"
        ) from None


def check_region_classes(region_classes):
    """``"gt"``, ``"all"`` or a sorted list of names."""
    if isinstance(region_classes, str) and region_classes not in ("gt", "all"):
        raise AttentionError("region_classes must be 'gt', 'all' or a list of label names")
    return region_classes if isinstance(region_classes, str) else sorted(region_classes)


def region_classes_of(label, region_classes, gt_label, mask_targets, label_class=None):
    """The classes whose objects form one sample's region (None: all of
    them), under a run's ``region_classes`` rule: ``"gt"``, the image's
    class (``gt_label``; all objects when none of them has it), ``"all"``,
    or a list of names."""
    if region_classes == "all":
        return None
    if region_classes == "gt" and label_class is not None:
        return {label_class}
    if region_classes == "gt":
        return default_region_classes(gt_label, region_labels(label, mask_targets))
    return set(region_classes)


class AttentionRunType(RunType):
    """One :func:`cam_plugin.compute_attention` run: validated on
    construction, executed by the driver."""

    method = records.ATTENTION_RUN
    #: the arguments compute_attention takes by position
    positional = ("heatmap_field", "region_field")

    def __init__(
        self,
        samples,
        heatmap_field="cam",
        region_field=None,
        label_field=None,
        gt_heatmap_field=None,
        region_classes="gt",
        mask_values=None,
        heatmap_threshold=0.5,
        tolerance=15.0,
        border=0.1,
        top_fraction=0.2,
        run_key=None,
        batch_size=256,
        device=None,
    ):
        samples = check_collection(samples)
        self.samples = samples
        self.dataset = samples._root_dataset
        self.heatmap_field = heatmap_field
        # samples without a map (failed CAMs) have nothing to measure
        self.candidate_field = heatmap_field
        self.region_field = region_field
        self.mask_values = set(mask_values) if mask_values is not None else None
        self.heatmap_threshold = heatmap_threshold
        self.tolerance = float(tolerance)
        self.border = float(border)
        self.top_fraction = float(top_fraction)
        self.key = run_key or f"{heatmap_field}_attention"
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

        if embedded_type(samples, heatmap_field) is not fo.Heatmap:
            raise AttentionError(
                f"'{heatmap_field}' is not an fo.Heatmap field of dataset "
                f"'{self.dataset.name}'"
            )

        self.cam_key, cam_config = cam_run_of(samples, heatmap_field)
        if gt_heatmap_field is None:
            targets = cam_config.get("targets") or {}
            gt_heatmap_field = targets.get("gt") if targets.get("pred") == heatmap_field else None
        if gt_heatmap_field is not None and embedded_type(samples, gt_heatmap_field) is not fo.Heatmap:
            raise AttentionError(f"'{gt_heatmap_field}' is not an fo.Heatmap field")
        self.gt_heatmap_field = gt_heatmap_field

        # a multi-label run's field of one class: its region is that
        # class's objects (region_classes="gt"), whatever else is labelled
        self.label_class = records.label_class(cam_config, heatmap_field)
        if self.label_class is not None and label_field in (None, cam_config.get("label_field")):
            label_field = None
        else:
            label_field = image_class_field(samples, cam_config, label_field)
        self.label_field = label_field

        self.mask_targets = check_region_field(samples, region_field) if region_field is not None else {}
        self.region_classes = check_region_classes(region_classes)

        self.map_fields = [heatmap_field] + ([gt_heatmap_field] if gt_heatmap_field else [])
        self._fields = {}
        for f in self.map_fields:
            if region_field is not None:
                self._fields[metric_field(f, "object_energy")] = (fo.FloatField, None)
                self._fields[metric_field(f, "object_area")] = (fo.FloatField, None)
                self._fields[metric_field(f, "pointing_hit")] = (fo.BooleanField, None)
            self._fields[metric_field(f, "border_energy")] = (fo.FloatField, None)
        if gt_heatmap_field:
            self._fields[metric_field(heatmap_field, AGREEMENT)] = (fo.FloatField, None)
        self.error_field = metric_field(heatmap_field, "attention_error")
        self._fields[self.error_field] = (fo.StringField, None)
        self.done_fields = (metric_field(heatmap_field, "border_energy"),)

        records.check_fields(samples, self.key, self._fields)

    def config(self):
        return {
            "heatmap_field": self.heatmap_field,
            "gt_heatmap_field": self.gt_heatmap_field,
            "region_field": self.region_field,
            "label_field": self.label_field,
            "region_classes": self.region_classes,
            "label_class": self.label_class,
            "mask_values": sorted(self.mask_values) if self.mask_values is not None else None,
            "heatmap_threshold": self.heatmap_threshold,
            "tolerance": self.tolerance,
            "border": self.border,
            "top_fraction": self.top_fraction,
        }

    def fields(self):
        return dict(self._fields)

    def depends_on(self):
        return [self.cam_key] if self.cam_key else []


    def outputs(self, ids, files):
        with ThreadPoolExecutor(max_workers=4) as pool:
            for start in range(0, len(ids), self.batch_size):
                yield self._compute_chunk(ids[start : start + self.batch_size], pool)

    def _read(self, chunk):
        paths = ["id", "filepath", "metadata", self.heatmap_field]
        paths += [p for p in (self.gt_heatmap_field, self.region_field) if p]
        if self.label_field:
            paths.append(f"{self.label_field}.label")
        view = self.samples.select(chunk, ordered=True)
        return dict(zip(paths, view.values(paths)))

    def _compute_chunk(self, chunk, pool):
        data = self._read(chunk)
        chunk = data["id"]  # without samples deleted since the ids were read
        n = len(chunk)
        out = {name: {} for name in self._fields}

        maps = {f: list(pool.map(load_map, data[f])) for f in self.map_fields}

        regions = [None] * n
        tolerances = [self.tolerance] * n
        for i in range(n):
            pred_map = maps[self.heatmap_field][i]
            if pred_map is None:
                continue
            h, w = pred_map.shape
            image_w = self._image_width(data["filepath"][i], data["metadata"][i], w, h)
            tolerances[i] = round(self.tolerance * w / image_w * 2) / 2 if image_w else self.tolerance
            if self.region_field is not None:
                regions[i] = self._region(data, i, w, h)

        for f in self.map_fields:
            groups = {}
            for i, m in enumerate(maps[f]):
                if m is not None:
                    groups.setdefault((m.shape, tolerances[i], regions[i] is None), []).append(i)

            for (shape, tol, no_region), rows in groups.items():
                stacked = torch.from_numpy(np.stack([maps[f][i] for i in rows])).to(self.device)
                region_t = None
                if self.region_field is not None and not no_region:
                    region_t = torch.stack([regions[i] for i in rows]).to(self.device)
                metrics = attention_metrics(stacked, region_t, tolerance=tol, border=self.border)
                for name, vals in metrics.items():
                    field_name = metric_field(f, name)
                    if field_name not in out:
                        continue
                    for i, v in zip(rows, vals.tolist()):
                        out[field_name][chunk[i]] = _as_field_value(v, name)

        if self.gt_heatmap_field:
            pairs = {}
            for i in range(n):
                a, b = maps[self.heatmap_field][i], maps[self.gt_heatmap_field][i]
                if a is not None and b is not None and a.shape == b.shape:
                    pairs.setdefault(a.shape, []).append(i)
            agreement_field = metric_field(self.heatmap_field, AGREEMENT)
            for rows in pairs.values():
                a = torch.from_numpy(np.stack([maps[self.heatmap_field][i] for i in rows]))
                b = torch.from_numpy(np.stack([maps[self.gt_heatmap_field][i] for i in rows]))
                iou = top_fraction_iou(a.to(self.device), b.to(self.device), self.top_fraction)
                for i, v in zip(rows, iou.tolist()):
                    out[agreement_field][chunk[i]] = _as_field_value(v, AGREEMENT)

        border_field = metric_field(self.heatmap_field, "border_energy")
        batch = []
        for i, sample_id in enumerate(chunk):
            values = {name: by_id.get(sample_id) for name, by_id in out.items()}
            error = None
            if maps[self.heatmap_field][i] is None:
                label = data[self.heatmap_field][i]
                where = getattr(label, "map_path", None) or "its map"
                error = SampleError(i, ErrorKind.INPUT, f"the heatmap {where} cannot be read")
            elif values[border_field] is None:
                error = SampleError(
                    i, ErrorKind.INPUT, "the heatmap is zero everywhere: there is no attention to measure"
                )
            if error is not None:
                values[self.error_field] = error.message
            batch.append(SampleOutput(sample_id, values, error=error))
        return batch

    def _region(self, data, i, width, height):
        label = data[self.region_field][i]
        if label is None:
            return None

        gt = data[f"{self.label_field}.label"][i] if self.label_field else None
        classes = region_classes_of(label, self.region_classes, gt, self.mask_targets, self.label_class)
        return region_mask(
            label,
            width,
            height,
            classes=classes,
            mask_values=self.mask_values,
            mask_targets=self.mask_targets,
            heatmap_threshold=self.heatmap_threshold,
        )

    @staticmethod
    def _image_width(filepath, metadata, map_w, map_h):
        """The displayed width of the image, so the tolerance (given in image
        pixels) can be converted to heatmap pixels."""
        if metadata is not None and metadata.width and metadata.height:
            w, h = metadata.width, metadata.height
            aspect = map_w / map_h
            # metadata may hold the stored size of an EXIF-rotated image
            return w if abs(w / h - aspect) <= abs(h / w - aspect) else h
        try:
            return displayed_size(filepath)[0]
        except ImageError:
            return None


def load_map(label):
    """A heatmap label's map as a float32 array (its stored levels), or
    None when there is none or it cannot be read."""
    if label is None:
        return None
    if label.map is not None:
        return np.asarray(label.map, dtype=np.float32)
    try:
        return read_levels(label.map_path)
    except (OSError, ValueError):
        return None


def _as_field_value(value, metric):
    if value != value:  # NaN: undefined for this sample
        return None
    if metric == "pointing_hit":
        return bool(value)
    return float(value)

