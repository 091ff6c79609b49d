"""Runs as users break them: kills at every database write, clones, shared
folders, odd names and paths, retries, deletion mid-run. Each test is one
defect that the old run loop had (issue 11), on a real database, real
images and the real CIFAR-10 ResNet-20."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fiftyone as fo
import pytest
from PIL import Image

import cam_plugin
from builders import cifar_dataset, run_killed_after_writes


@pytest.fixture(scope="module")
def resnet20(resnet20_path):
    return f"cifar10_resnet20:{resnet20_path}"


def _files(files_dir):
    return sorted(p for p in Path(files_dir).rglob("*") if p.is_file() and p.suffix != ".json")


def _assert_complete(dataset, key="cam", fields=("cam_prediction", "cam", "cam_gt")):
    """Every sample has all of the run's outputs, every file is readable,
    and the run's directory holds exactly the files the samples point to."""
    dataset.reload()
    for name in fields:
        assert dataset.count(name) == len(dataset), name
    run = cam_plugin.get_run(dataset, key)
    paths = set()
    for name in fields[1:]:
        for path in dataset.values(f"{name}.map_path"):
            with Image.open(path) as img:
                img.load()
            paths.add(path)
    assert {str(p) for p in _files(run["files_dir"])} == paths  # no orphans, no temporaries
    assert run["status"] == "completed"
    assert run["counts"]["processed"] == len(dataset) and run["counts"]["todo"] == 0


_RUN_SCRIPT = textwrap.dedent(
    """
    import sys
    import fiftyone as fo
    import cam_plugin

    dataset = fo.load_dataset(sys.argv[1])
    cam_plugin.compute_cams(
        dataset, sys.argv[2], label_field="ground_truth", batch_size=2, num_workers=0, device="cpu"
    )
    """
)


def test_a_kill_after_any_database_write_resumes_exactly(dataset_name, cifar_dir, resnet20, tmp_path):
    """Defects 1 and 2: kill the computing process right after its k-th
    database write, for every k until a run finishes first, then resume."""
    script = tmp_path / "run.py"
    script.write_text(_RUN_SCRIPT)
    finished_at = None
    stored_before_resume = []
    for k in range(1, 60):
        name = f"{dataset_name}_{k}"
        if fo.dataset_exists(name):
            fo.delete_dataset(name)
        dataset = cifar_dataset(name, cifar_dir, per_class=1)
        proc = run_killed_after_writes(script, [name, resnet20], k)
        if proc.returncode == 0:
            finished_at = k
            fo.delete_dataset(name)
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]

        dataset.reload()
        # a sample is either wholly there or not at all
        has = {
            f: set(dataset.exists(f).values("id")) if dataset.has_sample_field(f) else set()
            for f in ("cam_prediction", "cam", "cam_gt")
        }
        assert has["cam_prediction"] == has["cam"] == has["cam_gt"], k
        stored_before_resume.append(len(has["cam"]))
        stored = dataset.select(list(has["cam"])).values("cam.map_path") if has["cam"] else []
        mtimes = {p: os.path.getmtime(p) for p in stored}

        if cam_plugin.list_runs(dataset):
            summary = cam_plugin.compute_cams(
                dataset, resnet20, label_field="ground_truth", batch_size=2, num_workers=0, device="cpu"
            )
            assert summary.resumed and summary.skipped == len(has["cam"])
            assert summary.processed == len(dataset) - len(has["cam"])
        else:  # killed before the run was registered: nothing to resume
            assert not any(dataset.has_sample_field(f) for f in ("cam", "cam_prediction"))
            cam_plugin.compute_cams(
                dataset, resnet20, label_field="ground_truth", batch_size=2, num_workers=0, device="cpu"
            )
        _assert_complete(dataset)
        # work done before the kill is kept, not recomputed
        assert all(os.path.getmtime(p) == t for p, t in mtimes.items())
        fo.delete_dataset(name)

    assert finished_at is not None and finished_at > 8
    # kills landed while samples were being stored, not only before or after
    assert any(0 < n < 10 for n in stored_before_resume), stored_before_resume


def test_clone_never_deletes_the_originals_files(dataset_name, cifar_dir, resnet20):
    """Defect 3."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=2)
    cam_plugin.compute_cams(dataset, resnet20, label_field="ground_truth")
    paths = dataset.values("cam.map_path") + dataset.values("cam_gt.map_path")

    clone = dataset.clone(f"{dataset_name}_clone")
    try:
        assert cam_plugin.get_run(clone, "cam")["files_dir"] == cam_plugin.get_run(dataset, "cam")["files_dir"]
        cam_plugin.delete_run(clone, "cam")
        assert not clone.has_sample_field("cam")
        assert all(os.path.isfile(p) for p in paths)  # the original's files stay
        assert dataset.count("cam") == len(dataset)

        # the other way round: the clone still uses the files, so they stay
        clone2 = dataset.clone(f"{dataset_name}_clone2")
        cam_plugin.delete_run(dataset, "cam")
        assert all(os.path.isfile(p) for p in paths)
        assert clone2.values("cam.map_path") == paths[: len(dataset)]
        # ... and now belong to the clone, which deletes them with its run
        cam_plugin.delete_run(clone2, "cam")
        assert not any(os.path.exists(p) for p in paths)
    finally:
        for name in (f"{dataset_name}_clone", f"{dataset_name}_clone2"):
            if fo.dataset_exists(name):
                fo.delete_dataset(name)


def test_a_clone_continues_a_run_in_files_of_its_own(dataset_name, cifar_dir, resnet20):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=2)
    cam_plugin.compute_cams(dataset, resnet20)
    original_dir = cam_plugin.get_run(dataset, "cam")["files_dir"]
    before = _files(original_dir)
    clone = dataset.clone(f"{dataset_name}_clone")
    try:
        clone.add_samples([fo.Sample(filepath=p) for p in dataset.take(3, seed=1).values("filepath")])
        summary = cam_plugin.compute_cams(clone, resnet20)
        assert summary.processed == 3
        new_dir = cam_plugin.get_run(clone, "cam")["files_dir"]
        assert new_dir != original_dir and len(_files(new_dir)) == 3
        assert _files(original_dir) == before

        # the original's run goes; the files the clone still shows stay ...
        cam_plugin.delete_run(dataset, "cam")
        assert _files(original_dir) == before
        assert all(os.path.isfile(p) for p in clone.values("cam.map_path"))
        # ... until the clone's run goes too
        cam_plugin.delete_run(clone, "cam")
        assert not Path(original_dir).exists() and not Path(new_dir).exists()
    finally:
        fo.delete_dataset(f"{dataset_name}_clone")


def test_two_datasets_sharing_an_output_dir_keep_their_files_apart(dataset_name, cifar_dir, resnet20, tmp_path):
    """Defect 4, and a dataset deleted and re-created under the same name."""
    out = tmp_path / "shared_out"
    a = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    b = cifar_dataset(f"{dataset_name}_b", cifar_dir, per_class=1)
    try:
        cam_plugin.compute_cams(a, resnet20, output_dir=str(out))
        cam_plugin.compute_cams(b, resnet20, output_dir=str(out))
        a_dir, b_dir = (cam_plugin.get_run(d, "cam")["files_dir"] for d in (a, b))
        assert a_dir != b_dir
        b_files = _files(b_dir)
        cam_plugin.delete_run(a, "cam")
        assert _files(b_dir) == b_files and all(p.is_file() for p in b_files)
        assert b.count("cam") == len(b)

        # the same name, a new dataset: a new directory
        fo.delete_dataset(f"{dataset_name}_b")
        b2 = cifar_dataset(f"{dataset_name}_b", cifar_dir, per_class=1)
        cam_plugin.compute_cams(b2, resnet20, output_dir=str(out))
        assert cam_plugin.get_run(b2, "cam")["files_dir"] != b_dir
        assert all(p.is_file() for p in b_files)
    finally:
        if fo.dataset_exists(f"{dataset_name}_b"):
            fo.delete_dataset(f"{dataset_name}_b")


def test_user_fields_are_never_written_or_deleted(dataset_name, cifar_dir, resnet20):
    """Defect 5."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    labels = dataset.values("ground_truth.label")
    for overwrite in (False, True):
        with pytest.raises(cam_plugin.RunError, match="not made by this plugin"):
            cam_plugin.compute_cams(dataset, resnet20, pred_field="ground_truth", overwrite=overwrite)
    assert cam_plugin.list_runs(dataset) == []
    assert dataset.values("ground_truth.label") == labels
    assert not dataset.has_sample_field("cam")


def test_class_names_cannot_reach_outside_the_run_dir(dataset_name, cifar_dir, resnet20_path, tmp_path):
    """Defect 6: class names with '/', '..' and other odd characters."""
    names = ["../../escape", "a/b", "..", "c:\\d", "plane ✈", "bird", "cat", "deer", "dog", "frog"]
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    out = tmp_path / "out"
    targets = ["pred"] + [f"class:{n}" for n in names[:5]]
    cam_plugin.compute_cams(
        dataset, f"cifar10_resnet20:{resnet20_path}", classes=names, targets=targets, output_dir=str(out)
    )
    run = cam_plugin.get_run(dataset, "cam")
    files_dir = Path(run["files_dir"])
    written = [p for p in tmp_path.rglob("*.png")]
    assert len(written) == 6 * len(dataset)
    assert all(files_dir in p.parents for p in written)
    assert len({p.parent for p in written}) == 6  # one folder per target, none shared
    cam_plugin.delete_run(dataset, "cam")
    assert not list(tmp_path.rglob("*.png"))
    assert not files_dir.exists()


def test_colliding_target_names_are_refused(dataset_name, cifar_dir, resnet20):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    names = ["a/b", "a_b"] + [f"c{i}" for i in range(8)]
    with pytest.raises(cam_plugin.CamError, match="would both be stored"):
        cam_plugin.compute_cams(dataset, resnet20, classes=names, targets=["class:a/b", "class:a_b"])


def test_patches_views_are_refused_before_any_work(dataset_name, cifar_dir, resnet20):
    """Defect 8."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    box = fo.Detections(detections=[fo.Detection(label="object", bounding_box=[0.1, 0.1, 0.8, 0.8])])
    dataset.set_values("objects", [box.copy() for _ in range(len(dataset))])
    patches = dataset.to_patches("objects")
    with pytest.raises(cam_plugin.RunError, match="patches view"):
        cam_plugin.compute_cams(patches, resnet20)
    assert cam_plugin.list_runs(dataset) == [] and not dataset.has_sample_field("cam")


def test_failed_samples_are_retried_and_new_samples_picked_up(dataset_name, cifar_dir, resnet20, tmp_path):
    """Defect 9."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    image = Path(dataset.first().filepath)
    moved = tmp_path / image.name
    restored = tmp_path / "restored.jpg"
    dataset.add_sample(fo.Sample(filepath=str(moved)))  # not there yet

    first = cam_plugin.compute_cams(dataset, resnet20)
    assert (first.processed, first.failed, first.status) == (10, 1, "completed")
    assert "file not found" in dataset.exists("cam_error").first().cam_error

    moved.write_bytes(image.read_bytes())
    again = cam_plugin.compute_cams(dataset, resnet20)
    assert (again.processed, again.failed, again.skipped) == (0, 0, 11)  # failures kept by default
    retried = cam_plugin.compute_cams(dataset, resnet20, retry_failed=True)
    assert (retried.processed, retried.failed) == (1, 0)
    assert dataset.count("cam_error") == 0 and dataset.count("cam") == 11

    restored.write_bytes(image.read_bytes())
    dataset.add_sample(fo.Sample(filepath=str(restored)))
    grown = cam_plugin.compute_cams(dataset, resnet20)
    assert (grown.processed, grown.skipped, grown.status) == (1, 11, "completed")
    assert cam_plugin.get_run(dataset, "cam")["counts"]["processed"] == 12


_LAMBDA_SCRIPT = textwrap.dedent(
    """
    import sys
    import fiftyone as fo
    import torchvision.transforms as T
    import cam_plugin
    from cam_plugin.cifar_resnet import IMAGENET_MEAN, IMAGENET_STD

    transforms = T.Compose([
        T.Lambda(lambda img: img.resize((32, 32))),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    dataset = fo.load_dataset(sys.argv[1])
    summary = cam_plugin.compute_cams(dataset, sys.argv[2], transforms=transforms, batch_size=2, num_workers=0)
    print("RESULT", summary.resumed, summary.skipped, summary.processed)
    """
)


def test_lambda_transforms_resume_in_another_process(dataset_name, cifar_dir, resnet20, tmp_path):
    """Defect 10: the identity of a callable is its qualified name and
    source, the same in every process."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    script = tmp_path / "run.py"
    script.write_text(_LAMBDA_SCRIPT)
    env = dict(os.environ, CAM_PLUGIN_FLUSH_SECONDS="0")
    killed = run_killed_after_writes(script, [dataset_name, resnet20], 9)
    assert killed.returncode == -signal.SIGKILL
    dataset.reload()
    done = dataset.count("cam")
    assert 0 < done < len(dataset)

    resumed = subprocess.run(
        [sys.executable, str(script), dataset_name, resnet20], env=env, capture_output=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    line = [l for l in resumed.stdout.decode().splitlines() if l.startswith("RESULT")][0]
    assert line.split()[1:] == ["True", str(done), str(len(dataset) - done)]


def test_resuming_elsewhere_is_refused(dataset_name, cifar_dir, resnet20, tmp_path):
    """Defect 11."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    cam_plugin.compute_cams(dataset, resnet20, output_dir=str(tmp_path / "a"))
    dataset.add_sample(fo.Sample(filepath=dataset.first().filepath))
    with pytest.raises(cam_plugin.RunError, match="keeps its files under"):
        cam_plugin.compute_cams(dataset, resnet20, output_dir=str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()
    # without output_dir, or with the same one, it continues where it was
    summary = cam_plugin.compute_cams(dataset, resnet20)
    assert summary.processed == 1
    assert Path(dataset.last().cam.map_path).is_relative_to(tmp_path / "a")
    cam_plugin.delete_run(dataset, "cam")
    assert not list((tmp_path).rglob("*.png"))


@pytest.mark.parametrize("field", ["_id", "_rand", "id", "filepath", "metadata", "tags", "a.b", "9cam", ""])
def test_bad_field_names_are_refused_before_registering(dataset_name, cifar_dir, resnet20, field):
    """Defect 12: names that passed validation and failed after the run was
    registered."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    with pytest.raises(cam_plugin.RunError):
        cam_plugin.compute_cams(dataset, resnet20, heatmap_field=field, run_key="cam")
    assert cam_plugin.list_runs(dataset) == []
    cam_plugin.compute_cams(dataset, resnet20)  # nothing blocks a good run afterwards


def test_output_dir_that_is_a_file_is_refused_before_registering(dataset_name, cifar_dir, resnet20, tmp_path):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("x")
    with pytest.raises(OSError, match="not_a_dir"):
        cam_plugin.compute_cams(dataset, resnet20, output_dir=str(a_file))
    assert cam_plugin.list_runs(dataset) == []
    assert a_file.read_text() == "x"


_FULL_DISK_SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys
    import fiftyone as fo
    import cam_plugin

    dataset = fo.load_dataset(sys.argv[1])
    # files of more than 200 bytes cannot be written, as on a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.RLIM_INFINITY))
    try:
        cam_plugin.compute_cams(dataset, sys.argv[2], batch_size=4, num_workers=0)
    except cam_plugin.RunError as e:
        print("ERROR", e)
    """
)


def test_a_failing_disk_stops_the_run_with_the_path_and_an_honest_record(
    dataset_name, cifar_dir, resnet20, tmp_path
):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    script = tmp_path / "run.py"
    script.write_text(_FULL_DISK_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), dataset_name, resnet20], capture_output=True, timeout=300
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    message = [l for l in out.splitlines() if l.startswith("ERROR")][0]
    assert "Cannot write" in message and ".png" in message and "too large" in message.lower()
    run = cam_plugin.get_run(dataset, "cam")
    assert run["status"] == "running"
    assert run["counts"]["processed"] == dataset.count("cam_prediction") == 0
    # and once there is room again, the same call completes the run
    summary = cam_plugin.compute_cams(dataset, resnet20, batch_size=4, num_workers=0)
    assert summary.processed == len(dataset) and summary.status == "completed"


_SLOW_SCRIPT = textwrap.dedent(
    """
    import sys
    import fiftyone as fo
    import cam_plugin

    dataset = fo.load_dataset(sys.argv[1])
    try:
        cam_plugin.compute_cams(dataset, sys.argv[2], method="scorecam", batch_size=1, num_workers=0)
        print("FINISHED")
    except cam_plugin.RunError as e:
        print("ERROR", e)
    """
)


def test_deleting_a_run_while_it_runs(dataset_name, cifar_dir, resnet20, tmp_path):
    """Defect 12's last point: delete_run refuses while a live worker runs
    it; a record removed behind the plugin's back stops the worker with a
    clear message, and nothing more is written."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=4)
    script = tmp_path / "run.py"
    script.write_text(_SLOW_SCRIPT)
    env = dict(os.environ, CAM_PLUGIN_FLUSH_SECONDS="0")
    proc = subprocess.Popen(
        [sys.executable, str(script), dataset_name, resnet20], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 200
        while time.time() < deadline and not (dataset.has_sample_field("cam") and dataset.count("cam") >= 2):
            time.sleep(0.2)
            dataset.reload()
        assert dataset.count("cam") >= 2, "the run did not get going"

        with pytest.raises(cam_plugin.RunError, match="cannot be deleted while workers run it"):
            cam_plugin.delete_run(dataset, "cam")

        dataset.delete_run("cam")  # FiftyOne's own, which the plugin cannot refuse
        out, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "was deleted while it was running" in out.decode(), err.decode()[-2000:]
    assert "FINISHED" not in out.decode()


def test_grouped_datasets_process_the_current_slice_and_say_so(dataset_name, cifar_dir, resnet20):
    paths = [str(p) for p in sorted(Path(cifar_dir).glob("*/*.jpg"))[:6]]
    dataset = fo.Dataset(dataset_name)
    dataset.add_group_field("group", default="left")
    samples = []
    for left, right in zip(paths[0::2], paths[1::2]):
        group = fo.Group()
        samples += [
            fo.Sample(filepath=left, group=group.element("left")),
            fo.Sample(filepath=right, group=group.element("right")),
        ]
    dataset.add_samples(samples)

    summary = cam_plugin.compute_cams(dataset, resnet20)
    assert summary.group_slice == "left" and "slice 'left'" in str(summary)
    assert summary.processed == 3
    right = dataset.select_group_slices("right")
    assert right.count("cam") == 0 and dataset.select_group_slices("left").count("cam") == 3

    dataset.group_slice = "right"
    # the record counts the slice the run processed, whichever is active
    counts = cam_plugin.get_run(dataset, "cam")["counts"]
    assert (counts["samples"], counts["processed"]) == (3, 3)
    with pytest.raises(cam_plugin.RunError, match="group_slice"):
        cam_plugin.compute_cams(dataset, resnet20)
    cam_plugin.compute_cams(dataset, resnet20, heatmap_field="cam_right", pred_field="pred_right")
    assert dataset.select_group_slices("right").count("cam_right") == 3


_SAME_RUN_SCRIPT = textwrap.dedent(
    """
    import sys
    import fiftyone as fo
    import cam_plugin

    dataset = fo.load_dataset(sys.argv[1])
    summary = cam_plugin.compute_cams(dataset, sys.argv[2], batch_size=2, num_workers=0)
    print("RESULT", summary.processed, summary.busy_shards)
    """
)


def test_the_same_run_started_twice_at_once_computes_each_sample_once(
    dataset_name, cifar_dir, resnet20, tmp_path
):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=3)
    script = tmp_path / "run.py"
    script.write_text(_SAME_RUN_SCRIPT)
    procs = [
        subprocess.Popen([sys.executable, str(script), dataset_name, resnet20], stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    results = [l.split(" ", 2)[1:] for out in outs for l in out.splitlines() if l.startswith("RESULT")]
    processed = sorted(int(r[0]) for r in results)
    # one of them did the run (or both, one after the other, nothing twice)
    assert sum(processed) == len(dataset), results
    dataset.reload()
    assert cam_plugin.list_runs(dataset) == ["cam"]
    run = cam_plugin.get_run(dataset, "cam")
    assert run["counts"]["processed"] == len(dataset)
    root = Path(run["files_dir"]).parent
    assert [p.name for p in root.iterdir()] == [Path(run["files_dir"]).name]  # no second directory
    assert len(_files(run["files_dir"])) == len(dataset)


_WORKER_SCRIPT = textwrap.dedent(
    """
    import sys
    import fiftyone as fo
    import cam_plugin

    dataset = fo.load_dataset(sys.argv[1])
    try:
        summary = cam_plugin.compute_cams(dataset, sys.argv[2], batch_size=1, num_workers=0)
        print("RESULT", summary.processed, summary.busy_shards, flush=True)
    except cam_plugin.RunError as e:
        print("ERROR", e, flush=True)
    """
)


def _stopped(process):
    with open(f"/proc/{process.pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def _hung_then_taken_over(dataset, args, tmp_path, first_env=None, stop=None):
    """Starts a worker (``first_env`` added to its environment), waits until
    ``stop(first)`` has it stopped, lets its heartbeat go stale, runs a
    second worker to the end, then lets the first go on. Returns the frozen
    samples' ids, the second's stdout, the first's output and each
    sample's ``last_modified_at`` after the takeover."""
    script = tmp_path / "run.py"
    script.write_text(_WORKER_SCRIPT)
    env = dict(os.environ, CAM_PLUGIN_FLUSH_SECONDS="0", CAM_PLUGIN_STALE_AFTER_S="3")
    first = subprocess.Popen([sys.executable, str(script), *args], env=dict(env, **(first_env or {})),
                             stdout=subprocess.PIPE)
    try:
        stop(first)
        time.sleep(4)  # its heartbeat is now stale
        dataset.reload()
        frozen = set(dataset.exists("cam").values("id")) if dataset.has_sample_field("cam") else set()
        assert cam_plugin.get_run(dataset, "cam")["shards"]["0"]["state"] == "stale"
        second = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, timeout=300)
        assert second.returncode == 0, second.stderr.decode()[-2000:]
        dataset.reload()
        after_takeover = dict(zip(*dataset.values(["id", "last_modified_at"])))
        first.send_signal(signal.SIGCONT)
        out = first.communicate(timeout=120)[0].decode()
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    return frozen, second.stdout.decode(), out, after_takeover


def test_a_worker_stopped_between_its_check_and_its_write_overwrites_nothing(
    dataset_name, cifar_dir, resnet20, tmp_path, monkeypatch
):
    """The narrowest window: a worker has checked that it still holds its
    shard and hangs before the write that check allowed. Another takes the
    shard over and completes it; when the first comes back, its write must
    not land (found in CI: a SIGSTOP in that window let one write through)."""
    from cam_plugin.runs import records

    monkeypatch.setattr(records, "STALE_AFTER_S", 3.0)
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=3)

    def stopped_at_its_third_write(first):
        deadline = time.time() + 120
        while not _stopped(first):
            assert first.poll() is None and time.time() < deadline, "the worker never reached its third write"
            time.sleep(0.1)

    frozen, _, out, after_takeover = _hung_then_taken_over(
        dataset, [dataset_name, resnet20], tmp_path, dict(CAM_PLUGIN_STOP_AFTER_CHECKS="3"), stopped_at_its_third_write
    )
    assert len(frozen) == 2  # two writes landed; the third waited
    assert "was taken over by another worker" in out, out
    dataset.reload()
    assert dict(zip(*dataset.values(["id", "last_modified_at"]))) == after_takeover
    _assert_complete(dataset, fields=("cam_prediction", "cam"))


def test_a_hung_worker_is_taken_over_and_stops_writing(
    dataset_name, cifar_dir, resnet20, tmp_path, monkeypatch
):
    """A worker that stops answering (SIGSTOP: a hung process, a machine
    off the network) goes stale; another takes its shard over; when the
    first comes back it stops before writing again."""
    from cam_plugin.runs import records

    # this process judges staleness as the workers do
    monkeypatch.setattr(records, "STALE_AFTER_S", 3.0)
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=3)

    def stopped_after_three_samples(first):
        deadline = time.time() + 120
        while time.time() < deadline:
            dataset.reload()
            if dataset.has_sample_field("cam") and dataset.count("cam") >= 3:
                break
            time.sleep(0.1)
        first.send_signal(signal.SIGSTOP)

    frozen, second, out, after_takeover = _hung_then_taken_over(
        dataset, [dataset_name, resnet20], tmp_path, stop=stopped_after_three_samples
    )
    line = [l for l in second.splitlines() if l.startswith("RESULT")][0]
    assert int(line.split()[1]) == len(dataset) - len(frozen)
    assert "was taken over by another worker" in out, out
    dataset.reload()
    # the first worker wrote nothing after it came back
    assert dict(zip(*dataset.values(["id", "last_modified_at"]))) == after_takeover
    _assert_complete(dataset, fields=("cam_prediction", "cam"))
