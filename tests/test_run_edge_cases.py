"""Runs as users break them, second round: each test is a defect found by
trying (what the user did, what happened, what should happen), on the real
database, real CIFAR-10 images and the real ResNet-20."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import fiftyone as fo
import pytest

import cam_plugin
from cam_plugin.runs.base import shard_of
from builders import cifar_dataset, drain

FAST = dict(batch_size=2, num_workers=0, device="cpu")


@pytest.fixture(scope="module")
def resnet20(resnet20_path):
    return f"cifar10_resnet20:{resnet20_path}"


def _pngs(root):
    return sorted(str(p) for p in Path(root).rglob("*.png*"))


_RUN_SCRIPT = textwrap.dedent(
    """
    import sys
    import fiftyone as fo
    import cam_plugin

    dataset = fo.load_dataset(sys.argv[1])
    cam_plugin.compute_cams(dataset, sys.argv[2], batch_size=2, num_workers=0, device="cpu")
    print("FINISHED")
    """
)


def _killed_run(dataset_name, cifar_dir, resnet20, tmp_path, kill_after=9):
    """A run whose process was SIGKILLed (as kill -9) mid-run, after some
    samples were stored."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    script = tmp_path / "run.py"
    script.write_text(_RUN_SCRIPT)
    env = dict(os.environ, CAM_PLUGIN_FLUSH_SECONDS="0", CAM_PLUGIN_KILL_AFTER_WRITES=str(kill_after))
    proc = subprocess.run([sys.executable, str(script), dataset_name, resnet20], env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    dataset.reload()
    assert 0 < dataset.count("cam_prediction") < len(dataset)
    return dataset


# ---------------------------------------------------------------------------
# overwrite=True destroys before it validates


def test_overwrite_with_an_unusable_output_dir_keeps_the_existing_run(dataset_name, cifar_dir, resnet20, tmp_path):
    """The user has a finished run 'cam' and calls compute_cams again with
    overwrite=True and an output_dir that cannot be created (a typo: a path
    through a file). The call is refused with "Cannot create the run's file
    directory", but only after the existing run, its fields and its files
    were already deleted (base.py _open_record: records.delete_run runs
    before _prepare_files of the new run). README: an output_dir that cannot
    be created is "refused before any work"; the earlier results must still
    be there."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    cam_plugin.compute_cams(dataset, resnet20, **FAST)
    paths = dataset.values("cam.map_path")
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("x")

    with pytest.raises(OSError, match="not_a_dir"):
        cam_plugin.compute_cams(dataset, resnet20, overwrite=True, output_dir=str(a_file), **FAST)

    dataset.reload()
    assert cam_plugin.list_runs(dataset) == ["cam"]
    assert dataset.has_sample_field("cam") and dataset.count("cam") == len(dataset)
    assert all(os.path.isfile(p) for p in paths)


def test_attention_overwrite_cannot_destroy_the_cam_run_it_measures(dataset_name, cifar_dir, resnet20):
    """The user computes CAMs (key 'cam') and then attention metrics of
    field 'cam', giving run_key='cam' and overwrite=True (thinking it
    replaces an earlier attention run). The CAM run, its 'cam' field and
    all its PNGs are deleted, and the attention run reports 'completed'
    having measured nothing (0 processed). A run must not replace the run
    whose outputs it reads (its depends_on); it should be refused with
    nothing deleted."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    cam_plugin.compute_cams(dataset, resnet20, label_field="ground_truth", **FAST)
    paths = dataset.values("cam.map_path")

    try:
        cam_plugin.compute_attention(dataset, "cam", run_key="cam", overwrite=True)
    except (cam_plugin.RunError, ValueError):
        pass  # refusing is the right answer

    dataset.reload()
    assert dataset.has_sample_field("cam") and dataset.count("cam") == len(dataset)
    assert all(os.path.isfile(p) for p in paths)


# ---------------------------------------------------------------------------
# arguments that silently do nothing / views that break


@pytest.mark.parametrize("num_shards", [0, -1])
def test_a_nonpositive_shard_count_is_refused(dataset_name, cifar_dir, resnet20, num_shards):
    """compute_cams(..., num_shards=0) (or -1, say from a script's
    arithmetic) registers the run, computes nothing, and returns "0
    processed, 0 failed, 0 already done, running" with no error: the loop
    over range(num_shards) is empty (base.py iter_execute). It should be
    refused before anything is registered, like an out-of-range shard."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    for delegate in (False, True):
        with pytest.raises(cam_plugin.RunError, match="num_shards must be a positive"):
            cam_plugin.compute_cams(
                dataset, resnet20, num_shards=num_shards, delegate=delegate, **FAST
            )
    assert cam_plugin.list_runs(dataset) == []


def test_a_select_fields_view_can_be_processed(dataset_name, cifar_dir, resnet20):
    """The user works in a view that shows only some fields
    (dataset.select_fields("ground_truth"), a common way to lighten the App)
    and runs compute_cams on it. Every sample is computed, then the call
    crashes with "ValueError: DatasetView has no field 'cam_error'"
    (base.py _error_reasons / count_state query the run's own fields
    through the view, which hides them); the record stays 'running' and
    every later call on that view crashes the same way. The run's fields
    should be looked up on the dataset (or the view refused up front)."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    view = dataset.select_fields("ground_truth")
    summary = cam_plugin.compute_cams(view, resnet20, label_field="ground_truth", **FAST)
    assert summary.processed == len(dataset) and summary.status == "completed"
    again = cam_plugin.compute_cams(view, resnet20, label_field="ground_truth", **FAST)
    assert again.processed == 0 and again.skipped == len(dataset)


# ---------------------------------------------------------------------------
# two workers on one run: a sample computed twice


def test_a_shard_finished_by_another_worker_is_not_computed_again(dataset_name, cifar_dir, resnet20):
    """Two workers split a run with compute_cams(..., num_shards=2): worker
    A starts (takes shard 0), worker B starts while A is busy, finds shard 0
    held and computes shard 1. When A finishes shard 0 it claims shard 1
    (now 'done', so claimable) and computes every sample of it again,
    rewriting B's results: A's list of samples to do was read once before
    the first shard (base.py iter_execute: all_ids = todo.values("id")
    before the shard loop) and is never re-read after a claim. README: two
    workers "should never compute a sample twice". (The two workers are two
    generators in one process here, so the interleaving is exact.)"""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=2)
    ids = dataset.values("id")
    in_shard1 = [i for i in ids if shard_of(i, 2) == 1]
    assert 0 < len(in_shard1) < len(ids)

    worker_a = cam_plugin.iter_compute_cams(dataset, resnet20, num_shards=2, **FAST)
    next(worker_a)  # A holds shard 0 and has computed its first batch
    b = cam_plugin.compute_cams(dataset, resnet20, num_shards=2, **FAST)
    assert b.busy_shards == [0] and b.shards == [1] and b.processed == len(in_shard1)
    b_files = {p: os.path.getmtime(p) for p in dataset.select(in_shard1).values("cam.map_path")}

    a = drain(worker_a)
    assert a.processed == len(ids) - len(in_shard1)  # shard 0 only
    assert all(os.path.getmtime(p) == t for p, t in b_files.items())


# ---------------------------------------------------------------------------
# samples deleted while a run runs


def test_a_sample_deleted_during_an_earlier_shard_does_not_crash_the_run(dataset_name, cifar_dir, resnet20):
    """compute_cams(..., num_shards=2) runs both shards in this process;
    while it computes shard 0 the user deletes a sample (in the App, say)
    that belongs to shard 1. When shard 1 starts, the run crashes with
    KeyError: '<sample id>' (cams.py outputs: paths_by_id[i] for an id that
    no longer exists), shard 1 is marked failed and none of its samples is
    computed. A deleted sample should just be skipped."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=2)
    ids = dataset.values("id")
    in_shard1 = [i for i in ids if shard_of(i, 2) == 1]
    gen = cam_plugin.iter_compute_cams(dataset, resnet20, num_shards=2, **FAST)
    next(gen)
    dataset.delete_samples(in_shard1[:1])

    summary = drain(gen)
    assert summary.status == "completed"
    assert dataset.count("cam_prediction") == len(dataset) == len(ids) - 1


def test_a_sample_deleted_mid_run_leaves_no_orphan_file(dataset_name, cifar_dir, resnet20):
    """While a run computes, the user deletes a sample not yet done. The
    run still computes it, writes its PNG into the run's directory and
    counts it as processed (the update of its document matches nothing,
    store/writer.py flush does not look at the result), so the directory
    holds a file no sample points to and the summary says 20 processed on a
    dataset of 19. README: files "never orphaned"; the run's directory
    should hold exactly the files its samples point to."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=2)
    ids = dataset.values("id")
    gen = cam_plugin.iter_compute_cams(dataset, resnet20, **FAST)
    next(gen)
    dataset.delete_samples(ids[-1:])
    summary = drain(gen)

    files_dir = cam_plugin.get_run(dataset, "cam")["files_dir"]
    assert set(_pngs(files_dir)) == set(dataset.values("cam.map_path"))
    assert summary.processed == len(dataset)


# ---------------------------------------------------------------------------
# the record: counts, status, listing


def test_the_record_of_a_killed_run_has_its_counts(dataset_name, cifar_dir, resnet20, tmp_path):
    """A run is killed (kill -9) halfway. get_run(dataset, 'cam')['counts']
    is {} (counts are only stored when a call ends, base.py iter_execute
    finally), so get_run(...)['counts']['processed'] raises KeyError while
    half the samples are stored; during a live run it is {} too (or the
    previous call's numbers). README: counts are "counted from the data"."""
    dataset = _killed_run(dataset_name, cifar_dir, resnet20, tmp_path)
    run = cam_plugin.get_run(dataset, "cam")
    assert run["status"] == "running"
    assert run["shards"]["0"]["state"] == "stale"
    counts = run["counts"]
    assert counts.get("processed") == dataset.count("cam_prediction")
    assert counts.get("todo") == len(dataset) - dataset.count("cam_prediction")


def test_the_record_follows_samples_added_and_deleted(dataset_name, cifar_dir, resnet20):
    """After a completed run the user deletes 3 samples and adds 2. get_run
    still says status 'completed', samples 10, processed 10, todo 0: the
    record is a snapshot of the last call. README: status is "derived from
    the data" and counts are "counted from the data"; with 2 samples not
    done the run is not completed."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    cam_plugin.compute_cams(dataset, resnet20, **FAST)
    dataset.delete_samples(dataset.limit(3))
    dataset.add_samples([fo.Sample(filepath=p) for p in dataset.limit(2).values("filepath")])

    run = cam_plugin.get_run(dataset, "cam")
    assert run["counts"]["samples"] == len(dataset) == 9
    assert run["counts"]["processed"] == 7 and run["counts"]["todo"] == 2
    assert run["status"] == "running"


_OTHER_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys
    import fiftyone as fo
    import cam_plugin

    dataset = fo.load_dataset(sys.argv[1])
    cam_plugin.compute_cams(dataset, sys.argv[2], batch_size=2, num_workers=0, device="cpu")
    """
)


def test_list_runs_sees_a_run_made_by_another_process(dataset_name, cifar_dir, resnet20, tmp_path):
    """A user has the dataset open in a notebook; a run is computed by
    another process (a terminal, a delegated worker). In the notebook,
    cam_plugin.get_run(dataset, 'cam') returns the run, but
    cam_plugin.list_runs(dataset) returns [] (records.list_runs reads the
    dataset's in-memory document without reloading, unlike get_run)."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    script = tmp_path / "run.py"
    script.write_text(_OTHER_PROCESS_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), dataset_name, resnet20],
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert cam_plugin.list_runs(dataset) == ["cam"]
    assert cam_plugin.get_run(dataset, "cam")["status"] == "completed"


# ---------------------------------------------------------------------------
# FiftyOne's timezone setting


def test_get_run_works_while_a_run_is_live_with_a_timezone_configured(dataset_name, cifar_dir, resnet20):
    """A user who set FiftyOne's timezone (fo.config.timezone, or
    FIFTYONE_TIMEZONE=local/UTC, documented FiftyOne settings) looks at a
    live run: cam_plugin.get_run raises "TypeError: can't subtract
    offset-naive and offset-aware datetimes" (records.worker_alive compares
    datetime.utcnow() with the heartbeat, which FiftyOne's connection then
    returns timezone-aware)."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    gen = cam_plugin.iter_compute_cams(dataset, resnet20, **FAST)
    next(gen)
    old = fo.config.timezone
    fo.config.timezone = "UTC"
    try:
        run = cam_plugin.get_run(dataset, "cam")
        assert run["shards"]["0"]["state"] == "running"
    finally:
        fo.config.timezone = old
        gen.close()


def test_a_killed_run_resumes_with_a_timezone_configured(dataset_name, cifar_dir, resnet20, tmp_path):
    """Same setting, after a kill -9: calling compute_cams again to finish
    the run is refused with "Field 'cam_prediction' already exists and was
    not made by this plugin" (records.field_owners swallows the TypeError of
    get_run/worker_alive on the stale shard and so finds no owner; past
    that, RunRecord.claim would raise the TypeError itself), so the run can
    never be resumed while the timezone is set."""
    dataset = _killed_run(dataset_name, cifar_dir, resnet20, tmp_path)
    old = fo.config.timezone
    fo.config.timezone = "UTC"
    try:
        summary = cam_plugin.compute_cams(dataset, resnet20, **FAST)
    finally:
        fo.config.timezone = old
    assert summary.status == "completed"
    assert dataset.count("cam_prediction") == len(dataset)


# ---------------------------------------------------------------------------
# clones and paths


def test_a_clone_made_during_a_run_does_not_inherit_its_live_worker(dataset_name, cifar_dir, resnet20):
    """The user clones a dataset while a run on it is computing (to
    experiment on a copy). The clone's copy of the record lists the
    original's worker as holding shard 0, so on the clone get_run says
    shard 0 'running' and status 'running' after the original finished, and
    cam_plugin.delete_run(clone, 'cam') is refused "while workers run it"
    (no worker runs the clone's run: its samples are never written by it).
    A clone's record should not claim another dataset's live worker."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    gen = cam_plugin.iter_compute_cams(dataset, resnet20, **FAST)
    next(gen)
    clone = dataset.clone(f"{dataset_name}_clone")
    try:
        drain(gen)
        run = cam_plugin.get_run(clone, "cam")
        assert run["shards"].get("0", {}).get("state") != "running"
        cam_plugin.delete_run(clone, "cam")
        assert not clone.has_sample_field("cam")
        assert dataset.count("cam") == len(dataset)
    finally:
        fo.delete_dataset(f"{dataset_name}_clone")


def test_continuing_through_a_symlinked_output_dir_is_not_elsewhere(dataset_name, cifar_dir, resnet20, tmp_path):
    """The user ran with output_dir=/data/link (a symlink to /data/real)
    and continues with output_dir=/data/real, the same directory. The call
    is refused: "keeps its files under .../link ... (got .../real)"
    (base.py _continue compares os.path.abspath, not the real paths). The
    same directory is not "another output_dir"."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    os.symlink(real, link)
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    cam_plugin.compute_cams(dataset, resnet20, output_dir=str(link), **FAST)
    dataset.add_samples([fo.Sample(filepath=dataset.first().filepath)])
    summary = cam_plugin.compute_cams(dataset, resnet20, output_dir=str(real), **FAST)
    assert summary.processed == 1


def test_a_killed_worker_not_yet_reaped_counts_as_dead():
    """kill -9 leaves a zombie until its parent waits for it; a shard whose
    worker is a zombie is stale at once, not after the heartbeat timeout."""
    import time
    from datetime import datetime

    from cam_plugin.runs import records

    proc = subprocess.Popen(["sleep", "60"])
    worker = {"host": os.uname().nodename, "pid": proc.pid, "started": records._start_time(proc.pid)}
    shard = {"status": "running", "worker": worker, "heartbeat": datetime.utcnow()}
    try:
        assert records.shard_state(shard) == "running"
        proc.send_signal(signal.SIGKILL)
        time.sleep(0.5)
        assert records.shard_state(shard) == "stale"
    finally:
        proc.kill()
        proc.wait()
