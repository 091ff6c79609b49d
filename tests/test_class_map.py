"""Ground truth in another form and another vocabulary than the model's:
class maps (dict, JSON, CSV) and their errors, objects (detections,
polylines) as an image's class by the largest-object rule, and the whole
path on real data: COCO128's boxes judged for a real ImageNet classifier
(EfficientNet-Lite0) through a COCO-to-ImageNet class map, with the views
and the per-class summary."""

import json
import os
from collections import Counter
from pathlib import Path

import fiftyone as fo
import numpy as np
import pytest
import torch

import cam_plugin
from cam_plugin.batches import best_candidate
from cam_plugin.class_map import ClassMap, ClassMapError, image_class, object_area
from cam_plugin.models import CIFAR10_CLASSES

REPO = Path(__file__).resolve().parents[1]
COCO_IMAGENET_MAP = REPO / "examples" / "coco_imagenet_class_map.json"


# ---------------------------------------------------------------- parsing


def test_a_class_map_from_a_dict_json_and_csv_is_the_same_map(tmp_path):
    as_dict = {"dog": ["beagle", "pug"], "car": "sports car"}
    expected = {"dog": frozenset({"beagle", "pug"}), "car": frozenset({"sports car"})}
    assert ClassMap.load(as_dict).sets == expected

    path = tmp_path / "map.json"
    path.write_text(json.dumps(as_dict))
    assert ClassMap.load(path).sets == expected
    assert ClassMap.load(str(path)).source == str(path)

    csv_path = tmp_path / "map.csv"
    csv_path.write_text(
        "dataset_class,model_class\n"
        "# a comment line\n"
        "dog,beagle\n"
        "\n"
        'dog, "pug"\n'
        "car,sports car\n"
    )
    loaded = ClassMap.load(csv_path)
    assert loaded.sets == expected
    # several model classes on one row, too
    csv_path.write_text("dog,beagle,pug\ncar,sports car\n")
    assert ClassMap.load(csv_path).sets == expected
    # as run records store it, and back
    assert ClassMap.load(loaded.to_record()).sets == expected
    assert loaded.to_record() == [["car", ["sports car"]], ["dog", ["beagle", "pug"]]]


def test_class_map_errors_name_the_file_line_and_entry(tmp_path):
    with pytest.raises(ClassMapError, match="not found"):
        ClassMap.load(tmp_path / "missing.json")
    (tmp_path / "map.yaml").write_text("dog: beagle\n")
    with pytest.raises(ClassMapError, match=r"use a \.json file"):
        ClassMap.load(tmp_path / "map.yaml")

    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{\n  "dog": ["beagle"],\n  "car": ["cab",]\n}\n')
    with pytest.raises(ClassMapError, match=r"bad\.json, line 3: not valid JSON"):
        ClassMap.load(bad_json)
    bad_json.write_text('["dog", "beagle"]')
    with pytest.raises(ClassMapError, match="JSON object"):
        ClassMap.load(bad_json)

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("dog,beagle\ncar\n")
    with pytest.raises(ClassMapError, match=r"bad\.csv, line 2: needs a dataset class and at least one"):
        ClassMap.load(bad_csv)

    with pytest.raises(ClassMapError, match="'dog' maps to no model class"):
        ClassMap.load({"dog": []})
    with pytest.raises(ClassMapError, match="maps to 3"):
        ClassMap.load({"dog": ["beagle", 3]})
    with pytest.raises(ClassMapError, match="empty"):
        ClassMap.load({})
    with pytest.raises(ClassMapError, match="not int"):
        ClassMap.load(3)

    # model classes are checked against the model's: named, with the line
    # of a CSV file and the closest real name
    typo = tmp_path / "typo.csv"
    typo.write_text("dog,beagle\ncar,sportscar\n")
    with pytest.raises(ClassMapError) as e:
        ClassMap.load(typo).check(cam_plugin.imagenet_classes())
    message = str(e.value)
    assert "'sportscar' (for 'car', line 2; did you mean 'sports car'?)" in message
    assert "beagle" not in message


def test_the_largest_object_the_map_covers_gives_the_image_its_class():
    class_map = ClassMap.load({"dog": ["beagle"], "car": ["cab"]})
    # a person fills the frame, but no model class stands for it
    labels = ["person", "dog", "car", "dog"]
    areas = [object_area(bounding_box=b) for b in ([0, 0, 1, 1], [0, 0, 0.2, 0.2], [0, 0, 0.3, 0.3], [0, 0, 0.1, 0.1])]
    assert image_class(labels, areas, class_map) == "car"
    assert image_class(["person"], [1.0], class_map) is None
    assert image_class([], [], class_map) is None
    # equal areas: the first
    assert image_class(["dog", "car"], [0.5, 0.5], class_map) == "dog"

    square = [[(0.1, 0.1), (0.5, 0.1), (0.5, 0.5), (0.1, 0.5)]]
    assert object_area(points=square, closed=True) == pytest.approx(0.16)
    # an open, unfilled polyline makes no region: no object
    assert object_area(points=square, closed=False, filled=False) is None
    assert image_class(["car", "dog"], [None, 0.01], class_map) == "dog"
    with pytest.raises(ClassMapError, match="Unknown label rule"):
        image_class(labels, areas, class_map, rule="all")


def test_labels_without_a_region_are_no_objects():
    # fo.Detection's default box is []; boxes with a missing number, and
    # closed polylines without a shape of 3 points, make no region either:
    # a stray label must not become the image's class (nor raise)
    class_map = ClassMap.load({"dog": ["beagle"], "car": ["cab"]})
    assert fo.Detection(label="dog").bounding_box == []
    for box in ([], [0, 0, None, 1], [0, 0, float("nan"), 1], [0, 0, 1]):
        assert object_area(bounding_box=box) is None, box
    assert object_area(points=[[(0, 0), (1, 1)]], closed=True) is None
    assert object_area(points=[], closed=True) is None
    assert object_area(points=[[(0, 0), None, (1, 1)]], closed=True) is None
    areas = [object_area(bounding_box=[]), object_area(bounding_box=[0, 0, 0.1, 0.1])]
    assert image_class(["dog", "car"], areas, class_map) == "car"
    line = object_area(points=[[(0, 0), (1, 1)]], closed=True)
    assert image_class(["dog", "car"], [line, 0.01], class_map) == "car"


def test_a_class_given_twice_is_refused_not_overwritten(tmp_path):
    # json.loads keeps the last of duplicate keys, a list of pairs and keys
    # equal but for spaces did too: the first set was silently lost
    twice = tmp_path / "twice.json"
    twice.write_text('{"dog": ["beagle", "pug"], "cat": ["tabby"], "dog": ["golden retriever"]}')
    for value in (str(twice), [["dog", ["beagle"]], ["dog", ["pug"]]], {"dog": ["beagle"], " dog": ["pug"]}):
        with pytest.raises(ClassMapError, match="'dog' is given twice"):
            ClassMap.load(value)
    # CSV rows of one class add up, as documented
    rows = tmp_path / "rows.csv"
    rows.write_text("dog,beagle\ndog,pug\n")
    assert ClassMap.load(str(rows)).members("dog") == {"beagle", "pug"}


def test_a_csv_header_after_a_comment_is_a_header(tmp_path):
    path = tmp_path / "commented.csv"
    path.write_text("# COCO to ImageNet\n\ndataset_class,model_class\ndog,beagle\n")
    assert ClassMap.load(str(path)).sets == {"dog": frozenset({"beagle"})}


def test_the_ground_truth_target_is_the_member_the_model_scores_highest():
    logits = torch.tensor([[0.0, 3.0, 1.0, 5.0], [2.0, 1.0, 0.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    candidates = torch.tensor([[0, 1, 2], [2, 3, -1], [-1, -1, -1]])
    # row 0: 3 is the model's best class but not a member; row 2: none
    assert best_candidate(logits, candidates).tolist() == [1, 3, -1]


# ------------------------------------------- objects as ground truth (CIFAR)


@pytest.fixture
def cifar_with_objects(dataset_name, cifar_dir):
    """CIFAR images (2 per class) whose ground truth is also given as
    objects: the class's box, a smaller box of a class the model does not
    know, the same as polygons; two samples have only the unknown box and
    one has no objects (three samples whose labels map to nothing)."""
    from builders import cifar_dataset

    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=2)
    boxes, polygons = [], []
    for i, label in enumerate(dataset.values("ground_truth.label")):
        objects = [fo.Detection(label="person", bounding_box=[0.0, 0.0, 0.3, 0.3])]
        lines = [fo.Polyline(label="person", points=[[(0, 0), (0.3, 0), (0.3, 0.3), (0, 0.3)]], closed=True)]
        if i >= 3:
            objects.append(fo.Detection(label=label, bounding_box=[0.2, 0.2, 0.7, 0.7]))
            lines.append(
                fo.Polyline(label=label, points=[[(0.2, 0.2), (0.9, 0.2), (0.9, 0.9), (0.2, 0.9)]], filled=True)
            )
        boxes.append(fo.Detections(detections=objects) if i != 0 else None)
        polygons.append(fo.Polylines(polylines=lines) if i != 0 else None)
    dataset.set_values("objects", boxes)
    dataset.set_values("outlines", polygons)
    return dataset


def test_detections_as_ground_truth_judge_and_map_like_the_classification(cifar_with_objects, resnet20_path):
    dataset = cifar_with_objects
    model = f"cifar10_resnet20:{resnet20_path}"
    common = dict(batch_size=10, device="cpu", heatmap_size=32)
    cam_plugin.compute_cams(dataset, model, label_field="ground_truth", heatmap_field="cls",
                            pred_field="cls_prediction", **common)
    with pytest.warns(UserWarning, match="3 of 20 samples have no ground-truth label"):
        summary = cam_plugin.compute_cams(dataset, model, label_field="objects", heatmap_field="box",
                                          pred_field="box_prediction", **common)
    assert (summary.processed, summary.failed) == (20, 0)
    assert "3 of 20 samples" in summary.warnings[0] and "person" in summary.warnings[0]
    config = cam_plugin.get_run(dataset, "box")
    assert (config["label_rule"], config["class_map"]) == ("largest", None)
    assert {"box_gt_class", "box_correct"} <= set(config["fields"])
    # an fo.Classification run records nothing of the kind (as before)
    assert "correct_field" not in cam_plugin.get_run(dataset, "cls")

    for sample in dataset.iter_samples():
        assert sample.box_prediction.label == sample.cls_prediction.label
        if sample.objects is None or len(sample.objects.detections) < 2:
            # unmapped: predicted, not judged, no ground-truth map
            assert (sample.box_gt_class, sample.box_correct, sample.box_gt) == (None, None, None)
            assert sample.box is not None
            continue
        truth = sample.ground_truth.label
        assert sample.box_gt_class.label == truth  # the larger box, not the person
        assert sample.box_correct == (sample.cls_prediction.label == truth)
        assert sample.box_gt.target == truth
        np.testing.assert_array_equal(
            cam_plugin.heatmaps.read_levels(sample.box_gt.map_path),
            cam_plugin.heatmaps.read_levels(sample.cls_gt.map_path),
        )

    # polygons: the same classes by polygon area
    cam_plugin.compute_cams(dataset, model, label_field="outlines", heatmap_field="poly",
                            pred_field="poly_prediction", targets=["pred"], **common)
    assert dataset.values("poly_gt_class.label") == dataset.values("box_gt_class.label")

    # a box-less detection (fo.Detection's default) on a sample: no object,
    # and the run goes on (it stopped the whole shard before any sample)
    first = dataset.first()
    first.objects = fo.Detections(detections=[fo.Detection(label="cat")])
    first.save()
    summary = cam_plugin.compute_cams(dataset, model, label_field="objects", heatmap_field="boxless",
                                      pred_field="boxless_prediction", targets=["pred"], **common)
    assert (summary.processed, summary.failed) == (20, 0)
    assert dataset.first().boxless_gt_class is None

    with pytest.raises(cam_plugin.CamError, match="label_rule=.all.*multilabel=True"):
        cam_plugin.compute_cams(dataset, model, label_field="objects", heatmap_field="all",
                                label_rule="all", **common)
    with pytest.raises(cam_plugin.CamError, match="fo.Detections / fo.Polylines"):
        cam_plugin.compute_cams(dataset, model, label_field="filepath", heatmap_field="bad", **common)


def test_a_coarse_class_map_judges_by_the_set_and_explains_its_best_member(cifar_with_objects, resnet20_path, tmp_path):
    dataset = cifar_with_objects
    coarse = {"animal": ["bird", "cat", "deer", "dog", "frog", "horse"], "vehicle": ["airplane", "automobile"]}
    kind = {m: k for k, members in coarse.items() for m in members}
    # ship and truck samples: the map leaves them out, like the person box
    dataset.set_values(
        "coarse",
        [
            fo.Detections(detections=[fo.Detection(label=kind[label], bounding_box=[0.1, 0.1, 0.8, 0.8])])
            if label in kind else fo.Detections(detections=[fo.Detection(label="boat", bounding_box=[0, 0, 1, 1])])
            for label in dataset.values("ground_truth.label")
        ],
    )
    path = tmp_path / "coarse.csv"
    path.write_text("".join(f"{k},{m}\n" for k, members in coarse.items() for m in members))

    model = f"cifar10_resnet20:{resnet20_path}"
    with pytest.warns(UserWarning, match="4 of 20 samples"):
        cam_plugin.compute_cams(dataset, model, label_field="coarse", class_map=path, store_logits=True,
                                batch_size=10, device="cpu", heatmap_size=32)
    assert cam_plugin.get_run(dataset, "cam")["class_map"] == ClassMap.load(coarse).to_record()
    # the same map as a dict is the same run: it continues, nothing to do
    again = cam_plugin.compute_cams(dataset, model, label_field="coarse", class_map=coarse, store_logits=True,
                                    batch_size=10, device="cpu", heatmap_size=32)
    assert (again.processed, again.skipped) == (0, 20)

    judged = 0
    for sample in dataset.iter_samples():
        truth = sample.ground_truth.label
        if truth not in kind:
            assert sample.cam_correct is None and sample.cam_gt is None
            continue
        judged += 1
        members = coarse[kind[truth]]
        assert sample.cam_gt_class.label == kind[truth]
        assert sample.cam_correct == (sample.cam_prediction.label in members)
        logits = np.asarray(sample.cam_prediction.logits)
        best = max(members, key=lambda m: logits[CIFAR10_CLASSES.index(m)])
        assert sample.cam_gt.target == best
    assert judged == 16

    # an unknown model class is refused before anything is written
    with pytest.raises(cam_plugin.CamError, match="'spaceship' .*for 'vehicle'"):
        cam_plugin.compute_cams(dataset, model, label_field="coarse", heatmap_field="typo",
                                class_map={"vehicle": ["spaceship"]}, device="cpu")
    assert "typo" not in dataset.get_field_schema()

    # the views and the summary judge by the run's set rule
    cam_plugin.compute_attention(dataset, "cam", "coarse", device="cpu")
    assert cam_plugin.get_run(dataset, "cam_attention")["label_field"] == "cam_gt_class"
    field = {f.heatmap_field: f for f in cam_plugin.attention_fields(dataset)}["cam"]
    assert field.usable and (field.label_field, field.correct_field) == ("cam_gt_class", "cam_correct")
    views = cam_plugin.attention_views(dataset, "cam", max_object_area=0.9)
    for name in ("misclassified_background", "misclassified_on_object", "qa_confident_disagreement"):
        assert set(views[name].values("cam_correct")) <= {False}, name
    assert set(views["correct_background"].values("cam_correct")) <= {True}
    rows = cam_plugin.class_summary(dataset, "cam", max_object_area=0.9, min_samples=1)
    assert {r["class"] for r in rows} == {"animal", "vehicle"}
    assert sum(r["samples"] for r in rows) == 16
    assert rows.unmapped == 4 and rows.unmapped_labels == {"boat": 4}
    for row in rows:
        members = dataset.match(fo.ViewField("cam_gt_class.label") == row["class"])
        assert row["accuracy"] == pytest.approx(np.mean(members.values("cam_correct")))

    import forms

    note = forms.summary_note(rows, "cam", "the whole dataset (20 samples)")
    assert "4 samples whose labels the class map does not cover are in no class (their labels: boat 4)" in note

    # an fo.Classification field in the dataset's vocabulary: the same rule
    dataset.set_values("kind", [fo.Classification(label=kind.get(label, "boat"))
                                for label in dataset.values("ground_truth.label")])
    cam_plugin.compute_cams(dataset, model, label_field="kind", class_map=coarse, heatmap_field="kind_cam",
                            pred_field="kind_prediction", targets=["pred"], batch_size=10, device="cpu",
                            heatmap_size=32)
    assert dataset.values("kind_cam_correct") == dataset.values("cam_correct")
    assert dataset.values("kind_cam_gt_class.label") == dataset.values("cam_gt_class.label")


def test_the_form_reads_and_checks_a_class_map_file(cifar_with_objects, resnet20_path, tmp_path):
    import asyncio

    import fiftyone.operators as foo
    from fiftyone.operators.executor import resolve_type

    dataset = cifar_with_objects

    def form(**params):
        request = {"dataset_name": dataset.name, "params": params, "view": []}
        prop = asyncio.run(resolve_type(foo.OperatorRegistry(), "@cam-plugin/cam/compute_cams", request))
        return prop.to_json()["type"]["properties"]

    model = f"cifar10_resnet20:{resnet20_path}"
    props = form(model=model, targets="both", label_field="objects")
    assert {"objects", "outlines", "ground_truth"} <= {c["value"] for c in props["label_field"]["view"]["choices"]}
    assert not props["class_map_file"].get("invalid")

    bad = tmp_path / "map.csv"
    bad.write_text("animal,cat\nvehicle\n")
    props = form(model=model, targets="both", label_field="objects", class_map_file=str(bad))
    assert props["class_map_file"]["invalid"] and "line 2" in props["class_map_file"]["error_message"]

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"animal": ["cat", "dog"]}))
    props = form(model=model, targets="both", label_field="objects", class_map_file=str(good))
    assert not props["class_map_file"].get("invalid")
    assert props["class_map_read"]["view"]["label"].startswith("1 dataset classes mapped: animal")

    import forms

    kwargs = forms.compute_cams_kwargs(dict(model=model, label_field="objects", class_map_file=f" {good} "))
    assert kwargs["class_map"] == str(good)


# ------------------------------- acceptance: COCO128 and an ImageNet model


@pytest.fixture(scope="module")
def efficientnet_imagenet():
    from builders import efficientnet_lite0

    return efficientnet_lite0(cam_plugin.imagenet_classes())


def _largest_mapped_box(label_file, names, class_map):
    """The image class by the largest-object rule, computed from the YOLO
    label file itself (box area ``w * h``)."""
    best, best_area = None, -1.0
    if os.path.isfile(label_file):
        for line in Path(label_file).read_text().splitlines():
            parts = line.split()
            if not parts:
                continue
            label, w, h = names[int(parts[0])], float(parts[3]), float(parts[4])
            if label in class_map and w * h > best_area:
                best, best_area = label, w * h
    return best


def test_coco128_boxes_judged_for_an_imagenet_model_through_a_class_map(coco_dir, efficientnet_imagenet, dataset_name):
    from builders import _read_yaml_names, coco128_dataset

    dataset = coco128_dataset(dataset_name, coco_dir)
    class_map = json.loads(COCO_IMAGENET_MAP.read_text())
    names = _read_yaml_names(coco_dir / "config.yaml", "names")
    expected_class = {
        s.filepath: _largest_mapped_box(coco_dir / "labels" / f"{Path(s.filepath).stem}.txt", names, class_map)
        for s in dataset.select_fields()
    }
    unmapped = sum(c is None for c in expected_class.values())

    with pytest.warns(UserWarning, match=f"{unmapped} of 128 samples"):
        summary = cam_plugin.compute_cams(
            dataset, efficientnet_imagenet, label_field="ground_truth", class_map=COCO_IMAGENET_MAP,
            store_logits=True, heatmap_size=64, batch_size=16, device="cpu",
        )
    assert (summary.processed, summary.failed) == (128, 0)
    assert "person" in summary.warnings[0]

    sets = {k: set(v) for k, v in class_map.items()}
    right = judged = 0
    for sample in dataset.iter_samples():
        image_class = expected_class[sample.filepath]
        predicted = sample.cam_prediction.label
        if image_class is None:
            assert (sample.cam_gt_class, sample.cam_correct, sample.cam_gt) == (None, None, None)
            continue
        judged += 1
        assert sample.cam_gt_class.label == image_class
        # the set rule: right when the prediction is one of the class's
        assert sample.cam_correct == (predicted in sets[image_class])
        right += sample.cam_correct
        # the ground-truth map explains the member the model scores highest
        logits = np.asarray(sample.cam_prediction.logits)
        classes = efficientnet_imagenet.classes
        assert sample.cam_gt.target == max(sets[image_class], key=lambda m: logits[classes.index(m)])
    assert judged + unmapped == 128 and judged >= 40
    accuracy = right / judged
    print(f"\nCOCO128 under the class map: {judged} judged, {unmapped} unmapped, accuracy {accuracy:.3f}")
    # a real ImageNet model names many COCO objects right, and not all
    assert 0.15 < accuracy < 0.95, accuracy

    cam_plugin.compute_attention(dataset, "cam", "ground_truth", device="cpu")
    views = cam_plugin.attention_views(dataset, "cam")
    assert set(views) == set(cam_plugin.VIEW_DESCRIPTIONS)
    for name in ("misclassified_background", "misclassified_on_object", "qa_confident_disagreement"):
        assert set(views[name].values("cam_correct")) <= {False}, name
    assert set(views["correct_background"].values("cam_correct")) <= {True}
    # the view that needs no image class keeps the unmapped samples
    qa = views["qa_unlabelled_attention"]
    assert qa.count() == dataset.exists("cam_prediction").match(
        (fo.ViewField("cam_prediction.confidence") >= 0.8)
        & (fo.ViewField("cam_pointing_hit") == False)  # noqa: E712
        & (fo.ViewField("cam_object_area") <= 0.6)
        & (fo.ViewField("cam_object_energy") < fo.ViewField("cam_object_area") + 0.15 * (1 - fo.ViewField("cam_object_area")))
    ).count()

    rows = cam_plugin.class_summary(dataset, "cam", min_samples=1)
    assert rows.unmapped == unmapped
    assert rows.unmapped_labels["person"] >= 1
    # every judged sample whose object is small enough to tell from the
    # background is counted in its class
    measured = dataset.exists("cam_gt_class").match(fo.ViewField("cam_object_area") <= 0.6)
    assert {r["class"]: r["samples"] for r in rows} == Counter(measured.values("cam_gt_class.label"))
    for row in rows:
        of_class = measured.match(fo.ViewField("cam_gt_class.label") == row["class"])
        assert row["accuracy"] == pytest.approx(np.mean(of_class.values("cam_correct")))
        assert cam_plugin.class_view(dataset, row["class"], "cam").count() == row["off_object"]
    print("classes:", ", ".join(f"{r['class']} {r['samples']} ({r['accuracy']:.0%})" for r in rows))
    print("unmapped:", rows.unmapped, rows.unmapped_labels)
