"""The CAM run type: per sample, the prediction and one class activation map
per target, as ``fo.Classification`` and ``fo.Heatmap`` fields whose PNGs
live in the run's own directory."""

import os
import re
import warnings
from dataclasses import dataclass

import torch

import fiftyone as fo

from .. import appearance
from ..batches import best_candidate, compute_batch
from ..cams import CamError, CamExtractor
from ..class_map import (
    LABEL_RULES,
    ClassMap,
    ClassMapError,
    image_class,
    image_classes,
    object_area,
)
from ..engine import BatchRunner, image_loader, run_loader
from ..heatmaps import HEATMAP_RANGE
from ..models import ClassNamesWarning, classes_source, input_shape_of, load_classifier
from ..store.files import safe_name
from ..store.writer import SampleOutput
from . import records
from .base import RunType, check_collection, model_outputs, stable_identity, values_by_id

METHOD = records.CAM_RUN


@dataclass
class Target:
    """One map per sample: its name (also its folder), field and how its
    class is chosen."""

    name: str
    field: str
    pick: callable = None
    spec: str = ""


def parse_targets(targets, heatmap_field, classes, has_labels):
    """Turns target names into :class:`Target` objects.

    ``"pred"`` (the predicted class, in ``heatmap_field``), ``"gt"`` (the
    ground-truth class, in ``<heatmap_field>_gt``), ``"top<k>"`` (the 2nd
    to k-th predicted classes, in ``<heatmap_field>_top2`` ...) and
    ``"class:<name>"`` (a named class, in ``<heatmap_field>_<safe name>``;
    the name is reduced to letters, digits and underscores, so no class
    name can reach outside the run's directory).
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
            result.append(class_target(name, classes.index(name), heatmap_field))
        else:
            raise CamError(
                f"Unknown target '{t}': use 'pred', 'gt', 'top<k>' or 'class:<name>'"
            )

    unique = {}
    for t in result:
        other = unique.get(t.field)
        if other is not None and (other.name, other.spec) != (t.name, t.spec):
            raise CamError(
                f"Targets '{other.spec or other.name}' and '{t.spec or t.name}' would "
                f"both be stored in field '{t.field}'; ask for one of them"
            )
        unique[t.field] = t
    return list(unique.values())


#: the most classes a multi-label run makes fields for (one heatmap field
#: per class): beyond it the sidebar is unusable, so the run asks for
#: ``targets=["class:<name>", ...]``
MAX_LABEL_FIELDS = 256


def class_target(name, index, heatmap_field, pick=None):
    """The target of one named class, stored in ``<heatmap_field>_<safe
    name>`` (letters, digits and underscores only, so no class name can
    reach outside the run's directory)."""
    safe = safe_name(name, fallback=f"class{index}").lower().replace("-", "_")
    if pick is None:
        pick = lambda logits, gt, i=index: torch.full_like(logits[:, 0], i, dtype=torch.long)
    return Target(f"class_{safe}", f"{heatmap_field}_{safe}", pick, f"class:{name}")


def label_targets(targets, heatmap_field, classes, threshold):
    """The targets of a multi-label run: one per class (all of the model's,
    or those named ``"class:<name>"``), each made for a sample when the
    class is predicted (its sigmoid probability reaches ``threshold``) or
    in the sample's ground truth."""
    if targets is None:
        names = list(classes)
    else:
        names = []
        for t in [targets] if isinstance(targets, str) else targets:
            t = str(t).strip()
            if not t.startswith("class:"):
                raise CamError(
                    f"Target '{t}': a multi-label run makes one map per class, for the "
                    "samples that are predicted or labelled with it; choose classes with "
                    "targets=['class:<name>', ...] or leave targets unset for all"
                )
            name = t[len("class:") :]
            if name not in classes:
                raise CamError(
                    f"Target class '{name}' is not among the model's classes "
                    f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})"
                )
            names.append(name)
    if len(set(names)) > MAX_LABEL_FIELDS:
        raise CamError(
            f"A multi-label run stores one heatmap field per class, and the model has "
            f"{len(set(names))} classes; choose at most {MAX_LABEL_FIELDS} with "
            "targets=['class:<name>', ...]"
        )
    result = {}
    for name in names:
        index = classes.index(name)

        def pick(logits, gt, i=index):
            wanted = (torch.sigmoid(logits[:, i].float()) >= threshold) | (gt == i).any(1)
            return torch.where(wanted, torch.full_like(wanted, i, dtype=torch.long), -1)

        target = class_target(name, index, heatmap_field, pick)
        other = next((o for o in result.values() if o.field == target.field and o.spec != target.spec), None)
        if other is not None:
            raise CamError(
                f"Classes '{other.spec[6:]}' and '{name}' would both be stored in field "
                f"'{target.field}'; choose one of them with targets=['class:<name>', ...]"
            )
        result[target.spec] = target
    return list(result.values())


class CamRunType(RunType):
    """One :func:`cam_plugin.compute_cams` run: validated on construction
    (nothing is written when it refuses), executed by the driver."""

    method = METHOD

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
        run_key=None,
        chunk_size=None,
        trust_checkpoint=False,
        store_logits=False,
        class_map=None,
        label_rule=None,
        multilabel=False,
        threshold=0.5,
    ):
        samples = check_collection(samples)
        self.samples = samples
        self.dataset = samples._root_dataset
        self.key = run_key or heatmap_field
        self.label_field = label_field
        self.pred_field = pred_field
        self.heatmap_field = heatmap_field
        self.error_field = f"{heatmap_field}_error"
        self.done_fields = (pred_field,)
        self.heatmap_size = heatmap_size
        self.store_logits = bool(store_logits)
        self.multilabel = bool(multilabel)
        self.threshold = float(threshold)
        if self.multilabel and not 0 < self.threshold < 1:
            raise CamError(f"threshold must be a probability between 0 and 1, not {threshold!r}")
        self.warnings = []
        self._classes_source = None if classes is None else classes_source(classes)
        self.model_spec = model if isinstance(model, (str, os.PathLike)) else None

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.classifier = load_classifier(
            model, transforms=transforms, classes=classes, trust_checkpoint=trust_checkpoint
        )
        self.batch_size = batch_size or (64 if self.device.type == "cuda" else 16)
        self.num_workers = (
            num_workers if num_workers is not None else min(8, max(1, (os.cpu_count() or 2) // 2))
        )

        if self.multilabel:
            self._check_multilabel(class_map, label_rule)
            self.targets = label_targets(targets, heatmap_field, self.classifier.classes, self.threshold)
        else:
            self._check_label_field(class_map, label_rule)
            self.targets = parse_targets(
                targets, heatmap_field, self.classifier.classes, label_field is not None
            )
        if self.mapped:
            for t in self.targets:
                if t.name == "gt":
                    # the member of the class's set the model scores highest
                    t.pick = best_candidate
        self.file_targets = tuple(t.name for t in self.targets)

        prediction_type = fo.Classifications if self.multilabel else fo.Classification
        self._fields = {pred_field: (fo.EmbeddedDocumentField, prediction_type)}
        for t in self.targets:
            self._fields[t.field] = (fo.EmbeddedDocumentField, fo.Heatmap)
        self._fields[self.error_field] = (fo.StringField, None)
        derived = {}
        if self.multilabel and label_field is not None:
            derived = {self.gt_class_field: (fo.EmbeddedDocumentField, fo.Classifications)}
            self._fields.update(derived)
        if self.mapped:
            derived = {
                self.gt_class_field: (fo.EmbeddedDocumentField, fo.Classification),
                self.correct_field: (fo.BooleanField, None),
            }
            self._fields.update(derived)
        if len(self._fields) < 2 + len(self.targets) + len(derived):
            raise CamError(
                f"pred_field '{pred_field}' and the fields of the run "
                f"({', '.join(t.field for t in self.targets)}"
                f"{''.join(', ' + f for f in derived)}) must all differ"
            )
        records.check_fields(samples, self.key, self._fields)

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
                # the model's family may know its layer better than the probe
                layer=target_layer or self.classifier.target_layer,
                chunk_size=chunk_size or (256 if self.device.type == "cuda" else 64),
                autocast=mixed_precision,
            )
            self._check_class_count()
        except BaseException:
            module.to(self._restore_device)
            raise

    def _check_class_count(self):
        names = self.classifier.classes
        num_outputs = self.extractor.num_outputs
        if not names:
            self._warn_unnamed(num_outputs)
            return
        if num_outputs != len(names):
            given = f" by {self._classes_source}" if self._classes_source else ""
            raise CamError(
                f"The model has {num_outputs} outputs but {len(names)} class "
                f"names were given{given} ({', '.join(map(str, names[:5]))}"
                f"{', ...' if len(names) > 5 else ''}); pass one name per "
                "output, in output order"
            )

    def _warn_unnamed(self, num_outputs):
        # a model without class names: say so once, at the start, rather
        # than store labels '987', '293' silently
        indices = f"'0' ... '{num_outputs - 1}'" if num_outputs > 1 else "'0'"
        message = (
            f"The model has no class names, so its predictions are labelled "
            f"with its output indices ({indices})."
        )
        if num_outputs == 1000:
            message += (
                " It has 1000 outputs: if it is an ImageNet-1k classifier, pass "
                "classes='imagenet' to name them; otherwise pass classes=[...] in "
                "output order or the path of a text file with one name per line."
            )
        else:
            message += (
                f" To name them, pass classes=[...] ({num_outputs} names in output "
                "order) or the path of a text file with one name per line."
            )
        self.warnings.append(message)
        warnings.warn(message, ClassNamesWarning)

    def _check_label_field(self, class_map=None, label_rule=None):
        # ``mapped``: the image's class is not a Classification label that
        # is itself a model class, so the run stores the class it judged by
        # (``<heatmap_field>_gt_class``) and the verdict (``_correct``)
        self.mapped = False
        self.class_map = None
        self.label_rule = None
        self._label_type = None
        if self.label_field is None:
            self._gt_index = None
            if class_map is not None:
                raise CamError("class_map maps ground-truth labels: pass label_field too")
            return

        self._label_type = self._label_type_of(
            LABEL_TYPES,
            "fo.Classification labels (the ground-truth class of each image), or "
            "fo.Detections / fo.Polylines (the image's class is then its largest object's, "
            "see label_rule)",
        )

        classes = self.classifier.classes
        if classes is None:
            raise CamError(
                "The model's class names are unknown, so ground-truth labels "
                "cannot be matched to its outputs; pass classes=[...] in "
                "output order"
            )

        objects = self._label_type is not fo.Classification
        if label_rule == "all":
            raise CamError(
                "label_rule='all' (every object's class a label of the image) is for a "
                "multi-label model: pass multilabel=True (sigmoid outputs, one map per "
                "label), or use label_rule='largest' (the image's class is its largest "
                "object's among those the class map covers)"
            )
        if label_rule is not None and label_rule not in LABEL_RULES:
            raise CamError(f"Unknown label_rule {label_rule!r}: use 'largest' or 'all'")

        if not objects and class_map is None:
            self._check_classification_labels(classes)
            return

        self.mapped = True
        self.label_rule = "largest" if objects else None
        self.gt_class_field = f"{self.heatmap_field}_gt_class"
        self.correct_field = f"{self.heatmap_field}_correct"
        try:
            if class_map is None:
                self._map = ClassMap.identity(classes)
            else:
                self.class_map = ClassMap.load(class_map)
                self.class_map.check(classes)
                self._map = self.class_map
        except ClassMapError as e:
            raise CamError(str(e)) from e

        # every output index of each dataset class's model classes
        indices = {}
        for i, c in enumerate(classes):
            indices.setdefault(c, []).append(i)
        self._candidates = {
            name: tuple(sorted(i for m in members for i in indices[m]))
            for name, members in self._map.sets.items()
        }
        self._warn_unmapped()

    def _check_multilabel(self, class_map, label_rule):
        # a multi-label run's ground truth is a set of model classes per
        # sample, stored (the labels it judged by) in <heatmap>_gt_labels
        self.mapped = False
        self.class_map = None
        self._label_type = None
        self.label_rule = None
        classes = self.classifier.classes
        if not classes:
            raise CamError(
                "A multi-label run makes one heatmap field per class, named after it: the "
                "model's class names are unknown, pass classes=[...] in output order"
            )
        if class_map is not None:
            raise CamError(
                "class_map is not supported with multilabel=True yet: label the samples "
                "with the model's class names (fo.Classifications, or objects)"
            )
        if label_rule not in (None, "all"):
            raise CamError(
                f"label_rule={label_rule!r}: a multi-label run's ground truth is every "
                "object's class (label_rule='all')"
            )
        self._map = ClassMap.identity(classes)
        self._index = {c: i for i, c in enumerate(classes)}
        if self.label_field is None:
            return
        self._label_type = self._label_type_of(
            (fo.Classifications,) + LABEL_TYPES,
            "fo.Classifications (the image's labels), fo.Classification, or fo.Detections / "
            "fo.Polylines (every object's class is a label of the image)",
        )
        self.label_rule = "all" if self._label_type in (fo.Detections, fo.Polylines) else None
        self.gt_class_field = f"{self.heatmap_field}_gt_labels"
        path = self._label_paths()[0]
        labels = {x for x in self.samples.distinct(path) if x is not None}
        outside = sorted(labels - set(classes))
        if outside:
            message = (
                f"{len(outside)} ground-truth label(s) of '{self.label_field}' are not among the "
                f"model's classes ({', '.join(outside[:10])}{' ...' if len(outside) > 10 else ''}): "
                f"they get no map and are left out of '{self.gt_class_field}'"
            )
            self.warnings.append(message)
            warnings.warn(message, UnmappedLabelsWarning)

    def _label_type_of(self, types, accepted):
        """Which of ``types`` ``label_field`` holds; refused, saying what it
        must hold (``accepted``), when it is missing or holds another."""
        field = self.samples.get_field(self.label_field)
        if field is None:
            raise CamError(
                f"label_field '{self.label_field}' does not exist on dataset '{self.dataset.name}'"
            )
        doc_type = field.document_type if isinstance(field, fo.EmbeddedDocumentField) else None
        if doc_type is None or not issubclass(doc_type, types):
            raise CamError(f"label_field '{self.label_field}' must hold {accepted}")
        return next(t for t in types if issubclass(doc_type, t))

    def _check_classification_labels(self, classes):
        # an fo.Classification field without a class map: its labels must be
        # the model's class names, as before class maps existed
        labels = [x for x in self.samples.distinct(f"{self.label_field}.label") if x is not None]
        missing = sorted(set(labels) - set(classes))
        if missing:
            raise CamError(
                f"{len(missing)} ground-truth label(s) in '{self.label_field}' "
                f"are not among the model's {len(classes)} classes: "
                f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}. "
                "Pass classes=[...] matching the model's outputs, a class_map from "
                "these labels to the model's classes, or drop label_field"
            )

        self._gt_index = {c: i for i, c in enumerate(classes)}

    def _label_paths(self):
        if self._label_type is fo.Classifications:
            return [f"{self.label_field}.classifications.label"]
        if self._label_type is fo.Detections:
            base = f"{self.label_field}.detections"
            return [f"{base}.label", f"{base}.bounding_box"]
        if self._label_type is fo.Polylines:
            base = f"{self.label_field}.polylines"
            return [f"{base}.label", f"{base}.points", f"{base}.closed", f"{base}.filled"]
        return [f"{self.label_field}.label"]

    def _image_class(self, values):
        """The class a sample is judged by, from its values of
        :meth:`_label_paths`; None when its labels map to nothing."""
        if self._label_type is fo.Classification:
            (label,) = values
            if self.multilabel:
                # a sample without labels is unlabelled, not labelled "none"
                if label is None:
                    return None
                return (label,) if label in self._map else ()
            return label if label in self._map else None
        if self._label_type is fo.Classifications:
            (labels,) = values
            if labels is None:
                return None
            return tuple(sorted({l for l in labels if l in self._map}))
        if self._label_type is fo.Detections:
            labels, boxes = (v or [] for v in values)
            areas = [object_area(bounding_box=b) if b is not None else None for b in boxes]
        else:
            labels, points, closed, filled = (v or [] for v in values)
            areas = [object_area(points=p, closed=c, filled=f) for p, c, f in zip(points, closed, filled)]
        if self.multilabel:
            if values[0] is None:
                return None  # no labels field on this sample
            return image_classes(labels, areas, self._map)
        return image_class(labels, areas, self._map, self.label_rule)

    def _safe_image_class(self, sample_id, values):
        # labels no rule can read (odd values written by other tools) leave
        # this one sample unjudged, with a warning naming it; the others of
        # the batch go on
        try:
            return self._image_class(values)
        except (TypeError, ValueError, IndexError) as e:
            warnings.warn(
                f"Sample {sample_id}: its '{self.label_field}' labels cannot be read "
                f"({type(e).__name__}: {e}); it is treated as unmapped",
                UnmappedLabelsWarning,
            )
            return None

    def _warn_unmapped(self):
        """Says, when the run starts, how many samples have labels that map
        to nothing: they are computed (prediction and predicted-class map)
        but cannot be judged right or wrong, and are counted, not dropped."""
        from fiftyone import ViewField as F

        covered = sorted(self._map.sets)
        if self._label_type is fo.Classification:
            path = f"{self.label_field}.label"
            judged = F(path).is_in(covered)
        else:
            attr = "detections" if self._label_type is fo.Detections else "polylines"
            path = f"{self.label_field}.{attr}.label"
            kept = F("label").is_in(covered)
            if attr == "detections":
                # fo.Detection's default box is [] (no region, see object_area)
                kept = kept & (F("bounding_box").length() == 4)
            if attr == "polylines":
                kept = kept & ((F("closed") == True) | (F("filled") == True))  # noqa: E712
            judged = F(f"{self.label_field}.{attr}").filter(kept).length() > 0
        unjudged = self.samples.match(~judged)
        unmapped = unjudged.count()
        if not unmapped:
            return
        total = self.samples.count()
        # the labels of those samples, most frequent first: what a larger
        # map would have to cover
        counts = unjudged.count_values(path)
        outside = sorted((x for x in counts if x is not None), key=lambda x: (-counts[x], x))
        names = f"{', '.join(outside[:10])}{' ...' if len(outside) > 10 else ''}"
        by = "that the class map covers" if self.class_map is not None else "that is a model class"
        message = (
            f"{unmapped} of {total} samples have no ground-truth label {by}"
            + (f" (their labels: {names})" if outside else "")
            + f"; they get predictions and predicted-class maps, but no ground-truth map "
            f"and no right/wrong judgement ('{self.correct_field}' is empty), and "
            f"class_summary counts them as unmapped"
        )
        self.warnings.append(message)
        warnings.warn(message, UnmappedLabelsWarning)

    def config(self):
        clf = self.classifier
        config = {
            "cam_method": self.extractor.method.name,
            "layer": self.extractor.layer,
            "model": clf.name,
            "model_spec": os.fspath(self.model_spec) if self.model_spec is not None else None,
            "model_fingerprint": clf.fingerprint,
            "transforms": stable_identity(clf.transforms),
            "classes": list(clf.classes) if clf.classes else None,
            "label_field": self.label_field,
            "pred_field": self.pred_field,
            "heatmap_field": self.heatmap_field,
            "targets": {t.name: t.field for t in self.targets},
            "heatmap_size": self.heatmap_size,
            "store_logits": self.store_logits,
        }
        if self.multilabel:
            # the views of each class's field judge by these
            config.update(
                multilabel=True,
                threshold=self.threshold,
                label_rule=self.label_rule,
                gt_class_field=self.gt_class_field if self.label_field else None,
                class_fields={t.spec[len("class:") :]: t.field for t in self.targets},
            )
        if self.mapped:
            # the rule the views and the summary judge these samples by
            config.update(
                class_map=self.class_map.to_record() if self.class_map is not None else None,
                label_rule=self.label_rule,
                gt_class_field=self.gt_class_field,
                correct_field=self.correct_field,
            )
        return config

    def fields(self):
        return dict(self._fields)

    def outputs(self, ids, files):
        if not ids:
            return
        label_paths = self._label_paths() if self.label_field else []
        rows = values_by_id(self.samples, ids, ["filepath"] + label_paths)
        # samples deleted since the ids were read are simply gone
        ids = [i for i in ids if i in rows]
        paths = [rows[i][0] for i in ids]
        gt = [-1] * len(ids)
        image_classes = {}
        if self.multilabel and self.label_field:
            image_classes = {i: self._safe_image_class(i, rows[i][1:]) for i in ids}
            gt = [tuple(self._index[c] for c in image_classes[i] or ()) for i in ids]
        elif self.multilabel:
            gt = [()] * len(ids)
        elif self.mapped:
            image_classes = {i: self._safe_image_class(i, rows[i][1:]) for i in ids}
            gt = [self._candidates.get(image_classes[i], ()) for i in ids]
        elif self.label_field:
            gt = [self._gt_index.get(rows[i][1], -1) for i in ids]

        loader = image_loader(
            paths,
            self.classifier.transforms,
            min_side=max(self.input_shape[-2:]),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        names = self.classifier.classes
        picks = {t.name: t.pick for t in self.targets}

        def compute(group):
            return compute_batch(
                self.extractor, group, [gt[item.index] for item in group.items], picks,
                self.heatmap_size, self.device, multilabel=self.multilabel,
            )

        def output_of(sample_id, result):
            output = self._output(sample_id, result, names, files)
            if self.multilabel and self.label_field:
                labelled = image_classes[sample_id]
                output.values[self.gt_class_field] = (
                    None if labelled is None
                    else fo.Classifications(classifications=[fo.Classification(label=c) for c in labelled])
                )
            if self.mapped:
                self._judge(output, image_classes[sample_id], result, names)
            return output

        runner = BatchRunner(compute, self.batch_size)
        yield from model_outputs(self, run_loader(loader, runner), ids, output_of, CamError)

    def _prediction(self, result, names):
        logits = result.logits if self.store_logits else None
        if not self.multilabel:
            return fo.Classification(
                label=names[result.pred] if names else str(result.pred),
                confidence=result.confidence,
                logits=logits,
            )
        # every class whose probability reaches the threshold, most
        # probable first; possibly none
        order = sorted(
            (i for i, p in enumerate(result.probabilities) if p >= self.threshold),
            key=lambda i: -result.probabilities[i],
        )
        return fo.Classifications(
            classifications=[
                fo.Classification(label=names[i], confidence=float(result.probabilities[i])) for i in order
            ],
            logits=logits,
        )

    def _output(self, sample_id, result, names, files):
        values = {self.pred_field: self._prediction(result, names)}
        out_files = []
        for target in self.targets:
            framed = result.maps.get(target.name)
            if framed is None:
                continue
            path = files.path(target.name, sample_id)
            out_files.append((path, framed.levels))
            heatmap = fo.Heatmap(
                map_path=path,
                range=list(HEATMAP_RANGE),
                raw_max=framed.raw_max,
                target=names[framed.class_index] if names else str(framed.class_index),
            )
            if self.multilabel:
                # the class's probability, so the App filters each class's
                # maps by it and the views tell confident from unsure
                heatmap.confidence = float(result.probabilities[framed.class_index])
            values[target.field] = heatmap
        return SampleOutput(sample_id, values, out_files)

    def _judge(self, output, image_class, result, names):
        # unmapped samples get both fields empty: counted, not judged
        values = output.values
        values[self.gt_class_field] = None
        values[self.correct_field] = None
        if image_class is not None:
            values[self.gt_class_field] = fo.Classification(label=image_class)
            values[self.correct_field] = bool(self._map.is_correct(image_class, names[result.pred]))

    def finish(self, dataset):
        from ..scale import apply_run_scales

        appearance.apply(dataset, {t.name: t.field for t in self.targets})
        if self.multilabel:
            # each class's probability on its heatmaps, declared so that the
            # App's sidebar filters by it
            schema = dataset.get_field_schema(flat=True)
            for t in self.targets:
                name = f"{t.field}.confidence"
                if t.field in schema and name not in schema:
                    dataset.add_sample_field(name, fo.FloatField)
        # the heatmaps' display scale (``heatmap_scale`` of compute_cams, set
        # on the run type by iter_compute_cams; None keeps the recorded one),
        # applied again on every call: samples added since are scaled alike
        apply_run_scales(dataset, self.key, getattr(self, "heatmap_scale", None))

    def close(self):
        self.classifier.module.to(self._restore_device)


#: the ground-truth label types; the last two give an image the class of
#: its largest object (cam_plugin.class_map)
LABEL_TYPES = (fo.Classification, fo.Detections, fo.Polylines)


class UnmappedLabelsWarning(UserWarning):
    """Samples whose ground-truth labels map to no model class."""


def _module_device(module):
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
