"""The reliance run type: does the prediction depend on the background?
Each image goes through the model three times in one batch, decoded once:
as it is, with its background painted over, and with its labelled object
painted over (:mod:`cam_plugin.interventions`).

With ``p(.)`` the softmax probability of the class the model predicts on
the unmodified image, for the prefix ``P`` this writes:

-   ``P_bg_removed_confidence``: p with every pixel outside the region
    replaced by the fill; ``P_bg_removed_label``: the top class then
-   ``P_obj_removed_confidence``: p with every pixel inside the region
    replaced; ``P_obj_removed_label``: the top class then
-   ``P_bg_reliance`` = (p_obj_removed - p_bg_removed) / p: near +1 when the
    background carries the prediction, near -1 when the object does
-   ``P_bg_flip``, ``P_obj_flip``: whether the top class changes
-   ``P_reliance_class``: the class measured (the unmodified image's top
    class), ``P_reliance_error``: why a sample could not be tested
-   with ``fill="swap"``, ``P_swap_source``: the id of the sample whose
    background was used
"""

import hashlib

import numpy as np
import torch

import fiftyone as fo

from ..cams.capture import logits_of
from ..cams.inference import InferenceModels, parallel_streams
from ..engine import BatchRunner, Variants, image_loader, run_loader
from ..images import load_rgb
from ..interventions import check_fill, fill_image, interventions, swap_background
from ..models import input_shape_of
from ..regions import region_mask
from ..store.writer import SampleOutput
from . import records
from .attention import (
    AttentionError,
    cam_run_of,
    check_region_classes,
    check_region_field,
    image_class_field,
    region_classes_of,
)
from .base import RunType, cam_run_model, check_collection, model_outputs, run_device, stable_identity, values_by_id

#: the fields a reliance run writes, after its prefix
RELIANCE_FIELDS = {
    "bg_removed_confidence": fo.FloatField,
    "obj_removed_confidence": fo.FloatField,
    "bg_reliance": fo.FloatField,
    "bg_flip": fo.BooleanField,
    "obj_flip": fo.BooleanField,
    "bg_removed_label": fo.StringField,
    "obj_removed_label": fo.StringField,
    "reliance_class": fo.StringField,
    "reliance_error": fo.StringField,
}


#: chunks of a batch run side by side on CPU (cam_plugin.cams.inference)
_STREAMS = 2


class RelianceError(AttentionError):
    """A reliance test that cannot be run as asked."""


def reliance_field(prefix, name):
    """The name of a reliance field: ``<prefix>_<name>``."""
    return f"{prefix}_{name}"


def reliance_fields(prefix, fill="mean"):
    """Every field a reliance run with ``prefix`` and ``fill`` writes:
    ``{name: (ftype, None)}``."""
    names = dict(RELIANCE_FIELDS, **({"swap_source": fo.StringField} if fill == "swap" else {}))
    return {reliance_field(prefix, name): (ftype, None) for name, ftype in names.items()}


class RelianceRunType(RunType):
    """One :func:`cam_plugin.compute_reliance` run: validated on
    construction, executed by the driver."""

    method = records.RELIANCE_RUN

    def __init__(
        self,
        samples,
        model=None,
        region_field=None,
        pred_field="cam_prediction",
        prefix="cam",
        region_classes=None,
        fill="mean",
        seed=0,
        classes=None,
        transforms=None,
        label_field=None,
        mask_values=None,
        heatmap_threshold=0.5,
        batch_size=None,
        num_workers=None,
        device=None,
        run_key=None,
        trust_checkpoint=False,
    ):
        samples = check_collection(samples)
        self.samples = samples
        self.dataset = samples._root_dataset
        if not isinstance(prefix, str) or not prefix.isidentifier():
            raise RelianceError(
                f"Invalid prefix {prefix!r}: use letters, digits and underscores, starting "
                "with a letter (the fields are <prefix>_bg_reliance, <prefix>_bg_flip, ...)"
            )
        self.prefix = prefix
        self.key = run_key or f"{prefix}_reliance"
        self.fill = check_fill(fill)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RelianceError(f"seed must be a whole number, not {seed!r}")
        self.seed = seed
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise RelianceError(f"batch_size must be a positive whole number, not {batch_size!r}")
        self.pred_field = pred_field
        self.warnings = []
        if region_field is None:
            raise RelianceError(
                "region_field is required: the labelled objects (boxes, polygons, masks) "
                "whose pixels are painted over, and outside which is the background"
            )
        self.region_field = region_field
        self.mask_targets = check_region_field(samples, region_field)
        self.region_classes = check_region_classes("gt" if region_classes is None else region_classes)
        self.mask_values = sorted(int(v) for v in mask_values) if mask_values is not None else None
        self.heatmap_threshold = float(heatmap_threshold)

        self.cam_key, cam_config = cam_run_of(samples, pred_field)
        if cam_config.get("multilabel"):
            raise RelianceError(
                f"'{pred_field}' holds a multi-label run's predictions; compute_reliance "
                "tests one softmax prediction per image"
            )
        self.heatmap_field = cam_config.get("heatmap_field")
        self.label_field = image_class_field(samples, cam_config, label_field)

        resolved = cam_run_model(
            self.cam_key, cam_config, model, classes, transforms, trust_checkpoint, RelianceError,
            "the reliance fields", f"no CAM run made '{pred_field}', so there is no model to load again",
        )
        self.model_spec, self.classifier = resolved.spec, resolved.classifier
        self.warnings += resolved.warnings
        self.device, self.batch_size, self.num_workers = run_device(device, batch_size, num_workers)

        self._fields = reliance_fields(prefix, self.fill)
        self.error_field = reliance_field(prefix, "reliance_error")
        self.done_fields = (reliance_field(prefix, "bg_reliance"),)
        records.check_fields(samples, self.key, self._fields)

        # the model moves to the device for the run and back afterwards
        module = self.classifier.module
        self._restore_device = next((p.device for p in module.parameters()), torch.device("cpu"))
        module.to(self.device)
        try:
            self.input_shape = input_shape_of(self.classifier.transforms)
            self._check_class_count()
        except BaseException:
            module.to(self._restore_device)
            raise
        self._inference = InferenceModels(module)

    def _check_class_count(self):
        # one pass on a blank input, before anything is registered: labels
        # read with the wrong names would be silently wrong
        names = self.classifier.classes
        if not names:
            return
        with torch.no_grad():
            blank = torch.zeros((1, *self.input_shape), device=self.device)
            num_outputs = logits_of(self.classifier.module(blank)).shape[-1]
        if num_outputs != len(names):
            raise RelianceError(
                f"The model has {num_outputs} outputs but {len(names)} class names were given "
                f"({', '.join(map(str, names[:5]))}{', ...' if len(names) > 5 else ''}); pass one "
                "name per output, in output order"
            )

    def config(self):
        clf = self.classifier
        return {
            "model": clf.name,
            "model_spec": self.model_spec,
            "model_fingerprint": clf.fingerprint,
            "transforms": stable_identity(clf.transforms),
            "classes": list(clf.classes) if clf.classes else None,
            "prefix": self.prefix,
            "pred_field": self.pred_field,
            "heatmap_field": self.heatmap_field,
            "label_field": self.label_field,
            "region_field": self.region_field,
            "region_classes": self.region_classes,
            "mask_values": self.mask_values,
            "heatmap_threshold": self.heatmap_threshold,
            "fill": self.fill,
            "seed": self.seed if self.fill == "swap" else None,
        }

    def fields(self):
        return dict(self._fields)

    def depends_on(self):
        return [self.cam_key] if self.cam_key else []

    def outputs(self, ids, files):
        if not ids:
            return
        label_path = f"{self.label_field}.label" if self.label_field else None
        paths = ["filepath", self.region_field] + ([label_path] if label_path else [])
        rows = values_by_id(self.samples, ids, paths)
        ids = [i for i in ids if i in rows]  # without samples deleted since
        candidates = self._partners(ids, rows) if self.fill == "swap" else {}
        used = sorted({c for cs in candidates.values() for c in cs})
        partner_rows = values_by_id(self.samples, used, paths) if used else {}

        def region_of(row):
            # (label, the image's class): the region's classes are resolved
            # in the workers, where reading a mask may fail for one sample
            return row[1], row[2] if label_path else None

        variants = _Interventions(
            regions=[region_of(rows[i]) for i in ids],
            fill=self.fill,
            partners=[
                [(c, partner_rows[c][0], *region_of(partner_rows[c])) for c in candidates.get(i, ()) if c in partner_rows]
                for i in ids
            ],
            region_classes=self.region_classes,
            region_options=dict(
                mask_values=self.mask_values,
                mask_targets=self.mask_targets,
                heatmap_threshold=self.heatmap_threshold,
            ),
            region_field=self.region_field,
            min_side=max(self.input_shape[-2:]),
        )
        loader = image_loader(
            [rows[i][0] for i in ids],
            self.classifier.transforms,
            min_side=max(self.input_shape[-2:]),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            variants=variants,
        )
        names = self.classifier.classes

        def compute(group):
            # gradient-free passes: the inference copy (batch norms folded,
            # channels-last on CPU), twice as fast as the model on CPU
            module, memory_format = self._inference.get(self.device)
            inputs = group.tensor.to(self.device, non_blocking=True)
            n, k = inputs.shape[:2]
            batch = inputs.flatten(0, 1).contiguous(memory_format=memory_format)
            chunks = batch.split(max(1, -(-len(batch) // _STREAMS)))

            def forward(chunk):
                with torch.no_grad():  # grad mode is per thread
                    return logits_of(module(chunk)).float()

            # on CPU, chunks side by side on the shared threads
            with parallel_streams(self.device, len(chunks)) as pool:
                logits = torch.cat(list(pool.map(forward, chunks)) if pool else [forward(c) for c in chunks])
            probs = torch.softmax(logits, dim=1).view(n, k, -1)
            top = probs.argmax(dim=2)  # (n, k)
            cls = top[:, 0]
            p = probs.gather(2, cls[:, None, None].expand(n, k, 1))[:, :, 0]
            notes = [item.note for item in group.items]
            return list(zip(cls.tolist(), p.tolist(), top.tolist(), notes))

        def output_of(sample_id, result):
            values = self._values(result[:3], names)
            if self.fill == "swap":
                # the sample whose background was used (the note of the variants)
                values[reliance_field(self.prefix, "swap_source")] = result[3]
            return SampleOutput(sample_id, values)

        runner = BatchRunner(compute, self.batch_size)
        yield from model_outputs(self, run_loader(loader, runner), ids, output_of, RelianceError)

    def _values(self, result, names):
        cls, (p, p_bg, p_obj), (_, top_bg, top_obj) = result

        def name(i):
            return names[i] if names else str(i)

        values = {
            "bg_removed_confidence": float(p_bg),
            "obj_removed_confidence": float(p_obj),
            "bg_reliance": float((p_obj - p_bg) / p) if p > 0 else 0.0,
            "bg_flip": top_bg != cls,
            "obj_flip": top_obj != cls,
            "bg_removed_label": name(top_bg),
            "obj_removed_label": name(top_obj),
            "reliance_class": name(cls),
        }
        return {reliance_field(self.prefix, k): v for k, v in values.items()}

    def _partners(self, ids, rows, count=8):
        """For ``fill="swap"``: per sample, up to ``count`` candidates for
        lending it their background, of another class (its ground truth,
        else its prediction), the same in every shard and process for a
        given ``seed``; the first whose image and objects can be read is
        used (a sample without a labelled object has no background to tell
        from its object)."""
        class_field = self.label_field or self.pred_field
        if class_field in self.samples.get_field_schema():
            pool, pool_classes = self.samples.values(["id", f"{class_field}.label"])
        else:
            # no classes known: any other sample lends its background
            pool = self.samples.values("id")
            pool_classes = [None] * len(pool)
        order = np.argsort(pool)
        pool = [pool[i] for i in order]
        pool_classes = [pool_classes[i] for i in order]
        class_of = dict(zip(pool, pool_classes))
        partners = {}
        for sample_id in ids:
            own = class_of.get(sample_id)
            chosen = []
            for attempt in range(16 * count):
                digest = hashlib.sha1(f"{self.seed}:{sample_id}:{attempt}".encode()).hexdigest()
                j = int(digest[:12], 16) % len(pool)
                other = pool[j]
                if other != sample_id and other not in chosen and (own is None or pool_classes[j] != own):
                    chosen.append(other)
                    if len(chosen) == count:
                        break
            if not chosen:
                # (a rare class balance that random draws keep missing)
                chosen = [
                    o for o, c in zip(pool, pool_classes) if o != sample_id and (own is None or c != own)
                ][:count]
            partners[sample_id] = chosen
        return partners

    def close(self):
        self.classifier.module.to(self._restore_device)


class _Interventions:
    """The three inputs of one sample (see
    :func:`cam_plugin.interventions.interventions`), made in the loader's
    workers; its region and, for ``fill="swap"``, its partner's image and
    region are read there too, so one unreadable file fails one sample."""

    def __init__(self, regions, fill, partners, region_classes, region_options, region_field, min_side):
        self.regions = regions
        self.fill = fill
        self.partners = partners
        self.region_classes = region_classes
        self.region_options = region_options
        self.region_field = region_field
        self.min_side = min_side

    def _mask(self, label, gt, image):
        width, height = image.size
        try:
            classes = region_classes_of(label, self.region_classes, gt, self.region_options["mask_targets"])
            mask = region_mask(label, width, height, classes=classes, **self.region_options).numpy()
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"the region in '{self.region_field}' cannot be read: {e}") from e
        return mask, classes

    def __call__(self, index, image):
        label, gt = self.regions[index]
        region, classes = self._mask(label, gt, image)
        if not region.any():
            which = f" of class {', '.join(sorted(classes))}" if classes else ""
            raise ValueError(
                f"the region is empty: no labelled object{which} in '{self.region_field}', or its "
                "boxes or shapes cover no pixel of the image; there is no object to separate from "
                "the background"
            )
        if region.all():
            raise ValueError(
                f"the region in '{self.region_field}' covers the whole image: there is no "
                "background to remove"
            )
        if self.fill != "swap":
            return interventions(image, region, fill_image(image, self.fill))
        background, source = self._background(index)
        return Variants(interventions(image, region, fill_image(image, "swap", background)), source)

    def _background(self, index):
        """The background of the first of the sample's candidates that can
        lend one (its image and objects read, an object to paint out), and
        that candidate's id."""
        candidates = self.partners[index]
        if not candidates:
            raise ValueError(
                "no other sample of another class among the samples the run was given (its "
                "view) to take a background from"
            )
        reasons = []
        for sample_id, path, label, gt in candidates:
            try:
                other, _ = load_rgb(path, min_side=self.min_side)
                region, _ = self._mask(label, gt, other)
            except ValueError as e:  # ImageError included
                reasons.append(f"sample {sample_id}: {e}")
                continue
            if not region.any():
                reasons.append(f"sample {sample_id}: no labelled object to paint out")
                continue
            return swap_background(other, region), sample_id
        raise ValueError(
            f"none of the {len(candidates)} samples of another class tried can lend a background "
            f"({'; '.join(reasons[:3])})"
        )
