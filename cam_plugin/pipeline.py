"""The dataset-scale CAM run on a FiftyOne collection: images decoded in
DataLoader workers, maps computed by :mod:`cam_plugin.batches`, PNGs encoded
in background threads, fields written in bulk after their files, per-sample
failures recorded, and resumable after an interruption.
"""

import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

import fiftyone as fo
import fiftyone.core.utils as fou

from . import appearance, runs
from .batches import SampleImages, collate_groups, compute_batch
from .cams import CamError, CamExtractor
from .heatmaps import HEATMAP_RANGE, PngWriter, remove_temporary_files
from .models import input_shape_of, load_classifier

logger = logging.getLogger(__name__)


@dataclass
class CamRunSummary:
    """What a :func:`compute_cams` run did.

    Attributes:
        key: the run key
        processed: samples that got heatmaps in this call
        failed: samples that failed in this call (see ``errors``)
        skipped: samples already done by an earlier, interrupted call
        errors: counts of failure reasons
        fields: the fields the run writes
        files_dir: where its heatmap files are
        resumed: whether this call resumed an unfinished run
        seconds: wall time of this call
    """

    key: str
    processed: int = 0
    failed: int = 0
    skipped: int = 0
    errors: dict = field(default_factory=dict)
    fields: list = field(default_factory=list)
    files_dir: str = ""
    resumed: bool = False
    seconds: float = 0.0

    def __str__(self):
        text = (
            f"CAM run '{self.key}': {self.processed} processed, {self.failed} "
            f"failed, {self.skipped} already done ({self.seconds:.1f} s)"
        )
        for reason, count in sorted(self.errors.items(), key=lambda x: -x[1]):
            text += f"\n  {count} x {reason}"
        return text


@dataclass
class Target:
    """One map per sample: its name, field and how its class is chosen."""

    name: str
    field: str
    pick: callable = None


def heatmap_dir(dataset, key, output_dir=None):
    """The directory of a run's heatmap files: ``<output_dir>/<key>``, by
    default under FiftyOne's default dataset dir."""
    if output_dir is None:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset.name).strip("._") or "dataset"
        output_dir = os.path.join(fo.config.default_dataset_dir, "cam_heatmaps", safe)
    return os.path.join(os.path.abspath(os.path.expanduser(output_dir)), key)


def parse_targets(targets, heatmap_field, classes, has_labels):
    """Turns target names into :class:`Target` objects.

    ``"pred"`` (the predicted class, in ``heatmap_field``), ``"gt"`` (the
    ground-truth class, in ``<heatmap_field>_gt``), ``"top<k>"`` (the 2nd
    to k-th predicted classes, in ``<heatmap_field>_top2`` ...) and
    ``"class:<name>"`` (a named class, in ``<heatmap_field>_<name>``).
    """
    if targets is None:
        targets = ["pred", "gt"] if has_labels else ["pred"]
    elif isinstance(targets, str):
        targets = [targets]

    result = []
    for t in targets:
        t = str(t).strip()
        if t == "pred":
            result.append(Target("pred", heatmap_field, lambda logits, gt: logits.argmax(1)))
        elif t == "gt":
            if not has_labels:
                raise CamError("Target 'gt' needs label_field, the ground-truth labels")
            result.append(Target("gt", f"{heatmap_field}_gt", lambda logits, gt: gt))
        elif re.fullmatch(r"top\d+", t):
            k = int(t[3:])
            if k < 1:
                raise CamError(f"Invalid target '{t}'")
            if k == 1:
                result.append(Target("pred", heatmap_field, lambda logits, gt: logits.argmax(1)))
            for rank in range(2, k + 1):
                pick = lambda logits, gt, r=rank: logits.topk(r, dim=1).indices[:, r - 1]
                result.append(Target(f"top{rank}", f"{heatmap_field}_top{rank}", pick))
        elif t.startswith("class:"):
            name = t[len("class:") :]
            if not classes or name not in classes:
                raise CamError(
                    f"Target class '{name}' is not among the model's classes"
                    + (f" ({', '.join(classes[:10])}, ...)" if classes else "")
                )
            index = classes.index(name)
            safe = re.sub(r"\W+", "_", name).strip("_").lower()
            pick = lambda logits, gt, i=index: torch.full_like(logits[:, 0], i, dtype=torch.long)
            result.append(Target(f"class:{name}", f"{heatmap_field}_{safe}", pick))
        else:
            raise CamError(
                f"Unknown target '{t}': use 'pred', 'gt', 'top<k>' or 'class:<name>'"
            )

    seen = set()
    unique = []
    for t in result:
        if t.field not in seen:
            seen.add(t.field)
            unique.append(t)
    return unique


def _error_reason(message):
    """Groups error messages by kind for the summary (paths stripped)."""
    reason = message.split(": /")[0].split(" (")[0]
    return reason[:120]


class CamRun:
    """One call of :func:`compute_cams`: validated on construction, executed
    by :meth:`run`."""

    def __init__(
        self,
        samples,
        model,
        label_field=None,
        pred_field="cam_prediction",
        heatmap_field="cam",
        method="gradcam",
        target_layer=None,
        classes=None,
        transforms=None,
        targets=None,
        batch_size=None,
        num_workers=None,
        device=None,
        mixed_precision=False,
        heatmap_size=256,
        output_dir=None,
        run_key=None,
        overwrite=False,
        progress=None,
        flush_every=256,
        chunk_size=None,
    ):
        self.samples = samples
        self.dataset = samples._root_dataset
        self.key = run_key or heatmap_field
        self.label_field = label_field
        self.pred_field = pred_field
        self.heatmap_field = heatmap_field
        self.error_field = f"{heatmap_field}_error"
        self.progress = progress
        self.flush_every = flush_every
        self.heatmap_size = heatmap_size
        self.overwrite = overwrite

        self.device = torch.device(
            device or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.classifier = load_classifier(model, transforms=transforms, classes=classes)
        self.batch_size = batch_size or (64 if self.device.type == "cuda" else 16)
        self.num_workers = (
            num_workers if num_workers is not None else min(8, max(1, (os.cpu_count() or 2) // 2))
        )

        self._check_label_field()
        self.targets = parse_targets(
            targets, heatmap_field, self.classifier.classes, label_field is not None
        )

        self.fields = {pred_field: (fo.EmbeddedDocumentField, fo.Classification)}
        for t in self.targets:
            self.fields[t.field] = (fo.EmbeddedDocumentField, fo.Heatmap)
        self.fields[self.error_field] = (fo.StringField, None)
        runs.check_new_fields(samples, self.key, self.fields, overwrite=overwrite)
        self.files_dir = heatmap_dir(self.dataset, self.key, output_dir)

        # the model moves to the device for the run and back afterwards
        module = self.classifier.module
        self._restore_device = _module_device(module)
        module.to(self.device)
        try:
            self.input_shape = input_shape_of(self.classifier.transforms)
            self.extractor = CamExtractor(
                module,
                method,
                self.input_shape,
                layer=target_layer,
                chunk_size=chunk_size or (256 if self.device.type == "cuda" else 64),
                autocast=mixed_precision,
            )
            self._check_class_count()
        except BaseException:
            module.to(self._restore_device)
            raise

    def _check_class_count(self):
        names = self.classifier.classes
        if not names:
            return

        num_outputs = self.extractor.num_outputs
        if num_outputs != len(names):
            raise CamError(
                f"The model has {num_outputs} outputs but {len(names)} class "
                f"names were given ({', '.join(map(str, names[:5]))}"
                f"{', ...' if len(names) > 5 else ''}); pass one name per "
                "output, in output order"
            )

    def _check_label_field(self):
        if self.label_field is None:
            self._gt_index = None
            return

        field = self.samples.get_field(self.label_field)
        if field is None:
            raise CamError(
                f"label_field '{self.label_field}' does not exist on dataset "
                f"'{self.dataset.name}'"
            )
        if not (
            isinstance(field, fo.EmbeddedDocumentField)
            and issubclass(field.document_type, fo.Classification)
        ):
            raise CamError(
                f"label_field '{self.label_field}' must hold fo.Classification "
                f"labels (the ground-truth class of each image)"
            )

        classes = self.classifier.classes
        labels = [x for x in self.samples.distinct(f"{self.label_field}.label") if x is not None]
        if classes is None:
            raise CamError(
                "The model's class names are unknown, so ground-truth labels "
                "cannot be matched to its outputs; pass classes=[...] in "
                "output order"
            )

        missing = sorted(set(labels) - set(classes))
        if missing:
            raise CamError(
                f"{len(missing)} ground-truth label(s) in '{self.label_field}' "
                f"are not among the model's {len(classes)} classes: "
                f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}. "
                "Pass classes=[...] matching the model's outputs, or drop "
                "label_field"
            )

        self._gt_index = {c: i for i, c in enumerate(classes)}

    def config(self):
        clf = self.classifier
        return {
            "cam_method": self.extractor.method.name,
            "layer": self.extractor.layer,
            "model": clf.name,
            "model_fingerprint": clf.fingerprint,
            "transforms": repr(clf.transforms),
            "classes": list(clf.classes) if clf.classes else None,
            "label_field": self.label_field,
            "pred_field": self.pred_field,
            "heatmap_field": self.heatmap_field,
            "targets": {t.name: t.field for t in self.targets},
            "heatmap_size": self.heatmap_size,
            "fields": list(self.fields),
            "files_dir": self.files_dir,
        }

    def run(self):
        """Runs to completion; returns a :class:`CamRunSummary`."""
        updates = self.iter_run()
        while True:
            try:
                next(updates)
            except StopIteration as stop:
                return stop.value

    def iter_run(self):
        """Runs as a generator that yields ``(done, total)`` after each
        batch (for progress reporting) and returns the
        :class:`CamRunSummary`."""
        started = time.time()
        resumed = runs.start_run(
            self.samples, self.key, runs.CAM_RUN, self.config(), overwrite=self.overwrite
        )
        runs.ensure_fields(self.dataset, self.fields)
        for t in self.targets:
            os.makedirs(os.path.join(self.files_dir, t.name.replace(":", "_")), exist_ok=True)
        if resumed:
            remove_temporary_files(self.files_dir)

        todo = self.samples.exists(self.heatmap_field, False).exists(self.error_field, False)
        if self.label_field:
            ids, paths, gt = todo.values(["id", "filepath", f"{self.label_field}.label"])
        else:
            ids, paths = todo.values(["id", "filepath"])
            gt = [None] * len(ids)

        summary = CamRunSummary(
            key=self.key,
            skipped=len(self.samples) - len(ids),
            fields=list(self.fields),
            files_dir=self.files_dir,
            resumed=resumed,
        )
        self._errors = Counter()
        self._pending = {}
        self._done = 0
        self._failed = 0
        self._max_batch = self.batch_size

        status = "running"
        try:
            with PngWriter(num_threads=max(1, min(8, (os.cpu_count() or 2) // 2))) as writer:
                self._writer = writer
                try:
                    yield from self._loop(ids, paths, gt)
                finally:
                    # keep what is done, even when interrupted
                    self._flush()
            status = "completed"
            appearance.apply(self.dataset, {t.name: t.field for t in self.targets})
        finally:
            summary.processed = self._done
            summary.failed = self._failed
            summary.errors = dict(self._errors)
            summary.seconds = time.time() - started
            counts = {
                "processed": self._done,
                "failed": self._failed,
                "skipped": summary.skipped,
                "errors": dict(self._errors),
            }
            runs.update_run(self.samples, self.key, status=status, counts=counts)
            runs.ensure_fields(self.dataset, self.fields)
            self.classifier.module.to(self._restore_device)

        return summary

    def _loop(self, ids, paths, gt):
        loader = torch.utils.data.DataLoader(
            SampleImages(paths, self.classifier.transforms, min_side=max(self.input_shape[-2:])),
            batch_size=self.batch_size,
            num_workers=self.num_workers if len(paths) > self.batch_size else 0,
            collate_fn=collate_groups,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        gt_index = self._gt_index
        with fou.ProgressBar(total=len(ids), progress=self.progress) as pb:
            for batch in loader:
                for item in batch["failed"]:
                    self._record_error(ids[item["index"]], item["error"])

                for group in batch["groups"]:
                    for item in group.items:
                        i = item["index"]
                        item["id"] = ids[i]
                        item["gt"] = -1 if gt_index is None or gt[i] is None else gt_index[gt[i]]
                    self._process(group)

                if len(self._pending.get(self.pred_field, ())) >= self.flush_every:
                    self._flush()
                pb.update(count=len(batch["failed"]) + sum(len(g) for g in batch["groups"]))
                self._check_all_failing()
                yield self._done + self._failed, len(ids)

    def _check_all_failing(self):
        attempted = self._done + self._failed
        if self._done == 0 and attempted >= 16 and len(self._errors) == 1:
            (reason, count), = self._errors.items()
            if count == attempted and reason.startswith("CAM failed"):
                raise CamError(
                    f"The first {attempted} samples all failed with the same "
                    f"error, which points at the model or configuration: {reason}"
                )

    def _process(self, group):
        for start in range(0, len(group), self._max_batch):
            self._process_chunk(group.split(start, start + self._max_batch))

    def _process_chunk(self, chunk):
        try:
            self._compute(chunk)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(chunk) == 1:
                self._record_error(chunk.items[0]["id"], "CAM failed: out of GPU memory")
                return
            self._max_batch = max(1, len(chunk) // 2)
            logger.warning("GPU out of memory; batch size now %d", self._max_batch)
            self._process(chunk)
        except Exception as e:
            if len(chunk) > 1:
                # isolate the sample(s) that break the batch
                for i in range(len(chunk)):
                    self._process_chunk(chunk.split(i, i + 1))
                return
            self._record_error(chunk.items[0]["id"], f"CAM failed: {type(e).__name__}: {e}")

    def _compute(self, chunk):
        picks = {t.name: t.pick for t in self.targets}
        results = compute_batch(self.extractor, chunk, picks, self.heatmap_size, self.device)
        names = self.classifier.classes
        for item, result in zip(chunk.items, results):
            label = names[result.pred] if names else str(result.pred)
            self._queue(
                self.pred_field,
                item["id"],
                fo.Classification(label=label, confidence=result.confidence, logits=result.logits),
            )
            for target in self.targets:
                framed = result.maps.get(target.name)
                if framed is None:
                    continue
                path = os.path.join(
                    self.files_dir, target.name.replace(":", "_"), f"{item['id']}.png"
                )
                self._writer.submit(path, framed.levels)
                self._queue(
                    target.field,
                    item["id"],
                    fo.Heatmap(
                        map_path=path,
                        range=list(HEATMAP_RANGE),
                        raw_max=framed.raw_max,
                        target=names[framed.class_index] if names else str(framed.class_index),
                    ),
                )
            self._done += 1

    def _queue(self, field_name, sample_id, value):
        self._pending.setdefault(field_name, {})[sample_id] = value

    def _record_error(self, sample_id, message):
        self._failed += 1
        self._errors[_error_reason(message)] += 1
        self._queue(self.error_field, sample_id, message)

    def _flush(self):
        # files first: a field must never point at a file not yet written
        self._writer.wait()
        pending, self._pending = self._pending, {}
        for field_name, values in pending.items():
            if values:
                self.dataset.set_values(field_name, values, key_field="id")


def _module_device(module):
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def compute_cams(samples, model, **kwargs):
    """See :func:`cam_plugin.compute_cams`."""
    return CamRun(samples, model, **kwargs).run()
