"""Attention metrics of class activation maps against labelled regions,
batched in torch on the maps' device.

For a non-negative map ``M`` and a boolean region ``R`` of the same size:

- ``object_energy``: ``sum(M * R) / sum(M)``, the energy-based pointing game
  (Wang et al. 2020, Score-CAM); NaN if ``M`` sums to 0.
- ``object_area``: ``mean(R)``, the share of the frame the region covers,
  i.e. the energy a uniform map would get.
- ``pointing_hit``: 1 if some pixel attaining the maximum of ``M`` lies
  within Euclidean distance ``tolerance`` (in map pixels) of a region pixel,
  else 0 (pointing game, Zhang et al. 2018); NaN if ``M`` is all zero or
  ``R`` is empty.
- ``border_energy``: the share of ``M``'s mass in the border band of
  ``bh = max(1, round(border * H))`` rows and ``bw = max(1, round(border * W))``
  columns on each side; NaN if ``M`` sums to 0.

and :func:`top_fraction_iou`, the agreement of two maps' top pixels.
"""

import math

import torch

# Elements per chunk: small enough for the chunk's temporaries to be reused
# from the allocator's cache (fresh large buffers cost page faults on CPU)
_CHUNK_ELEMENTS = 1 << 21
# Gathered (peak, offset) pairs per step of the pointing test
_GATHER_ELEMENTS = 1 << 22


def attention_metrics(maps, regions=None, tolerance=15.0, border=0.1, chunk_size=None):
    """Computes the attention metrics of a batch of maps.

    Args:
        maps: a (N, H, W) float tensor of non-negative maps
        regions: an optional (N, H, W) bool tensor of regions; without it
            only ``border_energy`` is computed
        tolerance: the pointing game's tolerance, in map pixels
        border: the border band's width, as a fraction of each side
        chunk_size: maps processed at a time (default: about 2M pixels)

    Returns:
        a dict of (N,) float tensors on the maps' device: ``border_energy``
        and, with regions, ``object_energy``, ``object_area`` and
        ``pointing_hit`` (NaN where undefined)
    """
    if maps.ndim != 3:
        raise ValueError(f"expected (N, H, W) maps, got shape {tuple(maps.shape)}")
    if regions is not None:
        if regions.shape != maps.shape:
            raise ValueError(f"regions {tuple(regions.shape)} do not match maps {tuple(maps.shape)}")
        if regions.dtype != torch.bool:
            raise TypeError(f"regions must be bool, got {regions.dtype}")
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")

    num, height, width = maps.shape
    dtype = _float_dtype(maps)
    offsets = _disk_offsets(tolerance, height, width, maps.device)
    step = chunk_size or max(1, _CHUNK_ELEMENTS // max(1, height * width))

    parts = []
    for start in range(0, num, step):
        chunk = maps[start : start + step].to(dtype)
        region = None if regions is None else regions[start : start + step].to(maps.device)
        parts.append(_chunk_metrics(chunk, region, offsets, border))

    if not parts:
        keys = ["border_energy"]
        if regions is not None:
            keys += ["object_energy", "object_area", "pointing_hit"]
        return {k: torch.empty(0, dtype=dtype, device=maps.device) for k in keys}
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def top_fraction_iou(a, b, fraction=0.2, chunk_size=None):
    """The IoU of two batches of maps' top pixels.

    Each map's top set is ``{v >= k-th largest value, v > 0}`` with
    ``k = ceil(fraction * H * W)`` (ties at the threshold are all included,
    zeros never are).

    Args:
        a, b: (N, H, W) tensors of maps (e.g. the predicted class's and the
            ground-truth class's CAMs)
        fraction: the share of pixels in each top set, in (0, 1]
        chunk_size: maps processed at a time

    Returns:
        a (N,) float tensor; NaN where both top sets are empty
    """
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"expected two (N, H, W) batches, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")

    num, height, width = a.shape
    pixels = height * width
    # The guard keeps e.g. 0.2 * 25 = 5.000000000000001 from rounding up to 6
    k = min(pixels, max(1, math.ceil(fraction * pixels - 1e-9)))
    dtype = _float_dtype(a)
    b = b.to(a.device)
    step = chunk_size or max(1, _CHUNK_ELEMENTS // max(1, pixels))

    out = []
    for start in range(0, num, step):
        top_a = _top_set(a[start : start + step].reshape(-1, pixels).to(dtype), k)
        top_b = _top_set(b[start : start + step].reshape(-1, pixels).to(dtype), k)
        inter = (top_a & top_b).sum(1).to(dtype)
        union = (top_a | top_b).sum(1).to(dtype)
        out.append(torch.where(union > 0, inter / union.clamp_min(1), math.nan))
    if not out:
        return torch.empty(0, dtype=dtype, device=a.device)
    return torch.cat(out)


def _chunk_metrics(maps, regions, offsets, border):
    """The metrics of one chunk of maps (and regions)."""
    _, height, width = maps.shape
    nan = torch.tensor(math.nan, dtype=maps.dtype, device=maps.device)

    # Everything reduces rows first: inner-dimension reductions are the
    # fastest on CPU, and an all-object region then sums exactly like the map
    row_sums = maps.sum(2)
    total = row_sums.sum(1)
    mass = total > 0
    safe_total = torch.where(mass, total, 1)

    out = {"border_energy": torch.where(mass, _border_mass(maps, row_sums, border) / safe_total, nan)}
    if regions is None:
        return out

    # Converting from uint8 is about twice as fast on CPU as from bool
    weights = regions.view(torch.uint8).to(maps.dtype)
    count = weights.sum(2).sum(1)
    inside = weights.mul_(maps).sum(2).sum(1)
    # Rounding can push the ratio a hair past 1; the clamp keeps the range
    out["object_energy"] = torch.where(mass, (inside / safe_total).clamp(0, 1), nan)
    out["object_area"] = count / (height * width)

    defined = mass & (count > 0)
    hit = _pointing_hits(maps, regions, defined, offsets)
    out["pointing_hit"] = torch.where(defined, hit.to(maps.dtype), nan)
    return out


def _border_mass(maps, row_sums, border):
    """The mass in the band of ``bh`` rows / ``bw`` columns along each side."""
    _, height, width = maps.shape
    bh = max(1, round(border * height))
    bw = max(1, round(border * width))
    # Inner rows / columns are [r0, r1) / [c0, c1); empty when the bands meet
    r0, r1 = bh, max(bh, height - bh)
    c0, c1 = bw, max(bw, width - bw)

    band_rows = row_sums[:, :r0].sum(1) + row_sums[:, r1:].sum(1)
    inner_cols = maps[:, r0:r1].sum(1)  # column sums over the inner rows
    band_cols = inner_cols[:, :c0].sum(1) + inner_cols[:, c1:].sum(1)
    return band_rows + band_cols


def _pointing_hits(maps, regions, defined, offsets):
    """Whether some maximum of each map lies within the disk ``offsets`` of
    a region pixel; False where not ``defined``.

    Only the maxima are examined: rows holding the maximum are found from
    per-row maxima, then the disk around each maximum is gathered from the
    region. That costs one pass over the maps instead of a full dilation.
    """
    num, height, width = maps.shape
    row_max = maps.amax(2)
    peak = row_max.amax(1)
    peak_rows = (row_max == peak[:, None]) & defined[:, None]
    b, i = peak_rows.nonzero(as_tuple=True)
    r, j = (maps[b, i] == peak[b, None]).nonzero(as_tuple=True)
    b, i = b[r], i[r]

    hits = torch.zeros(num, dtype=torch.bool, device=maps.device)
    flat = regions.reshape(-1)
    dy, dx = offsets
    step = max(1, _GATHER_ELEMENTS // len(dy))
    for start in range(0, len(b), step):
        pb, pi, pj = (t[start : start + step, None] for t in (b, i, j))
        # Clamping an offset that leaves the grid moves it towards the peak
        # along that axis, onto a grid pixel that is also in the disk: so the
        # clamped gather tests exactly the disk's on-grid pixels
        ii = (pi + dy).clamp_(0, height - 1)
        jj = (pj + dx).clamp_(0, width - 1)
        near = flat[(pb * height + ii) * width + jj].any(1)
        hits[pb[near, 0]] = True
    return hits


def _disk_offsets(tolerance, height, width, device):
    """The (dy, dx) offsets with ``dy**2 + dx**2 <= tolerance**2``, cut to
    what a ``height x width`` grid can reach."""
    ry = height - 1 if tolerance >= height - 1 else int(tolerance)
    rx = width - 1 if tolerance >= width - 1 else int(tolerance)
    dy = torch.arange(-ry, ry + 1, device=device)[:, None]
    dx = torch.arange(-rx, rx + 1, device=device)[None, :]
    disk = (dy * dy + dx * dx).double() <= float(tolerance) ** 2
    dy, dx = dy.expand_as(disk)[disk], dx.expand_as(disk)[disk]
    return dy, dx


def _top_set(values, k):
    """The (n, P) mask of each row's values >= its k-th largest, and > 0."""
    threshold = torch.kthvalue(values, values.shape[1] - k + 1, dim=1).values
    return (values >= threshold[:, None]) & (values > 0)


def _float_dtype(tensor):
    """Float64 stays float64; everything else is computed in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32
