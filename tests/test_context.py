"""Attention named by context labels (compute_context) against a
brute-force reference on real COCO maps of a real ImageNet classifier:
the shared semantic masks (thing and stuff classes) and the boxes, the
summary per class and the view a matrix cell opens."""

import numpy as np
import pytest
from PIL import Image

import fiftyone as fo
from fiftyone import ViewField as F

import cam_plugin


@pytest.fixture(scope="module")
def coco_maps(coco_dir):
    from builders import coco128_dataset, efficientnet_lite0

    name = "t_context_coco"
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    dataset = coco128_dataset(name, coco_dir)
    view = dataset.exists("segmentation").limit(16)
    clf = efficientnet_lite0(classes=cam_plugin.imagenet_classes())
    summary = cam_plugin.compute_cams(view, clf, heatmap_size=96, progress=False)
    assert summary.processed == 16
    yield dataset, view
    fo.delete_dataset(name)


def _levels(heatmap):
    with Image.open(heatmap.map_path) as img:
        return np.asarray(img, dtype=np.float64)


def _brute_force(heat, value_at):
    """Every map pixel's mass to the classes ``value_at(cy, cx)`` gives at
    its centre, one pixel at a time."""
    h, w = heat.shape
    mass = {}
    for i in range(h):
        for j in range(w):
            for name in value_at((i + 0.5) / h, (j + 0.5) / w):
                mass[name] = mass.get(name, 0.0) + heat[i, j]
    total = heat.sum()
    return {name: m / total for name, m in mass.items()}


def _stored(sample, field="cam_context"):
    return {c.label: c.confidence for c in sample[field].classifications}


def test_context_shares_on_semantic_masks_match_a_brute_force_reference(coco_maps):
    dataset, view = coco_maps
    names = dataset.mask_targets["segmentation"]
    summary = cam_plugin.compute_context(view, "cam", "segmentation", progress=False)
    assert summary.processed == 16 and summary.failed == 0, summary

    stuff_seen = set()
    for sample in view.view():
        heat = _levels(sample.cam)
        mask = np.asarray(Image.open(sample.segmentation.mask_path))
        mh, mw = mask.shape

        def value_at(cy, cx):
            return [names[int(mask[int(cy * mh), int(cx * mw)])]]

        reference = _brute_force(heat, value_at)
        stored = _stored(sample)
        expected = {k: v for k, v in reference.items() if v >= 0.01}
        assert set(stored) == set(expected), (sample.filepath, stored, expected)
        for name, share in expected.items():
            assert stored[name] == pytest.approx(share, abs=1e-6)
        # a semantic mask shares the whole map out (what is below 1% aside)
        assert sum(reference.values()) == pytest.approx(1.0, abs=1e-9)
        shares = [c.confidence for c in sample.cam_context.classifications]
        assert shares == sorted(shares, reverse=True)
        stuff_seen |= set(stored) & {"sky", "grass", "wall", "road", "tree", "floor", "sea", "snow", "sand"}
    # stuff classes are named, not only objects
    assert stuff_seen, "no stuff class among 16 COCO images"

    # the App filters the field natively: attention on a class above 30%
    top = view.filter_labels("cam_context", F("confidence") >= 0.3)
    assert 0 < top.count() <= 16
    for sample in top:
        assert all(c.confidence >= 0.3 for c in sample.cam_context.classifications)


def test_context_shares_on_overlapping_boxes_count_each_pixel_once_per_class(coco_maps):
    dataset, view = coco_maps
    # another run on the same heatmap field writes the same output field:
    # it must be refused, not overwrite the masks' shares
    with pytest.raises(cam_plugin.RunError, match="cam_context"):
        cam_plugin.compute_context(view, "cam", "ground_truth", run_key="cam_box_context", progress=False)

    before = view.values("cam_context.classifications.confidence")
    clone = dataset.clone()
    try:
        # (the clone carries the masks' run: replaced by the boxes' there,
        # the original's shares untouched)
        cloned = clone.select(view.values("id"))
        cam_plugin.compute_context(cloned, "cam", "ground_truth", min_share=0.0, overwrite=True, progress=False)
        assert view.values("cam_context.classifications.confidence") == before
        assert cloned.values("cam_context.classifications.label") != view.values("cam_context.classifications.label")
        overlapping = 0
        for sample in cloned:
            heat = _levels(sample.cam)
            dets = sample.ground_truth.detections

            def value_at(cy, cx):
                inside = {
                    d.label for d in dets
                    if d.bounding_box[0] <= cx < d.bounding_box[0] + d.bounding_box[2]
                    and d.bounding_box[1] <= cy < d.bounding_box[1] + d.bounding_box[3]
                }
                return sorted(inside)

            reference = _brute_force(heat, value_at)
            stored = _stored(sample)
            assert set(stored) == {k for k, v in reference.items() if v > 0}
            for name, share in reference.items():
                if share > 0:
                    assert stored[name] == pytest.approx(share, abs=1e-6)
            labels = [d.label for d in dets]
            overlapping += len(labels) != len(set(labels))
        # two people's boxes overlapping count once: checked above on
        # images with repeated classes
        assert overlapping >= 3
    finally:
        clone.delete()


def test_context_summary_ranks_classes_and_a_cell_opens_its_samples(coco_maps, tmp_path):
    dataset, view = coco_maps
    # each image's class: its largest box's (what compute_cams' objects
    # ground truth would do, here by hand to have a Classification field)
    for sample in view:
        largest = max(sample.ground_truth.detections, key=lambda d: d.bounding_box[2] * d.bounding_box[3])
        sample["image_class"] = fo.Classification(label=largest.label)
        sample.save()
    rows = cam_plugin.context_summary(view, by="pred")
    assert sum(r.samples for r in rows) == 16
    for row in rows:
        assert list(row.shares.values()) == sorted(row.shares.values(), reverse=True)
        name, share = row.top
        cell = cam_plugin.context_view(view, row.class_name, name, by="pred")
        members = cell.values("cam_context.classifications")
        assert 0 < len(members) <= row.samples
        # most attention on the context class first
        got = [max(c.confidence for c in cl if c.label == name) for cl in members]
        assert got == sorted(got, reverse=True)
        # the row's mean is the mean over its samples (absent = 0)
        of_class = view.match(F("cam_prediction.label") == row.class_name).values("cam_context.classifications")
        mean = np.mean([sum(c.confidence for c in cl if c.label == name) for cl in of_class])
        assert share == pytest.approx(mean, abs=1e-9)

    with pytest.raises(cam_plugin.views.ViewsError, match="without ground truth"):
        cam_plugin.context_summary(view, by="gt")
    by_gt = cam_plugin.context_summary(view, by="gt", label_field="image_class")
    assert sum(r.samples for r in by_gt) == 16
    assert sum(r.misclassified for r in by_gt) == sum(
        p != g for p, g in zip(*view.values(["cam_prediction.label", "image_class.label"]))
    )
