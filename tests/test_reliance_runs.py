"""The reliance and context runs as users break them, and as the App runs
them: killed (-9) after their k-th database write and resumed, sharded to
real delegated workers, deleted with the CAM run they depend on, their
forms resolved and their operators executed by FiftyOne's machinery."""

import json
import signal
import textwrap

import fiftyone as fo
import fiftyone.operators as foo
import pytest

import cam_plugin
from builders import cifar_dataset, form_errors, resolve_form, run_delegated, run_killed_after_writes
from cam_plugin.runs.reliance import RELIANCE_FIELDS

PLUGIN = "@cam-plugin/cam"
RELIANCE = [f"cam_{name}" for name in RELIANCE_FIELDS if name != "reliance_error"]

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import fiftyone as fo
    import cam_plugin

    dataset = fo.load_dataset(sys.argv[1])
    kind, kwargs = sys.argv[2], json.loads(sys.argv[3])
    if kind == "reliance":
        cam_plugin.compute_reliance(dataset, **kwargs)
    else:
        cam_plugin.compute_context(dataset, **kwargs)
    """
)


@pytest.fixture(scope="module")
def resnet20(resnet20_path):
    return f"cifar10_resnet20:{resnet20_path}"


def _with_cams(name, cifar_dir, resnet20, per_class=1):
    """CIFAR images with a centre box labelled with the image's class and a
    second box in a corner (``scene``), and the CAM run of ResNet-20."""
    dataset = cifar_dataset(name, cifar_dir, per_class=per_class)
    for sample in dataset:
        label = sample.ground_truth.label
        sample["objects"] = fo.Detections(detections=[fo.Detection(label=label, bounding_box=[0.25, 0.25, 0.5, 0.5])])
        sample["scene"] = fo.Detections(
            detections=[
                fo.Detection(label=label, bounding_box=[0.25, 0.25, 0.5, 0.5]),
                fo.Detection(label="corner", bounding_box=[0.0, 0.0, 0.3, 0.3]),
            ]
        )
        sample.save()
    cam_plugin.compute_cams(dataset, resnet20, label_field="ground_truth", num_workers=0, progress=False)
    return dataset


def _reliance_outputs(dataset):
    dataset.reload()
    names = [f for f in RELIANCE if dataset.has_sample_field(f)]
    if not names:
        return {sid: {} for sid in dataset.values("id")}
    rows = dataset.values(["id"] + names)
    return {sid: dict(zip(names, values)) for sid, *values in zip(*rows)}


@pytest.mark.parametrize("kind", ["reliance", "context"])
def test_a_kill_after_database_writes_resumes_exactly(kind, dataset_name, cifar_dir, resnet20, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    if kind == "reliance":
        # no model: the CAM run's is loaded again, in the killed process too
        kwargs = dict(region_field="objects", batch_size=2, num_workers=0, progress=False)
    else:
        kwargs = dict(heatmap_field="cam", context_field="scene", batch_size=2, progress=False)
    base = _with_cams(dataset_name, cifar_dir, resnet20)
    finished_at, partial = None, []
    for k in range(1, 40, 2):
        dataset = base.clone(f"{dataset_name}_{k}")
        proc = run_killed_after_writes(script, [dataset.name, kind, json.dumps(kwargs)], k)
        if proc.returncode == 0:
            finished_at = k
            fo.delete_dataset(dataset.name)
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
        dataset.reload()
        if kind == "reliance":
            # a sample holds every reliance field or none
            outputs = _reliance_outputs(dataset)
            done = {sid for sid, o in outputs.items() if o.get("cam_bg_reliance") is not None}
            for sid, o in outputs.items():
                assert all((v is not None) == (sid in done) for v in o.values()), (k, o)
            summary = cam_plugin.compute_reliance(dataset, **kwargs)
            after = _reliance_outputs(dataset)
            assert all(after[sid] == outputs[sid] for sid in done)  # kept, not recomputed
            assert all(v is not None for o in after.values() for v in o.values())
        else:
            done = set(dataset.exists("cam_context").values("id")) if dataset.has_sample_field("cam_context") else set()
            summary = cam_plugin.compute_context(dataset, **kwargs)
            assert dataset.count("cam_context") == len(dataset)
        partial.append(len(done))
        if done:
            assert summary.resumed and summary.skipped == len(done)
        assert summary.processed == len(dataset) - len(done) and summary.status == "completed"
        fo.delete_dataset(dataset.name)
    assert finished_at is not None and finished_at > 4
    assert any(0 < n < 10 for n in partial), partial


def test_sharded_delegated_runs_equal_the_in_process_ones(dataset_name, cifar_dir, resnet20, tmp_path):
    from fiftyone.operators.executor import ExecutionRunState

    dataset = _with_cams(dataset_name, cifar_dir, resnet20, per_class=2)
    cam_plugin.compute_reliance(dataset, region_field="objects", fill="swap", prefix="here", num_workers=0)
    cam_plugin.compute_context(dataset, "cam", "scene", run_key="here_context")
    pairs = lambda: list(zip(*dataset.values(["cam_context.classifications.label", "cam_context.classifications.confidence"])))  # noqa: E731
    here_context = pairs()
    dataset.delete_sample_field("cam_context")
    dataset.delete_sample_field("cam_context_error")
    cam_plugin.delete_run(dataset, "here_context")

    queued = cam_plugin.compute_reliance(dataset, region_field="objects", fill="swap", num_shards=2, delegate=True)
    assert len(queued.queued) == 2
    queued_context = cam_plugin.compute_context(dataset, "cam", "scene", num_shards=2, delegate=True)
    assert len(queued_context.queued) == 2
    states, logs = run_delegated(dataset, tmp_path / "worker.log")
    assert states == [ExecutionRunState.COMPLETED] * 4, logs

    dataset.reload()
    assert cam_plugin.get_run(dataset, "cam_reliance")["status"] == "completed"
    # the same numbers, and the same swapped backgrounds, in the workers
    for name in ("bg_reliance", "bg_flip", "obj_flip", "bg_removed_label", "swap_source"):
        assert dataset.values(f"cam_{name}") == dataset.values(f"here_{name}"), name
    assert pairs() == here_context


def test_deleting_the_cam_run_deletes_what_was_measured_on_it(dataset_name, cifar_dir, resnet20):
    dataset = _with_cams(dataset_name, cifar_dir, resnet20)
    cam_plugin.compute_reliance(dataset, region_field="objects", num_workers=0)
    cam_plugin.compute_context(dataset, "cam", "scene")
    assert set(cam_plugin.list_runs(dataset)) == {"cam", "cam_reliance", "cam_context"}
    assert cam_plugin.list_runs(dataset, "reliance") == ["cam_reliance"]
    cam_plugin.delete_run(dataset, "cam")
    dataset.reload()
    assert cam_plugin.list_runs(dataset) == []
    left = [f for f in dataset.get_field_schema() if f.startswith("cam")]
    assert left == []
    # the user's fields are untouched
    assert dataset.count("objects") == dataset.count("scene") == len(dataset)


def test_odd_prefixes_and_fields_are_refused_before_anything_is_written(dataset_name, cifar_dir, resnet20):
    dataset = _with_cams(dataset_name, cifar_dir, resnet20)
    dataset.add_sample_field("mine_bg_flip", fo.BooleanField)
    for prefix, message in (("1bad", "Invalid prefix"), ("has space", "Invalid prefix"), ("mine", "not made by this plugin")):
        with pytest.raises(ValueError, match=message):
            cam_plugin.compute_reliance(dataset, region_field="objects", prefix=prefix)
    with pytest.raises(ValueError, match="region_field is required"):
        cam_plugin.compute_reliance(dataset, region_field=None)
    with pytest.raises(ValueError, match="must hold detections"):
        cam_plugin.compute_reliance(dataset, region_field="ground_truth")
    with pytest.raises(ValueError, match="fill must be one of"):
        cam_plugin.compute_reliance(dataset, region_field="objects", fill="noise")
    with pytest.raises(ValueError, match="must hold a segmentation, detections or polylines"):
        cam_plugin.compute_context(dataset, "cam", "ground_truth")
    with pytest.raises(ValueError, match="context_field is required"):
        cam_plugin.compute_context(dataset, "cam")
    # an in-memory model cannot be loaded again, nor delegated
    in_memory = cam_plugin.load_classifier(cam_plugin.get_run(dataset, "cam")["model_spec"])
    with pytest.raises(cam_plugin.RunError, match="cannot be delegated"):
        cam_plugin.compute_reliance(dataset, in_memory, region_field="objects", delegate=True)
    assert cam_plugin.list_runs(dataset) == ["cam"]
    assert not [f for f in dataset.get_field_schema() if f.startswith("cam_bg") or f == "cam_context"]


def test_the_forms_and_operators_through_fiftyone(dataset_name, cifar_dir, resnet20):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    form = resolve_form(f"{PLUGIN}/compute_reliance", dataset)
    assert "no_predictions" in form_errors(form)
    assert "Compute class activation maps" in form["no_predictions"]["view"]["description"]

    # a run with an in-memory model: the form says how to test it instead
    cam_plugin.compute_cams(dataset, cam_plugin.load_classifier(resnet20), label_field="ground_truth",
                            heatmap_field="mem", pred_field="mem_prediction", progress=False)
    form = resolve_form(f"{PLUGIN}/compute_reliance", dataset, pred_field="mem_prediction")
    assert "model_in_memory" in form_errors(form)
    assert "model=your_model" in form["model_in_memory"]["view"]["description"]

    dataset = _with_cams(f"{dataset_name}_2", cifar_dir, resnet20)
    form = resolve_form(f"{PLUGIN}/compute_reliance", dataset)
    assert form_errors(form) == {} and form["region_field"]["required"]  # to be chosen
    assert {"objects", "scene"} <= set(form["region_field"]["type"]["values"])
    form = resolve_form(f"{PLUGIN}/compute_reliance", dataset, region_field="objects")
    assert form_errors(form) == {}
    assert form["prefix"]["default"] == "cam"
    form = resolve_form(f"{PLUGIN}/compute_reliance", dataset, region_field="objects", fill="swap")
    assert form["prefix"]["default"] == "cam_swap"
    dataset.add_sample_field("taken_bg_flip", fo.BooleanField)
    form = resolve_form(f"{PLUGIN}/compute_reliance", dataset, region_field="objects", prefix="taken")
    assert "not made by this plugin" in form_errors(form)["prefix"]
    # the swap run's extra field is checked too
    dataset.add_sample_field("mine_swap_source", fo.StringField)
    form = resolve_form(f"{PLUGIN}/compute_reliance", dataset, region_field="objects", prefix="mine")
    assert form_errors(form) == {}
    form = resolve_form(f"{PLUGIN}/compute_reliance", dataset, region_field="objects", prefix="mine", fill="swap")
    assert "mine_swap_source" in form_errors(form)["prefix"]

    result = foo.execute_operator(
        f"{PLUGIN}/compute_reliance", ctx=dict(view=dataset.view()),
        params=dict(region_field="objects", pred_field="cam_prediction", fill="blur", prefix="cam_blur"),
    )
    assert result.error is None, result.error
    dataset.reload()
    assert dataset.count("cam_blur_bg_reliance") == len(dataset)
    assert cam_plugin.get_run(dataset, "cam_blur_reliance")["fill"] == "blur"

    form = resolve_form(f"{PLUGIN}/compute_context", dataset, heatmap_field="cam")
    assert form_errors(form) == {} and form["context_field"]["required"]
    form = resolve_form(f"{PLUGIN}/compute_context", dataset, heatmap_field="cam", context_field="scene")
    assert form_errors(form) == {}
    result = foo.execute_operator(
        f"{PLUGIN}/compute_context", ctx=dict(view=dataset.view()),
        params=dict(heatmap_field="cam", context_field="scene", min_share=0.05),
    )
    assert result.error is None, result.error
    assert result.result["processed"] == len(dataset)
    dataset.reload()
    assert min(c for cs in dataset.values("cam_context.classifications.confidence") for c in cs) >= 0.05

    # once measured, the views form offers the views of the intervention
    cam_plugin.compute_attention(dataset, "cam", "objects")
    names = cam_plugin.views.view_names(dataset, "cam")
    assert set(cam_plugin.views.RELIANCE_VIEW_DESCRIPTIONS) <= set(names)
    form = resolve_form(f"{PLUGIN}/attention_views", dataset, heatmap_field="cam")
    offered = [c["value"] for c in form["open_view"]["view"]["choices"]]
    assert "confirmed_background_reliance" in offered and "unfaithful_heatmap" in offered
    fo.delete_dataset(dataset.name)


def test_what_a_breaker_found_fails_one_sample_with_its_reason(dataset_name, cifar_dir, resnet20, tmp_path):
    """Defects a review found: each now fails the one sample (or the call,
    before anything is written) with a sentence naming the problem."""
    import numpy as np
    from PIL import Image

    dataset = _with_cams(dataset_name, cifar_dir, resnet20)
    ids = dataset.values("id")
    # a semantic-mask region whose file is gone, with the default "gt"
    # classes (read in the workers: that sample alone fails)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    Image.fromarray(mask).save(tmp_path / "m.png")
    dataset.set_values("seg", [fo.Segmentation(mask_path=str(tmp_path / "m.png"))] * len(dataset))
    gone = dataset[ids[0]]
    gone["seg"] = fo.Segmentation(mask_path=str(tmp_path / "gone.png"))
    # a zero-area box, and a box over the whole image
    gone["objects"] = fo.Detections(detections=[fo.Detection(label="x", bounding_box=[0.5, 0.5, 0, 0])])
    gone.save()
    whole = dataset[ids[1]]
    whole["objects"] = fo.Detections(detections=[fo.Detection(label=whole.ground_truth.label, bounding_box=[0, 0, 1, 1])])
    whole.save()
    dataset.mask_targets = {"seg": {1: "thing"}}

    summary = cam_plugin.compute_reliance(dataset, region_field="seg", prefix="seg", num_workers=0)
    assert summary.failed == 1 and summary.processed == len(dataset) - 1
    assert "the region in 'seg' cannot be read" in dataset[ids[0]]["seg_reliance_error"]
    summary = cam_plugin.compute_reliance(dataset, region_field="objects", num_workers=0)
    assert summary.failed == 2
    assert "cover no pixel of the image" in dataset[ids[0]]["cam_reliance_error"]
    assert "covers the whole image: there is no background" in dataset[ids[1]]["cam_reliance_error"]

    # swap: a sample without an object to paint out never lends its
    # background (its own object would be pasted along)
    summary = cam_plugin.compute_reliance(dataset, region_field="objects", fill="swap", prefix="sw", num_workers=0)
    sources = set(dataset.exists("sw_swap_source").values("sw_swap_source"))
    assert summary.processed == len(dataset) - 2 and ids[0] not in sources and sources

    # class names of the wrong length, a bad seed or batch size: refused
    # before a run is registered
    for kwargs, message in (
        (dict(classes=["a", "b"]), "10 outputs but 2 class names"),
        (dict(seed="abc"), "seed must be a whole number"),
        (dict(batch_size=-1), "batch_size must be a positive whole number"),
    ):
        with pytest.raises(ValueError, match=message):
            cam_plugin.compute_reliance(dataset, region_field="objects", prefix="bad", **kwargs)
    assert "bad_reliance" not in cam_plugin.list_runs(dataset)

    # RGB mask targets and maps with NaN say so
    dataset.mask_targets = {"seg": {"#ff0000": "red"}}
    with pytest.raises(ValueError, match="RGB colours"):
        cam_plugin.compute_context(dataset, "cam", "seg")
    nan = np.ones((8, 8))
    nan[0, 0] = np.nan
    dataset.set_values("odd_map", [fo.Heatmap(map=nan)] * len(dataset))
    summary = cam_plugin.compute_context(dataset, "odd_map", "scene")
    assert summary.failed == len(dataset)
    assert "NaN or infinite" in dataset.first()["odd_map_context_error"]


def test_the_views_use_only_the_intervention_of_the_runs_own_predictions(dataset_name, cifar_dir, resnet20):
    dataset = _with_cams(dataset_name, cifar_dir, resnet20, per_class=2)
    cam_plugin.compute_attention(dataset, "cam", "objects")
    # another model's intervention (random weights) explains other
    # predictions: the views leave those samples out
    cam_plugin.compute_reliance(dataset, "cifar10_resnet20:none", region_field="objects", num_workers=0)
    same = [
        i for i, a, b in zip(*dataset.values(["id", "cam_reliance_class", "cam_prediction.label"])) if a == b
    ]
    assert len(same) < len(dataset)
    views = cam_plugin.attention_views(dataset, "cam", save=False)
    for name in cam_plugin.views.RELIANCE_VIEW_DESCRIPTIONS:
        assert set(views[name].values("id")) <= set(same), name

    # a cell's view takes label_field as the summary does
    cam_plugin.compute_context(dataset, "cam", "scene")
    rows = cam_plugin.context_summary(dataset, label_field="ground_truth")
    row = rows[0]
    cell = cam_plugin.context_view(dataset, row.class_name, row.top[0], label_field="ground_truth")
    assert 0 < len(cell) <= row.samples
