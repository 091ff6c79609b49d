"""Labelled regions (boxes, polygons, masks, heatmaps) rasterised as boolean
torch masks over a grid of pixel centres covering the full image frame.

Pixel ``(i, j)`` of an ``H x W`` grid has the normalised centre
``(cx, cy) = ((j + 0.5) / W, (i + 0.5) / H)``; a pixel belongs to a region
iff its centre does:

- ``fo.Detection`` box ``[x, y, w, h]``: ``x <= cx < x + w`` and
  ``y <= cy < y + h``; with an instance mask (``mask`` or ``mask_path``,
  covering the box) the pixel must also have
  ``mask[min(mh - 1, floor((cy - y) / h * mh)), min(mw - 1, floor((cx - x) / w * mw))]``
  non-zero.
- ``fo.Polyline`` that is ``closed`` or ``filled``: the even-odd
  (crossing-number) rule over all of its shapes together, so holes work;
  open, unfilled polylines contribute nothing.
- ``fo.Segmentation``: ``mask[floor(cy * mh), floor(cx * mw)]`` (nearest,
  clamped) is one of the object values.
- ``fo.Heatmap``: the value sampled the same way is
  ``>= threshold * range_max``.
- ``fo.Detections`` / ``fo.Polylines``: the union over the selected labels.

All per-pixel work is vectorised in torch; coordinates are compared in
float64 so that the masks are exact, not approximately right.
"""

import math

import fiftyone.core.labels as fol
import numpy as np
import torch
from PIL import Image

# Bounds the (rows x edges) crossing table of one polygon, in elements
_POLYGON_BLOCK = 1 << 22
# Boxes rasterised together by pattern lookup (the table has 2**this rows)
_BOXES_PER_PATTERN = 6


def pixel_centres(height, width, device="cpu"):
    """Returns the normalised pixel centres ``(cy (H,), cx (W,))`` in float64.

    Float64 keeps ``(j + 0.5) / W`` bit-identical to the same expression in
    plain Python, so boundary pixels are decided the same way everywhere.
    """
    cy = (torch.arange(height, dtype=torch.float64, device=device) + 0.5) / height
    cx = (torch.arange(width, dtype=torch.float64, device=device) + 0.5) / width
    return cy, cx


def box_masks(boxes, valid, height, width):
    """Rasterises batches of boxes: the union of each row's valid boxes.

    Args:
        boxes: a (N, K, 4) tensor of normalised ``[x, y, w, h]`` boxes
        valid: a (N, K) bool tensor, or None for all valid; invalid boxes
            are ignored (padding for samples with fewer than K boxes)
        height, width: the grid size

    Returns:
        a (N, height, width) bool tensor on the boxes' device
    """
    boxes = torch.as_tensor(boxes).to(torch.float64)
    cy, cx = pixel_centres(height, width, device=boxes.device)
    x, y, w, h = boxes.unbind(-1)
    # A box is the outer product of a row interval and a column interval
    rows = (y[..., None] <= cy) & (cy < (y + h)[..., None])  # (N, K, H)
    cols = (x[..., None] <= cx) & (cx < (x + w)[..., None])  # (N, K, W)
    if valid is not None:
        rows &= torch.as_tensor(valid, device=boxes.device).bool()[..., None]

    num, num_boxes = rows.shape[:2]
    region = None
    for start in range(0, num_boxes, _BOXES_PER_PATTERN):
        group = slice(start, start + _BOXES_PER_PATTERN)
        part = _union_of_boxes(rows[:, group], cols[:, group])
        region = part if region is None else region.logical_or_(part)
    if region is None:
        return torch.zeros((num, height, width), dtype=torch.bool, device=boxes.device)
    return region


def _union_of_boxes(rows, cols):
    """The union of K boxes given as (N, K, H) rows and (N, K, W) columns.

    A pixel row's content depends only on which boxes cover that row, one of
    2**K patterns: the column mask of every pattern is tabulated, and the
    rows are then copied from the table. Copying whole rows is much faster
    on CPU than combining K broadcast boolean products pixel by pixel.
    """
    num, num_boxes, height = rows.shape
    width = cols.shape[2]
    # table[:, p] is the union of the columns of the boxes in bit pattern p,
    # built by doubling: patterns with bit k are those without it, | box k
    table = torch.zeros((num, 1, width), dtype=torch.bool, device=rows.device)
    for k in range(num_boxes):
        table = torch.cat([table, table | cols[:, k : k + 1]], dim=1)

    bits = 1 << torch.arange(num_boxes, device=rows.device)
    pattern = (rows.long() * bits[None, :, None]).sum(1)  # (N, H)
    index = torch.arange(num, device=rows.device)[:, None] * (1 << num_boxes) + pattern
    return table.reshape(-1, width).index_select(0, index.reshape(-1)).view(num, height, width)


def region_mask(
    label,
    width,
    height,
    classes=None,
    mask_values=None,
    mask_targets=None,
    heatmap_threshold=0.5,
    device="cpu",
):
    """Rasterises a label's region on a ``height x width`` grid.

    Args:
        label: a ``fo.Detection(s)``, ``fo.Polyline(s)``, ``fo.Segmentation``
            or ``fo.Heatmap``; None gives an empty region
        width, height: the grid size (the grid covers the full image)
        classes: label names to keep (None keeps all); for a segmentation,
            the mask values whose name in ``mask_targets`` is in ``classes``
        mask_values: for a segmentation, the values that are objects
            (default: every non-zero value); combined with ``classes`` the
            object values are those in both
        mask_targets: a segmentation's ``{value: name}`` mapping, needed with
            ``classes``
        heatmap_threshold: a heatmap pixel is an object iff its value is
            ``>= heatmap_threshold * range_max``
        device: the torch device of the result

    Returns:
        a (height, width) bool tensor
    """
    cy, cx = pixel_centres(height, width, device=device)
    region = torch.zeros((height, width), dtype=torch.bool, device=device)

    if label is None:
        return region

    if isinstance(label, (fol.Detection, fol.Detections)):
        dets = label.detections if isinstance(label, fol.Detections) else [label]
        dets = [d for d in dets if classes is None or d.label in classes]
        plain = [d.bounding_box for d in dets if not _has_instance_mask(d) and d.bounding_box]
        if plain:
            # Boxes without instance masks are rasterised together
            boxes = torch.tensor(plain, dtype=torch.float64, device=device)[None]
            region = box_masks(boxes, None, height, width)[0]
        for det in dets:
            if _has_instance_mask(det):
                region |= _detection_mask(det, cy, cx)
        return region

    if isinstance(label, (fol.Polyline, fol.Polylines)):
        polys = label.polylines if isinstance(label, fol.Polylines) else [label]
        for poly in polys:
            if classes is None or poly.label in classes:
                region |= _polyline_mask(poly, cy, cx)
        return region

    if isinstance(label, fol.Segmentation):
        values = _sample_nearest(_segmentation_array(label), cy, cx)
        objects = _object_values(classes, mask_values, mask_targets)
        if objects is None:
            return values != 0
        if not objects:
            return region
        # Membership by binary search: much faster on CPU than torch.isin
        objects = torch.tensor(sorted(objects), dtype=values.dtype, device=device)
        index = torch.searchsorted(objects, values).clamp_(max=len(objects) - 1)
        return objects[index] == values

    if isinstance(label, fol.Heatmap):
        values = _heatmap_array(label)
        rng = label.range or ([0, 1] if values.dtype.kind == "f" else [0, 255])
        return _sample_nearest(values, cy, cx) >= heatmap_threshold * float(rng[1])

    raise TypeError(f"cannot rasterise a region from {type(label).__name__}")


def segmentation_values(segmentation, width, height, device="cpu"):
    """A segmentation's mask values on a ``height x width`` grid covering
    the full image, sampled at the grid's pixel centres (nearest), as an
    int64 tensor."""
    cy, cx = pixel_centres(height, width, device=device)
    return _sample_nearest(_segmentation_array(segmentation), cy, cx).long()


def region_labels(label, mask_targets=None):
    """Returns the set of label names present in a region label.

    For a segmentation, the names (via ``mask_targets``) of the non-zero
    values present in its mask; values without a name are left out, and
    without ``mask_targets`` the set is empty. Heatmaps have no names.
    Open, unfilled polylines are left out, as they make no region.
    """
    if isinstance(label, fol.Detections):
        return {d.label for d in label.detections if d.label is not None}
    if isinstance(label, fol.Polylines):
        return {
            p.label
            for p in label.polylines
            if p.label is not None and (p.closed or p.filled)
        }
    if isinstance(label, fol.Detection):
        return {label.label} if label.label is not None else set()
    if isinstance(label, fol.Polyline):
        return {label.label} if label.label is not None and (label.closed or label.filled) else set()
    if isinstance(label, fol.Segmentation) and mask_targets:
        names = _int_keys(mask_targets)
        present = np.unique(_segmentation_array(label))
        return {names[v] for v in present.tolist() if v != 0 and v in names}
    return set()


def default_region_classes(gt_label, present_labels):
    """Chooses the classes whose objects form a sample's region.

    The region is the labelled objects of the sample's ground-truth class;
    when the sample has no ground-truth label, or no object has that label,
    it is all labelled objects.

    Args:
        gt_label: the ground-truth class name, a label with a ``label``
            attribute (e.g. ``fo.Classification``), or None
        present_labels: the label names present (see :func:`region_labels`)

    Returns:
        ``{gt_label}``, or None meaning all labels
    """
    name = getattr(gt_label, "label", gt_label)
    if name is None or name not in present_labels:
        return None
    return {name}


def _has_instance_mask(detection):
    return detection.mask is not None or detection.mask_path is not None


def _detection_mask(detection, cy, cx):
    """The pixels whose centres are in a detection's box (and instance mask)."""
    if detection.bounding_box is None:
        return torch.zeros((len(cy), len(cx)), dtype=torch.bool, device=cy.device)

    x, y, w, h = (float(v) for v in detection.bounding_box)
    if w <= 0 or h <= 0:
        # No centre satisfies x <= cx < x + w; also avoids dividing by zero
        return torch.zeros((len(cy), len(cx)), dtype=torch.bool, device=cy.device)

    rows = (y <= cy) & (cy < y + h)
    cols = (x <= cx) & (cx < x + w)
    region = rows[:, None] & cols[None, :]

    mask = detection.mask
    if mask is None and detection.mask_path is not None:
        mask = _read_image(detection.mask_path)
    if mask is None:
        return region

    mask = torch.from_numpy(np.asarray(mask) != 0).to(cy.device)
    mh, mw = mask.shape[:2]
    # Clamp both ways: rows outside the box index nothing meaningful, but
    # they are masked out by ``region`` anyway
    mi = ((cy - y) / h * mh).floor().clamp(0, mh - 1).long()
    mj = ((cx - x) / w * mw).floor().clamp(0, mw - 1).long()
    return region & mask[mi[:, None], mj[None, :]]


def _polyline_mask(polyline, cy, cx):
    """The even-odd rule at pixel centres over all shapes of a polyline.

    For each pixel row, a pixel is inside iff an odd number of edges cross
    the horizontal ray to its right; sorting each row's crossing abscissae
    turns that count into one ``searchsorted`` for the whole row.
    """
    height, width = len(cy), len(cx)
    region = torch.zeros((height, width), dtype=torch.bool, device=cy.device)
    if not (polyline.closed or polyline.filled):
        return region

    edges = []
    for shape in polyline.points or []:
        pts = np.asarray(shape, dtype=np.float64).reshape(-1, 2)
        if len(pts) >= 2:
            # Every shape is closed: its last point joins its first
            edges.append(np.concatenate([pts, np.roll(pts, -1, axis=0)], axis=1))
    if not edges:
        return region

    edges = torch.from_numpy(np.concatenate(edges)).to(cy.device)
    x1, y1, x2, y2 = edges.T[:, :, None]
    num_edges = len(edges)

    # Only rows with ymin <= cy < ymax can be crossed by an edge (the
    # straddle test below is half-open the same way); all others stay out
    ys = edges[:, 1::2]
    first, stop = torch.searchsorted(cy, torch.stack([ys.min(), ys.max()])).tolist()
    block = max(1, _POLYGON_BLOCK // num_edges)
    for start in range(first, stop, block):
        py = cy[start : min(stop, start + block)]
        # An edge crosses the row iff its end points lie on either side of it
        crosses = (y1 > py) != (y2 > py)  # (E, rows)
        dy = torch.where(crosses, y2 - y1, torch.ones_like(y1))
        x_cross = x1 + (py - y1) * (x2 - x1) / dy
        # Non-crossing edges go to -inf so that they are never right of a pixel
        x_cross = torch.where(crosses, x_cross, -math.inf).T.contiguous().sort(dim=1).values
        px = cx.expand(len(py), width).contiguous()
        # Crossings strictly right of the pixel centre (x_cross > cx)
        right = num_edges - torch.searchsorted(x_cross, px, right=True)
        region[start : start + len(py)] = right % 2 == 1
    return region


def _sample_nearest(values, cy, cx):
    """Samples a 2-D array at the pixel centres, nearest and clamped:
    ``values[floor(cy * mh), floor(cx * mw)]``."""
    values = np.asarray(values)
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[:, :, 0]
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D mask or map, got shape {values.shape}")

    # torch lacks most ops on unsigned wide ints (e.g. 16-bit PNGs): widen
    if values.dtype.kind in "iu":
        values = values.astype(np.int64)
    elif values.dtype.kind == "f":
        values = values.astype(np.float64)
    tensor = torch.from_numpy(np.ascontiguousarray(values)).to(cy.device)

    mh, mw = values.shape
    mi = (cy * mh).floor().clamp(0, mh - 1).long()
    mj = (cx * mw).floor().clamp(0, mw - 1).long()
    return tensor[mi[:, None], mj[None, :]]


def _object_values(classes, mask_values, mask_targets):
    """The segmentation values that are objects, or None for all non-zero."""
    if classes is None:
        return None if mask_values is None else {int(v) for v in mask_values}
    if mask_targets is None:
        raise ValueError("selecting segmentation classes needs mask_targets")

    named = {value for value, name in _int_keys(mask_targets).items() if name in classes}
    if mask_values is None:
        return named
    return named & {int(v) for v in mask_values}


def _int_keys(mask_targets):
    """Mask targets keyed by int (stored datasets may key them by str)."""
    return {int(value): name for value, name in mask_targets.items()}


def _segmentation_array(segmentation):
    if segmentation.mask is not None:
        return np.asarray(segmentation.mask)
    if segmentation.mask_path is not None:
        return _read_image(segmentation.mask_path)
    raise ValueError("the segmentation has neither mask nor mask_path")


def _heatmap_array(heatmap):
    if heatmap.map is not None:
        return np.asarray(heatmap.map)
    if heatmap.map_path is not None:
        return _read_image(heatmap.map_path)
    raise ValueError("the heatmap has neither map nor map_path")


def _read_image(path):
    """Reads a mask or map image as a numpy array of its stored values
    (palette indices for palette PNGs, 16-bit values for 16-bit PNGs)."""
    with Image.open(path) as img:
        return np.asarray(img)
