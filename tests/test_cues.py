"""Cue discovery on planted data with two different cues: a red patch that
goes with circles and a black-and-white checker patch that goes with
squares (80% of the training images of those classes; triangles carry
none). A small CNN trained here learns both shortcuts; on test images any
cue lands on any shape, and the mistakes each cue drives must have their
hotspots in one group per cue (recall and purity >= 0.8, two distinct
groups). Also: hotspot boxes in the full frame, the run record, saved views,
the Embeddings panel's visualization, deletion, resumption."""

import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

import fiftyone as fo
from fiftyone import ViewField as F

import cam_plugin
import demo  # examples/demo.py, put on the path by conftest.py
from cam_plugin.runs import cues as cue_runs

CUES = {"red": "circle", "checker": "square"}
CUE_SIDE = 12


def _draw(rng, shape, cue, faint):
    """One 128x96 image: a shape on demo's background and, with ``cue``, a
    red or checker patch away from it; returns the image, the shape's box
    and the cue's pixel box."""
    width, height = demo.IMAGE_SIZE
    pixels = demo._background(rng)
    size = rng.uniform(36, 50)
    polygon, box, spots = demo._place_shape(rng, shape, size, CUE_SIDE)
    contrast = rng.uniform(*(demo.FAINT_CONTRAST if faint else demo.CLEAR_CONTRAST))
    colour = demo._muted_color(rng, pixels.mean(axis=(0, 1)), contrast)
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).polygon(polygon, fill=255)
    alpha = np.asarray(mask, dtype=np.float32)[:, :, None] / 255
    pixels = pixels * (1 - alpha) + colour * alpha
    cue_box = None
    if cue is not None:
        x0, y0 = (int(v) for v in spots[rng.integers(len(spots))])
        if cue == "red":
            patch = np.array([225, 30, 30], dtype=np.float32) + rng.uniform(-15, 15, size=3)
        else:
            yy, xx = np.mgrid[0:CUE_SIDE, 0:CUE_SIDE]
            patch = np.where(((yy // 3 + xx // 3) % 2 == 0)[:, :, None], 245.0, 10.0)
        pixels[y0 : y0 + CUE_SIDE, x0 : x0 + CUE_SIDE] = patch
        cue_box = (x0, y0, x0 + CUE_SIDE, y0 + CUE_SIDE)
    pixels += demo.PIXEL_NOISE * rng.standard_normal(pixels.shape, dtype=np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
    return image, box, cue_box


def _relative(box):
    width, height = demo.IMAGE_SIZE
    x0, y0, x1, y1 = max(0.0, box[0]), max(0.0, box[1]), min(width, box[2]), min(height, box[3])
    return [x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height]


def _images(root, seed=0, n_train=600, n_test=240):
    rng = np.random.default_rng(seed)
    records = []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            shape = demo.CLASSES[i % 3]
            if split == "train":
                own = {v: k for k, v in CUES.items()}.get(shape)
                cue = own if own and rng.random() < 0.8 else (rng.choice(list(CUES)) if rng.random() < 0.2 else None)
            else:
                cue = (list(CUES) + [None])[int(rng.integers(3))]
            faint = rng.random() < 0.5
            image, box, cue_box = _draw(rng, shape, cue, faint)
            path = root / f"{split}-{i:04d}.png"
            image.save(path)
            records.append(dict(filepath=str(path), split=split, label=shape, box=box, cue=cue, cue_box=cue_box))
    return records


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The images and a model trained on them (in memory)."""
    root = tmp_path_factory.mktemp("two_cues")
    records = _images(root)
    config = demo.DemoConfig(epochs=15)
    classifier = demo.train_model(records, seed=0, config=config, log=lambda *a: None)
    return records, classifier


def _dataset(name, records):
    dataset = fo.Dataset(name)
    samples = []
    for r in records:
        if r["split"] != "test":
            continue
        sample = fo.Sample(
            filepath=r["filepath"],
            ground_truth=fo.Classification(label=r["label"]),
            objects=fo.Detections(detections=[fo.Detection(label=r["label"], bounding_box=_relative(r["box"]))]),
            cue=r["cue"],
        )
        scene = [fo.Detection(label="shape", bounding_box=_relative(r["box"]))]
        if r["cue_box"]:
            sample["cue_box"] = fo.Detection(label=r["cue"], bounding_box=_relative(r["cue_box"]))
            scene.append(fo.Detection(label=f"{r['cue']} patch", bounding_box=_relative(r["cue_box"])))
        # what a user's context labels would say is in the image
        sample["scene"] = fo.Detections(detections=scene)
        samples.append(sample)
    dataset.add_samples(samples)
    return dataset


def _on(box, cue_box):
    """Whether a hotspot's box centre lies on the cue patch (one patch
    side of slack: maps are coarser than the patch)."""
    if cue_box is None:
        return False
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    x, y, w, h = cue_box
    return x - w <= cx <= x + 2 * w and y - h <= cy <= y + 2 * h


def test_the_mistakes_of_each_cue_fall_in_one_group_per_cue(dataset_name, planted):
    records, classifier = planted
    dataset = _dataset(dataset_name, records)
    cam_plugin.compute_cams(dataset, classifier, label_field="ground_truth", batch_size=32, num_workers=0, device="cpu")
    # context labels measured on the maps name the groups
    cam_plugin.compute_context(dataset, "cam", "scene")
    summary = cam_plugin.discover_cues(
        dataset, classifier, region_field="objects", batch_size=32, num_workers=0, device="cpu"
    )
    assert summary.processed == len(dataset)
    groups = cam_plugin.cue_groups(dataset)
    assert len(groups) >= 2

    ids, spots, cue_boxes, cues, gts, preds = dataset.values(
        ["id", "cam_hotspots.detections", "cue_box.bounding_box", "cue", "ground_truth.label", "cam_prediction.label"]
    )
    found = {}
    for cue, cls in CUES.items():
        # the mistakes this cue drove: a shape of another class called the cue's class
        driven = [
            i for i in range(len(ids)) if cues[i] == cue and preds[i] == cls and gts[i] != cls
        ]
        assert len(driven) >= 10, f"the model follows the {cue} cue on only {len(driven)} test images"
        on_cue = [s.group for i in driven for s in spots[i] or [] if _on(s.bounding_box, cue_boxes[i])]
        assert len(on_cue) >= 0.8 * len(driven), (cue, len(on_cue), len(driven))
        group, count = max(((g, on_cue.count(g)) for g in set(on_cue)), key=lambda x: x[1])
        recall = count / len(on_cue)
        members = [(i, s) for i in range(len(ids)) for s in spots[i] or [] if s.group == group]
        purity = sum(cues[i] == cue and _on(s.bounding_box, cue_boxes[i]) for i, s in members) / len(members)
        found[cue] = (group, recall, purity)
        assert recall >= 0.8 and purity >= 0.8, (cue, recall, purity, len(members))
    assert found["red"][0] != found["checker"][0]

    # the groups' record: numbered by the mistakes they explain, named, viewed
    assert [g.group for g in groups] == list(range(1, len(groups) + 1))
    assert [g.mistakes for g in groups] == sorted((g.mistakes for g in groups), reverse=True)
    red = next(g for g in groups if g.group == found["red"][0])
    checker = next(g for g in groups if g.group == found["checker"][0])
    assert (red.name, checker.name) == ("red patch", "checker patch")
    assert red.pred_classes and next(iter(red.pred_classes)) == "circle"
    view = dataset.load_saved_view(red.view)
    assert set(view.distinct("cam_hotspots.detections.group")) == {red.group}
    patches = dataset.load_saved_view(red.patches_view)
    assert len(patches) == red.size
    assert set(red.typical) <= set(patches.values("id"))
    # thumbnails of the typical hotspots, the hotspot outlined
    assert len(red.thumbnails) == len(red.typical) > 0
    with Image.open(red.thumbnails[0]) as tile:
        assert tile.height == 96
        pixels = np.asarray(tile.convert("RGB")).reshape(-1, 3)
    assert ((pixels == (255, 214, 0)).all(axis=1)).sum() > 20
    # the Embeddings panel's points: one per hotspot
    viz = dataset.load_brain_results(f"{summary.key}_viz")
    assert len(viz.current_points) == sum(g.size for g in groups)
    labels = dataset.values("cam_hotspots.detections.label", unwind=True)
    assert set(labels) == {g.name for g in groups}

    # deleting the CAM run deletes the cue run, its views and its visualization
    cam_plugin.delete_run(dataset, "cam")
    assert not dataset.has_field("cam_hotspots")
    assert not dataset.list_saved_views() and not dataset.list_brain_runs()
    assert not any(os.path.exists(p) for g in groups for p in g.thumbnails)


def test_hotspot_boxes_are_in_the_full_image_frame(dataset_name, planted):
    """A crop-transform model (the model sees the centre square of 4:3
    images): a hotspot on a cue patch has its box on the patch in the full
    frame, not shifted by the crop."""
    records, classifier = planted
    dataset = _dataset(dataset_name, [r for r in records if r["split"] == "test" and r["cue"] == "red"][:40])
    cam_plugin.compute_cams(dataset, classifier, label_field="ground_truth", batch_size=32, num_workers=0, device="cpu")
    cam_plugin.discover_cues(dataset, classifier, region_field="objects", num_groups=2, brain_key=False,
                             batch_size=32, num_workers=0, device="cpu")
    errors = []
    for sample in dataset.match(F("cam_prediction.label") == "circle"):
        spots = sample.cam_hotspots.detections
        top = max(spots, key=lambda s: s.share, default=None) if spots else None
        if top is None or not _on(top.bounding_box, sample.cue_box.bounding_box):
            continue
        (x, y, w, h), (cx, cy, cw, ch) = top.bounding_box, sample.cue_box.bounding_box
        # the crop cuts the width: a box not mapped back is off along x
        errors.append(max(abs((x + w / 2) - (cx + cw / 2)) * demo.IMAGE_SIZE[0],
                          abs((y + h / 2) - (cy + ch / 2)) * demo.IMAGE_SIZE[1]))
    assert len(errors) >= 10
    # maps of a 6x6 feature grid over a 96 px square: a cell is 16 px
    assert np.median(errors) <= 6, errors


def test_the_embedding_pools_the_layer_under_the_hotspot():
    """_feature_cells: a map pixel falls in the feature cell of the input
    window it lies in; pixels outside the window (a centre crop's strips)
    fall in none."""
    cells = cue_runs._feature_cells((16, 0, 112, 96), (128, 96), (96, 128), (6, 6))
    assert cells.shape == (96, 128)
    assert (cells[:, :16] == -1).all() and (cells[:, 112:] == -1).all()
    assert cells[0, 16] == 0 and cells[95, 111] == 35
    assert cells[40, 16 + 40] == (40 // 16) * 6 + 40 // 16


def test_discover_cues_refuses_what_it_cannot_do(dataset_name, planted):
    records, classifier = planted
    dataset = _dataset(dataset_name, [r for r in records if r["split"] == "test"][:6])
    with pytest.raises(ValueError, match="'cam' is not an fo.Heatmap field"):
        cam_plugin.discover_cues(dataset, classifier)
    cam_plugin.compute_cams(dataset, classifier, label_field="ground_truth", num_workers=0, device="cpu")
    with pytest.raises(ValueError, match="in-memory model"):
        cam_plugin.discover_cues(dataset)
    with pytest.raises(ValueError, match="min_share"):
        cam_plugin.discover_cues(dataset, classifier, min_share=2)
    with pytest.raises(ValueError, match="num_groups"):
        cam_plugin.discover_cues(dataset, classifier, num_groups=0)
