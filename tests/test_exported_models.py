"""torch.export archives (.pt2) as compute_cams models: by path, their maps
are the original module's; layers and default layer as for the original;
a fixed batch size and crafted archives refused before anything in them
runs; and a delegated run loaded by path in a real worker."""

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import fiftyone as fo

import cam_plugin
from cam_plugin.cams.exported import ExportedProgramError, check_archive
from cam_plugin.cifar_resnet import CIFAR10_CLASSES
from cam_plugin.heatmaps import read_heatmap
from cam_plugin.models import is_exported_program_file
from builders import cifar_dataset, run_delegated

RUN = dict(heatmap_size=32, num_workers=0, device="cpu", batch_size=4)


def _resnet18(num_classes=10):
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes).eval()


def _export(module, path, size=224, dynamic=True):
    example = torch.randn(2, 3, size, size)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    program = torch.export.export(module, (example,), dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    module = _resnet18()
    path = _export(module, tmp_path_factory.mktemp("pt2") / "resnet18.pt2")
    return module, str(path)


def _maps(dataset, field):
    return {s.id: read_heatmap(s[field]) for s in dataset.select_fields(field)}


def _compare(dataset, a, b):
    preds = {s.id: s for s in dataset.select_fields([f"{a}_prediction", f"{b}_prediction"])}
    for s in preds.values():
        assert s[f"{a}_prediction"].label == s[f"{b}_prediction"].label
        assert s[f"{a}_prediction"].confidence == pytest.approx(s[f"{b}_prediction"].confidence, abs=1e-5)
    ma, mb = _maps(dataset, a), _maps(dataset, b)
    diffs = [float(np.abs(ma[i] - mb[i]).max()) for i in ma]
    scale = max(float(m.max()) for m in ma.values())
    print(f"{a} vs {b}: max abs map diff {max(diffs):.3g} (map max {scale:.3g})")
    assert max(diffs) <= 1e-4 * scale + 1e-6, (diffs, scale)
    return max(diffs), scale


def _run(dataset, model, field, **kwargs):
    summary = cam_plugin.compute_cams(
        dataset, model, heatmap_field=field, pred_field=f"{field}_prediction",
        label_field="ground_truth", classes=list(CIFAR10_CLASSES),
        **dict(RUN, **kwargs),
    )
    assert summary.processed == len(dataset) and not summary.failed, summary
    return summary


def test_pt2_by_path_gives_the_original_maps(exported, dataset_name, cifar_dir):
    module, path = exported
    assert is_exported_program_file(path) and not cam_plugin.is_torchscript_file(path)

    clf = cam_plugin.load_classifier(path)
    names = [n for n, _ in clf.module.named_modules()]
    assert "layer4" in names and "layer4.1.conv2" in names

    # the layers and the default as the original module's
    assert cam_plugin.model_layers(path) == cam_plugin.layer_candidates(module)
    assert cam_plugin.model_layers(path)[1] == "layer4"

    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    for method in ("gradcam", "layercam"):
        _run(dataset, module, f"eager_{method}", method=method)
        _run(dataset, path, f"pt2_{method}", method=method)
        _compare(dataset, f"eager_{method}", f"pt2_{method}")
    assert cam_plugin.get_run(dataset, "pt2_gradcam")["model_spec"] == path


def test_pt2_replaced_layer_output(tmp_path, dataset_name, cifar_dir):
    # ablation replaces the layer's output in batches of masked copies: the
    # hooks of the unflattened module must take a replacement too
    module = _resnet18()
    path = str(_export(module, tmp_path / "small.pt2", size=64))
    clf = cam_plugin.load_classifier(path)
    assert clf.module.exported_input_shape == (3, 64, 64)
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1).limit(2)
    _run(dataset, module, "eager", method="ablationcam", transforms=clf.transforms)
    _run(dataset, path, "pt2", method="ablationcam")
    _compare(dataset, "eager", "pt2")


def test_fixed_batch_size_is_refused(tmp_path):
    path = str(_export(_resnet18(), tmp_path / "fixed.pt2", size=64, dynamic=False))
    with pytest.raises(cam_plugin.ModelError, match="fixed batch size of 2.*Dim"):
        cam_plugin.load_classifier(path)


def _rewrite(src, dst, edit):
    """Copies the archive, ``edit(name, data) -> data or None`` on each entry
    (None drops it); returns ``dst``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
    return str(dst)


def _edit_json(suffix, change):
    def edit(name, data):
        if name.endswith(suffix):
            d = json.loads(data)
            change(d)
            return json.dumps(d).encode()
        return data

    return edit


def _saved(obj):
    # a torch.save that the weights-only unpickler refuses (a PosixPath)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _first_node(program):
    return program["graph_module"]["graph"]["nodes"][0]


CRAFTED = {
    "pickled weight": (
        _edit_json("weights_config.json", lambda d: next(iter(d["config"].values())).update(use_pickle=True)),
        "stored as a pickle",
    ),
    "os.system call": (
        _edit_json("models/model.json", lambda d: _first_node(d).update(target="torch.os.system")),
        "torch.os.system",
    ),
    "evaluated shape": (
        _edit_json(
            "models/model.json",
            lambda d: d["range_constraints"].update({"eval(chr(49))": {"min_val": 1, "max_val": 2}}),
        ),
        "not plain arithmetic",
    ),
    "guard code": (
        _edit_json("models/model.json", lambda d: d.update(guards_code=["__import__('os')"])),
        "guard code",
    ),
    "compiled code": (lambda name, data: data, "compiled code"),  # a .so added below
    "pickled sample inputs": (
        lambda name, data: _saved(((Path("/x"),), {})) if name.endswith("sample_inputs/model.pt") else data,
        "sample inputs",
    ),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_archives_are_refused_unopened(exported, tmp_path, monkeypatch, case):
    _, path = exported
    edit, message = CRAFTED[case]
    crafted = _rewrite(path, tmp_path / "crafted.pt2", edit)
    if case == "compiled code":
        with zipfile.ZipFile(crafted, "a") as z:
            z.writestr("resnet18/data/aotinductor/model/model.so", b"\x7fELF")

    def never(*args, **kwargs):
        raise AssertionError("torch.export.load ran on a refused archive")

    monkeypatch.setattr(torch.export, "load", never)
    assert is_exported_program_file(crafted)
    with pytest.raises(ExportedProgramError, match=message):
        check_archive(crafted)
    for call in (cam_plugin.load_classifier, cam_plugin.model_layers):
        with pytest.raises(cam_plugin.ModelError, match=message):
            call(crafted)


def test_delegated_run_loads_the_pt2_in_a_worker(exported, dataset_name, cifar_dir, tmp_path):
    from fiftyone.operators.executor import ExecutionRunState

    module, path = exported
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    _run(dataset, module, "eager")

    summary = cam_plugin.compute_cams(
        dataset, path, heatmap_field="pt2", pred_field="pt2_prediction",
        label_field="ground_truth", classes=list(CIFAR10_CLASSES),
        delegate=True, **RUN,
    )
    assert len(summary.queued) == 1, summary
    states, logs = run_delegated(dataset, tmp_path / "worker.log")
    assert states == [ExecutionRunState.COMPLETED], logs
    dataset.reload()
    assert dataset.count("pt2.map_path") == len(dataset)
    _compare(dataset, "eager", "pt2")


def test_the_app_form_takes_a_pt2_without_an_architecture(exported, dataset_name, cifar_dir):
    """The compute_cams form, resolved as the App does: a .pt2 file needs no
    architecture (it describes itself), and its layers fill the dropdown."""
    import asyncio

    import fiftyone.operators as foo
    from fiftyone.operators.executor import resolve_type

    _, path = exported
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    request = {
        "dataset_name": dataset.name,
        "view": [],
        "params": {"model_source": "file", "model_path": path},
    }
    prop = asyncio.run(resolve_type(foo.OperatorRegistry(), "@cam-plugin/cam/compute_cams", request))
    props = prop.to_json()["type"]["properties"]
    assert not {n: p.get("error_message") for n, p in props.items() if p.get("invalid")}
    assert props["target_layer"]["default"] == "layer4"
