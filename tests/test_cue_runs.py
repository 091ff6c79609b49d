"""The cue run as users break it and as the App runs it: killed (-9) after
its k-th database write and resumed, sharded to real delegated workers (the
CAM run's model loaded again by name there), its form resolved and its
operator executed by FiftyOne's machinery, on real CIFAR-10 images and the
real ResNet-20."""

import signal
import textwrap

import fiftyone as fo
import fiftyone.operators as foo
import pytest

import cam_plugin
from builders import cifar_dataset, form_errors, resolve_form, run_delegated, run_killed_after_writes

PLUGIN = "@cam-plugin/cam"

_SCRIPT = textwrap.dedent(
    """
    import sys
    import fiftyone as fo
    import cam_plugin

    dataset = fo.load_dataset(sys.argv[1])
    cam_plugin.discover_cues(dataset, region_field="objects", batch_size=2, num_workers=0, progress=False)
    """
)


@pytest.fixture(scope="module")
def resnet20(resnet20_path):
    return f"cifar10_resnet20:{resnet20_path}"


def _with_cams(name, cifar_dir, resnet20, per_class=2):
    dataset = cifar_dataset(name, cifar_dir, per_class=per_class)
    for sample in dataset:
        sample["objects"] = fo.Detections(
            detections=[fo.Detection(label=sample.ground_truth.label, bounding_box=[0.3, 0.3, 0.4, 0.4])]
        )
        sample.save()
    cam_plugin.compute_cams(dataset, resnet20, label_field="ground_truth", num_workers=0, progress=False)
    return dataset


def _hotspots(dataset):
    dataset.reload()
    if not dataset.has_sample_field("cam_hotspots"):
        return {}
    rows = dataset.exists("cam_hotspots").values(
        ["id", "cam_hotspots.detections.bounding_box", "cam_hotspots.detections.embedding"]
    )
    return {sid: (boxes, embeddings) for sid, boxes, embeddings in zip(*rows)}


def _same(a, b):
    """The same hotspots: boxes exactly, embeddings to float noise (a batch
    of another size sums in another order)."""
    import numpy as np

    if a.keys() != b.keys():
        return False
    for sid in a:
        (boxes_a, emb_a), (boxes_b, emb_b) = a[sid], b[sid]
        if boxes_a != boxes_b or not np.allclose(np.array(emb_a or []), np.array(emb_b or []), atol=1e-5):
            return False
    return True


def test_a_kill_after_database_writes_resumes_exactly(dataset_name, cifar_dir, resnet20, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    base = _with_cams(dataset_name, cifar_dir, resnet20, per_class=1)
    reference = base.clone(f"{dataset_name}_ref")
    cam_plugin.discover_cues(reference, region_field="objects", batch_size=2, num_workers=0, progress=False)
    expected = _hotspots(reference)
    assert sum(len(b) for b, _ in expected.values()) > 0
    finished_at, partial = None, []
    for k in range(1, 40, 3):
        dataset = base.clone(f"{dataset_name}_{k}")
        proc = run_killed_after_writes(script, [dataset.name], k)
        if proc.returncode == 0:
            finished_at = k
            fo.delete_dataset(dataset.name)
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
        done = _hotspots(dataset)
        # what was written before the kill is what a full run writes
        assert _same(done, {sid: expected[sid] for sid in done})
        summary = cam_plugin.discover_cues(dataset, region_field="objects", batch_size=2, num_workers=0, progress=False)
        assert summary.processed == len(dataset) - len(done) and summary.status == "completed"
        assert _same(_hotspots(dataset), expected)
        # the run that completed grouped every hotspot
        groups = cam_plugin.cue_groups(dataset)
        assert sum(g.size for g in groups) == sum(len(b) for b, _ in expected.values())
        partial.append(len(done))
        fo.delete_dataset(dataset.name)
    assert finished_at is not None and finished_at > 4
    assert any(0 < n < len(base) for n in partial), partial


def test_sharded_delegated_runs_equal_the_in_process_one(dataset_name, cifar_dir, resnet20, tmp_path):
    from fiftyone.operators.executor import ExecutionRunState

    dataset = _with_cams(dataset_name, cifar_dir, resnet20)
    here = dataset.clone(f"{dataset_name}_here")
    cam_plugin.discover_cues(here, region_field="objects", num_workers=0, progress=False)

    queued = cam_plugin.discover_cues(dataset, region_field="objects", num_shards=2, delegate=True)
    assert len(queued.queued) == 2
    states, logs = run_delegated(dataset, tmp_path / "worker.log")
    assert states == [ExecutionRunState.COMPLETED] * 2, logs
    assert _same(_hotspots(dataset), _hotspots(here))
    # the worker that finished last grouped them, as the in-process run did
    groups, here_groups = cam_plugin.cue_groups(dataset), cam_plugin.cue_groups(here)
    assert [(g.name, g.size, g.samples) for g in groups] == [(g.name, g.size, g.samples) for g in here_groups]
    assert dataset.values("cam_hotspots.detections.group") == here.values("cam_hotspots.detections.group")
    assert "cam_cues_viz" in dataset.list_brain_runs()
    fo.delete_dataset(here.name)


def test_the_form_and_operator_through_fiftyone(dataset_name, cifar_dir, resnet20):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    form = resolve_form(f"{PLUGIN}/discover_cues", dataset)
    assert "no_heatmaps" in form_errors(form)

    # a run with an in-memory model: the form says how to run it instead
    cam_plugin.compute_cams(dataset, cam_plugin.load_classifier(resnet20), label_field="ground_truth",
                            heatmap_field="mem", pred_field="mem_prediction", progress=False)
    form = resolve_form(f"{PLUGIN}/discover_cues", dataset, heatmap_field="mem")
    assert "model_in_memory" in form_errors(form)
    assert "model=your_model" in form["model_in_memory"]["view"]["description"]
    with pytest.raises(ValueError, match="in-memory model"):
        cam_plugin.discover_cues(dataset, heatmap_field="mem")

    dataset = _with_cams(f"{dataset_name}_2", cifar_dir, resnet20, per_class=1)
    cam_plugin.compute_attention(dataset, "cam", "objects")
    form = resolve_form(f"{PLUGIN}/discover_cues", dataset, heatmap_field="cam")
    assert form_errors(form) == {}
    assert form["region_field"]["default"] == "objects"  # the measured regions
    # a brain key another tool uses is refused in the form
    import fiftyone.brain as fob

    fob.compute_visualization(dataset, embeddings=[[float(i), 1.0] for i in range(len(dataset))],
                              brain_key="theirs", method="pca")
    form = resolve_form(f"{PLUGIN}/discover_cues", dataset, heatmap_field="cam", brain_key="theirs")
    assert "taken" in form_errors(form)["brain_key"]
    dataset.add_sample_field("cam_hotspots", fo.StringField)
    form = resolve_form(f"{PLUGIN}/discover_cues", dataset, heatmap_field="cam")
    assert "taken" in form_errors(form)
    dataset.delete_sample_field("cam_hotspots")

    result = foo.execute_operator(
        f"{PLUGIN}/discover_cues", ctx=dict(view=dataset.view()),
        params=dict(heatmap_field="cam", region_field="objects", num_groups=2),
    )
    assert result.error is None, result.error
    dataset.reload()
    assert dataset.count("cam_hotspots") == len(dataset)
    groups = cam_plugin.cue_groups(dataset)
    assert len(groups) == 2 and all(dataset.has_saved_view(g.view) for g in groups)
    assert "theirs" in dataset.list_brain_runs()  # not touched
    cam_plugin.delete_run(dataset, "cam_cues")
    assert dataset.list_brain_runs() == ["theirs"] and not dataset.list_saved_views()
    fo.delete_dataset(dataset.name)


def test_a_clone_regroups_without_touching_the_originals_files(dataset_name, cifar_dir, resnet20):
    """A clone shares the run's thumbnails directory with the dataset it was
    cloned from: grouping the clone again must not delete or rewrite them."""
    import os

    dataset = _with_cams(dataset_name, cifar_dir, resnet20)
    cam_plugin.discover_cues(dataset, region_field="objects", num_groups=2, num_workers=0, progress=False)
    files = [p for g in cam_plugin.cue_groups(dataset) for p in g.thumbnails + [g.strip] if p]
    assert files
    stamps = {p: os.stat(p).st_mtime_ns for p in files}
    clone = dataset.clone(f"{dataset_name}_clone")
    groups = cam_plugin.group_cues(clone, num_groups=3)
    assert len(groups) == 3 and sum(g.size for g in groups) == clone.count("cam_hotspots.detections")
    assert {p: os.stat(p).st_mtime_ns for p in files} == stamps
    assert len(cam_plugin.cue_groups(dataset)) == 2  # the original's own grouping stays
    assert all(dataset.has_saved_view(g.view) for g in cam_plugin.cue_groups(dataset))
    fo.delete_dataset(clone.name)


def test_one_process_at_a_time_groups_a_run(dataset_name, cifar_dir, resnet20):
    """Two shards that end at once both see every sample done; only one
    groups (the other skips); a grouping left by a dead process goes stale."""
    from datetime import datetime, timedelta

    from cam_plugin.runs import records

    dataset = _with_cams(dataset_name, cifar_dir, resnet20, per_class=1)
    cam_plugin.discover_cues(dataset, region_field="objects", num_groups=2, num_workers=0, progress=False)
    record = records.RunRecord.of(dataset, "cam_cues")
    record.update(grouping={"token": "other", "at": datetime.utcnow()})
    with pytest.raises(ValueError, match="Another process is grouping"):
        cam_plugin.group_cues(dataset, num_groups=3)
    # a shard's finish skips instead of failing the operation
    summary = cam_plugin.discover_cues(dataset, region_field="objects", num_groups=2, retry_failed=True,
                                       num_workers=0, progress=False)
    assert summary.status == "completed"
    assert len(cam_plugin.cue_groups(dataset)) == 2
    record.update(grouping={"token": "dead", "at": datetime.utcnow() - timedelta(hours=1)})
    assert len(cam_plugin.group_cues(dataset, num_groups=3)) == 3
    assert records.get_run(dataset, "cam_cues", derive=False)["grouping"] is None
