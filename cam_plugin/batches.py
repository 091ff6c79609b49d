"""From decoded sample images to predictions and quantised full-frame maps,
batch by batch, on the model's device. No FiftyOne here: the pipeline turns
these results into labels and files.
"""

from dataclasses import dataclass

import numpy as np
import torch

from .frames import TransformError, frame_size, input_window, to_frame
from .heatmaps import quantize
from .images import ImageError, load_rgb


class SampleImages(torch.utils.data.Dataset):
    """Decodes and preprocesses sample images; a failure becomes a record
    with the reason instead of an exception, so it never stops the loader."""

    def __init__(self, filepaths, transforms, min_side):
        self.filepaths = filepaths
        self.transforms = transforms
        self.min_side = min_side
        self._windows = {}

    def __len__(self):
        return len(self.filepaths)

    def __getitem__(self, index):
        path = self.filepaths[index]
        try:
            img, (full_w, full_h) = load_rgb(path, min_side=self.min_side)
            tensor = self.transforms(img)
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
                raise TransformError(
                    "transforms must return a (channels, height, width) tensor, "
                    f"got {type(tensor).__name__} {tuple(getattr(tensor, 'shape', ()))}"
                )
            if not tensor.is_floating_point():
                raise TransformError(
                    f"transforms returned a {tensor.dtype} tensor; add ToTensor() "
                    "or ToDtype(torch.float32, scale=True)"
                )

            window = self._window(img.size, tuple(tensor.shape[-2:]))
            window = window.scaled(full_w / img.size[0], full_h / img.size[1])
            return {
                "index": index,
                "tensor": tensor,
                "size": (full_w, full_h),
                "window": window.as_tuple(),
                "error": None,
            }
        except (ImageError, TransformError) as e:
            return {"index": index, "error": str(e)}
        except Exception as e:  # a transform failing on one image
            return {"index": index, "error": f"preprocessing failed: {type(e).__name__}: {e}"}

    def _window(self, size, out_hw):
        key = (size, out_hw)
        window = self._windows.get(key)
        if window is None:
            window = input_window(self.transforms, size[0], size[1], output_hw=out_hw)
            self._windows[key] = window
        return window


def _collate(items):
    return items


@dataclass
class Group:
    """Loaded samples whose tensors stack: one (N, C, H, W) tensor and the
    samples' metadata (``index``, ``size``, ``window``; the pipeline adds
    ``id`` and ``gt``)."""

    tensor: torch.Tensor
    items: list

    def __len__(self):
        return len(self.items)

    def split(self, start, stop):
        return Group(self.tensor[start:stop], self.items[start:stop])

    def pin_memory(self):
        # called by the DataLoader's pin-memory thread: a stacked, pinned
        # batch makes the host-to-device copy asynchronous
        return Group(self.tensor.pin_memory(), self.items)


def collate_groups(items):
    """The DataLoader's collate function, run in the loader workers: stacks
    the successfully loaded samples by tensor shape and sets aside the
    failures.

    Returns:
        a dict with ``groups`` (a list of :class:`Group`) and ``failed``
        (the items with an ``error``)
    """
    shapes = {}
    failed = []
    for item in items:
        if item["error"] is not None:
            failed.append(item)
        else:
            shapes.setdefault(tuple(item["tensor"].shape), []).append(item)

    groups = []
    for members in shapes.values():
        tensor = torch.stack([m.pop("tensor") for m in members])
        groups.append(Group(tensor, members))
    return {"groups": groups, "failed": failed}


@dataclass
class FramedMap:
    """One target's map of one sample, in the full image frame.

    Attributes:
        levels: (h, w) uint16 array, proportional to the raw map
        raw_max: the raw map's maximum (``levels`` 65535 stands for it)
        class_index: the class the map explains
    """

    levels: np.ndarray
    raw_max: float
    class_index: int


@dataclass
class SampleResult:
    pred: int
    confidence: float
    logits: np.ndarray
    maps: dict


def compute_batch(extractor, group, picks, heatmap_size, device):
    """Predictions and framed, quantised maps of a batch of loaded samples.

    Args:
        extractor: a :class:`cam_plugin.cams.CamExtractor`
        group: a :class:`Group`, each item with a ``gt`` class index (-1
            when unknown)
        picks: a dict mapping target names to ``pick(logits, gt) -> (B,)``
            class indices
        heatmap_size: the longest side of the framed maps
        device: the device to run on

    Returns:
        a list of :class:`SampleResult`, one per item; a target a sample has
        no class for (no ground truth) is missing from its ``maps``
    """
    items = group.items
    x = group.tensor.to(device, non_blocking=True)
    gt = torch.tensor([item["gt"] for item in items], device=device)
    target_fns = {name: (lambda logits, pick=pick: pick(logits, gt)) for name, pick in picks.items()}
    result = extractor(x, target_fns)

    conf, pred = torch.softmax(result.logits, dim=1).max(dim=1)
    logits = result.logits.cpu().numpy()
    pred = pred.cpu().tolist()
    conf = conf.cpu().tolist()
    classes = result.classes.cpu().numpy()
    valid = result.valid.cpu().numpy()

    windows = torch.tensor([item["window"] for item in items], dtype=torch.float32)
    sizes = [tuple(item["size"]) for item in items]
    out_sizes = [frame_size(w, h, heatmap_size) for w, h in sizes]
    maps = [{} for _ in items]
    windows = windows.to(result.maps.device)
    for t, name in enumerate(result.target_names):
        framed = to_frame(result.maps[:, t], windows, sizes, out_sizes)
        levels, raw_max = quantize(framed)
        for row, (w, h) in enumerate(out_sizes):
            if valid[row, t]:
                maps[row][name] = FramedMap(
                    levels[row, :h, :w], float(raw_max[row]), int(classes[row, t])
                )

    return [
        SampleResult(pred[i], conf[i], logits[i], maps[i]) for i in range(len(items))
    ]
