"""The plugin's operators, run through FiftyOne's own operator machinery with
the plugin installed in a temporary plugins dir: immediately, delegated to a
real `fiftyone delegated launch` worker, and their forms' validation as the
App resolves it."""

import asyncio
import os
import subprocess
import sys
import time

import fiftyone as fo
import fiftyone.operators as foo
import pytest
from fiftyone.operators.executor import ExecutionRunState, resolve_type

import cam_plugin
from builders import cifar_dataset

PLUGIN = "@cam-plugin/cam"
OPERATORS = [
    "compute_cams",
    "compute_attention",
    "attention_views",
    "class_attention_summary",
    "list_cam_runs",
    "delete_cam_run",
]


def uri(name):
    return f"{PLUGIN}/{name}"


@pytest.fixture
def labelled(dataset_name, cifar_dir):
    """CIFAR images with ground truth and a box covering the object's
    centre (the images are object-centred)."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=2)
    box = fo.Detections(detections=[fo.Detection(label="object", bounding_box=[0.25, 0.25, 0.5, 0.5])])
    dataset.set_values("objects", [box.copy() for _ in range(len(dataset))])
    for sample in dataset.iter_samples(autosave=True):
        sample.objects.detections[0].label = sample.ground_truth.label
    return dataset


def _execute(name, dataset, **params):
    result = foo.execute_operator(uri(name), ctx=dict(dataset=dataset, params=params))
    assert result.error is None, result.error
    dataset.reload()
    return result


def test_plugin_and_operators_are_registered():
    import fiftyone.plugins as fop

    assert PLUGIN in [p.name for p in fop.list_plugins()]
    for name in OPERATORS + ["attention_by_class"]:
        assert foo.get_operator(uri(name)) is not None, name


def test_every_operator_immediately(labelled, resnet20_path):
    dataset = labelled
    _execute(
        "compute_cams",
        dataset,
        model=f"cifar10_resnet20:{resnet20_path}",
        method="gradcam",
        targets="both",
        label_field="ground_truth",
        batch_size=8,
        device="cpu",
    )
    assert dataset.count("cam.map_path") == len(dataset)
    assert dataset.count("cam_gt.map_path") == len(dataset)
    assert dataset.count("cam_prediction") == len(dataset)
    # heatmaps get distinct colorscales in the dataset's App color scheme
    scales = {c["path"]: c["name"] for c in dataset.app_config.color_scheme.colorscales}
    assert scales["cam"] != scales["cam_gt"]

    _execute("compute_attention", dataset, heatmap_field="cam", region_field="objects")
    assert dataset.count("cam_object_energy") == len(dataset)
    assert dataset.count("cam_gt_pointing_hit") == len(dataset)

    views = _execute("attention_views", dataset, heatmap_field="cam", open_view="correct_background")
    counts = {row["view"]: row["samples"] for row in views.result["counts"]}
    assert set(counts) == {f"cam_{name}" for name in cam_plugin.views.VIEW_DESCRIPTIONS}
    assert "cam_correct_background" in dataset.list_saved_views()
    assert counts["cam_correct_background"] == len(dataset.load_saved_view("cam_correct_background"))
    assert views.result["ran_on"] == f"the whole dataset ({len(dataset)} samples)"

    summary = _execute("class_attention_summary", dataset, heatmap_field="cam").result
    assert {r["class"] for r in summary["rows"]} == set(dataset.distinct("ground_truth.label"))
    # the plot output's value is its list of traces, as the App's PlotlyView reads it
    assert summary["plot"][0]["x"] == [r["class"] for r in summary["rows"]]
    library_rows = cam_plugin.views.class_summary(dataset, "cam")
    assert [r["samples"] for r in summary["rows"]] == [r["samples"] for r in library_rows]

    listed = _execute("list_cam_runs", dataset).result["runs"]
    assert {(r["key"], r["kind"], r["status"]) for r in listed} == {
        ("cam", "cams", "completed"),
        ("cam_attention", "attention", "completed"),
    }

    _execute("delete_cam_run", dataset, run_key="cam")
    assert cam_plugin.list_runs(dataset) == []
    assert not any(f.startswith("cam") for f in dataset.get_field_schema())


def _wait_for_delegated(dataset_name, count, timeout=240):
    from fiftyone.factory.repo_factory import RepositoryFactory

    repo = RepositoryFactory.delegated_operation_repo()
    deadline = time.time() + timeout
    while time.time() < deadline:
        ops = repo.list_operations(dataset_name=dataset_name)
        done = [o for o in ops if o.run_state in (ExecutionRunState.COMPLETED, ExecutionRunState.FAILED)]
        if len(ops) >= count and len(done) == len(ops):
            return ops
        time.sleep(0.5)
    raise AssertionError(f"delegated operations did not finish: {[o.run_state for o in ops]}")


def test_every_operator_delegated_to_a_worker(labelled, resnet20_path):
    dataset = labelled
    name = dataset.name

    def queue(op_name, **params):
        result = foo.execute_operator(
            uri(op_name), ctx=dict(dataset=dataset, params=params), request_delegation=True
        )
        assert result.delegated, op_name
        assert result.error is None, result.error

    # a real worker, as users run it
    fiftyone_cli = os.path.join(os.path.dirname(sys.executable), "fiftyone")
    worker = subprocess.Popen(
        [fiftyone_cli, "delegated", "launch"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        queue(
            "compute_cams",
            model=f"cifar10_resnet20:{resnet20_path}",
            targets="both",
            label_field="ground_truth",
            device="cpu",
        )
        ops = _wait_for_delegated(name, 1)
        dataset.reload()
        assert dataset.count("cam.map_path") == len(dataset), [o.run_state for o in ops]

        queue("compute_attention", heatmap_field="cam", region_field="objects")
        _wait_for_delegated(name, 2)
        queue("attention_views", heatmap_field="cam")
        queue("class_attention_summary", heatmap_field="cam")
        queue("list_cam_runs")
        ops = _wait_for_delegated(name, 5)
        queue("delete_cam_run", run_key="cam")
        ops = _wait_for_delegated(name, 6)
    finally:
        worker.terminate()
        worker.wait(timeout=30)

    states = {o.operator.split("/")[-1]: o.run_state for o in ops}
    assert states == {op: ExecutionRunState.COMPLETED for op in OPERATORS}, states
    dataset.reload()
    assert "cam_misclassified_background" in dataset.list_saved_views()
    assert cam_plugin.list_runs(dataset) == []
    assert not any(f.startswith("cam") for f in dataset.get_field_schema())


def _form(op_name, dataset, **params):
    """The operator's input form as the App resolves it, as JSON."""
    registry = foo.OperatorRegistry()
    request = {"dataset_name": dataset.name, "view": [], "params": params}
    prop = asyncio.run(resolve_type(registry, uri(op_name), request))
    assert not isinstance(prop, foo.executor.ExecutionResult), getattr(prop, "error", None)
    return prop.to_json()["type"]["properties"]


def _errors(properties):
    return {name: p.get("error_message") for name, p in properties.items() if p.get("invalid")}


def test_compute_cams_form_validation(labelled, resnet20_path):
    dataset = labelled
    model = f"cifar10_resnet20:{resnet20_path}"

    ok = _form("compute_cams", dataset, model=model, label_field="ground_truth", targets="both")
    assert _errors(ok) == {}
    layer = ok["target_layer"]
    assert layer["default"] == "layer3"
    assert "layer3" in [c["value"] for c in layer["view"]["choices"]]

    # an existing field of another type
    dataset.add_sample_field("taken", fo.StringField)
    errors = _errors(_form("compute_cams", dataset, model=model, heatmap_field="taken"))
    assert "already exists with type StringField" in errors["heatmap_field"]

    # a ground-truth map needs a ground-truth field
    errors = _errors(_form("compute_cams", dataset, model=model, targets="gt"))
    assert "need a ground-truth field" in errors["label_field"]

    # an unknown layer
    errors = _errors(_form("compute_cams", dataset, model=model, target_layer="layer9"))
    assert "Unknown layer 'layer9'" in errors["target_layer"]

    # a field name that is not a valid name
    errors = _errors(_form("compute_cams", dataset, model=model, pred_field="my preds"))
    assert "not a valid field name" in errors["pred_field"]


def test_torchvision_model_form_lists_weights_and_layers_without_downloading(labelled):
    props = _form("compute_cams", labelled, model_source="torchvision", torchvision_model="resnet18")
    weights = [c["value"] for c in props["weights"]["view"]["choices"]]
    assert weights[0] == "IMAGENET1K_V1"
    assert props["target_layer"]["default"] == "layer4"

    errors = _errors(_form("compute_cams", labelled, model_source="torchvision", torchvision_model="resnet9000"))
    assert "not a torchvision classifier" in errors["torchvision_model"]


def test_class_names_from_the_form_name_the_predictions(labelled, resnet20_path):
    """A model file with the class names typed in the form: predictions carry
    those names, in output order."""
    names = [f"C{i}-{n}" for i, n in enumerate(cam_plugin.models.CIFAR10_CLASSES)]
    _execute(
        "compute_cams",
        labelled,
        model_source="file",
        model_path=str(resnet20_path),
        architecture="cifar10_resnet20",
        classes=", ".join(names),
        heatmap_field="named",
        pred_field="named_prediction",
        batch_size=8,
        device="cpu",
    )
    labels = labelled.values("named_prediction.label")
    assert all(label in names for label in labels)
    # the same model under its own names predicts the same classes
    _execute("compute_cams", labelled, model=f"cifar10_resnet20:{resnet20_path}", batch_size=8, device="cpu")
    plain = labelled.values("cam_prediction.label")
    assert [names.index(n) for n in labels] == [cam_plugin.models.CIFAR10_CLASSES.index(p) for p in plain]


def test_the_operator_queues_one_delegated_operation_per_shard(labelled, resnet20_path):
    """With Shards > 1 the operator runs at once and queues the shards, each
    a delegated operation of its own; its output lists them."""
    from fiftyone.factory.repo_factory import RepositoryFactory

    dataset = labelled
    result = _execute(
        "compute_cams",
        dataset,
        model=f"cifar10_resnet20:{resnet20_path}",
        targets="both",
        label_field="ground_truth",
        device="cpu",
        num_shards=3,
    )
    assert not result.delegated
    queued = result.result["queued"] if isinstance(result.result, dict) else None
    ops = RepositoryFactory.delegated_operation_repo().list_operations(dataset_name=dataset.name)
    assert len(ops) == 3
    assert sorted(op.context.request_params["params"]["shard"] for op in ops) == [0, 1, 2]
    assert queued is None or sorted(queued) == sorted(str(op.id) for op in ops)
    run = cam_plugin.get_run(dataset, "cam")
    assert run["num_shards"] == 3 and run["status"] == "running"
    assert run["counts"]["todo"] == len(dataset)
