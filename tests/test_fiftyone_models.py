"""FiftyOne models as compute_cams models: a TorchImageModel built offline
from a config like the zoo's (random, seeded weights), whose predictions
must be apply_model's and whose maps lie in the full image frame; zoo
names; and the FiftyOne models that are refused."""

from pathlib import Path

import numpy as np
import pytest
import torch

import fiftyone as fo
import fiftyone.utils.torch as fout

import cam_plugin
from cam_plugin.frames import frame_size, input_window
from cam_plugin.heatmaps import read_heatmap

CLASSES = ["ant", "bee", "cat", "dog", "eel"]
COCO_IMAGES = ("000000000357", "000000000560", "000000000474")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _torch_image_model(**config):
    # the zoo's torchvision classifiers, as manifest-torch.json configures
    # them, with random weights (nothing is downloaded)
    torch.manual_seed(0)
    d = {
        "entrypoint_fcn": "torchvision.models.resnet18",
        "entrypoint_args": {"weights": None, "num_classes": len(CLASSES)},
        "output_processor_cls": "fiftyone.utils.torch.ClassifierOutputProcessor",
        "classes": CLASSES,
        "image_min_dim": 224,
        "image_max_dim": 2048,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "device": "cpu",
    }
    d.update(config)
    return fout.TorchImageModel(fout.TorchImageModelConfig(d))


def _dataset(name, paths):
    dataset = fo.Dataset(name)
    dataset.add_samples([fo.Sample(filepath=str(p)) for p in paths])
    dataset.compute_metadata()
    return dataset


def _check_against_apply_model(dataset, model):
    dataset.apply_model(model, label_field="ref", batch_size=1, num_workers=0)
    summary = cam_plugin.compute_cams(
        dataset, model, heatmap_size=64, batch_size=2, num_workers=0, device="cpu"
    )
    assert summary.processed == len(dataset) and not summary.failed, summary

    confidences = []
    for sample in dataset.select_fields(["ref", "cam_prediction", "cam", "metadata"]):
        ref, ours = sample["ref"], sample["cam_prediction"]
        assert ours.label == ref.label, sample.filepath
        assert ours.confidence == pytest.approx(ref.confidence, abs=1e-4)
        confidences.append((ref.confidence, ours.confidence))
        print(f"{Path(sample.filepath).name}: {ref.label} {ref.confidence:.6f} vs {ours.label} {ours.confidence:.6f}")

        # the full image frame: the map keeps the image's aspect ratio
        w, h = sample.metadata.width, sample.metadata.height
        levels = read_heatmap(sample["cam"])
        out_w, out_h = frame_size(w, h, 64)
        assert levels.shape == (out_h, out_w)
        assert abs(out_w / out_h - w / h) < 2 / min(out_w, out_h)
        assert np.isfinite(levels).all() and levels.max() > 0
    return confidences


def test_torch_image_model_matches_apply_model_on_coco(dataset_name, coco_dir):
    # COCO images of their own sizes (ragged batches, every size its own
    # group): 640 x 218 goes up to 658 x 224 (the zoo's 224 minimum),
    # 460 x 312 and the portrait 333 x 500 stay as they are
    images = [Path(coco_dir) / "images" / f"{n}.jpg" for n in COCO_IMAGES]
    dataset = _dataset(dataset_name, images)
    assert len(set(dataset.values("metadata.width"))) == 3
    model = _torch_image_model()
    assert model.ragged_batches

    clf = cam_plugin.load_classifier(model)
    assert clf.module is model._model and clf.transforms is model.transforms
    assert clf.classes == CLASSES

    _check_against_apply_model(dataset, model)
    run = cam_plugin.get_run(dataset, "cam")
    assert run["layer"] == "layer4"
    assert run["classes"] == CLASSES

    # FiftyOne's resizes are not torchvision's: the window is probed, and
    # a resize covers the whole image
    w, h = dataset.first().metadata.width, dataset.first().metadata.height
    window = input_window(model.transforms, w, h)
    assert np.allclose(window.as_tuple(), (0, 0, w, h), atol=1.0), window


def test_torch_image_model_upsized_cifar(dataset_name, cifar_dir):
    # 32 x 32 CIFAR images go up to the zoo's 224 minimum
    images = sorted(Path(cifar_dir).glob("*/*.jpg"))[:3]
    dataset = _dataset(dataset_name, images)
    model = _torch_image_model()
    _check_against_apply_model(dataset, model)
    window = input_window(model.transforms, 32, 32, output_hw=(224, 224))
    assert np.allclose(window.as_tuple(), (0, 0, 32, 32), atol=0.5), window


def test_torch_image_model_with_fixed_size(dataset_name, coco_dir):
    # image_size: one torchvision Resize to a fixed size, mapped exactly
    images = [Path(coco_dir) / "images" / f"{n}.jpg" for n in COCO_IMAGES[1:]]
    dataset = _dataset(dataset_name, images)
    model = _torch_image_model(image_size=[96, 128], image_min_dim=None, image_max_dim=None)
    assert not model.ragged_batches
    _check_against_apply_model(dataset, model)


def test_refused_fiftyone_models():
    detector = _torch_image_model(output_processor_cls="fiftyone.utils.torch.DetectorOutputProcessor")
    with pytest.raises(cam_plugin.ModelError, match="not a classifier"):
        cam_plugin.load_classifier(detector)

    class Custom(fout.TorchImageModel):
        def _forward_pass(self, imgs):
            return self._model(imgs) * 2

    torch.manual_seed(0)
    custom = Custom(_torch_image_model().config)
    with pytest.raises(cam_plugin.ModelError, match="_forward_pass"):
        cam_plugin.load_classifier(custom)

    half = _torch_image_model()
    half._model.half()
    with pytest.raises(cam_plugin.ModelError, match="half precision"):
        cam_plugin.load_classifier(half)


def test_zoo_names():
    with pytest.raises(cam_plugin.ModelError, match="not a FiftyOne zoo model"):
        cam_plugin.load_classifier("zoo:no-such-model-torch")
    with pytest.raises(cam_plugin.ModelError, match="Name the zoo model"):
        cam_plugin.load_classifier("zoo:")

    # the zoo's network with random weights: its layers without a download
    names, default = cam_plugin.model_layers("zoo:resnet18-imagenet-torch")
    assert default == "layer4" and "layer3" in names
    clf = cam_plugin.load_classifier("zoo:resnet18-imagenet-torch:none")
    assert len(clf.classes) == 1000 and clf.name.startswith("zoo:resnet18-imagenet-torch")
