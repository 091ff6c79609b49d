"""The plugin's operators, run through FiftyOne's own operator machinery with
the plugin installed in a temporary plugins dir."""

import os
import subprocess
import sys
import time

import fiftyone as fo
import fiftyone.operators as foo
import pytest

from builders import cifar_dataset

PLUGIN = "@cam-plugin/cam"


def test_plugin_is_discovered():
    import fiftyone.plugins as fop

    names = [p.name for p in fop.list_plugins()]
    assert PLUGIN in names
    assert foo.get_operator(f"{PLUGIN}/compute_cams") is not None


def test_compute_cams_operator_immediate(dataset_name, cifar_dir, resnet20_path):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=3)
    result = foo.execute_operator(
        f"{PLUGIN}/compute_cams",
        ctx=dict(
            dataset=dataset,
            params=dict(
                model=f"cifar10_resnet20:{resnet20_path}",
                method="gradcam",
                targets="both",
                label_field="ground_truth",
                batch_size=8,
                device="cpu",
            ),
        ),
    )
    assert result.error is None, result.error
    dataset.reload()
    schema = dataset.get_field_schema()
    assert "cam" in schema and "cam_gt" in schema and "cam_prediction" in schema
    assert dataset.count("cam.map_path") == len(dataset)
    assert dataset.count("cam_gt.map_path") == len(dataset)
    assert dataset.count("cam_prediction") == len(dataset)


def test_compute_cams_operator_delegated(dataset_name, cifar_dir, resnet20_path):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=2)
    op = foo.get_operator(f"{PLUGIN}/compute_cams")
    result = op(
        dataset,
        f"cifar10_resnet20:{resnet20_path}",
        delegate=True,
        heatmap_field="cam_deleg",
        pred_field="pred_deleg",
        device="cpu",
    )
    assert result.delegated
    assert dataset.count("cam_deleg") == 0 if "cam_deleg" in dataset.get_field_schema() else True

    # a real `fiftyone delegated launch` worker runs the queued operation
    fiftyone_cli = os.path.join(os.path.dirname(sys.executable), "fiftyone")
    worker = subprocess.Popen(
        [fiftyone_cli, "delegated", "launch"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 180
        from fiftyone.factory.repo_factory import RepositoryFactory
        from fiftyone.operators.executor import ExecutionRunState

        repo = RepositoryFactory.delegated_operation_repo()
        while time.time() < deadline:
            ops = repo.list_operations(dataset_name=dataset_name)
            if ops and all(o.run_state in (ExecutionRunState.COMPLETED, ExecutionRunState.FAILED) for o in ops):
                break
            time.sleep(1)
    finally:
        worker.terminate()
        worker.wait(timeout=30)

    ops = repo.list_operations(dataset_name=dataset_name)
    assert len(ops) == 1
    assert ops[0].run_state == ExecutionRunState.COMPLETED, ops[0].run_state
    dataset.reload()
    assert dataset.count("cam_deleg.map_path") == len(dataset)
    assert dataset.count("pred_deleg") == len(dataset)
