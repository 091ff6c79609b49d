"""Tests of cam_plugin.metrics: hand-computed values that pin the
definitions, properties on random maps and regions, and every COCO128
sample's metrics against a plain numpy reference."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cam_plugin.metrics import attention_metrics, top_fraction_iou
from test_regions import REGION_KINDS, coco_regions, load_coco128

REGION_KEYS = ("object_energy", "object_area", "pointing_hit")
KEYS = REGION_KEYS + ("border_energy",)


# --- brute-force references: numpy float64, straight from the definitions --


def reference_metrics(heat, region, tolerance=15.0, border=0.1):
    """The four metrics of one (H, W) map and region."""
    heat = np.asarray(heat, dtype=np.float64)
    height, width = heat.shape
    total = heat.sum()
    out = {"object_area": region.mean()}

    out["object_energy"] = heat[region].sum() / total if total > 0 else math.nan

    if total > 0 and region.any():
        rows, cols = np.nonzero(region)
        near = [
            ((rows - i) ** 2 + (cols - j) ** 2 <= tolerance**2).any()
            for i, j in zip(*np.nonzero(heat == heat.max()))
        ]
        out["pointing_hit"] = float(any(near))
    else:
        out["pointing_hit"] = math.nan

    bh = max(1, round(border * height))
    bw = max(1, round(border * width))
    i, j = np.indices((height, width))
    band = (i < bh) | (i >= height - bh) | (j < bw) | (j >= width - bw)
    out["border_energy"] = heat[band].sum() / total if total > 0 else math.nan
    return out


def reference_top_iou(a, b, fraction=0.2):
    k = math.ceil(round(fraction * a.size, 9))

    def top(v):
        kth = np.sort(v.ravel())[::-1][k - 1]
        return (v >= kth) & (v > 0)

    ta, tb = top(a), top(b)
    union = (ta | tb).sum()
    return (ta & tb).sum() / union if union else math.nan


def smooth_map(rng, height, width):
    """A seeded smooth non-negative map: bilinearly upsampled 6 x 6 noise,
    shifted so that about a third of it is zero, squared to sharpen peaks."""
    low = torch.from_numpy(rng.random((1, 1, 6, 6)))
    up = torch.nn.functional.interpolate(
        low, size=(height, width), mode="bilinear", align_corners=False
    )
    return ((up[0, 0] - 0.35).clamp_min(0) ** 2).to(torch.float32).numpy()


def assert_metrics_close(actual, expected, what, tol=1e-6):
    for key, value in expected.items():
        got = float(actual[key])
        if math.isnan(value):
            assert math.isnan(got), f"{what}: {key} = {got}, expected NaN"
        else:
            assert abs(got - value) <= tol, f"{what}: {key} = {got}, expected {value}"


# --- COCO128 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def coco(coco_dir):
    return load_coco128(coco_dir)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small per-sample tensors run faster on one thread on a busy 2-core
    machine (see test_regions); the thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind", REGION_KINDS)
def test_coco_metrics_match_reference(coco_dir, kind):
    rng = np.random.default_rng(1234)

    # Maps of one grid size are batched, in small chunks, to exercise both
    by_grid = {}
    for k, (w, h), region, expected_region in coco_regions(coco_dir, kind):
        heat = smooth_map(rng, h, w)
        by_grid.setdefault((w, h), []).append((k, heat, region, expected_region))

    seen = {key: [] for key in KEYS}
    for group in by_grid.values():
        maps = torch.from_numpy(np.stack([g[1] for g in group]))
        regions = torch.stack([g[2] for g in group])
        actual = attention_metrics(maps, regions, chunk_size=7)
        for n, (k, heat, _, expected_region) in enumerate(group):
            expected = reference_metrics(heat, expected_region)
            got = {key: v[n] for key, v in actual.items()}
            assert_metrics_close(got, expected, f"{kind} sample {k}")
            for key in KEYS:
                seen[key].append(expected[key])

    # The comparison is not vacuous: hits and misses, varied energies
    hits = [v for v in seen["pointing_hit"] if not math.isnan(v)]
    assert 0 < sum(hits) < len(hits)
    assert np.nanstd(seen["object_energy"]) > 0.05
    assert np.nanstd(seen["border_energy"]) > 0.05


def test_coco_top_fraction_iou_matches_reference(coco):
    samples, _ = coco
    rng = np.random.default_rng(99)
    values = []
    for s in samples[:40]:
        w, h = s["grid"]
        a, b = smooth_map(rng, h, w), smooth_map(rng, h, w)
        got = float(top_fraction_iou(torch.from_numpy(a)[None], torch.from_numpy(b)[None])[0])
        expected = reference_top_iou(a, b)
        assert abs(got - expected) <= 1e-6
        values.append(expected)
    assert 0 <= min(values) < max(values) <= 1


# --- hand-computed values ----------------------------------------------------


def _one(heat, region, **kwargs):
    heat = torch.tensor(heat, dtype=torch.float32)[None]
    region = torch.tensor(region, dtype=torch.bool)[None]
    return {k: float(v[0]) for k, v in attention_metrics(heat, region, **kwargs).items()}


DIAGONAL = np.diag([1.0, 2.0, 3.0, 4.0])
TOP_LEFT = np.zeros((4, 4), dtype=bool)
TOP_LEFT[:2, :2] = True


def test_energy_area_border_by_hand():
    got = _one(DIAGONAL, TOP_LEFT)
    assert got["object_energy"] == pytest.approx(3 / 10)
    assert got["object_area"] == pytest.approx(4 / 16)
    # bh = bw = max(1, round(0.4)) = 1: only the inner 2 x 2 (mass 2 + 3)
    # is out of the band
    assert got["border_energy"] == pytest.approx(5 / 10)
    # The peak (3, 3) is sqrt(8) ~ 2.83 pixels from the region's (1, 1)
    assert got["pointing_hit"] == 1.0
    assert _one(DIAGONAL, TOP_LEFT, tolerance=2.8)["pointing_hit"] == 0.0
    assert _one(DIAGONAL, TOP_LEFT, tolerance=2.9)["pointing_hit"] == 1.0


def test_border_band_widths():
    ones = np.ones((10, 10))
    # 1-pixel band: 100 - 8 * 8 = 36 pixels
    assert _one(ones, np.zeros((10, 10)))["border_energy"] == pytest.approx(0.36)
    # border 0.25 -> round(2.5) = 2 (Python rounds half to even) -> 100 - 36
    assert _one(ones, np.zeros((10, 10)), border=0.25)["border_energy"] == pytest.approx(0.64)
    # Bands that meet cover everything
    assert _one(np.ones((3, 3)), np.zeros((3, 3)), border=0.5)["border_energy"] == 1.0
    # Rectangular: bh = round(0.1 * 20) = 2 rows, bw = max(1, round(0.5)) = 1 column
    heat = np.zeros((20, 5))
    heat[2, 1] = 1.0  # inner
    heat[1, 3] = 3.0  # row band
    heat[10, 4] = 6.0  # column band
    assert _one(heat, np.zeros((20, 5)))["border_energy"] == pytest.approx(0.9)


@pytest.mark.parametrize(
    "peak, pixel, tolerance, hit",
    [
        ((20, 5), (20, 20), 15.0, 1.0),  # exactly 15 px along a row
        ((20, 5), (21, 20), 15.0, 0.0),  # sqrt(226) > 15
        ((20, 5), (29, 17), 15.0, 1.0),  # 9-12-15 triangle: exactly 15
        ((20, 5), (20, 20), 14.99, 0.0),
        ((0, 0), (9, 12), 15.0, 1.0),  # near the corner: disk clipped
        ((0, 0), (10, 12), 15.0, 0.0),
        ((39, 39), (39, 24), 15.0, 1.0),
        ((20, 5), (20, 5), 0.0, 1.0),  # on the region itself
        ((20, 5), (20, 6), 0.0, 0.0),
    ],
)
def test_pointing_tolerance_boundary(peak, pixel, tolerance, hit):
    heat = np.full((40, 40), 0.5)
    heat[peak] = 1.0
    region = np.zeros((40, 40), dtype=bool)
    region[pixel] = True
    assert _one(heat, region, tolerance=tolerance)["pointing_hit"] == hit


def test_pointing_considers_every_maximum():
    heat = np.zeros((40, 40))
    heat[0, 0] = heat[39, 39] = 2.0
    region = np.zeros((40, 40), dtype=bool)
    region[39, 30] = True
    assert _one(heat, region)["pointing_hit"] == 1.0
    heat[39, 39] = 1.0
    assert _one(heat, region)["pointing_hit"] == 0.0


def test_undefined_values_are_nan():
    zero = _one(np.zeros((4, 4)), TOP_LEFT)
    assert math.isnan(zero["object_energy"])
    assert math.isnan(zero["pointing_hit"])
    assert math.isnan(zero["border_energy"])
    assert zero["object_area"] == 0.25

    empty = _one(DIAGONAL, np.zeros((4, 4), dtype=bool))
    assert empty["object_energy"] == 0.0
    assert empty["object_area"] == 0.0
    assert math.isnan(empty["pointing_hit"])


def test_without_regions_only_border_energy():
    out = attention_metrics(torch.tensor(DIAGONAL, dtype=torch.float32)[None])
    assert set(out) == {"border_energy"}
    assert float(out["border_energy"][0]) == pytest.approx(0.5)


def test_chunking_and_dtypes():
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(13, 9, 11, generator=gen, dtype=torch.float64)
    regions = torch.rand(13, 9, 11, generator=gen) > 0.6
    whole = attention_metrics(maps, regions)
    chunked = attention_metrics(maps, regions, chunk_size=4)
    assert all(v.dtype == torch.float64 and v.shape == (13,) for v in whole.values())
    for key in KEYS:
        assert torch.equal(whole[key], chunked[key])
    single = attention_metrics(maps.float(), regions)
    assert single["object_energy"].dtype == torch.float32
    assert torch.allclose(single["object_energy"].double(), whole["object_energy"], atol=1e-6)
    empty = attention_metrics(maps[:0], regions[:0])
    assert set(empty) == set(KEYS) and all(v.shape == (0,) for v in empty.values())


def test_invalid_arguments():
    maps = torch.rand(2, 4, 4)
    with pytest.raises(ValueError):
        attention_metrics(maps, torch.zeros(2, 4, 5, dtype=torch.bool))
    with pytest.raises(TypeError):
        attention_metrics(maps, torch.zeros(2, 4, 4))
    with pytest.raises(ValueError):
        attention_metrics(maps[0])
    with pytest.raises(ValueError):
        top_fraction_iou(maps, maps, fraction=0)


def test_top_fraction_iou_by_hand():
    a = torch.arange(25.0).reshape(1, 5, 5)
    # k = ceil(0.2 * 25) = 5: a's top set is its last row, its transpose's
    # the last column; they share the corner
    assert float(top_fraction_iou(a, a.transpose(1, 2))[0]) == pytest.approx(1 / 9)
    assert float(top_fraction_iou(a, a)[0]) == 1.0
    # Ties at the threshold are all in; zeros never are
    ones, zeros = torch.ones(1, 5, 5), torch.zeros(1, 5, 5)
    assert float(top_fraction_iou(ones, a)[0]) == pytest.approx(5 / 25)
    sparse = zeros.clone()
    sparse[0, 4, 4] = sparse[0, 0, 0] = 1.0
    assert float(top_fraction_iou(sparse, a)[0]) == pytest.approx(1 / 6)
    assert math.isnan(float(top_fraction_iou(zeros, zeros)[0]))
    assert float(top_fraction_iou(zeros, a)[0]) == 0.0


# --- properties ----------------------------------------------------------


@st.composite
def maps_and_regions(draw):
    """Small batches of maps with values in {0, ..., 20} (so that scaling
    them never merges distinct values) and random regions."""
    n = draw(st.integers(1, 4))
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12))
    heat = draw(hnp.arrays(np.uint8, (n, h, w), elements=st.integers(0, 20)))
    region = draw(hnp.arrays(np.bool_, (n, h, w)))
    return torch.from_numpy(heat.astype(np.float32)), torch.from_numpy(region)


@settings(max_examples=200, deadline=None)
@given(data=maps_and_regions(), tolerance=st.sampled_from([0.0, 1.0, 1.5, 3.0, 15.0]))
def test_metrics_match_reference_and_stay_in_unit_interval(data, tolerance):
    maps, regions = data
    got = attention_metrics(maps, regions, tolerance=tolerance)
    for n in range(len(maps)):
        expected = reference_metrics(maps[n].numpy(), regions[n].numpy(), tolerance=tolerance)
        assert_metrics_close({k: v[n] for k, v in got.items()}, expected, f"map {n}")
    for key in KEYS:
        values = got[key][~got[key].isnan()]
        assert ((values >= 0) & (values <= 1)).all(), key


@settings(max_examples=150, deadline=None)
@given(data=maps_and_regions())
def test_all_object_region(data):
    maps, _ = data
    got = attention_metrics(maps, torch.ones_like(maps, dtype=torch.bool))
    mass = maps.sum((1, 2)) > 0
    assert (got["object_area"] == 1).all()
    assert (got["object_energy"][mass] == 1).all()
    assert (got["pointing_hit"][mass] == 1).all()
    assert got["object_energy"][~mass].isnan().all()


@settings(max_examples=150, deadline=None)
@given(data=maps_and_regions())
def test_empty_region(data):
    maps, _ = data
    got = attention_metrics(maps, torch.zeros_like(maps, dtype=torch.bool))
    mass = maps.sum((1, 2)) > 0
    assert (got["object_energy"][mass] == 0).all()
    assert (got["object_area"] == 0).all()
    assert got["pointing_hit"].isnan().all()


@settings(max_examples=150, deadline=None)
@given(data=maps_and_regions(), scale=st.floats(1e-3, 1e3))
def test_scaling_leaves_metrics_unchanged(data, scale):
    maps, regions = data
    before = attention_metrics(maps, regions)
    after = attention_metrics(maps * scale, regions)
    for key in KEYS:
        assert torch.equal(before[key].isnan(), after[key].isnan()), key
        defined = ~before[key].isnan()
        assert torch.allclose(before[key][defined], after[key][defined], rtol=0, atol=1e-6), key


@st.composite
def map_pairs(draw):
    """Two batches of small maps of one shape, values in {0, ..., 20}."""
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    a, b = (draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, 20))) for _ in range(2))
    return torch.from_numpy(a.astype(np.float32)), torch.from_numpy(b.astype(np.float32))


@settings(max_examples=150, deadline=None)
@given(pair=map_pairs(), fraction=st.sampled_from([0.05, 0.2, 0.5, 1.0]))
def test_top_fraction_iou_properties(pair, fraction):
    a, b = pair
    iou = top_fraction_iou(a, b, fraction)
    assert torch.allclose(iou, top_fraction_iou(b, a, fraction), equal_nan=True)
    defined = ~iou.isnan()
    assert ((iou[defined] >= 0) & (iou[defined] <= 1)).all()
    for n in range(len(a)):
        expected = reference_top_iou(a[n].numpy(), b[n].numpy(), fraction)
        got = float(iou[n])
        assert (math.isnan(got) and math.isnan(expected)) or abs(got - expected) <= 1e-6
    self_iou = top_fraction_iou(a, a, fraction)
    positive = (a > 0).flatten(1).any(1)
    assert (self_iou[positive] == 1).all() and self_iou[~positive].isnan().all()
