"""Attention metrics through the product path: real CAMs of a real ImageNet
classifier on real COCO images, measured against boxes, polygons and
semantic masks by compute_attention, and checked against brute-force numpy
references computed from the stored heatmap files."""

import math

import fiftyone as fo
import numpy as np
import pytest

import cam_plugin
from cam_plugin import heatmaps
from builders import efficientnet_lite0
from test_metrics import reference_metrics, reference_top_iou
from test_regions import THING_IDS, reference_boxes, reference_polylines, reference_segmentation

HEATMAP_SIZE = 256


@pytest.fixture(scope="module")
def efficientnet_classifier():
    return efficientnet_lite0()


@pytest.fixture(scope="module")
def coco_with_cams(coco_dir, efficientnet_classifier):
    from builders import coco128_dataset

    name = "t_attention_coco"
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    dataset = coco128_dataset(name, coco_dir)
    # pred and 2nd-most-likely class maps: two real maps per sample to
    # compare (COCO has no single image class, so no ground-truth maps)
    summary = cam_plugin.compute_cams(
        dataset,
        efficientnet_classifier,
        targets=["pred", "top2"],
        heatmap_size=HEATMAP_SIZE,
        batch_size=16,
    )
    assert summary.processed == len(dataset)
    yield dataset
    fo.delete_dataset(name)


def _reference_region(kind, sample, targets, height, width):
    if kind == "ground_truth":
        return reference_boxes(sample.ground_truth, height, width)
    if kind == "polygons":
        return reference_polylines(sample["polygons"], height, width)
    return reference_segmentation(sample.segmentation.mask_path, THING_IDS, height, width)


@pytest.mark.parametrize("kind", ["ground_truth", "polygons", "segmentation"])
def test_metrics_match_brute_force_reference(coco_with_cams, kind):
    dataset = coco_with_cams
    mask_values = THING_IDS if kind == "segmentation" else None
    result = cam_plugin.compute_attention(
        dataset,
        "cam",
        kind,
        gt_heatmap_field="cam_top2",
        region_classes="all",
        mask_values=mask_values,
        overwrite=True,
        device="cpu",
    )
    assert result.processed == len(dataset) and result.status == "completed"
    config = cam_plugin.get_run(dataset, "cam_attention")
    assert config["region_field"] == kind and config["depends_on"] == ["cam"]

    targets = dataset.mask_targets["segmentation"]
    checked = 0
    hits = set()
    for sample in dataset:
        heat = heatmaps.read_levels(sample.cam.map_path)
        height, width = heat.shape
        tolerance = round(15.0 * width / sample.metadata.width * 2) / 2
        border = reference_metrics(heat, np.zeros_like(heat, dtype=bool))["border_energy"]
        assert sample.cam_border_energy == pytest.approx(border, abs=1e-6)

        other = heatmaps.read_levels(sample.cam_top2.map_path)
        agreement = reference_top_iou(heat, other)
        if math.isnan(agreement):
            assert sample.cam_pred_gt_agreement is None
        else:
            assert sample.cam_pred_gt_agreement == pytest.approx(agreement, abs=1e-6)

        if sample[kind] is None:
            assert sample.cam_object_energy is None
            continue

        region = _reference_region(kind, sample, targets, height, width)
        expected = reference_metrics(heat, region, tolerance=tolerance)
        for key in ("object_energy", "object_area", "pointing_hit"):
            got = sample[f"cam_{key}"]
            if math.isnan(expected[key]):
                assert got is None, (sample.filepath, key)
            else:
                assert float(got) == pytest.approx(expected[key], abs=1e-6), (sample.filepath, key)
        hits.add(sample.cam_pointing_hit)
        checked += 1

    assert checked >= 100
    assert hits >= {True, False}  # both outcomes occur: the check can fail


def test_attention_runs_are_guarded_and_deleted_with_their_cam_run(
    coco_dir, efficientnet_classifier, dataset_name
):
    from builders import coco128_dataset

    dataset = coco128_dataset(dataset_name, coco_dir)
    dataset.delete_samples(dataset.take(len(dataset) - 6, seed=0))  # six are enough
    cam_plugin.compute_cams(dataset, efficientnet_classifier, heatmap_size=64)
    cam_plugin.compute_attention(dataset, "cam", "ground_truth")
    with pytest.raises(cam_plugin.RunError, match="different configuration"):
        cam_plugin.compute_attention(dataset, "cam", "ground_truth", tolerance=3.0)
    # the same call again has nothing left to do
    again = cam_plugin.compute_attention(dataset, "cam", "ground_truth")
    assert (again.processed, again.skipped) == (0, len(dataset))
    assert "cam_object_energy" in dataset.get_field_schema()

    cam_plugin.delete_run(dataset, "cam")
    schema = dataset.get_field_schema()
    assert not any(name.startswith("cam") for name in schema), sorted(schema)
    assert cam_plugin.list_runs(dataset) == []
