"""The cam_plugin demo: a classifier that learned a shortcut, caught by its
class activation maps.

No network is needed: the demo draws its own images. Each 128x96 image shows
one shape (circle, square or triangle: the class) of random size, position
and muted colour on a noisy, textured background, plus a small saturated
colour marker (the *cue*) somewhere in the background, away from the shape.

-   In the train split the marker's colour goes with the class for 92% of the
    images (red: circle, green: square, blue: triangle).
-   40% of the shapes, in both splits, are *faint*: so close to the
    background's brightness that a small CNN trained for under a minute does
    not learn to see them. For those the cue is the only evidence it uses.
-   In the test split the cue is swapped to another class's colour for half
    of the images.

A small CNN (conv layers, global average pooling, a linear layer) is trained
on the train split, :func:`cam_plugin.compute_cams` computes Grad-CAM maps
for the test split, and :func:`cam_plugin.compute_attention` measures how
much of each map's mass lies inside the shape's box. Where the cue is
swapped, the model follows it for
about half of the images (nearly all the faint ones, a few clear ones), and
those maps light up the marker, not the shape (about 10% of their mass in the
box): the plugin's ``misclassified_background`` view finds the images that
followed the cue with precision and recall near 1. Correct predictions
on clear shapes keep about 40% of the mass in the tight box: the evidence
for a shape is its outline, and the maps spill over it.

It is an example of using the library, not part of it: run it (with
``cam_plugin`` installed, ``make setup``) as::

    python examples/demo.py --dir DIR [--seed N] [--app]

or ``make demo`` / ``make app``.

Images, records and the trained weights are kept in ``DIR`` and reused by a
later run with the same seed and configuration. ``--db DBDIR`` keeps the
demo's database in ``DBDIR``, served by a MongoDB server of the demo's own
(``make demo`` does this with ``.demo/db``), so it never touches your own
FiftyOne database, even while the App is open on it.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")

# Saturated cue colours. Shapes and backgrounds use muted colours only, so a
# cue colour never appears anywhere else in an image
CUE_COLORS = {
    "circle": (225, 30, 30),
    "square": (30, 205, 50),
    "triangle": (40, 80, 240),
}

# The images are 4:3 while the model sees their centre square (resized and
# centre-cropped, the way ImageNet preprocessing works), so heatmaps must be
# placed back into the full frame with an offset. Shapes and cues are kept
# inside the square; the side strips show background only.
IMAGE_SIZE = (128, 96)  # (width, height)

# Brightness differences (0-255 levels) between a shape and its background
CLEAR_CONTRAST = (35, 90)
FAINT_CONTRAST = (3, 10)

PIXEL_NOISE = 8.0
CUE_SIDE = (8, 12)
# The cue keeps at least this many pixels away from the shape's box
CUE_MARGIN = 8

# Bump when the image generator changes, so cached images are redrawn
GENERATOR_VERSION = 1

DATASET_NAME = "cam-demo"
HEATMAP_FIELD = "cam"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo's data and model depend on.

    Attributes:
        n_train: train images
        n_test: test images
        train_cue_rate: share of train images whose cue matches the class;
            the others show another class's cue
        test_swap_rate: share of test images whose cue is swapped to
            another class's
        faint_rate: share of images (in both splits) whose shape is faint
        shape_size: the range of the shapes' sizes (diameter of a circle,
            side of a triangle), in pixels
        input_size: the side of the model's square input
        layers: the CNN's feature layers: an int is a 3x3 conv (+ batch
            norm + ReLU) with that many channels, ``"M"`` a 2x2 max-pool
        epochs: training epochs
        batch_size: training batch size
        lr: the peak Adam learning rate (one-cycle schedule)
    """

    n_train: int = 1200
    n_test: int = 500
    train_cue_rate: float = 0.92
    test_swap_rate: float = 0.5
    faint_rate: float = 0.4
    shape_size: tuple = (44, 64)
    input_size: int = 48
    layers: tuple = (8, "M", 16, "M", 32, 32)
    epochs: int = 20
    batch_size: int = 32
    lr: float = 2e-3

    _DATA_FIELDS = (
        "n_train",
        "n_test",
        "train_cue_rate",
        "test_swap_rate",
        "faint_rate",
        "shape_size",
    )

    def data_key(self, seed):
        """A short hash of what the images depend on."""
        data = {name: getattr(self, name) for name in self._DATA_FIELDS}
        return _hash({"version": GENERATOR_VERSION, "seed": seed, **data})

    def model_key(self, seed):
        """A short hash of what the trained weights depend on."""
        return _hash({"data": self.data_key(seed), **dataclasses.asdict(self)})


#: a quicker demo (``--small``), the size the App tests use
SMALL = DemoConfig(n_train=400, n_test=48)


def _hash(obj):
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def visible_region():
    """The pixel box ``(x0, y0, x1, y1)`` of the image that the model's centre
    crop shows, shrunk by a small margin for resampling at its edges."""
    width, height = IMAGE_SIZE
    side = min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    margin = 3
    return x0 + margin, y0 + margin, x0 + side - margin, y0 + side - margin


def _background(rng):
    """A muted, low-frequency textured background (float32 RGB)."""
    width, height = IMAGE_SIZE
    base = rng.uniform(70, 185) + rng.uniform(-20, 20, size=3)
    coarse = rng.normal(0, 1, size=(6, 8, 3))
    # the blotches share most of their variation across channels so the
    # background stays muted, never close to a saturated cue colour
    coarse = 0.7 * coarse.mean(axis=-1, keepdims=True) + 0.3 * coarse
    coarse = np.clip(128 + 40 * coarse, 0, 255).astype(np.uint8)
    texture = Image.fromarray(coarse, "RGB").resize((width, height), Image.BICUBIC)
    texture = np.asarray(texture, dtype=np.float32) - 128
    return (base + 0.6 * texture).astype(np.float32)


def _shape_polygon(shape, cx, cy, size):
    """Vertices of an upright shape ``size`` pixels across, centred on
    ``(cx, cy)`` (a circle is a 48-gon)."""
    if shape == "circle":
        n, radius, start = 48, size / 2, 0.0
    elif shape == "square":
        n, radius, start = 4, 0.9 * size / math.sqrt(2), math.pi / 4
    else:
        n, radius, start = 3, size / math.sqrt(3), -math.pi / 2
    return [
        (
            cx + radius * math.cos(start + 2 * math.pi * k / n),
            cy + radius * math.sin(start + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _muted_color(rng, background, contrast):
    """A low-saturation colour whose brightness differs from the
    background's by ``contrast`` levels, lighter or darker."""
    level = background.mean()
    sign = 1 if rng.random() < 0.5 else -1
    if not 0 <= level + sign * contrast <= 255:
        sign = -sign
    # the tint stays below the contrast, so faint shapes stay faint in hue too
    tint = rng.uniform(-1, 1, size=3) * min(12.0, 0.3 * contrast)
    return np.clip(background + sign * contrast + tint, 0, 255)


def _free_spots(box, side):
    """Top-left pixels, as an (N, 2) array of ``(x, y)``, of the ``side`` x
    ``side`` squares in the visible region that keep :data:`CUE_MARGIN`
    pixels away from ``box``."""
    vx0, vy0, vx1, vy1 = visible_region()
    x = np.arange(math.ceil(vx0), math.floor(vx1) - side + 1)
    y = np.arange(math.ceil(vy0), math.floor(vy1) - side + 1)
    x, y = np.meshgrid(x, y)
    m = CUE_MARGIN
    free = (
        (x + side + m <= box[0])
        | (box[2] + m <= x)
        | (y + side + m <= box[1])
        | (box[3] + m <= y)
    )
    return np.stack([x[free], y[free]], axis=1)


def _place_shape(rng, shape, size, cue_side):
    """Picks a position for the shape inside the visible region that leaves
    room for the cue; returns ``(polygon, box, cue_spots)``."""
    vx0, vy0, vx1, vy1 = visible_region()
    for _ in range(1000):
        cx = rng.uniform(vx0 + size / 2, vx1 - size / 2)
        cy = rng.uniform(vy0 + size / 2, vy1 - size / 2)
        polygon = _shape_polygon(shape, cx, cy, size)
        xs, ys = zip(*polygon)
        box = (min(xs), min(ys), max(xs), max(ys))
        if box[0] < vx0 or box[1] < vy0 or box[2] > vx1 or box[3] > vy1:
            continue
        spots = _free_spots(box, cue_side)
        if len(spots):
            return polygon, box, spots

    raise RuntimeError(f"No room for a {size:.0f} px {shape} and its cue; use smaller shapes")


def draw_image(rng, shape, cue, faint=False, shape_size=DemoConfig.shape_size):
    """Draws one image.

    Args:
        rng: a ``numpy.random.Generator``
        shape: the class, one of :data:`CLASSES`
        cue: the class whose cue colour the marker shows
        faint (False): whether the shape is faint
        shape_size: the range of the shape's size, in pixels

    Returns:
        a tuple ``(image, info)``: the RGB PIL image and a dict with the
        shape's ``box`` and the marker's ``cue_box`` (pixel ``(x0, y0, x1,
        y1)``) and the shape's ``contrast``
    """
    width, height = IMAGE_SIZE
    pixels = _background(rng)

    size = rng.uniform(*shape_size)
    cue_side = int(rng.integers(CUE_SIDE[0], CUE_SIDE[1] + 1))
    polygon, box, cue_spots = _place_shape(rng, shape, size, cue_side)

    contrast = rng.uniform(*(FAINT_CONTRAST if faint else CLEAR_CONTRAST))
    color = _muted_color(rng, pixels.mean(axis=(0, 1)), contrast)
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).polygon(polygon, fill=255)
    alpha = np.asarray(mask, dtype=np.float32)[:, :, None] / 255
    pixels = pixels * (1 - alpha) + color * alpha

    x0, y0 = (int(v) for v in cue_spots[rng.integers(len(cue_spots))])
    cue_color = np.array(CUE_COLORS[cue], dtype=np.float32) + rng.uniform(-15, 15, size=3)
    pixels[y0 : y0 + cue_side, x0 : x0 + cue_side] = cue_color

    pixels += PIXEL_NOISE * rng.standard_normal(pixels.shape, dtype=np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
    info = {
        "box": box,
        "cue_box": (x0, y0, x0 + cue_side, y0 + cue_side),
        "contrast": float(contrast),
    }
    return image, info


def _relative_box(box):
    """Pixel ``(x0, y0, x1, y1)`` -> FiftyOne's relative ``[x, y, w, h]``."""
    width, height = IMAGE_SIZE
    x0, y0 = max(0.0, box[0]), max(0.0, box[1])
    x1, y1 = min(float(width), box[2]), min(float(height), box[3])
    return [x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height]


def _sample_plan(rng, split, config):
    """Draws what one image shows: ``(shape, cue class, swapped, faint)``."""
    shape = CLASSES[rng.integers(len(CLASSES))]
    faint = bool(rng.random() < config.faint_rate)
    keep = config.train_cue_rate if split == "train" else 1 - config.test_swap_rate
    if rng.random() < keep:
        return shape, shape, False, faint

    others = [c for c in CLASSES if c != shape]
    return shape, others[rng.integers(len(others))], True, faint


def generate_images(root, n_train=None, n_test=None, seed=0, config=None):
    """Draws the demo images into ``<root>/images``, or reuses the ones there
    when they were drawn with the same seed and configuration.

    Every image has its own random generator seeded from ``(seed, split,
    index)``, so an image does not depend on how many others are drawn.

    Args:
        root: the demo directory
        n_train (None), n_test (None): image counts, overriding ``config``
        seed (0): the random seed
        config (None): a :class:`DemoConfig`

    Returns:
        a list of records (dicts) with ``filepath``, ``split``
        (``"train"``/``"test"``), ``label``, ``box`` and ``cue_box``
        (relative ``[x, y, w, h]``), ``cue``, ``cue_swapped``, ``faint``
        and ``contrast``
    """
    config = _config_with(config, n_train, n_test)
    key = config.data_key(seed)
    records_path = os.path.join(root, "records.json")
    cached = _load_json(records_path)
    if (
        cached
        and cached.get("key") == key
        and all(os.path.isfile(r["filepath"]) for r in cached["records"])
    ):
        return cached["records"]

    image_dir = os.path.join(root, "images")
    shutil.rmtree(image_dir, ignore_errors=True)
    records = []
    splits = [("train", config.n_train), ("test", config.n_test)]
    for split_id, (split, count) in enumerate(splits):
        os.makedirs(os.path.join(image_dir, split), exist_ok=True)
        for index in range(count):
            rng = np.random.default_rng([seed, split_id, index])
            shape, cue, swapped, faint = _sample_plan(rng, split, config)
            image, info = draw_image(rng, shape, cue, faint, config.shape_size)
            path = os.path.abspath(os.path.join(image_dir, split, f"{index:05d}.png"))
            image.save(path, compress_level=1)
            records.append(
                {
                    "filepath": path,
                    "split": split,
                    "label": shape,
                    "box": _relative_box(info["box"]),
                    "cue": cue,
                    "cue_swapped": swapped,
                    "cue_box": _relative_box(info["cue_box"]),
                    "faint": faint,
                    "contrast": round(info["contrast"], 2),
                }
            )

    os.makedirs(root, exist_ok=True)
    _save_json(records_path, {"key": key, "records": records})
    return records


def _config_with(config, n_train=None, n_test=None):
    config = config or DemoConfig()
    changes = {}
    if n_train is not None:
        changes["n_train"] = n_train
    if n_test is not None:
        changes["n_test"] = n_test
    return dataclasses.replace(config, **changes) if changes else config


def _load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _save_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class ShapeNet(nn.Module):
    """A small CNN that class activation maps apply to: conv layers, global
    average pooling and one linear layer. Every ReLU is its own module, used
    once, so hooks see each activation separately.

    Args:
        layers: ints (3x3 conv + batch norm + ReLU with that many channels)
            and ``"M"`` (2x2 max-pool), in order
        num_classes: the number of outputs
    """

    def __init__(self, layers=DemoConfig.layers, num_classes=len(CLASSES)):
        super().__init__()
        modules, channels = [], 3
        for layer in layers:
            if layer == "M":
                modules.append(nn.MaxPool2d(2))
                continue
            modules += [
                nn.Conv2d(channels, layer, 3, padding=1, bias=False),
                nn.BatchNorm2d(layer),
                nn.ReLU(),
            ]
            channels = layer

        self.features = nn.Sequential(*modules)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def model_transforms(input_size=DemoConfig.input_size):
    """The preprocessing, the same for training and CAMs: resize the shorter
    side, centre-crop the square, normalise."""
    return T.Compose(
        [
            T.Resize(input_size),
            T.CenterCrop(input_size),
            T.ToTensor(),
            T.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        ]
    )


def _load_tensors(records, transforms):
    """The records' images as one (N, 3, H, W) tensor, and their labels."""
    images = []
    for r in records:
        with Image.open(r["filepath"]) as img:
            images.append(transforms(img.convert("RGB")))
    labels = torch.tensor([CLASSES.index(r["label"]) for r in records])
    return torch.stack(images), labels


def train_model(records, seed=0, config=None, cache_dir=None, num_threads=1, log=print):
    """Trains a :class:`ShapeNet` on the train records, or loads the weights
    a previous call saved for the same seed and configuration.

    Args:
        records: records from :func:`generate_images`; the train ones are
            used
        seed (0): the seed of the initialisation and the batch order
        config (None): a :class:`DemoConfig`
        cache_dir (None): where ``model.pt`` is saved and loaded from
        num_threads (1): torch CPU threads while training. One by default:
            convolutions this small gain little from more, OpenMP threads
            slow down badly when other processes share the cores, and a
            fixed count makes the result the same on every machine
        log (print): where progress messages go

    Returns:
        a :class:`cam_plugin.Classifier` (module in eval mode, transforms,
        class names)
    """
    from cam_plugin import Classifier

    config = config or DemoConfig()
    key = config.model_key(seed)
    transforms = model_transforms(config.input_size)
    module = ShapeNet(config.layers)
    path = os.path.join(cache_dir, "model.pt") if cache_dir else None

    saved = torch.load(path, map_location="cpu", weights_only=True) if path and os.path.isfile(path) else None
    if saved and saved.get("key") == key:
        module.load_state_dict(saved["state_dict"])
        log(f"Reusing the model trained before ({path})")
    else:
        train = [r for r in records if r["split"] == "train"]
        x, y = _load_tensors(train, transforms)
        _fit(module, x, y, seed, config, num_threads, log)
        if path:
            os.makedirs(cache_dir, exist_ok=True)
            state = {"key": key, "config": repr(config), "state_dict": module.state_dict()}
            torch.save(state, path)

    module.eval()
    return Classifier(module, transforms, list(CLASSES), f"demo ShapeNet (seed {seed})")


def _fit(module, x, y, seed, config, num_threads, log):
    """Minibatch Adam with a one-cycle schedule on in-memory tensors;
    deterministic given the seed and thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(num_threads)))
    torch.manual_seed(seed)
    order_rng = torch.Generator().manual_seed(seed)
    for m in module.modules():  # initialise under the seed
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()

    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr, weight_decay=1e-4)
    steps = config.epochs * math.ceil(len(x) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()

    try:
        module.train()
        for epoch in range(config.epochs):
            order = torch.randperm(len(x), generator=order_rng)
            correct, total_loss = 0, 0.0
            for start in range(0, len(x), config.batch_size):
                idx = order[start : start + config.batch_size]
                logits = module(x[idx])
                loss = loss_fn(logits, y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                total_loss += loss.item() * len(idx)
                correct += (logits.argmax(1) == y[idx]).sum().item()
            if (epoch + 1) % 5 == 0 or epoch + 1 == config.epochs:
                log(
                    f"  epoch {epoch + 1}/{config.epochs}: loss {total_loss / len(x):.3f}, "
                    f"train accuracy {correct / len(x):.1%}"
                )
    finally:
        module.eval()
        torch.set_num_threads(previous)


def train_accuracy(classifier, records):
    """The classifier's accuracy on the train records (eval mode)."""
    train = [r for r in records if r["split"] == "train"]
    x, y = _load_tensors(train, classifier.transforms)
    with torch.no_grad():
        pred = torch.cat([classifier.module(b).argmax(1) for b in x.split(256)])
    return (pred == y).float().mean().item()


# ---------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------


def build_dataset(records, name=DATASET_NAME):
    """Builds the FiftyOne dataset of the images, replacing any dataset of
    that name.

    Each sample has ``ground_truth`` (``fo.Classification``, the shape),
    ``objects`` (``fo.Detections`` with the shape's box), ``cue_marker``
    (``fo.Detections`` with the marker's box, labelled ``"<class> cue"``),
    ``scene`` (both boxes: what :func:`cam_plugin.compute_context` names
    the attention by),
    ``cue`` (the class whose cue is shown), ``cue_swapped``, ``faint``,
    ``shape_contrast``, the tag ``train`` or ``test``, and metadata.

    Returns:
        a persistent ``fo.Dataset``
    """
    import fiftyone as fo

    if fo.dataset_exists(name):
        fo.delete_dataset(name)

    samples = []
    for r in records:
        samples.append(
            fo.Sample(
                filepath=r["filepath"],
                tags=[r["split"]],
                ground_truth=fo.Classification(label=r["label"]),
                objects=fo.Detections(
                    detections=[fo.Detection(label=r["label"], bounding_box=r["box"])]
                ),
                cue_marker=fo.Detections(
                    detections=[fo.Detection(label=f"{r['cue']} cue", bounding_box=r["cue_box"])]
                ),
                scene=fo.Detections(
                    detections=[
                        fo.Detection(label=r["label"], bounding_box=r["box"]),
                        fo.Detection(label=f"{r['cue']} cue", bounding_box=r["cue_box"]),
                    ]
                ),
                cue=r["cue"],
                cue_swapped=r["cue_swapped"],
                faint=r["faint"],
                shape_contrast=r["contrast"],
            )
        )

    dataset = fo.Dataset(name)
    dataset.persistent = True
    dataset.add_samples(samples)
    dataset.compute_metadata()
    return dataset


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def evaluate(samples, heatmap_field=HEATMAP_FIELD, pred_field="cam_prediction"):
    """Measures the attention with the plugin itself: ``compute_attention``
    against the shapes' boxes, then the attention views, and records per
    sample whether its prediction followed a swapped cue (``followed_cue``,
    known by construction).

    Returns:
        a dict of per-sample lists: ``id``, ``label``, ``pred``, ``cue``,
        ``swapped``, ``faint``, ``in_box`` (the object energy) and
        ``flagged`` (in the ``misclassified_background`` view), plus
        ``class_summary``, the per-class summary rows
    """
    import cam_plugin

    cam_plugin.compute_attention(samples, heatmap_field, region_field="objects", overwrite=True)
    views = cam_plugin.attention_views(samples, heatmap_field)
    flagged = set(views["misclassified_background"].values("id"))

    ids, labels, preds, cues, swapped, faint, in_box = samples.values(
        [
            "id",
            "ground_truth.label",
            f"{pred_field}.label",
            "cue",
            "cue_swapped",
            "faint",
            f"{heatmap_field}_object_energy",
        ]
    )
    followed = [bool(s and p == c != g) for g, p, c, s in zip(labels, preds, cues, swapped)]
    samples._root_dataset.set_values("followed_cue", dict(zip(ids, followed)), key_field="id")
    # (views of the background intervention, when compute_reliance ran)
    confirmed = views.get("confirmed_background_reliance")
    confirmed = set(confirmed.values("id")) if confirmed is not None else set()
    unfaithful = views.get("unfaithful_heatmap")
    unfaithful = set(unfaithful.values("id")) if unfaithful is not None else set()
    return {
        "id": ids,
        "label": labels,
        "pred": preds,
        "cue": cues,
        "swapped": swapped,
        "faint": faint,
        "in_box": [float("nan") if v is None else v for v in in_box],
        "flagged": [i in flagged for i in ids],
        "confirmed": [i in confirmed for i in ids],
        "unfaithful": [i in unfaithful for i in ids],
        "class_summary": cam_plugin.class_summary(samples, heatmap_field),
    }


def summarize(values):
    """The demo's numbers from :func:`evaluate`'s values.

    Returns:
        a dict: counts and accuracies of unswapped/swapped samples, how many
        predictions followed the cue (of the faint and the clear shapes),
        the mean and median in-box mass of cue-followers and of correct
        unswapped samples, and the precision and recall with which the
        ``misclassified_background`` view finds the cue-followers
    """
    label = np.array(values["label"], dtype=object)
    pred = np.array(values["pred"], dtype=object)
    cue = np.array(values["cue"], dtype=object)
    swapped = np.array(values["swapped"], dtype=bool)
    faint = np.array(values["faint"], dtype=bool)
    in_box = np.array(values["in_box"], dtype=float)

    correct = pred == label
    followed = swapped & (pred == cue) & ~correct
    correct_unswapped = correct & ~swapped
    flagged = np.array(values["flagged"], dtype=bool)
    confirmed = np.array(values.get("confirmed", [False] * len(label)), dtype=bool)

    def mean(mask):
        return float(np.nanmean(in_box[mask])) if np.any(mask) else float("nan")

    def median(mask):
        return float(np.nanmedian(in_box[mask])) if np.any(mask) else float("nan")

    def ratio(a, b):
        return float(a / b) if b else float("nan")

    n_swapped = int(swapped.sum())
    return {
        "n_test": len(label),
        "n_unswapped": int((~swapped).sum()),
        "n_swapped": n_swapped,
        "acc_unswapped": ratio((correct & ~swapped).sum(), (~swapped).sum()),
        "acc_swapped": ratio((correct & swapped).sum(), n_swapped),
        "n_followed": int(followed.sum()),
        "follow_rate": ratio(followed.sum(), n_swapped),
        "follow_rate_faint": ratio((followed & faint).sum(), (swapped & faint).sum()),
        "follow_rate_clear": ratio((followed & ~faint).sum(), (swapped & ~faint).sum()),
        "n_other_errors": int((~correct & ~followed).sum()),
        "in_box_followed": mean(followed),
        "in_box_followed_median": median(followed),
        "in_box_correct": mean(correct_unswapped),
        "in_box_correct_median": median(correct_unswapped),
        "in_box_correct_clear": mean(correct_unswapped & ~faint),
        "in_box_correct_faint": mean(correct_unswapped & faint),
        "n_flagged": int(flagged.sum()),
        "flag_precision": ratio((flagged & followed).sum(), flagged.sum()),
        "flag_recall": ratio((flagged & followed).sum(), followed.sum()),
        "n_confirmed": int(confirmed.sum()),
        "confirmed_precision": ratio((confirmed & followed).sum(), confirmed.sum()),
        "confirmed_recall": ratio((confirmed & followed).sum(), followed.sum()),
        "n_unfaithful": int(np.sum(values.get("unfaithful", []))),
    }


def _aligned(rows, others):
    """``others``' rows in the order of ``rows`` (by class)."""
    by_class = {r.class_name: r for r in others}
    return [by_class[r.class_name] for r in rows]


def format_summary(info):
    """The demo's results as readable text."""
    m = info["metrics"]
    t = info["timings"]
    pct = lambda v: "n/a" if v != v else f"{v:.0%}"  # noqa: E731
    num = lambda v: "n/a" if v != v else f"{v:.2f}"  # noqa: E731
    lines = [
        "",
        f"Training accuracy: {pct(info['train_accuracy'])} (the cue matches the class "
        f"for {pct(info['config'].train_cue_rate)} of the train images)",
        f"Test split, {m['n_test']} images:",
        f"  accuracy where the cue matches the class: {pct(m['acc_unswapped'])} "
        f"of {m['n_unswapped']}",
        f"  accuracy where the cue is swapped:        {pct(m['acc_swapped'])} "
        f"of {m['n_swapped']}",
        f"  predictions that followed the swapped cue: {m['n_followed']} of "
        f"{m['n_swapped']} ({pct(m['follow_rate'])}; faint shapes "
        f"{pct(m['follow_rate_faint'])}, clear shapes {pct(m['follow_rate_clear'])})",
        f"  other errors: {m['n_other_errors']}",
        "Object energy (share of the predicted-class Grad-CAM mass inside the shape's box):",
        f"  predictions that followed the cue: mean {num(m['in_box_followed'])}, "
        f"median {num(m['in_box_followed_median'])}",
        f"  correct, cue matching the class:   mean {num(m['in_box_correct'])}, "
        f"median {num(m['in_box_correct_median'])} (clear shapes "
        f"{num(m['in_box_correct_clear'])}, faint {num(m['in_box_correct_faint'])})",
        f"View 'misclassified_background': {m['n_flagged']} samples; precision "
        f"{num(m['flag_precision'])}, recall {num(m['flag_recall'])} for the cue-followers",
        f"View 'confirmed_background_reliance' (the background intervention agrees): "
        f"{m['n_confirmed']} samples; precision {num(m['confirmed_precision'])}, recall "
        f"{num(m['confirmed_recall'])}; 'unfaithful_heatmap': {m['n_unfaithful']} samples",
        "Classes by share of samples looking off the object:",
        *[
            f"  {r['class']:<10} {pct(r['off_object_share'])} of {r['samples']} "
            f"(accuracy {pct(r['accuracy'])})"
            for r in info["class_summary"]
        ],
        "Background reliance by class (+1: the background carries the prediction, -1: the "
        "shape does; the background gap is accuracy minus accuracy on another class's "
        "background, ImageNet-9's Mixed-Rand):",
        *[
            f"  {r.class_name:<10} reliance {r.mean_reliance:+.2f}, prediction changes without "
            f"the background {pct(r.bg_flip_rate)}, without the shape {pct(r.obj_flip_rate)}; "
            f"background gap {pct(g.background_gap)}"
            for r, g in zip(info["reliance_summary"], _aligned(info["reliance_summary"], info["swap_summary"]))
        ],
        "Where the attention falls, by class (share of the map on each labelled box; "
        "among the misclassified):",
        *[
            f"  {r.class_name:<10} "
            + ", ".join(
                f"{name} {pct(share)} ({pct(r.misclassified_shares.get(name, 0.0))})"
                for name, share in list(r.shares.items())[:3]
            )
            for r in info["context_summary"]
        ],
        "Cues the model attends to off the shape (hotspots grouped by the CAM layer's "
        "features; named by the scene's boxes; saved views '<run>-<n>-<name>'):",
        *[
            f"  {g.group}. {g.name:<14} {g.size} hotspots in {g.samples} samples, "
            f"{g.mistakes} misclassified ({pct(g.mistake_rate)}); predicted "
            + ", ".join(f"{c} {n}" for c, n in list(g.pred_classes.items())[:3])
            for g in info["cue_groups"]
        ],
        str(info["cam_summary"]),
        f"Timings: images {t['generate']:.1f} s, training {t['train']:.1f} s, "
        f"CAMs {t['cams']:.1f} s, background interventions {t['reliance']:.1f} s, "
        f"cue discovery {t['cues']:.1f} s",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------


def run_demo(
    dir,
    seed=0,
    app=False,
    config=None,
    name=DATASET_NAME,
    progress=True,
    log=print,
    port=None,
):
    """Runs the whole demo: images, model, dataset, CAMs, measurements.

    Args:
        dir: the demo directory (images, ``records.json``, ``model.pt`` and
            the heatmaps), created if needed
        seed (0): the random seed of the images and the training
        app (False): launch the FiftyOne App on the dataset and wait
        config (None): a :class:`DemoConfig`
        name: the dataset's name (replaced if it exists)
        progress (True): show a progress bar while computing CAMs
        log (print): where messages go
        port (None): the App's port (FiftyOne's default, 5151, if None)

    Returns:
        a tuple ``(dataset, info)``; ``info`` holds ``metrics`` (see
        :func:`summarize`), ``train_accuracy``, ``timings`` (seconds of
        ``generate``, ``train``, ``cams``), ``cam_summary``, ``config``,
        ``seed`` and ``summary`` (the printed text)
    """
    import cam_plugin
    from fiftyone import ViewField as F

    config = config or DemoConfig()
    dir = os.path.abspath(os.path.expanduser(dir))
    os.makedirs(dir, exist_ok=True)
    timings = {}

    log(f"Drawing {config.n_train} train and {config.n_test} test images in {dir}")
    started = time.perf_counter()
    records = generate_images(dir, seed=seed, config=config)
    timings["generate"] = time.perf_counter() - started

    log("Training the CNN")
    started = time.perf_counter()
    classifier = train_model(records, seed=seed, config=config, cache_dir=dir, log=log)
    timings["train"] = time.perf_counter() - started
    accuracy = train_accuracy(classifier, records)

    dataset = build_dataset(records, name)
    test = dataset.match_tags("test")

    log(f"Computing Grad-CAM maps for the {len(test)} test images")
    # the dataset was just replaced, so heatmaps of an earlier run are stale
    heatmaps_dir = os.path.join(dir, "heatmaps")
    shutil.rmtree(heatmaps_dir, ignore_errors=True)
    started = time.perf_counter()
    cam_summary = cam_plugin.compute_cams(
        test,
        classifier,
        label_field="ground_truth",
        heatmap_field=HEATMAP_FIELD,
        output_dir=heatmaps_dir,
        # the images are tiny: larger batches amortise the per-batch work
        batch_size=64,
        progress=progress,
    )
    timings["cams"] = time.perf_counter() - started

    log("Testing whether the predictions depend on the background")
    started = time.perf_counter()
    # the shape's box painted over, or everything but it: with the mean
    # colour for the views, and on another class's background (ImageNet-9's
    # Mixed-Rand) for the background gap
    cam_plugin.compute_reliance(
        test, classifier, region_field="objects", batch_size=64, overwrite=True, progress=progress
    )
    cam_plugin.compute_reliance(
        test, classifier, region_field="objects", fill="swap", prefix="cam_swap", batch_size=64,
        overwrite=True, progress=progress,
    )
    timings["reliance"] = time.perf_counter() - started
    cam_plugin.compute_context(test, HEATMAP_FIELD, "scene", overwrite=True, progress=progress)

    log("Discovering the cues the model attends to off the shape")
    started = time.perf_counter()
    # hotspots off the shape, embedded with the CAM layer's features and
    # grouped; the scene's boxes name the groups
    cam_plugin.discover_cues(
        test, classifier, region_field="objects", batch_size=64, overwrite=True, progress=progress
    )
    timings["cues"] = time.perf_counter() - started

    log("Measuring where the model looked")
    values = evaluate(test)
    metrics = summarize(values)
    dataset.save_view(
        "followed-cue",
        test.match(F("followed_cue")),
        description="Predicted the class of the swapped cue (known by construction)",
        overwrite=True,
    )

    info = {
        "seed": seed,
        "config": config,
        "train_accuracy": accuracy,
        "metrics": metrics,
        "class_summary": values["class_summary"],
        "reliance_summary": cam_plugin.reliance_summary(test),
        "swap_summary": cam_plugin.reliance_summary(test, "cam_swap"),
        "context_summary": cam_plugin.context_summary(test),
        "cue_groups": cam_plugin.cue_groups(test),
        "cam_summary": cam_summary,
        "timings": timings,
    }
    info["summary"] = format_summary(info)
    log(info["summary"])

    if app:
        import fiftyone as fo

        session = fo.launch_app(dataset, **({"port": port} if port else {}))
        log(f"The App is at {session.url}: press ` for the plugin's operators")
        session.wait()

    return dataset, info


def main(argv=None):
    """The command line: ``python examples/demo.py --dir DIR [--app]
    [--seed N]``."""
    parser = argparse.ArgumentParser(
        prog="python examples/demo.py",
        description="Trains a small CNN on synthetic shapes with a planted "
        "background cue and shows, with Grad-CAM, where it looks.",
    )
    parser.add_argument("--dir", required=True, help="where images, model and heatmaps are kept")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--name", default=DATASET_NAME, help=f"dataset name (default {DATASET_NAME})"
    )
    parser.add_argument("--app", action="store_true", help="open the FiftyOne App on the dataset")
    parser.add_argument("--port", type=int, help="the App's port (default: FiftyOne's, 5151)")
    parser.add_argument(
        "--small",
        action="store_true",
        help=f"a quicker demo: {SMALL.n_train} training and {SMALL.n_test} test images",
    )
    parser.add_argument(
        "--db",
        help="keep the database in this directory, served by a MongoDB server of the "
        "demo's own (default: FiftyOne's configured database)",
    )
    args = parser.parse_args(argv)
    if args.db:
        # before FiftyOne is imported: it reads the database URI once
        from cam_plugin import private_db

        private_db.use(os.path.abspath(args.db))
        os.environ.setdefault("FIFTYONE_DEFAULT_DATASET_DIR", os.path.join(os.path.abspath(args.dir), "files"))

    run_demo(
        args.dir,
        seed=args.seed,
        app=args.app,
        name=args.name,
        config=SMALL if args.small else None,
        port=args.port,
    )


if __name__ == "__main__":
    main()
