"""Tests of the demo (:mod:`cam_plugin.demo`): the synthetic images, the
in-box measure, and a small end-to-end run checking that the planted cue
works as designed: the model learns the shortcut, follows a swapped cue for
a clear share of the test images, and its Grad-CAM maps for those lie off
the object.
"""

import numpy as np
import pytest
from fiftyone import ViewField as F

import demo  # examples/demo.py, put on the path by conftest.py

# A smaller demo than the default, so the end-to-end run stays well under
# a minute and a half on two CPU cores
SMALL = demo.DemoConfig(n_train=600, n_test=200)
SEED = 0


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    import fiftyone as fo

    name = "t_demo_small"
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    root = tmp_path_factory.mktemp("demo")
    dataset, info = demo.run_demo(
        root, seed=SEED, config=SMALL, name=name, progress=False, log=lambda *a: None
    )
    yield root, dataset, info
    if fo.dataset_exists(name):
        fo.delete_dataset(name)


def test_draw_image_is_deterministic_and_keeps_the_cue_off_the_shape():
    for i, shape in enumerate(demo.CLASSES * 4):
        faint = i % 2 == 1
        a, info = demo.draw_image(np.random.default_rng([7, i]), shape, "square", faint)
        b, _ = demo.draw_image(np.random.default_rng([7, i]), shape, "square", faint)
        assert a.size == demo.IMAGE_SIZE
        assert np.array_equal(np.asarray(a), np.asarray(b))

        box, cue = info["box"], info["cue_box"]
        apart = (
            cue[2] + demo.CUE_MARGIN <= box[0]
            or box[2] + demo.CUE_MARGIN <= cue[0]
            or cue[3] + demo.CUE_MARGIN <= box[1]
            or box[3] + demo.CUE_MARGIN <= cue[1]
        )
        assert apart, (box, cue)

        # both lie in the centre square the model sees
        x0, y0, x1, y1 = demo.visible_region()
        for b_ in (box, cue):
            assert x0 <= b_[0] and b_[2] <= x1 and y0 <= b_[1] and b_[3] <= y1

        # the marker shows the cue colour
        x, y = (cue[0] + cue[2]) // 2, (cue[1] + cue[3]) // 2
        pixel = np.asarray(a, dtype=float)[y, x]
        assert np.abs(pixel - demo.CUE_COLORS["square"]).max() < 50

        expected = demo.FAINT_CONTRAST if faint else demo.CLEAR_CONTRAST
        assert expected[0] <= info["contrast"] <= expected[1]


def test_generate_images_splits_and_cue_rates(tmp_path):
    config = demo.DemoConfig(n_train=300, n_test=200)
    records = demo.generate_images(tmp_path, seed=3, config=config)
    train = [r for r in records if r["split"] == "train"]
    test = [r for r in records if r["split"] == "test"]
    assert len(train) == 300 and len(test) == 200

    for r in records:
        assert (r["cue"] != r["label"]) == r["cue_swapped"]
        x, y, w, h = r["box"]
        assert 0 <= x and 0 <= y and x + w <= 1 and y + h <= 1 and w > 0 and h > 0

    train_swapped = np.mean([r["cue_swapped"] for r in train])
    test_swapped = np.mean([r["cue_swapped"] for r in test])
    assert 0.02 <= train_swapped <= 0.15  # 8% expected
    assert 0.38 <= test_swapped <= 0.62  # 50% expected
    assert {r["label"] for r in records} == set(demo.CLASSES)

    # a second call reuses the images instead of redrawing them
    mtime = (tmp_path / "images" / "test" / "00000.png").stat().st_mtime_ns
    assert demo.generate_images(tmp_path, seed=3, config=config) == records
    assert (tmp_path / "images" / "test" / "00000.png").stat().st_mtime_ns == mtime

    # another seed redraws them
    other = demo.generate_images(tmp_path, seed=4, config=config)
    assert [r["label"] for r in other] != [r["label"] for r in records]


def test_summarize_counts_cue_followers():
    values = {
        "label": ["circle", "circle", "square", "square", "triangle"],
        "pred": ["circle", "square", "circle", "triangle", "triangle"],
        "cue": ["circle", "square", "square", "triangle", "square"],
        "swapped": [False, True, False, True, True],
        "faint": [False, True, False, True, False],
        "in_box": [0.6, 0.1, 0.2, 0.05, 0.7],
        "flagged": [False, True, True, True, False],
    }
    m = demo.summarize(values)
    assert m["n_followed"] == 2  # samples 1 and 3
    assert m["n_other_errors"] == 1  # sample 2: wrong, cue not swapped
    assert m["follow_rate"] == pytest.approx(2 / 3)
    assert m["follow_rate_faint"] == pytest.approx(1.0)
    assert m["acc_unswapped"] == pytest.approx(0.5)
    assert m["in_box_followed"] == pytest.approx(0.075)
    assert m["in_box_correct"] == pytest.approx(0.6)
    # flagged by the view: samples 1, 2, 3, of which 1 and 3 followed the cue
    assert m["n_flagged"] == 3
    assert m["flag_precision"] == pytest.approx(2 / 3)
    assert m["flag_recall"] == pytest.approx(1.0)


def test_small_demo_dataset(small_demo):
    root, dataset, info = small_demo
    assert len(dataset) == SMALL.n_train + SMALL.n_test
    assert len(dataset.match_tags("train")) == SMALL.n_train
    test = dataset.match_tags("test")
    assert len(test) == SMALL.n_test

    sample = test.first()
    assert sample.metadata.width == 128 and sample.metadata.height == 96
    assert sample.ground_truth.label in demo.CLASSES
    assert sample.objects.detections[0].label == sample.ground_truth.label
    assert isinstance(sample.cue_swapped, bool)
    assert sample.cue in demo.CLASSES

    # every test sample got its maps, in the full 4:3 image frame
    assert info["cam_summary"].processed == SMALL.n_test
    assert info["cam_summary"].failed == 0
    from cam_plugin.heatmaps import read_levels

    assert read_levels(sample.cam_gt.map_path).shape == (96, 128)
    # the model sees the centre square (x in [16, 112)): the maps are placed
    # there, and the side strips it never saw stay empty
    for path in test.limit(20).values("cam.map_path"):
        levels = read_levels(path)
        assert levels.shape == (96, 128)
        assert levels[:, :16].max() == 0 and levels[:, 112:].max() == 0
        assert levels[:, 16:112].max() == 65535
    assert len(test.exists("cam_object_energy")) == SMALL.n_test
    assert "cam_misclassified_background" in dataset.list_saved_views()

    assert (root / "model.pt").is_file()
    assert "precision" in info["summary"]


def test_small_demo_model_learns_the_shortcut(small_demo):
    _, _, info = small_demo
    m = info["metrics"]

    # it fits the train split, and is right wherever the cue agrees
    assert info["train_accuracy"] >= 0.9
    assert m["acc_unswapped"] >= 0.95

    # a swapped cue is followed for a clear share of the test images,
    # nearly always for the faint shapes
    assert m["follow_rate"] >= 0.3, m
    assert m["follow_rate_faint"] >= 0.8, m

    # errors that did not follow the cue are rare
    assert m["n_other_errors"] <= 0.05 * m["n_test"], m


def test_small_demo_attention_is_off_the_object_for_cue_followers(small_demo):
    _, _, info = small_demo
    m = info["metrics"]

    # the maps of cue-followers have little mass on the shape...
    assert m["in_box_followed"] < 0.2, m
    # ...much less than the correct predictions on clearly visible shapes
    assert m["in_box_correct_clear"] > 1.5 * m["in_box_followed"], m
    assert m["in_box_correct_clear"] > m["in_box_followed"] + 0.1, m

    # the plugin's misclassified_background view finds the cue-followers
    assert m["flag_precision"] >= 0.8, m
    assert m["flag_recall"] >= 0.8, m


def test_small_demo_intervention_confirms_the_cue_driven_mistakes(small_demo):
    _, dataset, info = small_demo
    m = info["metrics"]
    test = dataset.match_tags("test")

    # the cue-followers are in confirmed_background_reliance: wrong, looking
    # off the shape, and the prediction survives painting the shape over
    # or dies with the background
    assert m["n_followed"] >= 20, m
    assert m["confirmed_precision"] >= 0.8, m
    assert m["confirmed_recall"] >= 0.8, m
    confirmed = dataset.load_saved_view("cam_confirmed_background_reliance")
    followers = set(test.match(F("followed_cue")).values("id"))
    assert len(set(confirmed.values("id")) & followers) == round(m["confirmed_recall"] * len(followers))

    # by intervention, the followers depend on the background and the
    # correct predictions on clear shapes do not
    reliance, followed, correct, faint = test.values(
        ["cam_bg_reliance", "followed_cue", F("cam_prediction.label") == F("ground_truth.label"), "faint"]
    )
    reliance = np.array(reliance, dtype=float)
    followed, correct, faint = (np.array(v, dtype=bool) for v in (followed, correct, faint))
    assert np.median(reliance[followed]) > np.median(reliance[correct & ~faint]) + 0.2

    # the demo prints both per-class summaries
    summary = info["summary"]
    assert "Background reliance by class" in summary and "background gap" in summary
    assert "Where the attention falls, by class" in summary
    assert {r.class_name for r in info["reliance_summary"]} == set(demo.CLASSES)
    assert {r.class_name for r in info["context_summary"]} == set(demo.CLASSES)
    # the context classes are the scene's boxes: the shape's class and cues
    for row in info["context_summary"]:
        assert set(row.shares) <= set(demo.CLASSES) | {f"{c} cue" for c in demo.CLASSES}


def test_small_demo_discovers_the_cues_and_prints_them(small_demo):
    _, dataset, info = small_demo
    groups = info["cue_groups"]
    assert groups and "Cues the model attends to off the shape" in info["summary"]
    for g in groups:
        assert f"{g.group}. {g.name}" in info["summary"]
        assert g.name in {f"{c} cue" for c in demo.CLASSES} or g.name == f"cue {g.group}"
        assert dataset.has_saved_view(g.view)
    # the markers are the places off the shape the model attends to
    assert any(g.name.endswith(" cue") for g in groups)
    test = dataset.match_tags("test")
    assert sum(g.size for g in groups) == test.count("cam_hotspots.detections")


def test_small_demo_reuses_the_trained_model(small_demo):
    root, _, _ = small_demo
    records = demo.generate_images(root, seed=SEED, config=SMALL)
    messages = []
    clf = demo.train_model(records, seed=SEED, config=SMALL, cache_dir=root, log=messages.append)
    assert any("Reusing" in msg for msg in messages)
    assert clf.classes == list(demo.CLASSES)
    assert demo.train_accuracy(clf, records) >= 0.9
