"""Ground truth in another vocabulary than the model's: a class map from
dataset classes to sets of model classes, and the rule that gives an image
labelled with objects its one class.

A COCO dataset labels ``dog``; an ImageNet classifier answers ``beagle`` or
``pug``. A :class:`ClassMap` says which model classes stand for each dataset
class (``{"dog": [the 118 ImageNet dog breeds], "car": ["sports car",
"convertible", "cab", ...]}``); under it

-   a prediction is *correct* when it is one of the model classes of the
    sample's dataset class,
-   the ground-truth map explains the member of that set the model scores
    highest (what the model would have had to answer), and
-   a sample whose labels map to nothing is *unmapped*: it gets its
    prediction and predicted-class map, no ground-truth map and no
    right/wrong judgement, and is counted as such.

An image labelled with objects (``fo.Detections`` / ``fo.Polylines``) gets
its class by :data:`LABEL_RULES`: ``"largest"``, the class of its largest
object among those whose class the map covers (an ImageNet model cannot
name a person, so a person filling a street scene would otherwise leave
the car in it unjudged). Objects are compared by area in normalised
coordinates (boxes: ``w * h``; closed or filled polylines: the shoelace
area of their shapes), which orders them as their pixel areas do.

No FiftyOne here.
"""

import csv
import difflib
import io
import json
import math
import os
from dataclasses import dataclass, field

#: how an image labelled with objects gets its class: ``"largest"``, its
#: largest object's (a single-label model), or ``"all"``, every object's
#: class, each a target of its own (a multi-label model, see
#: :func:`image_classes`)
LABEL_RULES = ("largest", "all")


class ClassMapError(ValueError):
    """A class map that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class ClassMap:
    """Dataset classes mapped to the sets of model classes that stand for
    them.

    Attributes:
        sets: a dict from dataset class to a ``frozenset`` of model classes
        source: where the map came from (a file path, ``"dict"``), for
            messages
    """

    sets: dict
    source: str = "dict"
    # (dataset class, model class) -> the file line that named it, for
    # messages about a CSV file's entries
    lines: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, value):
        """A class map from a :class:`ClassMap`, a dict (dataset class to a
        model class or a list of them), a list of ``[dataset class, [model
        classes]]`` pairs (how run records store it), or the path of a JSON
        file (such a dict) or a CSV file (rows ``dataset class, model
        class[, model class ...]``; a dataset class may take several rows;
        an optional header row starts with ``dataset_class``; ``#`` starts
        a comment line).

        Raises:
            ClassMapError: naming the file, the line or the entry at fault
        """
        if isinstance(value, ClassMap):
            return value
        if isinstance(value, dict):
            return cls._from_dict(value, "dict")
        if isinstance(value, (list, tuple)):
            try:
                pairs = [(k, v) for k, v in value]
            except (TypeError, ValueError):
                raise ClassMapError(
                    "A class map given as a list must hold [dataset class, [model classes]] pairs"
                ) from None
            return cls._from_dict(_unique(pairs, "the list"), "list")
        if isinstance(value, (str, os.PathLike)):
            return cls._from_file(os.fspath(value))
        raise ClassMapError(
            f"A class map must be a dict, a ClassMap or the path of a JSON or CSV file, "
            f"not {type(value).__name__}"
        )

    @classmethod
    def identity(cls, model_classes):
        """Each model class standing for itself: the map used when a
        dataset's labels are already the model's class names."""
        return cls({c: frozenset([c]) for c in model_classes if c is not None}, "the model's classes")

    @classmethod
    def _from_dict(cls, mapping, source, lines=None):
        sets = {}
        for key, members in mapping.items():
            where = f" ({source})" if source not in ("dict", "list") else ""
            if not isinstance(key, str) or not key.strip():
                raise ClassMapError(f"Class map{where}: dataset class {key!r} must be a non-empty string")
            if isinstance(members, str):
                members = [members]
            try:
                members = list(members)
            except TypeError:
                raise ClassMapError(
                    f"Class map{where}: '{key}' must map to a model class or a list of "
                    f"them, not {type(members).__name__}"
                ) from None
            bad = [m for m in members if not isinstance(m, str) or not m.strip()]
            if bad:
                raise ClassMapError(
                    f"Class map{where}: '{key}' maps to {bad[0]!r}; model classes are non-empty strings"
                )
            if not members:
                raise ClassMapError(
                    f"Class map{where}: '{key}' maps to no model class; remove it (its samples "
                    "are then reported as unmapped) or give at least one"
                )
            if key.strip() in sets:
                # " dog" and "dog": one would silently replace the other
                raise ClassMapError(
                    f"Class map{where}: '{key.strip()}' is given twice; give all its model "
                    "classes in one entry"
                )
            sets[key.strip()] = frozenset(m.strip() for m in members)
        if not sets:
            raise ClassMapError(f"The class map ({source}) is empty: map at least one dataset class")
        return cls(sets, source, dict(lines or {}))

    @classmethod
    def _from_file(cls, path):
        if not os.path.isfile(path):
            raise ClassMapError(f"Class map file not found: {path}")
        ext = os.path.splitext(path)[1].lower()
        if ext not in (".json", ".csv"):
            raise ClassMapError(
                f"Class map file {path}: use a .json file (a dict of dataset class to "
                "model classes) or a .csv file (rows: dataset class, model class ...)"
            )
        try:
            with open(path, encoding="utf-8-sig") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ClassMapError(f"Class map file {path} cannot be read: {e}") from e
        if ext == ".json":
            try:
                # json keeps the last of duplicate keys: refused instead
                mapping = json.loads(text, object_pairs_hook=lambda pairs: _unique(pairs, path))
            except json.JSONDecodeError as e:
                raise ClassMapError(f"Class map file {path}, line {e.lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(mapping, dict):
                raise ClassMapError(
                    f"Class map file {path} must hold a JSON object from dataset class to "
                    f"model classes, not a {type(mapping).__name__}"
                )
            return cls._from_dict(mapping, path)
        return cls._from_csv(text, path)

    @classmethod
    def _from_csv(cls, text, path):
        mapping, lines = {}, {}
        first = True
        for number, row in enumerate(csv.reader(io.StringIO(text), skipinitialspace=True), start=1):
            cells = [c.strip() for c in row]
            if not any(cells) or cells[0].startswith("#"):
                continue
            # the header, if any, is the first row of data (after comments)
            header, first = first and cells[0].lower().replace(" ", "_") == "dataset_class", False
            if header:
                continue
            members = [c for c in cells[1:] if c]
            if not cells[0] or not members:
                raise ClassMapError(
                    f"Class map file {path}, line {number}: needs a dataset class and at least "
                    f"one model class (got {','.join(row)!r})"
                )
            mapping.setdefault(cells[0], []).extend(members)
            for m in members:
                lines.setdefault((cells[0], m), number)
        return cls._from_dict(mapping, path, lines)

    def check(self, model_classes):
        """Refuses a map naming classes the model does not have.

        Raises:
            ClassMapError: naming the unknown model classes (with the line
                of a CSV file, and the closest model class names)
        """
        known = set(model_classes)
        unknown = sorted(
            (dataset_class, m)
            for dataset_class, members in self.sets.items()
            for m in members
            if m not in known
        )
        if not unknown:
            return
        described = []
        for dataset_class, m in unknown[:8]:
            line = self.lines.get((dataset_class, m))
            close = difflib.get_close_matches(m, known, n=1)
            described.append(
                f"'{m}' (for '{dataset_class}'{f', line {line}' if line else ''}"
                f"{f'; did you mean {close[0]!r}?' if close else ''})"
            )
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise ClassMapError(
            f"The class map ({self.source}) names {len(unknown)} class(es) the model does not "
            f"have: {', '.join(described)}{more}. Use the model's class names exactly "
            f"({len(known)} classes, e.g. {', '.join(repr(c) for c in list(model_classes)[:3])})"
        )

    def __contains__(self, dataset_class):
        return dataset_class in self.sets

    def __len__(self):
        return len(self.sets)

    def members(self, dataset_class):
        """The model classes standing for a dataset class (empty when the
        map does not cover it)."""
        return self.sets.get(dataset_class, frozenset())

    def is_correct(self, dataset_class, predicted):
        """Whether predicting ``predicted`` is right for an image of
        ``dataset_class``: None when the map does not cover the class."""
        if dataset_class not in self.sets:
            return None
        return predicted in self.sets[dataset_class]

    def to_record(self):
        """The map as run records store it: ``[dataset class, [model
        classes]]`` pairs, sorted (MongoDB keys may not hold every class
        name, e.g. one with a dot)."""
        return [[k, sorted(v)] for k, v in sorted(self.sets.items())]


def object_area(bounding_box=None, points=None, closed=None, filled=None):
    """The area, in normalised coordinates, of a box ``[x, y, w, h]`` or of
    a polyline's shapes; None for an open, unfilled polyline (it makes no
    region, so it is no object of the image), a label with neither, and
    one whose geometry is not a region (``fo.Detection``'s default box is
    ``[]``; a box with a missing number; a polyline without a shape of 3
    points): a stray label must not become the image's class, nor stop
    the run."""
    if bounding_box is not None:
        try:
            _, _, w, h = (float(v) for v in bounding_box)
        except (TypeError, ValueError):
            return None
        if not (math.isfinite(w) and math.isfinite(h)):
            return None
        return max(0.0, w) * max(0.0, h)
    if points is None or not (closed or filled):
        return None
    area, shapes = 0.0, 0
    for shape in points:
        try:
            xs = [float(p[0]) for p in shape]
            ys = [float(p[1]) for p in shape]
        except (TypeError, ValueError, IndexError):
            continue
        if len(xs) < 3:
            continue
        twice = sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))
        if math.isfinite(twice):
            area += abs(twice) / 2
            shapes += 1
    return area if shapes else None


def image_class(labels, areas, class_map, rule="largest"):
    """The class of an image labelled with objects: under ``"largest"``,
    the label of its largest object whose class ``class_map`` covers (the
    first of equal ones), or None when no object's class is covered.

    Args:
        labels: the objects' labels
        areas: their areas (see :func:`object_area`), in the same order;
            objects whose area is None are no objects
        class_map: a :class:`ClassMap`
        rule ("largest"): one of :data:`LABEL_RULES`
    """
    if rule != "largest":
        raise ClassMapError(f"Unknown label rule {rule!r} for one image class: use 'largest'")
    best, best_area = None, -1.0
    for label, area in zip(labels, areas):
        if area is not None and label in class_map and area > best_area:
            best, best_area = label, area
    return best


def image_classes(labels, areas, class_map):
    """The classes of an image labelled with objects under ``"all"``: the
    labels of its objects whose class ``class_map`` covers, each once, in
    sorted order (objects whose area is None are no objects)."""
    return tuple(sorted({l for l, a in zip(labels, areas) if a is not None and l in class_map}))


def _unique(pairs, source):
    """A dict of ``(key, value)`` pairs, refusing a key given twice (a JSON
    object or a list would otherwise keep only the last)."""
    mapping = {}
    for key, value in pairs:
        if key in mapping:
            raise ClassMapError(
                f"Class map ({source}): '{key}' is given twice; give all its model classes in one entry"
            )
        mapping[key] = value
    return mapping
