"""Class names and logits of the predictions a CAM run stores.

A model without class names used to yield labels '987', '293' silently:
``classes`` now takes ``"imagenet"`` or a text file as well as a list, and
a run whose model has no names says so when it starts. Logits are stored
only on request (``store_logits=True``, as FiftyOne's ``apply_model``),
and both choices are part of the run's configuration, so a continued run
keeps them. On the real database, real CIFAR-10 images, the real ResNet-20
and a random-weights torchvision ResNet-18.
"""

import os
import re
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

import cam_plugin
from builders import cifar_dataset
from cam_plugin import ClassNamesWarning, ModelError, imagenet_classes, load_classifier, read_class_names
from cam_plugin.cifar_resnet import CIFAR10_CLASSES
from cam_plugin.models import cifar_transforms
from cam_plugin.runs import records, sharding

FAST = dict(batch_size=4, num_workers=0, device="cpu", heatmap_size=32)


@pytest.fixture(scope="module")
def resnet20(resnet20_path):
    return f"cifar10_resnet20:{resnet20_path}"


@pytest.fixture(scope="module")
def resnet20_module(resnet20):
    """The trained CIFAR ResNet-20 as a plain ``nn.Module``: no class names."""
    return load_classifier(resnet20).module


@pytest.fixture(scope="module")
def resnet18_module():
    """torchvision's ResNet-18 with random weights: 1000 outputs, no names."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def _few(name, cifar_dir, n=3):
    """A dataset of ``n`` CIFAR-10 test images (of different classes)."""
    dataset = cifar_dataset(name, cifar_dir, per_class=1)
    dataset.delete_samples(dataset.skip(n))
    return dataset


def _unnamed_warnings(record):
    return [w for w in record if issubclass(w.category, ClassNamesWarning)]


# ---------------------------------------------------------------------------
# the public helpers


def test_imagenet_classes_are_torchvisions_1000_names():
    names = imagenet_classes()
    assert names == list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    assert len(names) == 1000 and names[0] == "tench"
    names.append("mine")
    assert len(imagenet_classes()) == 1000  # a new list every call


def test_read_class_names_skips_blank_lines_and_whitespace(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("\ufeff  cat \n\n dog\t\n   \nsea lion\n\n", encoding="utf-8")
    assert read_class_names(path) == ["cat", "dog", "sea lion"]
    assert read_class_names(str(path)) == ["cat", "dog", "sea lion"]


def test_read_class_names_names_a_missing_empty_or_directory_file(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(ModelError, match="missing.txt: not found"):
        read_class_names(missing)

    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    with pytest.raises(ModelError, match="empty.txt holds no class names"):
        read_class_names(empty)

    with pytest.raises(ModelError, match="is a directory"):
        read_class_names(tmp_path)


def test_load_classifier_takes_imagenet_a_file_or_a_list(tmp_path, monkeypatch, resnet18_module):
    assert load_classifier(resnet18_module, classes="imagenet").classes == imagenet_classes()
    assert load_classifier(resnet18_module, classes=" ImageNet ").classes == imagenet_classes()

    # the literal word is the keyword even where a file of that name exists;
    # the file is reached as a path
    monkeypatch.chdir(tmp_path)
    Path("imagenet").write_text("a\nb\n")
    assert load_classifier(resnet18_module, classes="imagenet").classes == imagenet_classes()
    assert load_classifier(resnet18_module, classes="./imagenet").classes == ["a", "b"]
    assert load_classifier(resnet18_module, classes=Path("imagenet")).classes == ["a", "b"]

    assert load_classifier(resnet18_module, classes=("x", 2)).classes == ["x", "2"]
    with pytest.raises(ModelError, match="no_such_names.txt: not found"):
        load_classifier(resnet18_module, classes="no_such_names.txt")
    with pytest.raises(ModelError, match="not a int"):
        load_classifier(resnet18_module, classes=3)


# ---------------------------------------------------------------------------
# runs with class names


def test_imagenet_names_label_a_1000_output_model_and_a_resume_accepts_the_list(
    dataset_name, cifar_dir, resnet18_module
):
    dataset = _few(dataset_name, cifar_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = cam_plugin.compute_cams(dataset, resnet18_module, classes="imagenet", **FAST)
    assert not _unnamed_warnings(caught)
    assert summary.processed == len(dataset) and not summary.warnings

    names = imagenet_classes()
    labels = dataset.values("cam_prediction.label")
    assert labels and all(label in names for label in labels)
    assert all(target in names for target in dataset.values("cam.target"))
    assert cam_plugin.get_run(dataset, "cam")["classes"] == names

    # the keyword again, or the names it stands for, continue the same run
    again = cam_plugin.compute_cams(dataset, resnet18_module, classes="imagenet", **FAST)
    assert again.resumed and again.processed == 0 and again.skipped == len(dataset)
    again = cam_plugin.compute_cams(dataset, resnet18_module, classes=names, **FAST)
    assert again.resumed and again.skipped == len(dataset)

    # other names are another configuration, said briefly
    other = names[:500] + ["renamed"] + names[501:]
    with pytest.raises(cam_plugin.RunError, match=re.escape(f"classes[500]: {names[500]!r} -> 'renamed'")):
        cam_plugin.compute_cams(dataset, resnet18_module, classes=other, **FAST)


def test_imagenet_names_for_a_model_without_1000_outputs_are_refused(
    dataset_name, cifar_dir, resnet20_module
):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    with pytest.raises(cam_plugin.CamError, match=r"10 outputs but 1000 class names were given by classes='imagenet'"):
        cam_plugin.compute_cams(
            dataset, resnet20_module, classes="imagenet", transforms=cifar_transforms(), **FAST
        )
    assert cam_plugin.list_runs(dataset) == []
    assert "cam_prediction" not in dataset.get_field_schema()


def test_a_class_names_file_labels_the_predictions(dataset_name, cifar_dir, resnet20_module, tmp_path):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    path = tmp_path / "cifar10.txt"
    path.write_text("\n".join(f"  {name}  \n" for name in CIFAR10_CLASSES))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cam_plugin.compute_cams(
            dataset, resnet20_module, classes=path, label_field="ground_truth",
            transforms=cifar_transforms(), **FAST
        )
    assert not _unnamed_warnings(caught)
    labels = dataset.values("cam_prediction.label")
    assert set(labels) <= set(CIFAR10_CLASSES)
    # the trained ResNet-20 gets most of these right: names in output order
    truth = dataset.values("ground_truth.label")
    assert sum(a == b for a, b in zip(labels, truth)) >= 7
    assert set(dataset.values("cam_gt.target")) == set(truth)
    assert cam_plugin.get_run(dataset, "cam")["classes"] == list(CIFAR10_CLASSES)

    short = tmp_path / "nine.txt"
    short.write_text("\n".join(CIFAR10_CLASSES[:9]))
    with pytest.raises(cam_plugin.CamError, match=r"10 outputs but 9 class names were given by the class names file .*nine.txt"):
        cam_plugin.compute_cams(
            dataset, resnet20_module, classes=str(short), transforms=cifar_transforms(),
            run_key="other", heatmap_field="other", pred_field="other_pred", **FAST
        )


# ---------------------------------------------------------------------------
# a model without class names


def test_a_1000_output_model_without_names_warns_and_suggests_imagenet(
    dataset_name, cifar_dir, resnet18_module
):
    dataset = _few(dataset_name, cifar_dir)
    with pytest.warns(ClassNamesWarning, match="classes='imagenet'") as caught:
        summary = cam_plugin.compute_cams(dataset, resnet18_module, **FAST)
    assert len(_unnamed_warnings(caught)) == 1
    assert "'0' ... '999'" in str(caught[0].message)
    assert summary.warnings == [str(caught[0].message)]
    assert "classes='imagenet'" in str(summary)

    labels = dataset.values("cam_prediction.label")
    assert all(label.isdigit() and 0 <= int(label) < 1000 for label in labels)
    assert cam_plugin.get_run(dataset, "cam")["classes"] is None


def test_another_model_without_names_warns_how_to_name_them(dataset_name, cifar_dir, resnet20_module):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    with pytest.warns(ClassNamesWarning, match=r"pass classes=\[\.\.\.\] \(10 names") as caught:
        cam_plugin.compute_cams(dataset, resnet20_module, transforms=cifar_transforms(), **FAST)
    message = str(_unnamed_warnings(caught)[0].message)
    assert "'0' ... '9'" in message and "text file" in message and "imagenet" not in message
    assert set(dataset.values("cam_prediction.label")) <= {str(i) for i in range(10)}


def test_a_model_with_names_does_not_warn(dataset_name, cifar_dir, resnet20, resnet20_module):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # a named model carries its names; given names need no warning
        cam_plugin.compute_cams(dataset, resnet20, **FAST)
        cam_plugin.compute_cams(
            dataset, resnet20_module, classes=list(CIFAR10_CLASSES), transforms=cifar_transforms(),
            run_key="listed", heatmap_field="listed", pred_field="listed_pred", **FAST
        )
    assert not _unnamed_warnings(caught)
    assert set(dataset.values("listed_pred.label")) <= set(CIFAR10_CLASSES)


# ---------------------------------------------------------------------------
# logits


def test_logits_are_stored_only_when_asked(dataset_name, cifar_dir, resnet20):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    cam_plugin.compute_cams(dataset, resnet20, **FAST)
    sample = dataset.first()
    assert sample.cam_prediction.logits is None
    assert "logits" not in str(sample) or "'logits': None" in str(sample)
    assert dataset.count("cam_prediction.logits") == 0
    assert cam_plugin.get_run(dataset, "cam")["store_logits"] is False

    cam_plugin.compute_cams(
        dataset, resnet20, store_logits=True, run_key="with_logits", heatmap_field="lcam",
        pred_field="lpred", **FAST
    )
    assert dataset.count("lpred.logits") == len(dataset)
    for sample in dataset:
        logits = sample.lpred.logits
        assert len(logits) == 10
        # the label is the class of the largest logit
        assert sample.lpred.label == CIFAR10_CLASSES[int(logits.argmax())]


def test_a_1000_class_model_stores_1000_logits(dataset_name, cifar_dir, resnet18_module):
    dataset = _few(dataset_name, cifar_dir)
    cam_plugin.compute_cams(dataset, resnet18_module, classes="imagenet", store_logits=True, **FAST)
    assert {len(x) for x in dataset.values("cam_prediction.logits")} == {1000}


def test_a_resumed_run_keeps_storing_logits(dataset_name, cifar_dir, resnet20):
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=2)
    gen = cam_plugin.iter_compute_cams(dataset, resnet20, store_logits=True, **FAST)
    next(gen)
    gen.close()  # interrupted after its first batch
    done = dataset.count("cam_prediction")
    assert 0 < done < len(dataset)

    # continuing without logits would mix predictions with and without them
    with pytest.raises(cam_plugin.RunError, match="store_logits: True -> False"):
        cam_plugin.compute_cams(dataset, resnet20, **FAST)

    summary = cam_plugin.compute_cams(dataset, resnet20, store_logits=True, **FAST)
    assert summary.resumed and summary.processed == len(dataset) - done
    assert [len(x) for x in dataset.values("cam_prediction.logits")] == [10] * len(dataset)


def test_a_record_from_before_store_logits_continues_with_the_default():
    # a record written before store_logits existed has no such entry
    old = {"cam_method": "gradcam", "classes": ["a"], "status": "running"}
    new = {"cam_method": "gradcam", "classes": ["a"], "store_logits": False}
    assert records.comparable(old) == records.comparable(new)
    assert records.comparable(old) != records.comparable(dict(new, store_logits=True))


# ---------------------------------------------------------------------------
# delegation


def test_delegated_shards_get_the_resolved_names_and_the_logits_choice(
    dataset_name, cifar_dir, resnet20, tmp_path, monkeypatch
):
    """Queued shards are delegated operations whose parameters are JSON: a
    names file (which a worker may not see) or "imagenet" travels as the
    list it stands for, so every worker labels alike."""
    dataset = cifar_dataset(dataset_name, cifar_dir, per_class=1)
    path = tmp_path / "cifar10.txt"
    path.write_text("\n".join(CIFAR10_CLASSES))
    queued = []

    def fake_queue(uri, samples, params):
        queued.append(params)
        return f"op{len(queued)}"

    monkeypatch.setattr(sharding, "_queue_operation", fake_queue)
    summary = cam_plugin.compute_cams(
        dataset, resnet20, classes=path, store_logits=True, delegate=True, num_shards=2, **FAST
    )
    assert summary.queued == ["op1", "op2"]
    for params in queued:
        assert params["classes"] == list(CIFAR10_CLASSES)
        assert params["store_logits"] is True
        assert not isinstance(params["classes"], (str, os.PathLike))
    record = cam_plugin.get_run(dataset, "cam")
    assert record["classes"] == list(CIFAR10_CLASSES) and record["store_logits"] is True
