"""How the App colours the heatmaps: per map or on one dataset-wide scale
(only the labels' ``range`` changes), colorscales that reach the App's
painter, and field descriptions that say what the colours mean. On the real
database, real CIFAR-10 images and the real ResNet-20."""

import fiftyone as fo
import fiftyone.core.plots.plotly as fop
import numpy as np
import pytest
from fiftyone.core.state import build_color_scheme

import cam_plugin
from cam_plugin.heatmaps import HEATMAP_RANGE, PNG_MAX, display_range, read_levels
from builders import cifar_dataset

FAST = dict(batch_size=4, num_workers=0, device="cpu")


@pytest.fixture(scope="module")
def resnet20(resnet20_path):
    return f"cifar10_resnet20:{resnet20_path}"


@pytest.fixture
def computed(dataset_name, cifar_dir, resnet20):
    """CIFAR images (one per class) with `cam` and `cam_gt`, per-map scale."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    cam_plugin.compute_cams(dataset, resnet20, label_field="ground_truth", **FAST)
    return dataset


def _labels(dataset, field):
    dataset.reload()
    return [h for h in dataset.values(field) if h is not None]


def _position(level, heatmap):
    """Where the App puts a PNG level on the colorscale (0: first colour,
    1: last; below 0: transparent)."""
    start, stop = heatmap.range
    return (level - start) / (stop - start)


def test_a_new_run_is_scaled_per_map_and_says_so(computed):
    dataset = computed
    for field in ("cam", "cam_gt"):
        assert all(list(h.range) == HEATMAP_RANGE for h in _labels(dataset, field))
    assert cam_plugin.get_run(dataset, "cam")["heatmap_scale"] == {"cam": "map", "cam_gt": "map"}

    cam = dataset.get_field("cam")
    assert len(cam.description) <= 250  # the App's tooltip shows it whole
    assert "predicted class" in cam.description and "jet" in cam.description
    assert "own maximum" in cam.description
    assert cam.info["scale"].startswith("per map")
    gt = dataset.get_field("cam_gt")
    assert "ground-truth class" in gt.description and "viridis" in gt.description


def test_the_dataset_scale_gives_the_same_raw_value_the_same_colour(computed):
    dataset = computed
    before = {h.map_path: read_levels(h.map_path) for h in _labels(dataset, "cam")}
    peak = cam_plugin.set_heatmap_scale(dataset, "cam", "dataset")

    labels = _labels(dataset, "cam")
    raw_maxes = [h.raw_max for h in labels]
    assert peak == pytest.approx(max(raw_maxes))
    assert len(set(np.round(raw_maxes, 6))) > 1, "the test needs maps of different maxima"
    weakest = min(labels, key=lambda h: h.raw_max)
    strongest = max(labels, key=lambda h: h.raw_max)

    # one raw value (half the weakest map's maximum) on every sample
    raw = 0.5 * weakest.raw_max
    positions = [_position(raw / h.raw_max * PNG_MAX, h) for h in labels]
    assert np.ptp(positions) < 1e-9
    assert positions[0] == pytest.approx((raw - 0.1 * peak) / (0.9 * peak))
    # the strongest map is drawn as before; the weakest never reaches the
    # last colour: its own peak sits where its raw maximum is on the scale
    assert strongest.range == pytest.approx(HEATMAP_RANGE, abs=0.5)
    assert _position(PNG_MAX, weakest) == pytest.approx((weakest.raw_max - 0.1 * peak) / (0.9 * peak))
    assert _position(PNG_MAX, weakest) < 1
    for h in labels:
        assert h.range == pytest.approx(display_range(h.raw_max, "dataset", peak))

    # the PNGs are untouched, and so are the raw values read back
    for h in labels:
        assert np.array_equal(read_levels(h.map_path), before[h.map_path])
    # the ground-truth maps keep their own scale
    assert all(list(h.range) == HEATMAP_RANGE for h in _labels(dataset, "cam_gt"))
    assert cam_plugin.get_run(dataset, "cam")["heatmap_scale"] == {"cam": "dataset", "cam_gt": "map"}
    cam = dataset.get_field("cam")
    assert "dataset's largest value" in cam.description and len(cam.description) <= 250
    assert cam.info["scale"].startswith("dataset-wide")

    # and back: per-map ranges exactly as a new run writes them
    cam_plugin.set_heatmap_scale(dataset, "cam", "map")
    assert all(list(h.range) == HEATMAP_RANGE for h in _labels(dataset, "cam"))
    assert "own maximum" in dataset.get_field("cam").description
    assert cam_plugin.get_run(dataset, "cam")["heatmap_scale"]["cam"] == "map"


def test_rescaling_an_unchanged_field_touches_no_sample(computed):
    dataset = computed
    cam_plugin.set_heatmap_scale(dataset, "cam", "dataset")
    dataset.reload()
    stamps = dataset.values("last_modified_at")
    cam_plugin.set_heatmap_scale(dataset, "cam", "dataset")
    dataset.reload()
    assert dataset.values("last_modified_at") == stamps


def test_only_the_heatmaps_of_a_cam_run_are_rescaled(computed, resnet20):
    dataset = computed
    # another run's heatmaps, and a heatmap field of the user's own
    cam_plugin.compute_cams(dataset, resnet20, heatmap_field="other", pred_field="other_pred", **FAST)
    own = fo.Heatmap(map=np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), range=[0, 1])
    dataset.set_values("mine", [own.copy() for _ in range(len(dataset))])
    dataset.get_field("mine").description = "my own"
    dataset.get_field("mine").save()

    for field in ("mine", "cam_prediction", "ground_truth", "nonexistent"):
        with pytest.raises(cam_plugin.RunError):
            cam_plugin.set_heatmap_scale(dataset, field, "dataset")
    with pytest.raises(ValueError):
        cam_plugin.set_heatmap_scale(dataset, "cam", "global")

    cam_plugin.set_heatmap_scale(dataset, "cam", "dataset")
    assert all(list(h.range) == HEATMAP_RANGE for h in _labels(dataset, "other"))
    assert all(list(h.range) == [0, 1] for h in _labels(dataset, "mine"))
    assert dataset.get_field("mine").description == "my own"
    assert cam_plugin.get_run(dataset, "other")["heatmap_scale"] == {"other": "map"}


def test_compute_cams_scales_dataset_wide_and_keeps_it_as_samples_are_added(
    dataset_name, cifar_dir, resnet20
):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    first = dataset.limit(4)
    cam_plugin.compute_cams(first, resnet20, heatmap_scale="dataset", **FAST)
    assert cam_plugin.get_run(dataset, "cam")["heatmap_scale"] == {"cam": "dataset"}

    def consistent():
        # every map drawn against the same raw maximum: stop * raw_max / 65535
        labels = _labels(dataset, "cam")
        full_scale = [h.range[1] * h.raw_max / PNG_MAX for h in labels]
        assert np.ptp(full_scale) < 1e-6 * max(full_scale)
        assert max(full_scale) == pytest.approx(max(h.raw_max for h in labels))
        return len(labels)

    assert consistent() == 4
    # the run continues on the whole dataset without being told the scale
    # again: the samples it adds are scaled with the others, against the
    # new maximum over all of them
    summary = cam_plugin.compute_cams(dataset, resnet20, **FAST)
    assert summary.resumed and summary.processed == len(dataset) - 4
    assert consistent() == len(dataset)
    assert "dataset's largest value" in dataset.get_field("cam").description

    # a display setting, not a different run: switching it continues the run
    summary = cam_plugin.compute_cams(dataset, resnet20, heatmap_scale="map", **FAST)
    assert summary.resumed and summary.processed == 0
    assert all(list(h.range) == HEATMAP_RANGE for h in _labels(dataset, "cam"))
    assert cam_plugin.get_run(dataset, "cam")["heatmap_scale"] == {"cam": "map"}


def test_the_colorscales_reach_the_app_with_their_colour_table(dataset_name, cifar_dir, resnet20):
    """The App paints heatmaps with the ``rgb`` table of their colorscale
    and falls back to viridis without one; the scheme a session sends the
    App is the dataset's as stored, so the table must be stored."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    # a colorscale the user chose for the ground-truth maps is kept
    dataset.app_config.color_scheme = fo.ColorScheme(colorscales=[{"path": "cam_gt", "name": "hot"}])
    dataset.save()
    cam_plugin.compute_cams(dataset, resnet20, label_field="ground_truth", **FAST)

    dataset.reload()
    sent = build_color_scheme(None, dataset).to_dict()  # what a session sends
    scales = {c["path"]: c for c in sent["colorscales"]}
    assert scales["cam"]["name"] == "jet"
    assert scales["cam"]["rgb"] == [list(c) for c in fop.get_colormap("jet")]
    assert scales["cam_gt"]["name"] == "hot"
    assert scales["cam_gt"]["rgb"] == [list(c) for c in fop.get_colormap("hot")]
    assert "hot" in dataset.get_field("cam_gt").description


def _forms():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "forms.py"
    spec = importlib.util.spec_from_file_location("cam_plugin_forms", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_delegated_run_is_scaled_as_asked_by_its_workers(dataset_name, cifar_dir, resnet20, monkeypatch):
    """The form's choice reaches the record when the shards are queued, and
    each worker (the operator, with the queued parameters) applies it."""
    from cam_plugin.runs import sharding

    forms = _forms()
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    queued = []
    monkeypatch.setattr(sharding, "_queue_operation", lambda uri, samples, params: queued.append(params) or "op")

    form = dict(model=resnet20, heatmap_scale="dataset", num_shards=2, batch_size=4, device="cpu")
    kwargs = forms.compute_cams_kwargs(form)
    assert kwargs["heatmap_scale"] == "dataset"
    summary = cam_plugin.compute_cams(dataset, delegate=True, **kwargs)
    assert len(summary.queued) == 2
    assert cam_plugin.get_run(dataset, "cam")["heatmap_scale"] == {"cam": "dataset"}

    for params in queued:  # what each delegated operation runs
        cam_plugin.compute_cams(dataset, **dict(forms.compute_cams_kwargs(params), num_workers=0))
    labels = _labels(dataset, "cam")
    assert len(labels) == len(dataset)
    peak = max(h.raw_max for h in labels)
    for h in labels:
        assert h.range == pytest.approx(display_range(h.raw_max, "dataset", peak))
    assert cam_plugin.get_run(dataset, "cam")["heatmap_scale"] == {"cam": "dataset"}


def test_rescaling_restores_the_colour_tables_a_scheme_saved_in_the_app_lost(computed):
    """The App's colour settings save the scheme without the ``rgb`` tables
    (the App strips them before saving)."""
    dataset = computed
    scheme = dataset.app_config.color_scheme
    scheme.colorscales = [{k: v for k, v in c.items() if k != "rgb"} for c in scheme.colorscales]
    dataset.app_config.color_scheme = scheme
    dataset.save()

    cam_plugin.set_heatmap_scale(dataset, "cam", "map")
    dataset.reload()
    scales = {c["path"]: c for c in dataset.app_config.color_scheme.colorscales}
    assert scales["cam"]["rgb"] == [list(c) for c in fop.get_colormap("jet")]
    assert scales["cam_gt"]["rgb"] == [list(c) for c in fop.get_colormap("viridis")]
