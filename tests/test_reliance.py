"""The background intervention (compute_reliance) against a direct
reference computation on real COCO images with a real ImageNet classifier,
and the views it feeds: a map that the intervention contradicts is in
``unfaithful_heatmap``, one it confirms is not."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps

import fiftyone as fo

import cam_plugin
from cam_plugin.interventions import MEAN_COLOUR


def _image(path):
    with Image.open(path) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def _box_region(boxes, width, height):
    """Pixels whose centres lie in any box (x <= cx < x + w), the way the
    region is defined, computed independently."""
    cy = (np.arange(height) + 0.5) / height
    cx = (np.arange(width) + 0.5) / width
    region = np.zeros((height, width), bool)
    for x, y, w, h in boxes:
        region |= ((y <= cy) & (cy < y + h))[:, None] & ((x <= cx) & (cx < x + w))[None, :]
    return region


def _paint(img, where, fill):
    pixels = np.asarray(img).copy()
    pixels[where] = np.asarray(fill)[where]
    return Image.fromarray(pixels)


def _reference(module, transforms, img, region, fill_img):
    """(predicted class, p, p without background, p without object, top
    classes) by painting, transforming and a softmax, one image at a time."""
    images = [img, _paint(img, ~region, fill_img), _paint(img, region, fill_img)]
    with torch.no_grad():
        logits = torch.cat([module(transforms(i)[None]) for i in images])
    probs = torch.softmax(logits.double(), dim=1)
    cls = int(probs[0].argmax())
    return cls, probs[:, cls].tolist(), probs.argmax(dim=1).tolist()


@pytest.fixture(scope="module")
def coco_efficientnet(coco_dir, tmp_path_factory):
    from builders import coco128_dataset, efficientnet_lite0

    name = "t_reliance_coco"
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    dataset = coco128_dataset(name, coco_dir)
    clf = cam_plugin.load_classifier(efficientnet_lite0(classes=cam_plugin.imagenet_classes()))
    yield dataset, clf
    fo.delete_dataset(name)


def test_reliance_fields_match_painting_transforming_and_softmax(coco_efficientnet):
    dataset, clf = coco_efficientnet
    view = dataset.match(fo.ViewField("ground_truth.detections").length() > 0).limit(12)
    module = clf.module.eval()

    for fill in ("mean", "blur", "swap"):
        prefix = f"r_{fill}"
        summary = cam_plugin.compute_reliance(
            view, clf, region_field="ground_truth", region_classes="all", fill=fill, prefix=prefix,
            batch_size=5, num_workers=1, progress=False,
        )
        assert summary.processed == len(view) and summary.failed == 0, summary
        checked = 0
        # (a view iterated once keeps the fields it had then: a fresh one)
        for sample in view.view():
            img = _image(sample.filepath)
            boxes = [d.bounding_box for d in sample.ground_truth.detections]
            region = _box_region(boxes, *img.size)
            if fill == "mean":
                fill_img = Image.new("RGB", img.size, MEAN_COLOUR)
            elif fill == "blur":
                fill_img = img.filter(ImageFilter.GaussianBlur(radius=max(2.0, min(img.size) / 10)))
            else:
                source = dataset[sample[f"{prefix}_swap_source"]]
                assert source.id != sample.id
                other = _image(source.filepath)
                other_region = _box_region([d.bounding_box for d in source.ground_truth.detections], *other.size)
                other = _paint(other, other_region, Image.new("RGB", other.size, MEAN_COLOUR))
                fill_img = other.resize(img.size, Image.BILINEAR)
            cls, (p, p_bg, p_obj), (_, top_bg, top_obj) = _reference(module, clf.transforms, img, region, fill_img)
            names = clf.classes
            assert sample[f"{prefix}_reliance_class"] == names[cls]
            assert sample[f"{prefix}_bg_removed_confidence"] == pytest.approx(p_bg, abs=1e-5)
            assert sample[f"{prefix}_obj_removed_confidence"] == pytest.approx(p_obj, abs=1e-5)
            assert sample[f"{prefix}_bg_reliance"] == pytest.approx((p_obj - p_bg) / p, abs=1e-5)
            assert sample[f"{prefix}_bg_flip"] == (top_bg != cls)
            assert sample[f"{prefix}_obj_flip"] == (top_obj != cls)
            assert sample[f"{prefix}_bg_removed_label"] == names[top_bg]
            assert sample[f"{prefix}_obj_removed_label"] == names[top_obj]
            checked += 1
        assert checked == 12

    # the swap sources are the same in another process's run (a seed, not
    # the order of the view) and change with the seed
    again = cam_plugin.compute_reliance(
        view.sort_by("filepath", reverse=True), clf, region_field="ground_truth", region_classes="all",
        fill="swap", prefix="r_swap_again", progress=False,
    )
    assert again.processed == 12
    assert view.values("r_swap_swap_source") == view.values("r_swap_again_swap_source")
    reseeded = cam_plugin.compute_reliance(
        view, clf, region_field="ground_truth", region_classes="all", fill="swap", seed=1,
        prefix="r_swap_seed1", progress=False,
    )
    assert reseeded.processed == 12
    assert view.values("r_swap_swap_source") != view.values("r_swap_seed1_swap_source")


def test_a_semantic_mask_region_and_a_sample_without_the_class(coco_efficientnet):
    dataset, clf = coco_efficientnet
    view = dataset.exists("segmentation").limit(10)
    module = clf.module.eval()
    summary = cam_plugin.compute_reliance(
        view, clf, region_field="segmentation", region_classes=["person"], prefix="r_person",
        num_workers=0, progress=False,
    )
    person = {v for v, n in dataset.mask_targets["segmentation"].items() if n == "person"}
    with_person = 0
    for sample in view:
        img = _image(sample.filepath)
        mask = np.asarray(Image.open(sample.segmentation.mask_path))
        assert mask.shape == (img.size[1], img.size[0])  # one value per pixel
        region = np.isin(mask, list(person))
        if not region.any():
            assert sample["r_person_bg_reliance"] is None
            assert "no labelled object of class person in 'segmentation'" in sample["r_person_reliance_error"]
            continue
        with_person += 1
        fill_img = Image.new("RGB", img.size, MEAN_COLOUR)
        cls, (p, p_bg, p_obj), _ = _reference(module, clf.transforms, img, region, fill_img)
        assert sample["r_person_bg_reliance"] == pytest.approx((p_obj - p_bg) / p, abs=1e-5)
    assert 0 < with_person < len(view)
    assert summary.processed == with_person and summary.failed == len(view) - with_person
    assert summary.errors == {"input missing": len(view) - with_person}


class _SaturatedScene(torch.nn.Module):
    """A classifier whose gradients miss what it relies on: it calls an
    image a "blue scene" from the blue of the background through a
    saturated clamp (zero gradient), and a small red term is all Grad-CAM
    sees; a "red thing" it calls from the red object (gradient and
    reliance agree). Fixed weights, no training."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.ReLU())
        with torch.no_grad():
            # channel 0: redness, channel 1: blueness
            self.features[0].weight.copy_(torch.tensor([[1.0, -0.5, -0.5], [-0.5, -0.5, 1.0]])[:, :, None, None])
            self.features[0].bias.zero_()

    def forward(self, x):
        a = self.features(x).mean(dim=(2, 3))
        blue_scene = 10 * a[:, 1].clamp(max=0.15) + 0.01 * a[:, 0]
        nothing = torch.full_like(blue_scene, 0.5)
        red_thing = 6 * a[:, 0]
        return torch.stack([blue_scene, nothing, red_thing], dim=1)


def _scene(path, background):
    img = Image.new("RGB", (64, 64), background)
    pixels = np.asarray(img).copy()
    pixels[20:44, 20:44] = (230, 20, 20)
    Image.fromarray(pixels).save(path)


def test_a_map_the_intervention_contradicts_is_an_unfaithful_heatmap(dataset_name, tmp_path):
    samples = []
    for i in range(6):
        for kind, colour in (("blue", (20, 40, 230)), ("green", (20, 200, 40))):
            path = tmp_path / f"{kind}{i}.png"
            _scene(path, colour)
            samples.append(
                fo.Sample(
                    filepath=str(path),
                    kind=kind,
                    objects=fo.Detections(detections=[fo.Detection(label="thing", bounding_box=[20 / 64, 20 / 64, 24 / 64, 24 / 64])]),
                )
            )
    dataset = fo.Dataset(dataset_name)
    dataset.add_samples(samples)
    classifier = cam_plugin.Classifier(
        _SaturatedScene().eval(), T.ToTensor(), ["blue scene", "nothing", "red thing"], "saturated"
    )
    cam_plugin.compute_cams(dataset, classifier, target_layer="features.1", progress=False)
    cam_plugin.compute_attention(dataset, "cam", "objects", progress=False)
    cam_plugin.compute_reliance(dataset, classifier, region_field="objects", progress=False)

    blue = dataset.match(fo.ViewField("kind") == "blue")
    green = dataset.match(fo.ViewField("kind") == "green")
    assert set(blue.values("cam_prediction.label")) == {"blue scene"}
    assert set(green.values("cam_prediction.label")) == {"red thing"}
    # both maps sit on the red object ...
    assert min(dataset.values("cam_object_energy")) > 0.9
    # ... but the blue scene dies without its background and survives
    # without the object: the map shows what the model does not use
    assert blue.values("cam_bg_flip") == [True] * 6 and blue.values("cam_obj_flip") == [False] * 6
    assert min(blue.values("cam_bg_reliance")) > 0.5
    # the red thing is carried by the object, as its map says
    assert green.values("cam_bg_flip") == [False] * 6 and green.values("cam_obj_flip") == [True] * 6
    assert max(green.values("cam_bg_reliance")) < -0.3

    views = cam_plugin.attention_views(dataset, "cam")
    assert set(views["unfaithful_heatmap"].values("id")) == set(blue.values("id"))
    assert "unfaithful_heatmap" in cam_plugin.views.view_names(dataset, "cam")
    assert dataset.load_saved_view("cam_unfaithful_heatmap").count() == 6
    # without ground truth there is nothing to call wrong or right
    assert "confirmed_background_reliance" not in views
