"""The cue run type: the places off the object that a map attends to, as
hotspots with embeddings, and their grouping into recurring cues.

Per sample (resumable, shardable like every run): the image goes through
the CAM run's model once more, its target layer's features captured; the
stored full-frame map gives the hotspots (:func:`cam_plugin.hotspots.find_hotspots`:
connected regions above a fraction of the map's maximum that lie mostly
outside the labelled region), and each hotspot's embedding is the layer's
features pooled under the map's weights inside the hotspot, projected to at
most ``dims`` dimensions by a seeded random projection (the same in every
process) and scaled to unit length. They are written as ``fo.Detections`` in
``<heatmap_field>_hotspots`` (full image frame) with the attributes
``share``, ``mean_attention``, ``on_object``, ``embedding`` and, when a
context field is known, ``context`` (the context class under most of the
hotspot's mass, other than the image's class and its object's) and
``context_share`` (the share of the hotspot's mass on it).

Once every sample is done, :func:`group_cues` clusters the embeddings and
writes each hotspot's ``group`` (1 = the group explaining the most
mistakes) and ``label`` (the group's name), saves a view per group, and
computes the Embeddings panel's visualization of the hotspot patches.
"""

import io
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

import fiftyone as fo
from fiftyone import ViewField as F

from ..cams.capture import LayerCapture, eval_mode, infer_layout
from ..engine import BatchRunner, ErrorKind, SampleError, image_loader, run_loader
from ..hotspots import find_hotspots, group_embeddings
from ..models import input_shape_of
from ..regions import region_labels, region_mask
from ..store.files import RunFiles, _write_atomic
from ..store.writer import SampleOutput
from . import records
from .attention import (
    AttentionError,
    cam_run_of,
    check_region_classes,
    check_region_field,
    embedded_type,
    image_class_field,
    int_mask_targets,
    load_map,
    region_classes_of,
)
from .base import RunType, cam_run_model, check_collection, model_outputs, run_device, stable_identity, values_by_id
from .context import CONTEXT_TYPES, class_shares

#: the label of a hotspot before grouping
UNGROUPED = "hotspot"
#: the subfolder of the run's directory holding the groups' thumbnails
THUMBNAILS = "thumbnails"
#: the subfolder holding each group's strip of thumbnails (for the panel)
STRIPS = "strips"


class CueError(AttentionError):
    """Cue discovery that cannot run as asked."""


def hotspots_field(heatmap_field):
    """The field of a heatmap field's hotspots: ``<heatmap_field>_hotspots``."""
    return f"{heatmap_field}_hotspots"


@dataclass
class CueGroup:
    """One group of similar hotspots: a recurring cue.

    Attributes:
        group: its number, 1 = the group explaining the most mistakes
        name: its dominant context class (see :func:`cam_plugin.group_cues`),
            else ``cue <group>``
        size: its hotspots
        samples: the samples holding them
        mistakes: the samples among them whose prediction is wrong
        mistake_rate: ``mistakes / samples`` of the judged samples
        gt_classes, pred_classes: ``{class: samples}``, most first
        mean_reliance: the mean background reliance of its samples, when a
            reliance run tested the CAM run's predictions, else None
        context: ``{context class: hotspots}`` of its hotspots' dominant
            context classes, most first
        typical: ids of its most typical hotspots (closest to its centre)
        typical_samples: the ids of their samples, in the same order
        thumbnails: crops of the typical hotspots (PNG paths, the hotspot
            outlined), in the same order
        strip: the thumbnails side by side in one PNG, or None
        view: the name of its saved view (its samples, only its hotspots)
        patches_view: the name of its saved patches view
    """

    group: int
    name: str
    size: int
    samples: int
    mistakes: int
    mistake_rate: float
    gt_classes: dict = field(default_factory=dict)
    pred_classes: dict = field(default_factory=dict)
    mean_reliance: float = None
    context: dict = field(default_factory=dict)
    typical: list = field(default_factory=list)
    typical_samples: list = field(default_factory=list)
    thumbnails: list = field(default_factory=list)
    strip: str = None
    view: str = None
    patches_view: str = None


class CuesRunType(RunType):
    """One :func:`cam_plugin.discover_cues` run: validated on construction,
    executed by the driver; grouping happens when the last sample is done."""

    method = records.CUES_RUN
    positional = ("heatmap_field",)
    #: the groups' typical hotspots, cropped for the Cues panel
    file_targets = (THUMBNAILS, STRIPS)

    def __init__(
        self,
        samples,
        model=None,
        heatmap_field="cam",
        region_field=None,
        region_classes=None,
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
    ):
        samples = check_collection(samples)
        self.samples = samples
        self.dataset = samples._root_dataset
        self.heatmap_field = heatmap_field
        self.candidate_field = heatmap_field
        self.key = run_key or f"{heatmap_field}_cues"
        if embedded_type(samples, heatmap_field) is not fo.Heatmap:
            raise CueError(f"'{heatmap_field}' is not an fo.Heatmap field of dataset '{self.dataset.name}'")
        self.min_share = _share(min_share, "min_share")
        self.fraction = _share(fraction, "fraction")
        self.max_on_object = _share(max_on_object, "max_on_object")
        for name, value in (("dims", dims), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or (name == "dims" and value < 2):
                raise CueError(f"{name} must be a whole number{' of at least 2' if name == 'dims' else ''}, not {value!r}")
        if num_groups is not None and (isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1):
            raise CueError(f"num_groups must be a positive whole number or None (chosen automatically), not {num_groups!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise CueError(f"batch_size must be a positive whole number, not {batch_size!r}")
        self.dims, self.seed, self.num_groups = dims, seed, num_groups
        self.brain_key = brain_key
        if brain_key not in (None, False) and (not isinstance(brain_key, str) or not brain_key.isidentifier()):
            raise CueError(f"Invalid brain_key {brain_key!r}: use letters, digits and underscores")

        self.cam_key, cam_config = cam_run_of(samples, heatmap_field)
        if not self.cam_key:
            raise CueError(
                f"No CAM run made '{heatmap_field}': cue discovery reads the CAM run's model "
                "and layer (run compute_cams first)"
            )
        self.layer = cam_config.get("layer")
        self.pred_field = cam_config.get("pred_field")
        self.label_field = image_class_field(samples, cam_config, label_field)
        self.region_field = region_field
        self.mask_targets = check_region_field(samples, region_field) if region_field else {}
        self.region_classes = check_region_classes("gt" if region_classes is None else region_classes)
        self.context_field = context_field or _context_field_of(samples, heatmap_field)
        if self.context_field is not None and embedded_type(samples, self.context_field) not in CONTEXT_TYPES:
            raise CueError(
                f"context_field '{self.context_field}' must hold a segmentation, detections or polylines"
            )
        self.context_is_mask = (
            self.context_field is not None and embedded_type(samples, self.context_field) is fo.Segmentation
        )
        self.context_targets = int_mask_targets(samples, self.context_field) if self.context_is_mask else {}

        resolved = cam_run_model(
            self.cam_key, cam_config, model, classes, transforms, trust_checkpoint, CueError,
            "the hotspots' embeddings", None,
        )
        self.model_spec, self.classifier, self.warnings = resolved.spec, resolved.classifier, resolved.warnings
        self.device, self.batch_size, self.num_workers = run_device(device, batch_size, num_workers)

        self.output_field = hotspots_field(heatmap_field)
        self.error_field = f"{heatmap_field}_hotspots_error"
        self.done_fields = (self.output_field,)
        self._fields = {
            self.output_field: (fo.EmbeddedDocumentField, fo.Detections),
            self.error_field: (fo.StringField, None),
        }
        records.check_fields(samples, self.key, self._fields)

        module = self.classifier.module
        self._restore_device = next((p.device for p in module.parameters()), torch.device("cpu"))
        module.to(self.device)
        try:
            self.input_shape = input_shape_of(self.classifier.transforms)
            self.channels = self._probe_channels()
        except BaseException:
            module.to(self._restore_device)
            raise
        self.projection = _projection(self.channels, self.dims, self.seed)

    def _probe_channels(self):
        # one blank pass finds the layer's width (and that it has a grid)
        blank = torch.zeros((1, *self.input_shape), device=self.device)
        module = self.classifier.module
        with torch.no_grad(), eval_mode(module), LayerCapture(module, self.layer) as capture:
            module(blank)
        layout = infer_layout(tuple(capture.raw.shape), self.input_shape[-2:])
        if layout is None:
            raise CueError(f"Layer '{self.layer}' has no spatial grid to pool hotspots over")
        return int(layout.to_nchw(capture.raw).shape[1])

    def config(self):
        clf = self.classifier
        return {
            "model": clf.name,
            "model_spec": self.model_spec,
            "model_fingerprint": clf.fingerprint,
            "transforms": stable_identity(clf.transforms),
            "layer": self.layer,
            "heatmap_field": self.heatmap_field,
            "pred_field": self.pred_field,
            "label_field": self.label_field,
            "region_field": self.region_field,
            "region_classes": self.region_classes,
            "context_field": self.context_field,
            "min_share": self.min_share,
            "fraction": self.fraction,
            "max_on_object": self.max_on_object,
            "dims": self.dims,
            "seed": self.seed,
        }

    def fields(self):
        return dict(self._fields)

    def depends_on(self):
        return [self.cam_key]

    def outputs(self, ids, files):
        if not ids:
            return
        label_path = f"{self.label_field}.label" if self.label_field else None
        paths = ["filepath", self.heatmap_field]
        paths += [p for p in (self.region_field, self.context_field, label_path) if p]
        rows = values_by_id(self.samples, ids, paths)
        ids = [i for i in ids if i in rows]
        columns = {p: [rows[i][k] for i in ids] for k, p in enumerate(paths)}
        loader = image_loader(
            columns["filepath"],
            self.classifier.transforms,
            min_side=max(self.input_shape[-2:]),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )

        def compute(group):
            inputs = group.tensor.to(self.device, non_blocking=True)
            module = self.classifier.module
            with torch.no_grad(), eval_mode(module), LayerCapture(module, self.layer) as capture:
                module(inputs)
            layout = infer_layout(tuple(capture.raw.shape), tuple(inputs.shape[-2:]))
            feats = layout.to_nchw(capture.raw).float().cpu().numpy()
            return [self._hotspots_of(item, feats[b], columns) for b, item in enumerate(group.items)]

        def output_of(sample_id, detections):
            if isinstance(detections, str):
                error = SampleError(0, ErrorKind.INPUT, detections)
                return SampleOutput(sample_id, {self.error_field: error.message}, error=error)
            return SampleOutput(
                sample_id, {self.output_field: fo.Detections(detections=detections), self.error_field: None}
            )

        runner = BatchRunner(compute, self.batch_size)
        yield from model_outputs(self, run_loader(loader, runner), ids, output_of, CueError)

    def _hotspots_of(self, item, feats, columns):
        """One sample's hotspots as ``fo.Detection`` s, or why there are none
        (a string)."""
        i = item.index
        heatmap = columns[self.heatmap_field][i]
        heat = load_map(heatmap)
        if heat is None:
            return f"the heatmap {getattr(heatmap, 'map_path', None) or 'of the sample'} cannot be read"
        heat = np.clip(np.nan_to_num(heat.astype(np.float64)), 0, None)
        map_h, map_w = heat.shape
        region = None
        gt = columns[f"{self.label_field}.label"][i] if self.label_field else None
        # a hotspot is off the object: it is never named by the object's class
        own = {gt} if gt else set()
        if self.region_field is not None and columns[self.region_field][i] is not None:
            label = columns[self.region_field][i]
            try:
                classes = region_classes_of(label, self.region_classes, gt, self.mask_targets)
                region = region_mask(label, map_w, map_h, classes=classes, mask_targets=self.mask_targets).numpy()
                own |= set(classes) if classes is not None else set(region_labels(label, self.mask_targets))
            except (OSError, ValueError, TypeError) as e:
                return f"the region in '{self.region_field}' cannot be read: {e}"
        spots = find_hotspots(heat, region, fraction=self.fraction, min_share=self.min_share, max_inside=self.max_on_object)
        if not spots:
            return []
        cells = _feature_cells(item.window, item.size, (map_h, map_w), feats.shape[1:])
        context = columns[self.context_field][i] if self.context_field else None
        flat = feats.reshape(feats.shape[0], -1)
        detections = []
        for spot in spots:
            weights = np.where(spot.mask, heat, 0.0)
            valid = cells >= 0
            pooled = np.bincount(cells[valid], weights=weights[valid], minlength=flat.shape[1])
            if pooled.sum() <= 0:
                continue  # outside the model's input: no features to pool
            vector = flat @ (pooled / pooled.sum())
            vector = vector @ self.projection if self.projection is not None else vector
            vector = vector / (np.linalg.norm(vector) or 1.0)
            attributes = dict(
                share=spot.share,
                mean_attention=spot.mean_attention,
                on_object=spot.inside,
                embedding=[float(v) for v in vector],
            )
            if context is not None:
                try:
                    shares = class_shares(torch.from_numpy(weights), context, self.context_is_mask, self.context_targets)
                except (OSError, ValueError) as e:
                    return f"the context labels in '{self.context_field}' cannot be read: {e}"
                shares = {k: v for k, v in (shares or {}).items() if k not in own and v > 0}
                if shares:
                    name, share = max(shares.items(), key=lambda kv: (kv[1], kv[0]))
                    attributes.update(context=name, context_share=float(share))
            detections.append(fo.Detection(label=UNGROUPED, bounding_box=spot.box, **attributes))
        return detections

    def finish(self, dataset):
        # the call that sees every sample done groups them (two shards that
        # end at once both may: the grouping is deterministic)
        todo = records.data_counts(self.samples, self.done_fields, self.error_field, self.candidate_field)["todo"]
        if todo == 0:
            group_cues(self.samples, self.heatmap_field, num_groups=self.num_groups, brain_key=self.brain_key,
                       seed=self.seed, run_key=self.key, busy_ok=True)

    def close(self):
        self.classifier.module.to(self._restore_device)


def _share(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise CueError(f"{name} must be a share between 0 and 1, not {value!r}")
    return float(value)


def _context_field_of(samples, heatmap_field):
    """The context field of a context run over ``heatmap_field``, if any."""
    for key in records.list_runs(samples, method=records.CONTEXT_RUN):
        config = records.get_run(samples, key, derive=False)
        if config.get("heatmap_field") == heatmap_field and config.get("context_field") in samples.get_field_schema():
            return config["context_field"]
    return None


def _projection(channels, dims, seed):
    """A (channels, dims) Gaussian random projection fixed by the seed and
    the width (every process and shard projects alike), or None when the
    layer is no wider than ``dims``."""
    if channels <= dims:
        return None
    rng = np.random.default_rng([seed, channels, dims])
    return rng.standard_normal((channels, dims)) / np.sqrt(dims)


def _feature_cells(window, image_size, map_hw, grid_hw):
    """For each pixel of a full-frame map, the flat index of the feature cell
    of the model input it falls in (-1 outside the input's window)."""
    x0, y0, x1, y1 = window
    width, height = image_size
    (map_h, map_w), (grid_h, grid_w) = map_hw, grid_hw
    px = (np.arange(map_w) + 0.5) * width / map_w
    py = (np.arange(map_h) + 0.5) * height / map_h
    cols = np.floor((px - x0) / (x1 - x0) * grid_w).astype(int)
    rows = np.floor((py - y0) / (y1 - y0) * grid_h).astype(int)
    cols = np.where((cols >= 0) & (cols < grid_w), cols, -1)
    rows = np.where((rows >= 0) & (rows < grid_h), rows, -1)
    cells = rows[:, None] * grid_w + cols[None, :]
    return np.where((rows[:, None] >= 0) & (cols[None, :] >= 0), cells, -1)


#: a grouping claimed longer ago than this was left by a dead process
GROUPING_STALE_S = 600


def group_cues(samples, heatmap_field="cam", num_groups=None, brain_key=None, seed=0, run_key=None, typical=6,
               busy_ok=False):
    """Groups the hotspots of a finished cue run into cues; see
    :func:`cam_plugin.group_cues`. One process at a time groups a run (two
    shards may end at once): with ``busy_ok`` a call that finds another
    grouping returns None, else it raises."""
    dataset = samples._root_dataset
    key = run_key or _cue_run_of(samples, heatmap_field)
    config = records.get_run(samples, key, derive=False)
    if config.get("method") != records.CUES_RUN:
        raise CueError(f"No cue run '{key}' on dataset '{dataset.name}': run discover_cues first")
    record = records.RunRecord.of(samples, key)
    token = records.new_token()
    if not _claim_grouping(record, token):
        if busy_ok:
            return None
        raise CueError(f"Another process is grouping the hotspots of run '{key}' now; try again when it ends")
    try:
        return _group(samples, dataset, key, record, records.get_run(samples, key, derive=False),
                      heatmap_field, num_groups, brain_key, seed, typical)
    finally:
        records._runs_collection().update_one(
            {"_id": record.doc_id, "config.grouping.token": token}, {"$set": {"config.grouping": None}}
        )


def _claim_grouping(record, token):
    """Takes the run's grouping unless a live process holds it (atomic)."""
    from datetime import datetime, timedelta

    now = datetime.utcnow()
    free = [
        {"config.grouping": {"$exists": False}},
        {"config.grouping": None},
        {"config.grouping.at": {"$lt": now - timedelta(seconds=GROUPING_STALE_S)}},
    ]
    result = records._runs_collection().update_one(
        {"_id": record.doc_id, "$or": free}, {"$set": {"config.grouping": {"token": token, "at": now}}}
    )
    return result.modified_count == 1


def _group(samples, dataset, key, record, config, heatmap_field, num_groups, brain_key, seed, typical):
    field_name = hotspots_field(heatmap_field)
    # the run's files are this dataset's own, not a clone's source's
    owns_files = bool(config.get("files_dir")) and str(config.get("dataset_id")) == str(dataset._doc.id)
    _remove_outputs(dataset, config, owns_files)

    view = samples.exists(field_name)
    pred_path = f"{config['pred_field']}.label" if config.get("pred_field") else None
    gt_path = f"{config['label_field']}.label" if config.get("label_field") else None
    reliance_path = _reliance_path(samples, config.get("pred_field"))
    paths = ["id", f"{field_name}.detections.id", f"{field_name}.detections.embedding",
             f"{field_name}.detections.context"] + [p for p in (pred_path, gt_path, reliance_path) if p]
    values = dict(zip(paths, view.values(paths)))
    sample_ids = values["id"]
    owners, spot_ids, vectors, contexts = [], [], [], []
    for s, (ids_, embs, ctxs) in enumerate(zip(*(values[p] for p in paths[1:4]))):
        for spot_id, emb, ctx in zip(ids_ or [], embs or [], ctxs or []):
            owners.append(s)
            spot_ids.append(spot_id)
            vectors.append(emb)
            contexts.append(ctx)
    if not vectors:
        record.update(groups=[], saved_views=[], brain_keys=[])
        return []
    x = np.asarray(vectors, dtype=np.float32)
    labels, k = group_embeddings(x, num_groups=num_groups if num_groups is None else min(num_groups, len(x)), seed=seed)
    owners = np.asarray(owners)

    def of(path, s):
        return values[path][s] if path else None

    raw = []
    for g in range(k):
        members = np.flatnonzero(labels == g)
        if not len(members):
            continue
        owned = sorted(set(owners[members].tolist()))
        judged = [s for s in owned if of(gt_path, s) is not None and of(pred_path, s) is not None]
        mistakes = sum(of(gt_path, s) != of(pred_path, s) for s in judged)
        reliance = [of(reliance_path, s) for s in owned if of(reliance_path, s) is not None]
        centre = x[members].mean(axis=0)
        closest = members[np.argsort(((x[members] - centre) ** 2).sum(axis=1))[:typical]]
        context = Counter(contexts[m] for m in members if contexts[m])
        raw.append(dict(
            index=g, size=len(members), samples=len(owned), mistakes=int(mistakes),
            mistake_rate=mistakes / len(judged) if judged else 0.0,
            gt_classes=dict(Counter(of(gt_path, s) for s in owned if of(gt_path, s) is not None).most_common()),
            pred_classes=dict(Counter(of(pred_path, s) for s in owned if of(pred_path, s) is not None).most_common()),
            mean_reliance=float(np.mean(reliance)) if reliance else None,
            context=dict(context.most_common()),
            typical=[spot_ids[m] for m in closest],
            typical_samples=[sample_ids[owners[m]] for m in closest],
        ))
    raw.sort(key=lambda r: (-r["mistakes"], -r["size"], r["index"]))
    groups, number_of, taken = [], {}, Counter()
    for n, r in enumerate(raw, start=1):
        name = f"cue {n}"
        if r["context"]:
            # named when one class is under most of the hotspots that lie on
            # any labelled context, and under a quarter of all of them
            top, count = next(iter(r["context"].items()))
            if count >= 0.5 * sum(r["context"].values()) and count >= 0.25 * r["size"]:
                taken[top] += 1
                name = top if taken[top] == 1 else f"{top} {taken[top]}"
        number_of[r.pop("index")] = (n, name)
        groups.append(CueGroup(group=n, name=name, **r))

    # each hotspot's group and name, written per sample
    spot_group = {spot_ids[m]: number_of[int(labels[m])] for m in range(len(spot_ids))}
    ids_by_sample = values[f"{field_name}.detections.id"]
    view.set_values(f"{field_name}.detections.group",
                    [[spot_group[i][0] for i in (ids_ or [])] for ids_ in ids_by_sample])
    view.set_values(f"{field_name}.detections.label",
                    [[spot_group[i][1] for i in (ids_ or [])] for ids_ in ids_by_sample])

    files = RunFiles(config["files_dir"], records.files_owner(config)) if owns_files else None
    if files is not None:
        boxes = dict(zip(spot_ids, (b for bs in _column(view, f"{field_name}.detections.bounding_box") for b in bs)))
        paths = dict(zip(sample_ids, view.values("filepath")))
        for g in groups:
            g.thumbnails = [
                _thumbnail(files, spot_id, paths[sample_id], boxes[spot_id])
                for spot_id, sample_id in zip(g.typical, g.typical_samples)
            ]
            g.strip = _strip(files, g.typical[0], [p for p in g.thumbnails if p]) if g.typical else None

    # the hotspots' attributes join the schema: the App's sidebar filters
    # them, the Embeddings panel reads the embeddings
    dataset.add_dynamic_sample_fields(fields=field_name)

    saved = []
    for g in groups:
        slug = re.sub(r"[^a-z0-9]+", "-", g.name.lower()).strip("-")
        g.view = f"{key}-{g.group}-{slug}"
        g.patches_view = f"{g.view}-patches"
        members = samples.filter_labels(field_name, F("group") == g.group)
        for name, v in ((g.view, members), (g.patches_view, members.to_patches(field_name))):
            if dataset.has_saved_view(name):
                raise CueError(f"A saved view '{name}' exists that this run did not make; rename or delete it")
            dataset.save_view(name, v, description=f"Cue '{g.name}' of run '{key}': {g.size} hotspots in {g.samples} samples")
            saved.append(name)

    brain_keys = []
    if brain_key is not False and len(x) >= 3:
        brain_key = brain_key or f"{key}_viz"
        import fiftyone.brain as fob

        if brain_key in dataset.list_brain_runs():
            raise CueError(f"A brain run '{brain_key}' exists that this run did not make; pass another brain_key")
        fob.compute_visualization(
            samples, patches_field=field_name, embeddings="embedding", brain_key=brain_key,
            seed=seed, verbose=False, progress=False, **_visualization_method(*x.shape),
        )
        brain_keys.append(brain_key)
    record.update(
        groups=[asdict(g) for g in groups], saved_views=saved, brain_keys=brain_keys
    )
    return groups


def _visualization_method(points, dims):
    """t-SNE separates groups best; it needs more points than its
    perplexity (30), and past a few thousand points it is slow: PCA then."""
    if 50 < points <= 5000:
        return dict(method="tsne", pca_dims=50 if dims > 50 else None)
    return dict(method="pca")


def _column(view, path):
    return [v or [] for v in view.values(path)]


def _thumbnail(files, spot_id, filepath, box, height=96):
    """Writes a crop of the image around a hotspot (the hotspot outlined,
    half its size again around it) and returns its path; None when the
    image cannot be read."""
    from ..images import load_rgb

    try:
        image, (width, full_height) = load_rgb(filepath)
    except ValueError:
        return None
    image = image.resize((width, full_height)) if image.size != (width, full_height) else image
    x, y, w, h = box
    side = max(w * width, h * full_height) * 2 + 16
    cx, cy = (x + w / 2) * width, (y + h / 2) * full_height
    crop = (int(max(0, cx - side / 2)), int(max(0, cy - side / 2)),
            int(min(width, cx + side / 2)), int(min(full_height, cy + side / 2)))
    tile = image.crop(crop)
    scale = height / max(1, tile.height)
    tile = tile.resize((max(1, round(tile.width * scale)), height))
    outline = [(x * width - crop[0]) * scale, (y * full_height - crop[1]) * scale,
               ((x + w) * width - crop[0]) * scale, ((y + h) * full_height - crop[1]) * scale]
    ImageDraw.Draw(tile).rectangle(outline, outline=(255, 214, 0), width=2)
    path = files.path(THUMBNAILS, spot_id)
    data = io.BytesIO()
    tile.save(data, format="PNG")
    _write_atomic(path, data.getvalue())
    return path


def _strip(files, name, thumbnails, gap=4):
    """The thumbnails side by side in one PNG (one image in the panel's
    text); None without thumbnails."""
    if not thumbnails:
        return None
    tiles = [Image.open(p).convert("RGB") for p in thumbnails]
    strip = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), max(t.height for t in tiles)))
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + gap
    path = files.path(STRIPS, name)
    data = io.BytesIO()
    strip.save(data, format="PNG")
    _write_atomic(path, data.getvalue())
    return path


def _remove_outputs(dataset, config, owns_files):
    """Removes a previous grouping's saved views, brain run and (when the
    dataset owns the run's files) thumbnails."""
    for g in (config.get("groups") or []) if owns_files else []:
        for path in (g.get("thumbnails") or []) + [g.get("strip")]:
            if path and os.path.isfile(path):
                os.remove(path)
    records.delete_saved_outputs(dataset, config)


def _cue_run_of(samples, heatmap_field):
    for key in records.list_runs(samples, method=records.CUES_RUN):
        if records.get_run(samples, key, derive=False).get("heatmap_field") == heatmap_field:
            return key
    raise CueError(f"No cue run over '{heatmap_field}': run discover_cues first")


def _reliance_path(samples, pred_field):
    """The background-reliance field of a reliance run over ``pred_field``."""
    for key in records.list_runs(samples, method=records.RELIANCE_RUN):
        config = records.get_run(samples, key, derive=False)
        name = f"{config.get('prefix')}_bg_reliance"
        if config.get("pred_field") == pred_field and name in samples.get_field_schema():
            return name
    return None


def cue_groups(samples, heatmap_field="cam"):
    """The groups of the cue run over ``heatmap_field``, as
    :class:`CueGroup` s (empty before grouping)."""
    key = _cue_run_of(samples, heatmap_field)
    return [CueGroup(**g) for g in records.get_run(samples, key, derive=False).get("groups") or []]
