"""Scale-out with the real machinery (issue 11): a sharded run queued as
delegated operations, computed by two ``fiftyone delegated launch -m``
workers, one operation process killed with SIGKILL mid-shard, the operation
failed and rerun with FiftyOne's own CLI, and the rerun taking over the
stale shard. Every sample ends up computed exactly once."""

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from bson import ObjectId
from fiftyone.operators.executor import ExecutionRunState
from PIL import Image

import cam_plugin
from cam_plugin.runs.base import shard_of
from cam_plugin.store.files import MARKER, TMP_MARK
from builders import cifar_dataset

FIFTYONE = os.path.join(os.path.dirname(sys.executable), "fiftyone")
NUM_SHARDS = 4
# per-batch arguments that make a shard take seconds on a small CPU
SLOW = dict(batch_size=4, num_workers=0, device="cpu")
TERMINAL = (ExecutionRunState.COMPLETED, ExecutionRunState.FAILED)
# the killed shard must have this many samples written before the kill...
MIN_WRITTEN = 8


def _repo():
    from fiftyone.factory.repo_factory import RepositoryFactory

    return RepositoryFactory.delegated_operation_repo()


def _cli(*args):
    """``fiftyone delegated <args>`` as a user runs it; its stdout."""
    done = subprocess.run(
        [FIFTYONE, "delegated", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def _start_workers(count, logs_dir):
    env = dict(os.environ, CAM_PLUGIN_FLUSH_SECONDS="0.2")
    workers = []
    for i in range(count):
        log = open(logs_dir / f"worker{i}.log", "w")
        workers.append(
            subprocess.Popen(
                [FIFTYONE, "delegated", "launch", "-m"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
        log.close()
    return workers


def _stop_workers(workers):
    """Kills the workers and every process they started (operation
    processes make themselves session leaders, so they outlive their
    launcher unless killed too)."""
    procs = []
    for w in workers:
        try:
            procs += psutil.Process(w.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for w in workers:
        if w.poll() is None:
            w.terminate()
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    for w in workers:
        try:
            w.wait(timeout=30)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait(timeout=30)


def _logs(logs_dir):
    return "\n".join(
        f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(logs_dir.glob("*.log"))
    )


def _file_times(dataset, ids):
    """mtime (ns) of every heatmap file of the given samples."""
    view = dataset.select(ids)
    times = {}
    for field in ("cam", "cam_gt"):
        for path in view.values(f"{field}.map_path"):
            times[path] = os.stat(path).st_mtime_ns
    return times


def _find_victim(dataset, workers, sizes, deadline, logs_dir):
    """Polls until an operation process is mid-shard: its shard has
    ``MIN_WRITTEN`` to three quarters of its samples written (on a busy
    machine the polls are slow and a half-way window was missed; a quarter
    of the shard still outlasts the kill). Returns ``(shard,
    psutil.Process, shard entry)``."""
    launchers = {w.pid for w in workers}
    while True:
        assert time.monotonic() < deadline, "no shard was caught mid-way\n" + _logs(logs_dir)
        dead = [w.pid for w in workers if w.poll() is not None]
        assert not dead, f"workers {dead} exited\n" + _logs(logs_dir)
        ops = _repo().list_operations(dataset_name=dataset.name)
        ended = [(str(o.id), o.run_state) for o in ops if o.run_state in TERMINAL]
        assert len(ended) < len(ops), f"every shard ended before one was caught: {ended}\n" + _logs(logs_dir)
        assert all(state == ExecutionRunState.COMPLETED for _, state in ended), _logs(logs_dir)

        if "cam" in cam_plugin.list_runs(dataset):
            shards = cam_plugin.get_run(dataset, "cam").get("shards") or {}
            written = Counter(
                shard_of(i, NUM_SHARDS) for i in dataset.exists("cam_prediction").values("id")
            )
            for key, entry in sorted(shards.items()):
                s = int(key)
                if entry["state"] != "running":
                    continue
                if not MIN_WRITTEN <= written[s] <= sizes[s] * 3 // 4:
                    continue
                worker = entry["worker"]
                try:
                    proc = psutil.Process(worker["pid"])
                    parent, started = proc.ppid(), proc.create_time()
                except psutil.NoSuchProcess:
                    continue
                # the shard's holder is an operation process of one of our
                # launchers, the very process the record names
                assert parent in launchers, (worker, parent, launchers)
                assert abs(started - worker["started"]) < 1e-3
                return s, proc, entry
        time.sleep(0.05)


def _wait_terminal(dataset_name, count, deadline, logs_dir):
    repo = _repo()
    while True:
        ops = repo.list_operations(dataset_name=dataset_name)
        if len(ops) >= count and all(o.run_state in TERMINAL for o in ops):
            return ops
        assert time.monotonic() < deadline, (
            f"operations did not finish: {[(str(o.id), o.run_state) for o in ops]}\n" + _logs(logs_dir)
        )
        time.sleep(0.25)


def test_sharded_run_survives_a_killed_worker(dataset_name, cifar_dir, resnet20_path, tmp_path):
    deadline = time.monotonic() + 400
    spec = f"cifar10_resnet20:{resnet20_path}"
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=40)
    n = len(dataset)
    ids = dataset.values("id")
    sizes = Counter(shard_of(i, NUM_SHARDS) for i in ids)
    assert sorted(sizes) == list(range(NUM_SHARDS))

    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    repo = _repo()
    workers = _start_workers(2, logs_dir)
    try:
        summary = cam_plugin.compute_cams(
            dataset, spec, label_field="ground_truth", delegate=True, num_shards=NUM_SHARDS, **SLOW
        )
        assert len(summary.queued) == NUM_SHARDS, summary
        assert sorted(summary.shards) == list(range(NUM_SHARDS))
        op_of_shard = dict(zip(summary.shards, summary.queued))
        assert {str(o.id) for o in repo.list_operations(dataset_name=dataset_name)} == set(summary.queued)

        # kill -9 one operation process mid-shard
        shard, victim, entry = _find_victim(dataset, workers, sizes, deadline, logs_dir)
        victim.kill()
        victim.wait(timeout=30)
        killed = dict(entry["worker"])

        # what the dead process left: its samples are final, and so are those
        # the other workers have written so far
        dataset.reload()
        written_ids = dataset.exists("cam_prediction").values("id")
        killed_written = [i for i in written_ids if shard_of(i, NUM_SHARDS) == shard]
        assert MIN_WRITTEN <= len(killed_written) < sizes[shard], (len(killed_written), sizes[shard])
        times_at_kill = _file_times(dataset, written_ids)
        killed_times = _file_times(dataset, killed_written)
        assert len(killed_times) == 2 * len(killed_written)

        # the plugin sees the dead holder at once (same host, pid gone) ...
        record = cam_plugin.get_run(dataset, "cam")["shards"][str(shard)]
        assert (record["status"], record["state"]) == ("running", "stale"), record
        # ... while FiftyOne leaves the operation running
        op_id = op_of_shard[shard]
        assert repo.get(_id=ObjectId(op_id)).run_state == ExecutionRunState.RUNNING

        out = _cli("fail", op_id)
        assert "as failed" in out, out
        assert repo.get(_id=ObjectId(op_id)).run_state == ExecutionRunState.FAILED
        out = _cli("rerun", op_id)
        match = re.search(r"ID '([0-9a-f]{24})'", out)
        assert match, out
        rerun_id = match.group(1)

        ops = _wait_terminal(dataset_name, NUM_SHARDS + 1, deadline, logs_dir)
        # the worker whose operation process was killed went on working
        assert all(w.poll() is None for w in workers), _logs(logs_dir)
        log_text = _logs(logs_dir)
    finally:
        _stop_workers(workers)

    states = {str(o.id): o.run_state for o in ops}
    expected = {i: ExecutionRunState.COMPLETED for i in summary.queued + [rerun_id]}
    expected[op_id] = ExecutionRunState.FAILED
    assert states == expected, log_text
    assert "Operation ended without terminal state" in log_text

    # exactly once, by the operations' own accounts: each shard's samples
    # computed by one operation, the killed shard's finished ones not again
    results = {str(o.id): o.result.result for o in ops if str(o.id) != op_id}
    for s, i in op_of_shard.items():
        if s != shard:
            assert (results[i]["processed"], results[i]["failed"]) == (sizes[s], 0), results[i]
    rerun = results[rerun_id]
    assert (rerun["processed"], rerun["failed"]) == (sizes[shard] - len(killed_written), 0), rerun
    assert sum(r["processed"] for r in results.values()) + len(killed_written) == n

    run = cam_plugin.get_run(dataset, "cam")
    assert run["status"] == "completed", run
    counts = run["counts"]
    assert (counts["samples"], counts["processed"], counts["failed"], counts["todo"]) == (n, n, 0, 0), counts
    assert sorted(run["shards"]) == [str(s) for s in range(NUM_SHARDS)]
    assert {k: s["state"] for k, s in run["shards"].items()} == {
        str(s): "done" for s in range(NUM_SHARDS)
    }
    # the rerun's operation process took the stale shard over from the dead one
    taken = run["shards"][str(shard)]
    assert taken["taken_over"]["pid"] == killed["pid"], taken
    assert taken["worker"]["pid"] != killed["pid"]

    # every sample has all its fields, none failed
    dataset.reload()
    for field in ("cam_prediction", "cam", "cam_gt"):
        assert dataset.exists(field).count() == n, field
    assert dataset.exists("cam_error").count() == 0

    # exactly one file per sample and target, nothing else, no temporaries
    files_dir = Path(run["files_dir"])
    found = {p.relative_to(files_dir).as_posix() for p in files_dir.rglob("*") if p.is_file()}
    assert not [f for f in found if TMP_MARK in f]
    expected_files = {f"{t}/{i}.png" for t in ("pred", "gt") for i in ids} | {MARKER}
    assert found == expected_files, (sorted(found - expected_files)[:5], sorted(expected_files - found)[:5])
    rows = zip(*dataset.values(["id", "cam.map_path", "cam_gt.map_path"]))
    for sample_id, pred_path, gt_path in rows:
        assert pred_path == str(files_dir / "pred" / f"{sample_id}.png")
        assert gt_path == str(files_dir / "gt" / f"{sample_id}.png")
        for path in (pred_path, gt_path):
            with Image.open(path) as img:
                assert img.format == "PNG"
                img.load()

    # no file written twice: the files of samples done before the kill
    # (the killed shard's among them) were left alone by the rerun
    assert _file_times(dataset, killed_written) == killed_times
    assert _file_times(dataset, written_ids) == times_at_kill

    # the finished run queues nothing more
    again = cam_plugin.compute_cams(
        dataset, spec, label_field="ground_truth", delegate=True, num_shards=NUM_SHARDS, **SLOW
    )
    assert again.queued == [], again
    assert len(repo.list_operations(dataset_name=dataset_name)) == NUM_SHARDS + 1


def test_delegation_queues_only_what_is_left(dataset_name, cifar_dir, resnet20_path):
    spec = f"cifar10_resnet20:{resnet20_path}"
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=2)
    repo = _repo()

    # a run completed here, all shards, then delegated again: nothing to queue
    done = cam_plugin.compute_cams(
        dataset, spec, label_field="ground_truth", num_shards=NUM_SHARDS, **SLOW
    )
    assert done.status == "completed" and done.processed == len(dataset)
    again = cam_plugin.compute_cams(
        dataset, spec, label_field="ground_truth", delegate=True, num_shards=NUM_SHARDS, **SLOW
    )
    assert again.queued == [] and again.shards == [], again
    assert again.resumed
    assert repo.list_operations(dataset_name=dataset.name) == []

    # an in-memory model cannot reach a worker: refused before anything exists
    module = cam_plugin.load_classifier(spec).module
    before = cam_plugin.list_runs(dataset)
    schema = set(dataset.get_field_schema())
    with pytest.raises(cam_plugin.RunError, match="cannot be delegated"):
        cam_plugin.compute_cams(
            dataset,
            module,
            heatmap_field="mem",
            pred_field="mem_prediction",
            delegate=True,
            num_shards=NUM_SHARDS,
            **SLOW,
        )
    dataset.reload()
    assert cam_plugin.list_runs(dataset) == before
    assert set(dataset.get_field_schema()) == schema
    assert repo.list_operations(dataset_name=dataset.name) == []


def test_queued_shards_carry_every_kind_of_target(dataset_name, cifar_dir, resnet20_path):
    """The operator's form knows pred/gt/both; a queued shard still computes
    exactly the targets the caller asked for (top-k, named classes), and a
    shard's parameters give the same run when executed (here immediately,
    through FiftyOne's operator machinery, as a worker would)."""
    import fiftyone.operators as foo

    spec = f"cifar10_resnet20:{resnet20_path}"
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    summary = cam_plugin.compute_cams(
        dataset, spec, label_field="ground_truth", targets=["pred", "gt", "top2", "class:cat"],
        delegate=True, num_shards=2, **SLOW,
    )
    # sample ids are random, so which shards have samples is read from them
    shards = sorted({shard_of(i, 2) for i in dataset.values("id")})
    assert len(summary.queued) == len(shards)
    for op in _repo().list_operations(dataset_name=dataset.name):
        params = dict(op.context.request_params["params"], delegate=False)
        result = foo.execute_operator(op.operator, ctx=dict(view=dataset.view(), params=params))
        assert result.error is None, result.error
    dataset.reload()
    for field in ("cam", "cam_gt", "cam_top2", "cam_cat"):
        assert dataset.count(field) == len(dataset), field
    run = cam_plugin.get_run(dataset, "cam")
    assert run["status"] == "completed" and sorted(run["shards"]) == [str(k) for k in shards]


def test_attention_runs_shard_the_same_way(dataset_name, cifar_dir, resnet20_path):
    import fiftyone as fo
    import fiftyone.operators as foo

    spec = f"cifar10_resnet20:{resnet20_path}"
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    box = fo.Detections(detections=[fo.Detection(label="object", bounding_box=[0.25, 0.25, 0.5, 0.5])])
    dataset.set_values("objects", [box.copy() for _ in range(len(dataset))])
    cam_plugin.compute_cams(dataset, spec, label_field="ground_truth", **SLOW)

    summary = cam_plugin.compute_attention(
        dataset, "cam", "objects", region_classes="all", delegate=True, num_shards=3
    )
    # sample ids are random: an empty shard is not queued (10 samples leave
    # one of 3 shards empty about once in 20 datasets)
    shards = sorted({shard_of(i, 3) for i in dataset.values("id")})
    assert len(shards) > 1
    assert len(summary.queued) == len(shards)
    ops = _repo().list_operations(dataset_name=dataset.name)
    assert sorted(op.context.request_params["params"]["shard"] for op in ops) == shards
    for op in ops:
        params = dict(op.context.request_params["params"], delegate=False)
        result = foo.execute_operator(op.operator, ctx=dict(view=dataset.view(), params=params))
        assert result.error is None, result.error
    dataset.reload()
    assert dataset.count("cam_object_energy") == dataset.count("cam_gt_object_energy") == len(dataset)
    run = cam_plugin.get_run(dataset, "cam_attention")
    assert run["status"] == "completed" and run["region_classes"] == "all"
    assert run["counts"]["processed"] == len(dataset)
