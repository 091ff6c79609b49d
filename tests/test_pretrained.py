"""The real CIFAR-10 ResNet-20 checkpoint through ``compute_cams`` on the
1,000 real CIFAR-10 test images: checkpoint loading, preprocessing and class
mapping are right when the accuracy matches the model run directly (0.804 on
these JPEG re-encodings), and every sample gets its heatmap file."""

import os

from PIL import Image

import cam_plugin
from builders import cifar_dataset


def test_resnet20_accuracy_and_a_heatmap_for_every_sample(dataset_name, cifar_dir, resnet20_path, tmp_path):
    dataset = cifar_dataset(dataset_name, cifar_dir)
    assert len(dataset) == 1000

    summary = cam_plugin.compute_cams(
        dataset,
        f"cifar10_resnet20:{resnet20_path}",
        label_field="ground_truth",
        output_dir=str(tmp_path),
        device="cpu",
    )
    assert (summary.processed, summary.failed) == (1000, 0)

    truth = dataset.values("ground_truth.label")
    predicted = dataset.values("cam_prediction.label")
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    assert accuracy >= 0.79, accuracy

    for field in ("cam", "cam_gt"):
        paths = dataset.values(f"{field}.map_path")
        assert len(set(paths)) == 1000 and all(os.path.isfile(p) for p in paths), field
    # the maps are in the full image frame: 32 x 32, like the images
    assert Image.open(dataset.first().cam.map_path).size == (32, 32)
