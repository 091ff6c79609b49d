"""Heatmaps line up with the image: the model input's window in the image, and
CAMs placed back into the full image frame."""

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

import fiftyone as fo

import cam_plugin
from cam_plugin import heatmaps
from cam_plugin.frames import Window, input_window, probe_window, to_frame


@pytest.mark.parametrize("size", [(640, 480), (300, 900), (100, 50), (224, 224), (31, 200)])
def test_analytic_windows_match_probing(size):
    presets = [
        torchvision.models.ResNet50_Weights.DEFAULT.transforms(),
        T.Compose([T.Resize(64), T.CenterCrop(48), T.ToTensor()]),
        T.Compose([T.Resize((40, 70)), T.ToTensor(), T.Normalize([0.5] * 3, [0.2] * 3)]),
        T.Compose([T.CenterCrop(120), T.ToTensor()]),  # pads small images
    ]
    w, h = size
    for transform in presets:
        exact = input_window(transform, w, h)
        probed = probe_window(transform, w, h)
        tol = 1.0 + max(w, h) / 255
        assert np.allclose(exact.as_tuple(), probed.as_tuple(), atol=tol), (transform, exact, probed)


def test_resize_crop_window_by_hand():
    # 640x480 -> Resize(256): 341x256 -> CenterCrop(224): left 58, top 16
    t = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    win = input_window(t, 640, 480)
    sx, sy = 640 / 341, 480 / 256
    assert win.x0 == pytest.approx(58 * sx) and win.x1 == pytest.approx(282 * sx)
    assert win.y0 == pytest.approx(16 * sy) and win.y1 == pytest.approx(240 * sy)


def test_custom_callables_are_probed_and_random_ones_refused():
    crop = lambda im: T.functional.to_tensor(im.crop((10, 5, 60, 45)).resize((25, 20)))
    win = input_window(crop, 90, 60)
    assert np.allclose(win.as_tuple(), (10, 5, 60, 45), atol=0.6)

    with pytest.raises(ValueError, match="not deterministic"):
        input_window(T.Compose([T.RandomResizedCrop(32), T.ToTensor()]), 90, 60)
    with pytest.raises(ValueError, match="not an axis-aligned"):
        input_window(T.Compose([T.RandomRotation((30, 30)), T.ToTensor()]), 90, 60)


def test_to_frame_places_a_hot_cell_where_the_window_says():
    cam = torch.zeros(1, 4, 4)
    cam[0, 1, 2] = 1.0  # row 1, column 2 of a 4x4 grid
    window = Window(100.0, 20.0, 300.0, 220.0)  # a 200x200 crop of a 400x240 image
    frame = to_frame(cam, [window.as_tuple()], (400, 240), (400, 240))[0]

    peak = np.unravel_index(int(frame.argmax()), frame.shape)
    # the cell covers x in [200, 250), y in [70, 120) of the image
    assert 200 <= peak[1] < 250 and 70 <= peak[0] < 120
    assert frame[:, :100].abs().max() == 0 and frame[:, 300:].abs().max() == 0
    assert frame[:20].abs().max() == 0 and frame[220:].abs().max() == 0

    # a constant map fills exactly the window, edge to edge
    flat = to_frame(torch.ones(1, 4, 4), [window.as_tuple()], (400, 240), (400, 240))[0]
    assert torch.allclose(flat[20:220, 100:300], torch.ones(200, 200))
    assert (flat > 0).sum() == 200 * 200


def _square_images(n, generator, size=64):
    """Noisy images; label 1 when a red square is present."""
    x = torch.rand(n, 3, size, size, generator=generator) * 0.5
    y = torch.randint(0, 2, (n,), generator=generator)
    for i in torch.nonzero(y).flatten().tolist():
        s = int(torch.randint(8, 14, (1,), generator=generator))
        r, c = torch.randint(0, size - s, (2,), generator=generator).tolist()
        x[i, :, r : r + s, c : c + s] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    return x, y


def _train_square_detector():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 2),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(250):
        x, y = _square_images(32, g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    x, y = _square_images(200, g)
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.95, accuracy
    return model.eval()


def test_heatmap_peak_lands_on_the_object_in_full_image_coordinates(dataset_name, tmp_path):
    model = _train_square_detector()

    # 160x90 images (16:9) against a square 64x64 input: Resize(64) makes
    # them 113x64, the centre crop keeps x in [24.5, 137.5) of the original
    rng = np.random.default_rng(1)
    boxes = [(60, 30), (100, 50), (40, 10), (115, 60)]
    samples = []
    for i, (bx, by) in enumerate(boxes):
        pixels = (rng.random((90, 160, 3)) * 127).astype(np.uint8)
        pixels[by : by + 20, bx : bx + 20] = (255, 0, 0)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        samples.append(fo.Sample(filepath=str(path), box=[bx, by]))
    dataset = fo.Dataset(dataset_name)
    dataset.add_samples(samples)

    transforms = T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor()])
    clf = cam_plugin.Classifier(model, transforms, ["background", "square"], "square-detector")
    summary = cam_plugin.compute_cams(dataset, clf, targets=["class:square"], heatmap_field="cam")
    assert summary.processed == len(boxes)

    for sample in dataset:
        levels = heatmaps.read_levels(sample.cam_square.map_path)
        assert levels.shape == (90, 160)  # the full frame, not the model input
        row, col = np.unravel_index(int(levels.argmax()), levels.shape)
        bx, by = sample.box
        assert bx - 2 <= col < bx + 22 and by - 2 <= row < by + 22, (sample.box, (col, row))
        # outside the crop window the model saw nothing: zero
        assert levels[:, :24].max() == 0 and levels[:, 138:].max() == 0
