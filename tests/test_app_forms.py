"""What the App's forms and outputs offer a new user, resolved and executed
through FiftyOne's operator machinery as the App does: only usable heatmap
fields, the standard target choice (dataset / current view / selected
samples) with what an operator ran on, one-sentence errors, output
displays without empty parts, and per-class rankings that need support."""

import asyncio

import fiftyone as fo
import fiftyone.operators as foo
import pytest
from fiftyone.operators.executor import resolve_type

import cam_plugin
from builders import form_errors as _errors
from builders import resolve_form, two_cam_runs

PLUGIN = "@cam-plugin/cam"


def uri(name):
    return f"{PLUGIN}/{name}"


@pytest.fixture
def two_runs(dataset_name, cifar_dir, resnet20_path):
    """The issue's repro: a CAM run without ground truth under the default
    name ``cam``, measured against boxes, then a second run with ground
    truth (``withgt``)."""
    return two_cam_runs(dataset_name, cifar_dir, resnet20_path)


def _form(op_name, dataset, view=None, selected=None, **params):
    return resolve_form(uri(op_name), dataset, view, selected, **params)


def _outputs(op_name, dataset, results, **params):
    request = {"dataset_name": dataset.name, "params": params, "view": [], "target": "outputs", "results": results}
    prop = asyncio.run(resolve_type(foo.OperatorRegistry(), uri(op_name), request))
    return prop.to_json()["type"]["properties"]


def _execute(op_name, dataset, view=None, selected=None, **params):
    ctx = dict(dataset=dataset, params=params)
    if view is not None:
        ctx["view"] = view
    if selected is not None:
        ctx["selected"] = selected
    result = foo.execute_operator(uri(op_name), ctx=ctx)
    assert result.error is None, result.error
    return result.result


def test_attention_fields_say_which_heatmaps_the_views_can_use(two_runs):
    described = {f.heatmap_field: f for f in cam_plugin.attention_fields(two_runs)}
    assert described["withgt"].usable
    assert (described["withgt"].label_field, described["withgt"].pred_field) == (
        "ground_truth",
        "withgt_prediction",
    )
    # without ground truth: the views that need none, no summary
    assert described["cam"].usable and not described["cam"].summarisable
    assert "without ground truth" in described["cam"].summary_problem
    assert described["withgt"].summarisable


def test_summary_form_offers_only_fields_with_ground_truth(two_runs):
    props = _form("class_attention_summary", two_runs)
    heatmap = props["heatmap_field"]
    # before: the default was "cam", which has no ground truth
    assert heatmap["default"] == "withgt"
    assert [c["value"] for c in heatmap["view"]["choices"]] == ["withgt", "withgt_gt"]
    assert not _errors(props)
    # the field left out is named with its reason
    assert "cam" in props["unusable"]["view"]["label"]
    assert "without ground truth" in props["unusable"]["view"]["description"]

    # a caller who names it anyway is told why in the form
    errors = _errors(_form("class_attention_summary", two_runs, heatmap_field="cam"))
    assert "without ground truth" in errors["heatmap_field"]


def test_views_form_offers_a_field_without_ground_truth_its_views(two_runs):
    props = _form("attention_views", two_runs)
    assert [c["value"] for c in props["heatmap_field"]["view"]["choices"]] == ["cam", "withgt", "withgt_gt"]
    assert "unusable" not in props and not _errors(props)
    # "cam" has boxes but no ground truth: the views that need none
    views = [c["value"] for c in props["open_view"]["view"]["choices"]]
    assert views == list(cam_plugin.views.GROUND_TRUTH_FREE_VIEWS)
    assert "Without ground truth" in props["ground_truth_free"]["view"]["label"]
    views = [c["value"] for c in _form("attention_views", two_runs, heatmap_field="withgt")["open_view"]["view"]["choices"]]
    assert views == list(cam_plugin.VIEW_DESCRIPTIONS)

    # run: the views that need no ground truth are saved and one is opened
    # (not the default misclassified_background, which it has not)
    result = _execute("attention_views", two_runs, heatmap_field="cam")
    assert {c["view"] for c in result["counts"]} == {"cam_qa_unlabelled_attention", "cam_border_attention"}
    assert result["opened"] == "qa_unlabelled_attention"
    assert set(two_runs.list_saved_views()) >= {"cam_qa_unlabelled_attention", "cam_border_attention"}
    # the form refuses a view the field has not
    with pytest.raises(Exception, match="open_view"):
        _execute("attention_views", two_runs, heatmap_field="cam", open_view="misclassified_background")


def _app_requests(result):
    """What an executed operator asked the App to do: (operator, params)."""
    return [(r.operator_uri, r.params) for r in result.executor._requests]


def test_a_run_refused_at_execution_is_one_sentence(two_runs, resnet20_path):
    """A form can be valid and the run still refused when it starts (here:
    ground-truth labels the model does not know): the App gets a
    notification and an output with that one sentence, no traceback."""
    two_runs.set_values("coarse", [fo.Classification(label="animal") for _ in range(len(two_runs))])
    params = dict(
        model=f"cifar10_resnet20:{resnet20_path}", targets="both", label_field="coarse",
        heatmap_field="coarse_cam", pred_field="coarse_prediction", device="cpu",
    )
    result = foo.execute_operator(uri("compute_cams"), ctx=dict(dataset=two_runs, params=params))
    assert result.error is None, result.error
    requests = _app_requests(result)
    notices = [p for name, p in requests if name.endswith("notify")]
    assert len(notices) == 1 and notices[0]["variant"] == "error"
    message = notices[0]["message"]
    assert "animal" in message and "Traceback" not in message and "\n" not in message
    (shown,) = [p for name, p in requests if name.endswith("show_output")]
    assert shown["results"] == {"error": message}
    assert set(shown["outputs"]["type"]["properties"]) == {"error"}
    # nothing was written
    assert "coarse_cam" not in two_runs.get_field_schema()

    # the same sentence in the output of an operator that is not a generator
    # (resolved as the App does after execution)
    props = _outputs("class_attention_summary", two_runs, {"error": message})
    assert set(props) == {"error"}


def test_the_summary_runs_on_the_chosen_target_and_says_so(two_runs):
    view = two_runs.match(fo.ViewField("ground_truth.label").is_in(["cat", "dog", "ship"]))
    ids = two_runs.limit(3).values("id")

    props = _form("class_attention_summary", two_runs, view=view)
    targets = [c["value"] for c in props["view_target"]["view"]["choices"]]
    assert {"DATASET", "CURRENT_VIEW"} <= set(targets)
    props = _form("class_attention_summary", two_runs, view=view, selected=ids)
    assert "SELECTED_SAMPLES" in [c["value"] for c in props["view_target"]["view"]["choices"]]

    whole = _execute("class_attention_summary", two_runs, view=view, heatmap_field="withgt", view_target="DATASET")
    assert whole["ran_on"] == f"the whole dataset ({len(two_runs)} samples)"
    assert sum(r["samples"] for r in whole["rows"]) == len(two_runs)

    current = _execute("class_attention_summary", two_runs, view=view, heatmap_field="withgt", view_target="CURRENT_VIEW")
    assert current["ran_on"] == "the current view (6 samples)"
    assert {r["class"] for r in current["rows"]} == {"cat", "dog", "ship"}

    chosen = _execute(
        "class_attention_summary", two_runs, heatmap_field="withgt", selected=ids, view_target="SELECTED_SAMPLES"
    )
    assert chosen["ran_on"] == "the selected samples (3 samples)"
    assert sum(r["samples"] for r in chosen["rows"]) == 3


def test_views_operator_saves_views_of_the_chosen_target(two_runs):
    view = two_runs.limit(8)
    result = _execute("attention_views", two_runs, view=view, heatmap_field="withgt", view_target="CURRENT_VIEW")
    assert result["ran_on"] == "the current view (8 samples)"
    saved = two_runs.load_saved_view("withgt_misclassified_background")
    assert set(saved.values("id")) <= set(view.values("id"))


def test_every_operator_form_offers_the_target_choice(two_runs, resnet20_path):
    view = two_runs.limit(4)
    for op_name, params in [
        ("compute_cams", dict(model=f"cifar10_resnet20:{resnet20_path}")),
        ("compute_attention", dict(heatmap_field="withgt")),
        ("attention_views", {}),
        ("class_attention_summary", {}),
    ]:
        props = _form(op_name, two_runs, view=view, **params)
        assert "view_target" in props, op_name


def test_compute_output_shows_failure_reasons_only_when_there_are_some(two_runs):
    ok = {"ran_on": "x", "run_key": "withgt", "processed": 3, "failed": 0, "skipped": 0,
          "status": "completed", "errors": {}, "failure_reasons": [], "queued": []}
    props = _outputs("compute_attention", two_runs, ok)
    assert "failure_reasons" not in props and "errors" not in props and "queued" not in props
    assert {"ran_on", "processed", "failed"} <= set(props)

    failed = dict(ok, failed=2, errors={"unreadable image: x": 2},
                  failure_reasons=[{"reason": "unreadable image: x", "samples": 2}])
    props = _outputs("compute_attention", two_runs, failed)
    assert props["failure_reasons"]["view"]["name"] == "TableView"


def test_run_list_shows_counts_and_what_each_run_owns(two_runs):
    result = _execute("list_cam_runs", two_runs)
    rows = {r["key"]: r for r in result["runs"]}
    n = len(two_runs)
    assert rows["withgt"]["samples"] == f"{n} done, 0 failed, 0 to do"
    owned = {r["key"]: r for r in result["owned"]}
    assert "withgt_gt" in owned["withgt"]["fields"]
    files = {r["key"]: r["files_dir"] for r in result["files"]}
    assert set(files) == {"cam", "withgt"}
    assert files["withgt"] == cam_plugin.get_run(two_runs, "withgt")["files_dir"]
    # the model's checkpoint named without its directory: rows fit the dialog
    assert rows["withgt"]["what"].endswith("of cifar10_resnet20:resnet20-12fca82f.th")
    props = _outputs("list_cam_runs", two_runs, result)
    columns = [c["key"] for c in props["runs"]["view"]["columns"]]
    # the counts lead, the long texts (fields, paths) have a table of their own
    assert columns[:3] == ["key", "status", "samples"] and "fields" not in columns
    assert [c["key"] for c in props["owned"]["view"]["columns"]] == ["key", "what", "fields"]
    assert [c["key"] for c in props["files"]["view"]["columns"]] == ["key", "files_dir"]


def test_class_ranking_needs_support(dataset_name):
    """One sample at 100% off the object no longer outranks many at 60%:
    classes rank by the lower end of their 95% Wilson interval, and those
    with fewer than min_samples come last."""
    dataset = fo.Dataset(dataset_name)
    # energies: 0.05 on a 0.25-area object is focus < 0 (off); 0.9 is on it
    rows = [("rare", "rare", 0.05)] + [("common", "common", 0.05)] * 12 + [("common", "common", 0.9)] * 8
    rows += [("tiny", "tiny", 0.05)] * 4
    dataset.add_samples(
        [
            fo.Sample(
                filepath=f"/nonexistent/{i}.jpg",
                gt=fo.Classification(label=g),
                pred=fo.Classification(label=p, confidence=0.9),
                cam_object_energy=e,
                cam_object_area=0.25,
            )
            for i, (g, p, e) in enumerate(rows)
        ]
    )
    dataset.add_sample_field("cam", fo.EmbeddedDocumentField, embedded_doc_type=fo.Heatmap)
    summary = cam_plugin.class_summary(dataset, "cam", "gt", "pred")
    order = [r["class"] for r in summary]
    assert order == ["common", "tiny", "rare"]
    common = summary[0]
    assert common["off_object_share"] == pytest.approx(0.6)
    assert 0.38 < common["off_object_low"] < 0.6 < common["off_object_high"] < 0.82
    rare = summary[-1]
    assert rare["off_object_share"] == 1.0 and not rare["enough_samples"]
    assert rare["off_object_low"] < 0.25
    # without a minimum, 4 of 4 off (interval 51% to 100%) outranks 12 of 20
    # (39% to 78%), and 1 of 1 (21% to 100%) still comes last
    assert [r["class"] for r in cam_plugin.class_summary(dataset, "cam", "gt", "pred", min_samples=1)] == [
        "tiny", "common", "rare"
    ]


def test_summary_bars_carry_their_counts(two_runs):
    result = _execute("class_attention_summary", two_runs, heatmap_field="withgt")
    trace = result["plot"][0]
    rows = {r["class"]: r for r in result["rows"]}
    for name, text in zip(trace["x"], trace["text"]):
        assert text == f"{rows[name]['off_object']}/{rows[name]['samples']}"
    assert len(trace["error_y"]["array"]) == len(trace["x"])
    # every class here has 2 samples: all are greyed as ranked last
    assert set(trace["marker"]["color"]) == {"#b0b0b0"}
    assert "ranked last" in result["note"]


def test_class_names_from_a_text_file_in_the_form(two_runs, resnet20_path, tmp_path):
    """The compute_cams form takes class names from a text file (one per
    line), checks the file as the user types, and names the predictions
    with it; the ImageNet-1k choice is offered, and refused at the run's
    start for a 10-output model in one sentence."""
    names = [f"file-{n}" for n in cam_plugin.models.CIFAR10_CLASSES]
    good = tmp_path / "names.txt"
    good.write_text("\n".join(names) + "\n\n")
    model = dict(model_source="file", model_path=str(resnet20_path), architecture="cifar10_resnet20")

    props = _form("compute_cams", two_runs, **model, class_names_source="file", classes_file=str(tmp_path / "nope.txt"))
    assert "nope.txt" in _errors(props)["classes_file"]
    props = _form("compute_cams", two_runs, **model, class_names_source="file", classes_file=str(good))
    assert not _errors(props)
    assert props["classes_read"]["view"]["label"].startswith("10 class names: file-airplane, ")
    assert "imagenet" in [c["value"] for c in props["class_names_source"]["view"]["choices"]]

    params = dict(model, class_names_source="file", classes_file=str(good), heatmap_field="named",
                  pred_field="named_prediction", batch_size=10, device="cpu")
    _execute("compute_cams", two_runs, **params)
    two_runs.reload()
    assert set(two_runs.distinct("named_prediction.label")) <= set(names)
    # no logits unless asked (apply_model's convention)
    assert two_runs.first().named_prediction.logits is None

    result = foo.execute_operator(
        uri("compute_cams"),
        ctx=dict(dataset=two_runs, params=dict(params, class_names_source="imagenet", heatmap_field="inet",
                                                pred_field="inet_prediction")),
    )
    (notice,) = [p for name, p in _app_requests(result) if name.endswith("notify")]
    assert "10 outputs" in notice["message"] and "1000 class names" in notice["message"]


def test_an_object_covering_the_whole_image_has_no_background(dataset_name):
    """Before: with max_object_area=1.0, a sample whose object is the whole
    image divided by zero (focus NaN, a RuntimeWarning). Now its focus is
    0 and it is not counted off the object."""
    import warnings

    dataset = fo.Dataset(dataset_name)
    dataset.add_samples(
        [
            fo.Sample(
                filepath=f"/nonexistent/{i}.jpg",
                gt=fo.Classification(label="wall"),
                pred=fo.Classification(label="wall", confidence=0.9),
                cam_object_energy=energy,
                cam_object_area=area,
            )
            for i, (energy, area) in enumerate([(1.0, 1.0), (0.05, 0.25)])
        ]
    )
    dataset.add_sample_field("cam", fo.EmbeddedDocumentField, embedded_doc_type=fo.Heatmap)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        (row,) = cam_plugin.class_summary(dataset, "cam", "gt", "pred", max_object_area=1.0, min_samples=1)
    assert row["samples"] == 2 and row["off_object"] == 1
    # (0.05 - 0.25) / 0.75 and 0
    assert row["mean_focus"] == pytest.approx(-0.2 / 0.75 / 2)
