"""Tests of cam_plugin.regions: hand-computed masks that pin the definitions,
and every COCO128 sample's box, polygon and mask regions against plain numpy
references written from the definitions."""

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import fiftyone as fo

from cam_plugin.regions import (
    box_masks,
    default_region_classes,
    pixel_centres,
    region_labels,
    region_mask,
)

THING_IDS = set(range(1, 92))
MAX_SIDE = 256


# --- brute-force references: numpy, straight from the definitions ---------


def reference_centres(height, width):
    """Pixel centre grids (CY, CX), each (height, width)."""
    cy = (np.arange(height) + 0.5) / height
    cx = (np.arange(width) + 0.5) / width
    return np.meshgrid(cy, cx, indexing="ij")


def reference_box(box, height, width):
    x, y, w, h = box
    cy, cx = reference_centres(height, width)
    return (x <= cx) & (cx < x + w) & (y <= cy) & (cy < y + h)


def reference_boxes(detections, height, width, classes=None):
    region = np.zeros((height, width), dtype=bool)
    for det in detections.detections if detections is not None else []:
        if classes is None or det.label in classes:
            region |= reference_box(det.bounding_box, height, width)
    return region


def reference_polygon(shapes, height, width):
    """Crossing-number test at every pixel centre: a pixel toggles for each
    edge that spans its row and crosses the ray to its right."""
    cy, cx = reference_centres(height, width)
    inside = np.zeros((height, width), dtype=bool)
    for shape in shapes:
        for k in range(len(shape)):
            (x1, y1), (x2, y2) = shape[k], shape[(k + 1) % len(shape)]
            # Rows the edge does not span are left alone (no division there)
            spans = (y1 > cy[:, 0]) != (y2 > cy[:, 0])
            py, px = cy[spans, :1], cx[0]
            inside[spans] ^= px < (x2 - x1) * (py - y1) / (y2 - y1) + x1
    return inside


def reference_polylines(polylines, height, width, classes=None):
    region = np.zeros((height, width), dtype=bool)
    for poly in polylines.polylines if polylines is not None else []:
        if (poly.closed or poly.filled) and (classes is None or poly.label in classes):
            region |= reference_polygon(poly.points, height, width)
    return region


def reference_mask_values(mask, height, width):
    """mask[floor(cy * mh), floor(cx * mw)], clamped, at every centre."""
    cy, cx = reference_centres(height, width)
    mh, mw = mask.shape
    rows = np.minimum(mh - 1, np.floor(cy * mh).astype(int))
    cols = np.minimum(mw - 1, np.floor(cx * mw).astype(int))
    return mask[rows, cols]


def reference_segmentation(mask_path, values, height, width):
    mask = np.asarray(Image.open(mask_path))
    return np.isin(reference_mask_values(mask, height, width), sorted(values))


def grid_size(width, height, max_side=MAX_SIDE):
    """The image size scaled to ``max_side`` on its longer side."""
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


# --- COCO128 ----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def load_coco128(coco_dir):
    """Every COCO128 sample's labels and map grid size, plus the mask
    targets: built once per session (building the dataset is the slow part)
    and kept as plain objects, so the dataset itself is deleted at once."""
    from builders import coco128_dataset

    name = "t_regions_coco128"
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    dataset = coco128_dataset(name, coco_dir)
    try:
        samples = [
            {
                "grid": grid_size(s.metadata.width, s.metadata.height),
                "ground_truth": s.ground_truth,
                "polygons": s["polygons"],
                "segmentation": s["segmentation"],
            }
            for s in dataset.iter_samples()
        ]
        targets = dict(dataset.mask_targets["segmentation"])
    finally:
        fo.delete_dataset(name)
    return samples, targets


@pytest.fixture(scope="module")
def coco(coco_dir):
    return load_coco128(coco_dir)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Runs this module's small per-sample tensors on one thread: splitting
    them only adds synchronisation, which on a busy 2-core machine costs far
    more than the work (the thread count is restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _assert_same(actual, expected, what):
    assert actual.dtype == torch.bool and tuple(actual.shape) == expected.shape, what
    diff = int((actual.numpy() != expected).sum())
    assert diff == 0, f"{what}: {diff} pixels differ"


REGION_KINDS = ("boxes", "polygons", "things", "person")


@functools.lru_cache(maxsize=None)
def coco_regions(coco_dir, kind):
    """For every COCO128 sample with that kind of label: its index, grid
    ``(w, h)``, :func:`region_mask`'s region and the reference region.

    Kinds: ``boxes`` (ground_truth), ``polygons``, ``things`` (segmentation
    values 1-91), ``person`` (segmentation, by class name). Cached so that
    test_metrics reuses the regions checked here.
    """
    samples, targets = load_coco128(coco_dir)
    out = []
    for k, s in enumerate(samples):
        w, h = s["grid"]
        if kind == "boxes":
            label = s["ground_truth"]
            out.append((k, (w, h), region_mask(label, w, h), reference_boxes(label, h, w)))
        elif kind == "polygons":
            label = s["polygons"]
            out.append((k, (w, h), region_mask(label, w, h), reference_polylines(label, h, w)))
        elif s["segmentation"] is not None:
            seg = s["segmentation"]
            if kind == "things":
                region = region_mask(seg, w, h, mask_values=THING_IDS)
                values = THING_IDS
            else:
                region = region_mask(seg, w, h, classes={"person"}, mask_targets=targets)
                values = {v for v, name in targets.items() if name == "person"}
            out.append((k, (w, h), region, reference_segmentation(seg.mask_path, values, h, w)))
    return out


@pytest.mark.parametrize("kind", REGION_KINDS)
def test_coco_regions_match_reference(coco_dir, kind):
    regions = coco_regions(coco_dir, kind)
    for k, _, region, expected in regions:
        _assert_same(region, expected, f"{kind}, sample {k}")

    # The comparison is not vacuous: regions of every kind exist, varied
    # in size; samples without polygons / masks have empty regions
    assert len(regions) == (128 if kind in ("boxes", "polygons") else 100)
    nonempty = sum(expected.any() for *_, expected in regions)
    assert {"boxes": 126, "polygons": 98, "things": 98, "person": 40}[kind] <= nonempty
    assert np.std([expected.mean() for *_, expected in regions]) > 0.05


def test_coco_person_values(coco):
    _, targets = coco
    assert {v for v, name in targets.items() if name == "person"} == {1}


def test_coco_box_classes_match_reference(coco):
    samples, _ = coco
    for k, s in enumerate(samples):
        w, h = s["grid"]
        dets = s["ground_truth"]
        # One class only: the first box's
        first = {dets.detections[0].label} if dets.detections else {"none"}
        _assert_same(
            region_mask(dets, w, h, classes=first),
            reference_boxes(dets, h, w, classes=first),
            f"sample {k}, classes {first}",
        )


def test_coco_batched_box_masks_match_reference(coco):
    samples, _ = coco
    by_grid = {}
    for s in samples:
        by_grid.setdefault(s["grid"], []).append(s["ground_truth"])
    for (w, h), group in by_grid.items():
        most = max(1, max(len(d.detections) for d in group))
        boxes = torch.zeros((len(group), most, 4), dtype=torch.float64)
        valid = torch.zeros((len(group), most), dtype=torch.bool)
        for n, dets in enumerate(group):
            for k, det in enumerate(dets.detections):
                boxes[n, k] = torch.tensor(det.bounding_box, dtype=torch.float64)
                valid[n, k] = True
        regions = box_masks(boxes, valid, h, w)
        for n, dets in enumerate(group):
            _assert_same(regions[n], reference_boxes(dets, h, w), f"grid {w}x{h} #{n}")


def test_coco_region_labels_and_default_classes(coco):
    samples, targets = coco
    for s in samples:
        gt = s["ground_truth"]
        names = region_labels(gt)
        assert names == {d.label for d in gt.detections}
        for name in names:
            assert default_region_classes(name, names) == {name}
        assert default_region_classes("no such class", names) is None

        seg = s["segmentation"]
        if seg is not None:
            present = set(np.unique(np.asarray(Image.open(seg.mask_path))).tolist()) - {0}
            assert region_labels(seg, targets) == {targets[v] for v in present}


# --- hand-computed regions ---------------------------------------------------


def _grid(rows):
    return np.array(rows, dtype=bool)


def test_pixel_centres():
    cy, cx = pixel_centres(2, 4)
    assert cy.tolist() == [0.25, 0.75]
    assert cx.tolist() == [0.125, 0.375, 0.625, 0.875]


def test_box_on_tiny_grid():
    det = fo.Detection(label="a", bounding_box=[0.25, 0.25, 0.5, 0.5])
    expected = _grid([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    _assert_same(region_mask(det, 4, 4), expected, "box")


def test_box_is_half_open():
    # Centres of a 4-wide row: 0.125, 0.375, 0.625, 0.875; the box's left
    # edge sits on the second centre (in), its right edge on the third (out)
    det = fo.Detection(label="a", bounding_box=[0.375, 0.0, 0.25, 1.0])
    _assert_same(region_mask(det, 4, 1), _grid([[0, 1, 0, 0]]), "half-open box")


def test_instance_mask_covers_its_box(tmp_path):
    mask = np.array([[1, 0], [0, 1]], dtype=bool)
    # The box is the right half of a 4 x 2 grid; the 2 x 2 mask maps one
    # mask pixel onto each of its four pixels
    expected = _grid([[0, 0, 1, 0], [0, 0, 0, 1]])
    det = fo.Detection(label="a", bounding_box=[0.5, 0.0, 0.5, 1.0], mask=mask)
    _assert_same(region_mask(det, 4, 2), expected, "mask")

    path = tmp_path / "instance.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    det = fo.Detection(label="a", bounding_box=[0.5, 0.0, 0.5, 1.0], mask_path=str(path))
    _assert_same(region_mask(det, 4, 2), expected, "mask_path")


def test_instance_mask_index_is_clamped():
    # A 3-row mask over a box of 2 grid rows: rows sample mask rows
    # floor(0.25 * 3) = 0 and floor(0.75 * 3) = 2
    mask = np.array([[1], [0], [0]], dtype=bool)
    det = fo.Detection(label="a", bounding_box=[0.0, 0.0, 1.0, 1.0], mask=mask)
    _assert_same(region_mask(det, 1, 2), _grid([[1], [0]]), "rows")
    mask = np.array([[0], [0], [1]], dtype=bool)
    det = fo.Detection(label="a", bounding_box=[0.0, 0.0, 1.0, 1.0], mask=mask)
    _assert_same(region_mask(det, 1, 2), _grid([[0], [1]]), "rows")


def test_detections_union_and_classes():
    dets = fo.Detections(
        detections=[
            fo.Detection(label="a", bounding_box=[0.0, 0.0, 0.5, 0.5]),
            fo.Detection(label="b", bounding_box=[0.5, 0.5, 0.5, 0.5]),
        ]
    )
    both = _grid([[1, 0], [0, 1]])
    _assert_same(region_mask(dets, 2, 2), both, "union")
    _assert_same(region_mask(dets, 2, 2, classes={"b"}), _grid([[0, 0], [0, 1]]), "b only")
    _assert_same(region_mask(dets, 2, 2, classes={"c"}), _grid([[0, 0], [0, 0]]), "none")
    _assert_same(region_mask(None, 2, 2), _grid([[0, 0], [0, 0]]), "no label")


def test_triangle():
    # Below the anti-diagonal: a centre is inside iff cx + cy < 1, i.e.
    # i + j < 3 on a 4 x 4 grid (centres on the diagonal are outside: the
    # crossing test is strict there)
    tri = fo.Polyline(label="t", points=[[(0, 0), (1, 0), (0, 1)]], closed=True)
    expected = np.add.outer(np.arange(4), np.arange(4)) < 3
    _assert_same(region_mask(tri, 4, 4), expected, "triangle")


def test_polygon_with_hole():
    outer = [(0.1, 0.1), (0.9, 0.1), (0.9, 0.9), (0.1, 0.9)]
    inner = [(0.3, 0.3), (0.7, 0.3), (0.7, 0.7), (0.3, 0.7)]
    ring = fo.Polyline(label="r", points=[outer, inner], closed=True, filled=True)
    # Centres 0.05, 0.15, ..., 0.95: rows/columns 1-8 are inside the outer
    # square, rows/columns 3-6 inside the hole
    expected = np.zeros((10, 10), dtype=bool)
    expected[1:9, 1:9] = True
    expected[3:7, 3:7] = False
    region = region_mask(ring, 10, 10)
    _assert_same(region, expected, "ring")
    assert int(region.sum()) == 48


def test_open_polylines_make_no_region():
    pts = [[(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]]
    line = fo.Polyline(label="l", points=pts, closed=False, filled=False)
    assert not region_mask(line, 4, 4).any()
    assert region_labels(fo.Polylines(polylines=[line])) == set()
    filled = fo.Polyline(label="l", points=pts, closed=False, filled=True)
    assert region_mask(filled, 4, 4).all()
    assert region_labels(fo.Polylines(polylines=[filled])) == {"l"}


SEG = np.array([[0, 1, 2], [3, 1, 0]], dtype=np.uint8)


def test_segmentation_value_sets():
    seg = fo.Segmentation(mask=SEG)
    # On a 6 x 4 grid each mask pixel covers a 2 x 2 block
    _assert_same(
        region_mask(seg, 6, 4),
        _grid([[0, 0, 1, 1, 1, 1]] * 2 + [[1, 1, 1, 1, 0, 0]] * 2),
        "non-zero",
    )
    _assert_same(
        region_mask(seg, 6, 4, mask_values={1, 3}),
        _grid([[0, 0, 1, 1, 0, 0]] * 2 + [[1, 1, 1, 1, 0, 0]] * 2),
        "{1, 3}",
    )
    targets = {0: "background", 1: "a", 2: "b", 3: "c"}
    _assert_same(
        region_mask(seg, 6, 4, classes={"c"}, mask_targets=targets),
        _grid([[0] * 6] * 2 + [[1, 1, 0, 0, 0, 0]] * 2),
        "class c",
    )
    # Classes and values together: values named in classes
    _assert_same(
        region_mask(seg, 6, 4, classes={"a", "c"}, mask_values={1, 2}, mask_targets=targets),
        _grid([[0, 0, 1, 1, 0, 0]] * 2 + [[0, 0, 1, 1, 0, 0]] * 2),
        "a and {1, 2}",
    )
    with pytest.raises(ValueError):
        region_mask(seg, 6, 4, classes={"a"})
    assert region_labels(seg, targets) == {"a", "b", "c"}
    assert region_labels(seg) == set()


def test_segmentation_nearest_sampling_downscales():
    # A 2 x 2 grid samples rows/columns floor(0.25 * 4) = 1 and floor(0.75 * 4) = 3
    seg = fo.Segmentation(mask=np.arange(16).reshape(4, 4))
    _assert_same(region_mask(seg, 2, 2, mask_values={5, 15}), _grid([[1, 0], [0, 1]]), "5, 15")
    _assert_same(region_mask(seg, 2, 2, mask_values={7, 13}), _grid([[0, 1], [1, 0]]), "7, 13")


def test_segmentation_mask_path(tmp_path):
    path = tmp_path / "seg.png"
    Image.fromarray(SEG).save(path)
    from_file = region_mask(fo.Segmentation(mask_path=str(path)), 6, 4, mask_values={2, 3})
    from_array = region_mask(fo.Segmentation(mask=SEG), 6, 4, mask_values={2, 3})
    assert torch.equal(from_file, from_array) and from_file.any()


def test_heatmap_threshold(tmp_path):
    floats = fo.Heatmap(map=np.array([[0.2, 0.5], [0.7, 0.49]], dtype=np.float32))
    _assert_same(region_mask(floats, 2, 2), _grid([[0, 1], [1, 0]]), "float, [0, 1]")
    _assert_same(region_mask(floats, 2, 2, heatmap_threshold=0.6), _grid([[0, 0], [1, 0]]), "0.6")

    # Integer maps default to [0, 255]: the threshold is 127.5
    ints = fo.Heatmap(map=np.array([[127, 128]], dtype=np.uint8))
    _assert_same(region_mask(ints, 2, 1), _grid([[0, 1]]), "int, [0, 255]")
    ranged = fo.Heatmap(map=np.array([[49, 50]], dtype=np.uint8), range=[0, 100])
    _assert_same(region_mask(ranged, 2, 1), _grid([[0, 1]]), "range [0, 100]")

    path = tmp_path / "heat.png"
    Image.fromarray(np.array([[30000, 40000]], dtype=np.uint16)).save(path)
    from_file = fo.Heatmap(map_path=str(path), range=[0, 65535])
    _assert_same(region_mask(from_file, 2, 1), _grid([[0, 1]]), "16-bit PNG")


def test_default_region_classes():
    present = {"cat", "dog"}
    assert default_region_classes("cat", present) == {"cat"}
    assert default_region_classes(fo.Classification(label="dog"), present) == {"dog"}
    assert default_region_classes("bird", present) is None
    assert default_region_classes(None, present) is None
    assert default_region_classes("cat", set()) is None


def test_unsupported_label():
    with pytest.raises(TypeError):
        region_mask(fo.Classification(label="a"), 2, 2)


def test_box_masks_by_hand():
    boxes = torch.tensor(
        [
            [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]],
            [[0.0, 0.5, 1.0, 0.5], [0.0, 0.0, 1.0, 1.0]],  # second box padding
        ]
    )
    valid = torch.tensor([[True, True], [True, False]])
    regions = box_masks(boxes, valid, 2, 2)
    assert regions.shape == (2, 2, 2)
    _assert_same(regions[0], _grid([[1, 0], [0, 1]]), "two boxes")
    _assert_same(regions[1], _grid([[0, 0], [1, 1]]), "padding ignored")
    assert not box_masks(torch.zeros((3, 0, 4)), None, 2, 2).any()


def test_box_masks_many_boxes_match_region_mask():
    # More boxes than one pattern table holds: groups are OR-ed together
    gen = torch.Generator().manual_seed(1)
    xy = torch.rand(5, 15, 2, generator=gen) * 0.9
    wh = torch.rand(5, 15, 2, generator=gen) * (1 - xy) * 0.5
    boxes = torch.cat([xy, wh], dim=-1).double()
    valid = torch.rand(5, 15, generator=gen) < 0.7
    regions = box_masks(boxes, valid, 23, 31)
    for n in range(5):
        dets = fo.Detections(
            detections=[
                fo.Detection(label="x", bounding_box=boxes[n, k].tolist())
                for k in range(15)
                if valid[n, k]
            ]
        )
        assert torch.equal(regions[n], region_mask(dets, 31, 23))


_coord = st.floats(0, 1, allow_nan=False).map(lambda v: round(v, 3))


@settings(max_examples=150, deadline=None)
@given(
    shapes=st.lists(
        st.lists(st.tuples(_coord, _coord), min_size=1, max_size=8), min_size=1, max_size=3
    ),
    width=st.integers(1, 24),
    height=st.integers(1, 24),
)
def test_random_polygons_match_reference(shapes, width, height):
    poly = fo.Polyline(label="p", points=shapes, closed=True)
    expected = reference_polygon(shapes, height, width)
    _assert_same(region_mask(poly, width, height), expected, "polygon")


def test_grid_size():
    assert grid_size(640, 480) == (256, 192)
    assert grid_size(427, 640) == (171, 256)
    assert math.isclose(grid_size(100, 100)[0], 256)
