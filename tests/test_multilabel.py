"""Multi-label classifiers: a small sigmoid model trained here on images
with two planted objects (a red and a blue square, each present or not).
Each class gets its own heatmap field, whose maps peak on that class's
object; each class's maps are measured against that class's boxes, and
its views and summary judge that class alone."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn

import fiftyone as fo

import cam_plugin

SIZE = 48
PATCH = 11
CLASSES = ["red", "blue"]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
TRANSFORMS = T.Compose([T.Resize((SIZE, SIZE)), T.ToTensor()])


def _image(rng, present):
    """A grey-noise image with a square of each present class, apart; the
    squares' top-left corners by class."""
    image = rng.integers(90, 160, (SIZE, SIZE, 3)).astype(np.uint8)
    corners = {}
    for name in present:
        while True:
            x, y = (int(v) for v in rng.integers(0, SIZE - PATCH, 2))
            if all(abs(x - a) >= PATCH + 2 or abs(y - b) >= PATCH + 2 for a, b in corners.values()):
                break
        image[y : y + PATCH, x : x + PATCH] = COLOURS[name]
        corners[name] = (x, y)
    return image, corners


class TwoObjectNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, len(CLASSES))

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def _presence(rng):
    return [name for name in CLASSES if rng.random() < 0.5]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images, targets = [], []
    for _ in range(600):
        present = _presence(rng)
        image, _ = _image(rng, present)
        images.append(TRANSFORMS(Image.fromarray(image)))
        targets.append([float(c in present) for c in CLASSES])
    x, y = torch.stack(images), torch.tensor(targets)
    net = TwoObjectNet()
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    for step in range(400):
        batch = torch.randint(0, len(x), (64,))
        optimiser.zero_grad()
        loss_fn(net(x[batch]), y[batch]).backward()
        optimiser.step()
    net.eval()
    with torch.no_grad():
        accuracy = ((net(x) > 0).float() == y).float().mean().item()
    assert accuracy > 0.97, f"the planted model did not learn its two objects ({accuracy:.3f})"
    return net


@pytest.fixture
def dataset(dataset_name, tmp_path):
    """24 test images: each combination of the two objects six times. The
    labels name what is drawn, except on the first image with both, whose
    blue square is missing from its labels (an annotation slip)."""
    rng = np.random.default_rng(1)
    combinations = [[], ["red"], ["blue"], ["red", "blue"]] * 6
    samples = []
    slipped = False
    for i, present in enumerate(combinations):
        image, corners = _image(rng, present)
        path = str(tmp_path / f"img{i:02d}.png")
        Image.fromarray(image).save(path)
        labelled = list(present)
        if present == ["red", "blue"] and not slipped:
            labelled, slipped = ["red"], True
        samples.append(
            fo.Sample(
                filepath=path,
                drawn=present,
                corners={k: list(v) for k, v in corners.items()},
                ground_truth=fo.Classifications(classifications=[fo.Classification(label=c) for c in labelled]),
                objects=fo.Detections(
                    detections=[
                        fo.Detection(
                            label=c,
                            bounding_box=[corners[c][0] / SIZE, corners[c][1] / SIZE, PATCH / SIZE, PATCH / SIZE],
                        )
                        for c in labelled
                    ]
                ),
            )
        )
    ds = fo.Dataset(dataset_name)
    ds.add_samples(samples)
    return ds


COMMON = dict(classes=CLASSES, transforms=TRANSFORMS, num_workers=0, multilabel=True)


def _peak(heatmap):
    levels = np.asarray(Image.open(heatmap.map_path))
    y, x = np.unravel_index(np.argmax(levels), levels.shape)
    # the map covers the full image frame: scale to image pixels
    return (x + 0.5) * SIZE / levels.shape[1], (y + 0.5) * SIZE / levels.shape[0]


def test_each_label_gets_its_own_map_peaking_on_its_object(model, dataset):
    summary = cam_plugin.compute_cams(dataset, model, label_field="ground_truth", **COMMON)
    assert (summary.processed, summary.failed) == (24, 0)
    schema = dataset.get_field_schema()
    assert schema["cam_prediction"].document_type is fo.Classifications
    assert {"cam_red", "cam_blue", "cam_gt_labels"} <= set(schema)

    checked = 0
    for sample in dataset:
        x = TRANSFORMS(Image.open(sample.filepath).convert("RGB"))[None]
        with torch.no_grad():
            probabilities = torch.sigmoid(model(x))[0].tolist()
        expected = sorted(
            (c for c, p in zip(CLASSES, probabilities) if p >= 0.5), key=lambda c: -probabilities[CLASSES.index(c)]
        )
        predictions = sample.cam_prediction.classifications
        assert [p.label for p in predictions] == expected
        for p in predictions:
            assert p.confidence == pytest.approx(probabilities[CLASSES.index(p.label)], abs=1e-5)
        labelled = {c.label for c in sample.ground_truth.classifications}
        assert [c.label for c in sample.cam_gt_labels.classifications] == sorted(labelled)
        for index, c in enumerate(CLASSES):
            heatmap = sample[f"cam_{c}"]
            # a map exactly for the classes predicted or labelled
            assert (heatmap is not None) == (c in expected or c in labelled), (sample.filepath, c)
            if heatmap is None:
                continue
            assert heatmap.target == c
            assert heatmap.confidence == pytest.approx(probabilities[index], abs=1e-5)
            if c in sample.drawn:
                px, py = _peak(heatmap)
                x0, y0 = sample.corners[c]
                # the peak on the class's square (a map pixel of slack)
                assert x0 - 3 <= px <= x0 + PATCH + 3 and y0 - 3 <= py <= y0 + PATCH + 3, (
                    sample.filepath, c, (px, py), (x0, y0)
                )
                checked += 1
    assert checked >= 20

    # continuing with the same arguments computes nothing again
    again = cam_plugin.compute_cams(dataset, model, label_field="ground_truth", **COMMON)
    assert again.processed == 0


def test_per_label_metrics_views_and_summary(model, dataset):
    cam_plugin.compute_cams(dataset, model, label_field="ground_truth", **COMMON)
    # each class's probability is a declared field the sidebar filters by
    assert {"cam_red.confidence", "cam_blue.confidence"} <= set(dataset.get_field_schema(flat=True))
    with pytest.raises(cam_plugin.CamError, match="no run_key"):
        cam_plugin.compute_label_attention(dataset, "objects", run_key="mine")
    results = cam_plugin.compute_label_attention(dataset, "objects")
    assert set(results) == {"red", "blue"}

    for c in CLASSES:
        energy = dataset.values(f"cam_{c}_object_energy")
        area = dataset.values(f"cam_{c}_object_area")
        hits = dataset.values(f"cam_{c}_pointing_hit")
        for sample, e, a, h in zip(dataset, energy, area, hits):
            labelled = {d.label for d in sample.objects.detections}
            if sample[f"cam_{c}"] is None:
                assert e is None
                continue
            if c in labelled:
                # the region is this class's square only, never the other's
                assert a == pytest.approx(PATCH * PATCH / SIZE**2, abs=0.02)
                assert h is True and e > 0.3, (sample.filepath, c, e)
            else:
                assert a == 0 and h is None

    # the slipped label: blue drawn and predicted, not labelled
    slipped = dataset.match(fo.ViewField("drawn").length() == 2).first()
    views = cam_plugin.attention_views(dataset, "cam_blue")
    assert set(views) == set(cam_plugin.VIEW_DESCRIPTIONS)
    assert slipped.id in views["qa_unlabelled_attention"].values("id")
    assert dataset.load_saved_view("cam_blue_qa_unlabelled_attention").count() == views[
        "qa_unlabelled_attention"
    ].count()

    # every view is what its definition says, from the stored fields
    t = cam_plugin.Thresholds()
    for c in CLASSES:
        views = cam_plugin.attention_views(dataset, f"cam_{c}", save=False)
        expected = {name: set() for name in views}
        for s in dataset:
            heatmap = s[f"cam_{c}"]
            if heatmap is None:
                continue
            labelled = c in {x.label for x in s.cam_gt_labels.classifications}
            predicted = c in {x.label for x in s.cam_prediction.classifications}
            e, a = s[f"cam_{c}_object_energy"], s[f"cam_{c}_object_area"]
            measured = e is not None and a is not None and 0 < a <= t.max_object_area
            background = measured and e < a + t.background_focus * (1 - a)
            on_object = measured and e >= a + t.object_focus * (1 - a)
            if measured and labelled != predicted and background:
                expected["misclassified_background"].add(s.id)
            if measured and labelled != predicted and on_object:
                expected["misclassified_on_object"].add(s.id)
            if measured and labelled and predicted and background:
                expected["correct_background"].add(s.id)
            if measured and labelled and not predicted and on_object and heatmap.confidence <= 1 - t.confidence:
                expected["qa_confident_disagreement"].add(s.id)
            off = measured and s[f"cam_{c}_pointing_hit"] is False and background
            if heatmap.confidence >= t.confidence and (not labelled or off):
                expected["qa_unlabelled_attention"].add(s.id)
            if s[f"cam_{c}_border_energy"] >= t.border_energy:
                expected["border_attention"].add(s.id)
        for name, view in views.items():
            assert set(view.values("id")) == expected[name], (c, name)

    # per class: measured over the samples labelled with it; recall as accuracy
    rows = cam_plugin.label_summary(dataset)
    assert {r["class"] for r in rows} == {"red", "blue"}
    for row in rows:
        c = row["class"]
        assert row["heatmap_field"] == f"cam_{c}"
        positives = dataset.match(
            fo.ViewField("cam_gt_labels.classifications").filter(fo.ViewField("label") == c).length() > 0
        )
        assert row["samples"] == positives.count()
        recall = np.mean([c in {x.label for x in s.cam_prediction.classifications} for s in positives])
        assert row["accuracy"] == pytest.approx(recall)
        assert row["off_object"] == 0 and row["accuracy"] > 0.9
        assert cam_plugin.class_summary(dataset, f"cam_{c}")[0] == {
            k: v for k, v in row.items() if k != "heatmap_field"
        }
    assert cam_plugin.class_view(dataset, "red", "cam_red").count() == 0


def test_objects_as_multi_label_ground_truth(model, dataset):
    # every object's class is a label of the image (label_rule="all")
    cam_plugin.compute_cams(dataset, model, label_field="objects", **COMMON)
    assert dataset.values("cam_gt_labels.classifications.label") == [
        sorted(d.label for d in s.objects.detections) for s in dataset
    ]
    assert cam_plugin.get_run(dataset, "cam")["label_rule"] == "all"


def test_multi_label_refusals(model, dataset):
    def refused(match, **kwargs):
        with pytest.raises(cam_plugin.CamError, match=match):
            cam_plugin.compute_cams(dataset, model, **dict(COMMON, **kwargs))

    refused("label_rule='largest'", label_field="objects", label_rule="largest")
    refused("class_map is not supported with multilabel", label_field="ground_truth", class_map={"red": ["red"]})
    refused("choose classes with", targets=["pred"])
    refused("'green' is not among", targets=["class:green"])
    refused("threshold must be a probability", threshold=1.5)
    refused("must hold fo.Classifications", label_field="filepath")
    refused("class names are unknown", classes=None)
    # a single-label run cannot take every object's class
    with pytest.raises(cam_plugin.CamError, match="multilabel=True"):
        cam_plugin.compute_cams(
            dataset, model, classes=CLASSES, transforms=TRANSFORMS, num_workers=0,
            label_field="objects", label_rule="all",
        )
    assert not cam_plugin.list_runs(dataset)
    assert "cam_red" not in dataset.get_field_schema()


def test_a_class_subset_and_labels_the_model_lacks(model, dataset):
    sample = dataset.first()
    sample.ground_truth.classifications.append(fo.Classification(label="green"))
    sample.save()
    last = dataset.last()
    last.ground_truth = None
    last.save()
    with pytest.warns(UserWarning, match="green"):
        cam_plugin.compute_cams(dataset, model, label_field="ground_truth", targets=["class:blue"], **COMMON)
    schema = dataset.get_field_schema()
    assert "cam_blue" in schema and "cam_red" not in schema
    # a sample without labels at all is not "labelled with nothing"
    last = dataset.last()
    assert last.cam_gt_labels is None
    # the unknown label is left out of the labels the run judged by
    assert all("green" not in (labels or []) for labels in dataset.values("cam_gt_labels.classifications.label"))


def test_the_app_form_and_a_sharded_delegated_run(model, dataset, tmp_path):
    """The compute_cams form, resolved as the App does, offers the
    multi-label switch and its threshold; a TorchScript file of the model,
    queued in two shards and computed by a real `fiftyone delegated launch`
    worker, gives the maps an in-process run gives."""
    from fiftyone.operators.executor import ExecutionRunState

    from builders import form_errors, resolve_form, run_delegated

    path = str(tmp_path / "two_objects.pt")
    torch.jit.script(model).save(path)
    uri = "@cam-plugin/cam/compute_cams"
    params = dict(model_source="file", model_path=path, classes="red, blue", multilabel=True)
    props = resolve_form(uri, dataset, **params)
    assert props["threshold"]["default"] == 0.5
    assert "ground_truth" in [c["value"] for c in props["label_field"]["view"]["choices"]]
    assert "targets" not in props and "class_map_file" not in props
    assert not form_errors(props)
    assert "threshold" in form_errors(resolve_form(uri, dataset, threshold=1.0, **params))

    # the same file, computed here: the reference
    by_file = dict(label_field="ground_truth", classes=CLASSES, multilabel=True)
    cam_plugin.compute_cams(dataset, path, heatmap_field="here", pred_field="here_prediction",
                            num_workers=0, **by_file)

    summary = cam_plugin.compute_cams(
        dataset, path, heatmap_field="queued", pred_field="queued_prediction",
        num_shards=2, delegate=True, **by_file,
    )
    assert len(summary.queued) == 2, summary
    states, logs = run_delegated(dataset, tmp_path / "worker.log")
    assert states == [ExecutionRunState.COMPLETED] * 2, logs
    dataset.reload()
    assert cam_plugin.get_run(dataset, "queued")["class_fields"] == {"red": "queued_red", "blue": "queued_blue"}
    assert dataset.count("queued_prediction") == len(dataset)
    for sample in dataset:
        assert [(p.label, round(p.confidence, 5)) for p in sample.queued_prediction.classifications] == [
            (p.label, round(p.confidence, 5)) for p in sample.here_prediction.classifications
        ]
        assert [x.label for x in sample.queued_gt_labels.classifications] == [
            x.label for x in sample.here_gt_labels.classifications
        ]
        for c in CLASSES:
            queued, here = sample[f"queued_{c}"], sample[f"here_{c}"]
            assert (queued is None) == (here is None)
            if here is not None:
                np.testing.assert_array_equal(
                    np.asarray(Image.open(queued.map_path)), np.asarray(Image.open(here.map_path))
                )
