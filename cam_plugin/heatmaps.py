"""Heatmap files: quantising maps to 16-bit PNGs on the device, writing them
(atomically, :func:`cam_plugin.store.files.write_png_atomic`) in a thread
pool, and reading them back.

Each PNG holds ``round(value / raw_max * 65535)``: proportional to the raw
CAM values (zero stays zero, no per-image minimum is subtracted), with the
image's raw maximum stored on the ``fo.Heatmap`` as ``raw_max`` so raw values
can be recovered: ``raw = level / 65535 * raw_max``.

The label's ``range`` tells the App how to draw the PNG: the App maps a level
``v`` to the colorscale's position ``(v - start) / (stop - start)`` (capped
at its last colour) and draws levels below ``start`` as transparent, so the
weakest attention does not wash the whole image in the colorscale's darkest
colour. Two scales (:func:`display_range`):

-   ``"map"`` (the default): ``[6554, 65535]``: each map is drawn against its
    own maximum (its peak gets the colorscale's last colour) and its weakest
    10% is transparent
-   ``"dataset"``: ``[0.1 * U, U]`` with ``U = 65535 * dataset_max /
    raw_max``: every map is drawn against the largest raw value of its field
    in the dataset, so the same raw value gets the same colour on every
    sample (a map whose maximum is half the dataset's never gets past the
    middle of the colorscale), and raw values below 10% of the dataset's
    maximum are transparent

Only the labels' ranges change between the two; the PNGs stay as written.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from .store.files import write_png_atomic

PNG_MAX = 65535
DISPLAY_THRESHOLD = 0.1
HEATMAP_RANGE = [round(DISPLAY_THRESHOLD * PNG_MAX), PNG_MAX]

#: how heatmaps are scaled for display: ``"map"``, each to its own maximum;
#: ``"dataset"``, all to the largest value of their field in the dataset
HEATMAP_SCALES = ("map", "dataset")


def display_range(raw_max, scale="map", dataset_max=None):
    """The ``range`` a heatmap label is drawn with in the App.

    Args:
        raw_max: the map's raw maximum (its PNG level 65535)
        scale ("map"): ``"map"`` or ``"dataset"``
        dataset_max (None): for ``"dataset"``, the largest ``raw_max`` of
            the field in the dataset

    Returns:
        ``[start, stop]``: :data:`HEATMAP_RANGE` for ``"map"`` (and for a map
        that is zero everywhere); for ``"dataset"``, ``[0.1 * U, U]`` with
        ``U = 65535 * dataset_max / raw_max``, where the App draws the raw
        value ``r`` at the colorscale position ``(r - 0.1 * dataset_max) /
        (0.9 * dataset_max)`` on every sample
    """
    check_scale(scale)
    if scale == "map" or not raw_max or raw_max <= 0 or not dataset_max or dataset_max <= 0:
        return list(HEATMAP_RANGE)
    stop = PNG_MAX * float(dataset_max) / float(raw_max)
    return [DISPLAY_THRESHOLD * stop, stop]


def check_scale(scale):
    """Returns ``scale`` if it is one of :data:`HEATMAP_SCALES`; raises
    ValueError otherwise."""
    if scale not in HEATMAP_SCALES:
        raise ValueError(
            f"Unknown heatmap scale {scale!r}: use 'map' (each map scaled to its own "
            "maximum) or 'dataset' (one scale for the whole dataset: the same value, "
            "the same colour on every sample)"
        )
    return scale


def quantize(maps):
    """Quantises (N, h, w) non-negative maps to 16-bit levels on their device.

    Returns:
        a tuple ``(levels, raw_max)``: a (N, h, w) uint16 numpy array on the
        CPU, and a (N,) float numpy array of each map's maximum
    """
    maps = maps.float().clamp_min(0)
    peak = maps.flatten(1).amax(dim=1)
    scale = torch.where(peak > 0, PNG_MAX / peak, torch.zeros_like(peak))
    levels = (maps * scale[:, None, None]).round_().clamp_(0, PNG_MAX)
    levels = levels.to(torch.int32).cpu().numpy().astype(np.uint16)
    return levels, peak.cpu().numpy().astype(np.float64)


def read_levels(path):
    """Reads a heatmap PNG as a float32 array of its stored levels."""
    with Image.open(path) as img:
        return np.asarray(img, dtype=np.float32)


def read_heatmap(heatmap):
    """Returns a ``fo.Heatmap``'s values as a float32 array, in raw CAM units
    when the label has ``raw_max``, else in the label's stored units."""
    if heatmap.map is not None:
        values = np.asarray(heatmap.map, dtype=np.float32)
    else:
        values = read_levels(heatmap.map_path)

    raw_max = heatmap.get_field("raw_max") if heatmap.has_field("raw_max") else None
    if raw_max is not None:
        values = values * (float(raw_max) / PNG_MAX)

    return values


class PngWriter:
    """Encodes and writes heatmap PNGs in background threads.

    ``submit`` returns immediately; ``wait`` blocks until every file submitted
    so far is on disk and re-raises the first write error.
    """

    def __init__(self, num_threads=2):
        self._pool = ThreadPoolExecutor(max_workers=max(1, num_threads))
        self._pending = []

    def submit(self, path, levels):
        self._pending.append(self._pool.submit(write_png_atomic, path, levels))

    def wait(self):
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]
        errors = [e for e in errors if e is not None]
        if errors:
            raise errors[0]

    def close(self):
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.close()
        return False
