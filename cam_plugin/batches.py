"""From a group of loaded sample images to predictions and quantised
full-frame maps, on the model's device. No FiftyOne here: the CAM run type
turns these results into labels and files.
"""

from dataclasses import dataclass

import numpy as np
import torch

from .frames import frame_size, to_frame
from .heatmaps import quantize


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
    """One sample's prediction (the arg-max class and its softmax
    probability), logits, maps by target name, and for a multi-label run
    every class's sigmoid probability."""

    pred: int
    confidence: float
    logits: np.ndarray
    maps: dict
    probabilities: np.ndarray = None


def _gt_tensor(gt, device):
    # candidate sets, padded with -1 to one (B, K) tensor
    if any(isinstance(g, (list, tuple)) for g in gt):
        width = max(1, max(len(g) for g in gt))
        gt = [list(g) + [-1] * (width - len(g)) for g in gt]
    return torch.tensor(gt, dtype=torch.long, device=device)


def best_candidate(logits, candidates):
    """Per row, the candidate class the model scores highest, or -1 for a
    row without candidates (no map is made for it).

    Args:
        logits: (B, C) class scores
        candidates: (B, K) class indices, padded with -1
    """
    valid = candidates >= 0
    scores = logits.gather(1, candidates.clamp(min=0)).float()
    scores = scores.masked_fill(~valid, float("-inf"))
    best = candidates.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
    return torch.where(valid.any(1), best, torch.full_like(best, -1))


def compute_batch(extractor, group, gt, picks, heatmap_size, device, multilabel=False):
    """Predictions and framed, quantised maps of a batch of loaded samples.

    Args:
        extractor: a :class:`cam_plugin.cams.CamExtractor`
        group: a :class:`cam_plugin.engine.Group`
        gt: the items' ground-truth class indices (-1 when unknown), or per
            item a sequence of candidate indices (a class map's set; empty
            when unknown), which the ``gt`` pick chooses among (see
            :func:`best_candidate`)
        picks: a dict mapping target names to ``pick(logits, gt) -> (B,)``
            class indices
        heatmap_size: the longest side of the framed maps
        device: the device to run on
        multilabel (False): also return each class's sigmoid probability
            (the scores of a multi-label model are independent logits)

    Returns:
        a list of :class:`SampleResult`, one per item; a target a sample has
        no class for (no ground truth) is missing from its ``maps``
    """
    items = group.items
    x = group.tensor.to(device, non_blocking=True)
    gt = _gt_tensor(list(gt), device)
    target_fns = {name: (lambda logits, pick=pick: pick(logits, gt)) for name, pick in picks.items()}
    result = extractor(x, target_fns)

    conf, pred = torch.softmax(result.logits, dim=1).max(dim=1)
    probabilities = [None] * len(items)
    if multilabel:
        probabilities = list(torch.sigmoid(result.logits).cpu().numpy())
    logits = result.logits.cpu().numpy()
    pred = pred.cpu().tolist()
    conf = conf.cpu().tolist()
    classes = result.classes.cpu().numpy()
    valid = result.valid.cpu().numpy()

    windows = torch.tensor([item.window for item in items], dtype=torch.float32)
    sizes = [tuple(item.size) for item in items]
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
        SampleResult(pred[i], conf[i], logits[i], maps[i], probabilities[i]) for i in range(len(items))
    ]
