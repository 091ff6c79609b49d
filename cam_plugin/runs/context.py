"""The context run type: what the map looks at, named by the dataset's own
labels. Per sample, the share of a heatmap's mass on each context class (a
semantic mask's classes, grass, sky, road..., or other objects' labels),
written as ``fo.Classifications`` in ``<heatmap_field>_context`` (label =
the class, confidence = its share) so the App's sidebar filters it.

Shares are computed at the stored map's resolution, the labels sampled at
its pixel centres (as :mod:`~cam_plugin.runs.attention` does). Objects of
one class that overlap count once per pixel; objects of different classes
that overlap count for each, so shares may add up to more than 1 for
objects and never do for a semantic mask.
"""

from concurrent.futures import ThreadPoolExecutor

import torch

import fiftyone as fo

from ..engine import ErrorKind, SampleError
from ..regions import region_labels, region_mask, segmentation_values
from ..store.writer import SampleOutput
from . import records
from .attention import AttentionError, cam_run_of, embedded_type, int_mask_targets, load_map
from .base import RunType, check_collection

CONTEXT_TYPES = (fo.Segmentation, fo.Detections, fo.Detection, fo.Polylines, fo.Polyline)


class ContextError(AttentionError):
    """Context shares that cannot be computed as asked."""


def shares_field(heatmap_field):
    """The field of a heatmap field's context shares: ``<heatmap_field>_context``."""
    return f"{heatmap_field}_context"


class ContextRunType(RunType):
    """One :func:`cam_plugin.compute_context` run: validated on
    construction, executed by the driver."""

    method = records.CONTEXT_RUN
    positional = ("heatmap_field", "context_field")

    def __init__(
        self,
        samples,
        heatmap_field="cam",
        context_field=None,
        min_share=0.01,
        classes=None,
        run_key=None,
        batch_size=256,
        device=None,
    ):
        samples = check_collection(samples)
        self.samples = samples
        self.dataset = samples._root_dataset
        self.heatmap_field = heatmap_field
        self.candidate_field = heatmap_field
        self.key = run_key or f"{heatmap_field}_context"
        self.min_share = float(min_share)
        if not 0 <= self.min_share <= 1:
            raise ContextError(f"min_share must be a share between 0 and 1, not {min_share!r}")
        self.classes = sorted(classes) if classes is not None else None
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

        if embedded_type(samples, heatmap_field) is not fo.Heatmap:
            raise ContextError(f"'{heatmap_field}' is not an fo.Heatmap field of dataset '{self.dataset.name}'")
        if context_field is None:
            raise ContextError(
                "context_field is required: a semantic segmentation (fo.Segmentation with "
                "mask targets) or objects (fo.Detections / fo.Polylines) whose classes name "
                "what the map looks at"
            )
        ctype = embedded_type(samples, context_field)
        if ctype not in CONTEXT_TYPES:
            raise ContextError(
                f"context_field '{context_field}' must hold a segmentation, detections or "
                f"polylines; it holds {ctype.__name__ if ctype else 'no labels'}"
            )
        self.context_field = context_field
        self.is_segmentation = ctype is fo.Segmentation
        self.mask_targets = int_mask_targets(samples, context_field) if self.is_segmentation else {}

        self.cam_key, _ = cam_run_of(samples, heatmap_field)
        self.output_field = shares_field(heatmap_field)
        self.error_field = f"{heatmap_field}_context_error"
        self.done_fields = (self.output_field,)
        self._fields = {
            self.output_field: (fo.EmbeddedDocumentField, fo.Classifications),
            self.error_field: (fo.StringField, None),
        }
        records.check_fields(samples, self.key, self._fields)

    def config(self):
        return {
            "heatmap_field": self.heatmap_field,
            "context_field": self.context_field,
            "min_share": self.min_share,
            "classes": self.classes,
            "mask_targets": {str(k): v for k, v in sorted(self.mask_targets.items())}
            if self.is_segmentation else None,
        }

    def fields(self):
        return dict(self._fields)

    def depends_on(self):
        return [self.cam_key] if self.cam_key else []

    def outputs(self, ids, files):
        with ThreadPoolExecutor(max_workers=4) as pool:
            for start in range(0, len(ids), self.batch_size):
                yield self._compute_chunk(ids[start : start + self.batch_size], pool)

    def _compute_chunk(self, chunk, pool):
        view = self.samples.select(chunk, ordered=True)
        chunk, heatmaps, labels = view.values(["id", self.heatmap_field, self.context_field])
        maps = list(pool.map(load_map, heatmaps))
        batch = []
        for i, sample_id in enumerate(chunk):
            error = None
            if maps[i] is None:
                where = getattr(heatmaps[i], "map_path", None) or "its map"
                error = f"the heatmap {where} cannot be read"
            else:
                try:
                    shares = self.shares(torch.from_numpy(maps[i]).to(self.device), labels[i])
                except (OSError, ValueError) as e:
                    error = (
                        str(e) if "heatmap" in str(e)
                        else f"the context labels in '{self.context_field}' cannot be read: {e}"
                    )
                else:
                    if shares is None:
                        error = "the heatmap is zero everywhere: there is no attention to share out"
            if error is not None:
                failure = SampleError(i, ErrorKind.INPUT, error)
                batch.append(SampleOutput(sample_id, {self.error_field: failure.message}, error=failure))
                continue
            kept = sorted(
                ((name, share) for name, share in shares.items() if share >= self.min_share and share > 0),
                key=lambda x: (-x[1], x[0]),
            )
            values = {
                self.output_field: fo.Classifications(
                    classifications=[fo.Classification(label=n, confidence=s) for n, s in kept]
                ),
                self.error_field: None,
            }
            batch.append(SampleOutput(sample_id, values))
        return batch

    def shares(self, heat, label):
        """``{context class: share of the map's mass}`` of one map (a (h, w)
        tensor) over one sample's context labels; None for a map that is
        zero everywhere. Classes outside ``classes`` are left out."""
        shares = class_shares(heat, label, self.is_segmentation, self.mask_targets)
        if shares is not None and self.classes is not None:
            shares = {k: v for k, v in shares.items() if k in self.classes}
        return shares


def class_shares(heat, label, is_segmentation, mask_targets):
    """``{context class: share of the map's mass}`` of one map (a (h, w)
    tensor) over one sample's context labels (a segmentation named by
    ``mask_targets``, or objects named by label); None for a map that is
    zero everywhere."""
    heat = heat.double()
    if not bool(torch.isfinite(heat).all()):
        raise ValueError("the heatmap holds NaN or infinite values")
    heat = heat.clamp_min(0)
    total = float(heat.sum())
    if total <= 0:
        return None
    if label is None:
        return {}
    h, w = heat.shape
    shares = {}
    if is_segmentation:
        values = segmentation_values(label, w, h, device=heat.device).flatten()
        mass = torch.bincount(values.clamp_min(0), weights=heat.flatten())
        for value in torch.nonzero(mass).flatten().tolist():
            name = mask_targets.get(value)
            if name is None and value == 0:
                continue  # unnamed 0: no label
            shares[name if name is not None else str(value)] = float(mass[value]) / total
    else:
        for name in sorted(region_labels(label)):
            mask = region_mask(label, w, h, classes={name}, device=heat.device)
            shares[name] = float(heat[mask].sum()) / total
    return shares
