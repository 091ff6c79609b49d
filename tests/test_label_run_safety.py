"""The runs of issue 13's ground truth as users break them: a run judged by
a class map and a multi-label run, killed (-9) right after their k-th
database write and resumed, computed over a clone, and queued to a real
delegated worker. These runs write more fields per sample than a plain
one (the judged class and verdict; a field per class), and each must
still land whole or not at all."""

import json
import os
import signal
import textwrap
from pathlib import Path

import fiftyone as fo
import pytest
from PIL import Image

import cam_plugin
from builders import cifar_dataset, run_delegated, run_killed_after_writes
from cam_plugin.cifar_resnet import CIFAR10_CLASSES

# each CIFAR class judged by a set of two model classes: a class map that
# changes verdicts (a cat called a dog is right under it)
CLASS_MAP = {c: [c, CIFAR10_CLASSES[(i + 1) % 10]] for i, c in enumerate(CIFAR10_CLASSES)}

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import fiftyone as fo
    import cam_plugin

    dataset = fo.load_dataset(sys.argv[1])
    cam_plugin.compute_cams(dataset, sys.argv[2], **json.loads(sys.argv[3]))
    """
)


@pytest.fixture(scope="module")
def resnet20(resnet20_path):
    return f"cifar10_resnet20:{resnet20_path}"


def _kinds(tmp_path):
    class_map = tmp_path / "class_map.json"
    class_map.write_text(json.dumps(CLASS_MAP))
    common = dict(label_field="ground_truth", batch_size=2, num_workers=0, device="cpu")
    return {
        "class_map": (
            dict(common, class_map=str(class_map)),
            ("cam_prediction", "cam", "cam_gt", "cam_gt_class", "cam_correct"),
        ),
        # a softmax model read as multi-label: its maps are as real, and
        # each sample gets the maps of its labelled and predicted classes
        "multilabel": (dict(common, multilabel=True, threshold=0.3), ("cam_prediction", "cam_gt_labels")),
    }


def _outputs(dataset, fields):
    """Per sample id, what it holds of the run's fields (None when absent)."""
    dataset.reload()
    names = [f for f in fields if dataset.has_sample_field(f)]
    rows = dataset.values(["id"] + names) if names else [dataset.values("id")]
    return {sid: dict(zip(names, values)) for sid, *values in zip(*rows)}


def _class_fields(dataset):
    return [f"cam_{c}" for c in CIFAR10_CLASSES if dataset.has_sample_field(f"cam_{c}")]


def _check_complete(dataset, fields):
    dataset.reload()
    run = cam_plugin.get_run(dataset, "cam")
    assert run["status"] == "completed" and run["counts"]["todo"] == 0
    assert dataset.count(fields[0]) == len(dataset)
    heatmaps = [f for f in fields if f in ("cam", "cam_gt")] + _class_fields(dataset)
    paths = set()
    for name in heatmaps:
        for path in dataset.exists(name).values(f"{name}.map_path"):
            with Image.open(path) as img:
                img.load()
            paths.add(path)
    on_disk = {str(p) for p in Path(run["files_dir"]).rglob("*") if p.is_file() and p.suffix != ".json"}
    assert on_disk == paths  # no orphans, no temporaries
    return paths


@pytest.mark.parametrize("kind", ["class_map", "multilabel"])
def test_a_kill_after_database_writes_resumes_exactly(kind, dataset_name, cifar_dir, resnet20, tmp_path):
    kwargs, fields = _kinds(tmp_path)[kind]
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    finished_at = None
    partial = []
    # every other k: the writes of a run alternate between samples and its
    # record, and both kinds of write are hit
    for k in range(1, 60, 2):
        name = f"{dataset_name}_{k}"
        if fo.dataset_exists(name):
            fo.delete_dataset(name)
        dataset = cifar_dataset(name, cifar_dir, per_class=1)
        proc = run_killed_after_writes(script, [name, resnet20, json.dumps(kwargs)], k)
        if proc.returncode == 0:
            finished_at = k
            fo.delete_dataset(name)
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]

        # a sample holds all of its outputs or none of them
        outputs = _outputs(dataset, list(fields) + _class_fields(dataset))
        done = {sid for sid, o in outputs.items() if o.get(fields[0]) is not None}
        for sid, o in outputs.items():
            if sid in done:
                assert all(o.get(f) is not None for f in fields[1:] if f != "cam_correct"), (k, o)
            else:
                assert all(v is None for v in o.values()), (k, o)
        partial.append(len(done))
        stored = {
            p for f in ("cam",) + tuple(_class_fields(dataset)) if dataset.has_sample_field(f)
            for p in dataset.select(list(done)).exists(f).values(f"{f}.map_path")
        }
        mtimes = {p: os.path.getmtime(p) for p in stored}

        summary = cam_plugin.compute_cams(dataset, resnet20, **kwargs)
        if cam_plugin.get_run(dataset, "cam") and done:
            assert summary.resumed and summary.skipped == len(done)
        assert summary.processed == len(dataset) - len(done)
        _check_complete(dataset, fields)
        # work done before the kill is kept, not recomputed
        assert all(os.path.getmtime(p) == t for p, t in mtimes.items())
        fo.delete_dataset(name)

    assert finished_at is not None and finished_at > 6
    assert any(0 < n < 10 for n in partial), partial


@pytest.mark.parametrize("kind", ["class_map", "multilabel"])
def test_a_clone_computes_its_own_and_never_touches_the_originals(kind, dataset_name, cifar_dir, resnet20, tmp_path):
    kwargs, fields = _kinds(tmp_path)[kind]
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=2)
    cam_plugin.compute_cams(dataset, resnet20, **kwargs)
    original = _check_complete(dataset, fields)
    mtimes = {p: os.path.getmtime(p) for p in original}
    verdicts = dataset.values(fields[-1]) if kind == "class_map" else None

    clone = dataset.clone(f"{dataset_name}_clone")
    try:
        # new samples in the clone: its run continues over them alone
        clone.add_samples([fo.Sample(filepath=s.filepath, ground_truth=s.ground_truth) for s in dataset.limit(3)])
        summary = cam_plugin.compute_cams(clone, resnet20, **kwargs)
        assert summary.processed == 3 and summary.skipped == len(dataset)
        cam_plugin.compute_cams(clone, resnet20, overwrite=True, **kwargs)
        cam_plugin.delete_run(clone, "cam")
        # every field the run made (a multi-label run's per class too) is gone
        assert not [f for f in clone.get_field_schema() if f.startswith("cam")]
    finally:
        fo.delete_dataset(clone.name)

    # the original's files and verdicts are as they were
    assert _check_complete(dataset, fields) == original
    assert all(os.path.getmtime(p) == t for p, t in mtimes.items())
    if verdicts is not None:
        assert dataset.values(fields[-1]) == verdicts


def test_a_delegated_run_with_a_class_map_file(dataset_name, cifar_dir, resnet20, tmp_path):
    """The class map travels with the queued operation as the run records
    it: the worker judges as an in-process run does, even after the file
    is gone."""
    from fiftyone.operators.executor import ExecutionRunState

    kwargs, fields = _kinds(tmp_path)["class_map"]
    kwargs = dict(kwargs, num_workers=None)
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=2)
    cam_plugin.compute_cams(dataset, resnet20, heatmap_field="here", pred_field="here_prediction", **kwargs)

    summary = cam_plugin.compute_cams(dataset, resnet20, num_shards=2, delegate=True, **kwargs)
    assert len(summary.queued) == 2
    # the file is read when queued: deleting it does not change the run
    os.remove(kwargs["class_map"])
    states, logs = run_delegated(dataset, tmp_path / "worker.log")
    assert states == [ExecutionRunState.COMPLETED] * 2, logs
    _check_complete(dataset, fields)
    assert dataset.values("cam_correct") == dataset.values("here_correct")
    assert dataset.values("cam_gt_class.label") == dataset.values("here_gt_class.label")
    assert dataset.values("cam_gt.target") == dataset.values("here_gt.target")
    # the set rule changed verdicts: a prediction of the next class is right
    changed = [
        p != g and c for p, g, c in zip(
            dataset.values("cam_prediction.label"), dataset.values("ground_truth.label"), dataset.values("cam_correct")
        )
    ]
    assert any(changed)
