"""Where a map looks away from the object, as places: its connected
high-attention regions outside the labelled region (hotspots), and the
grouping of their embeddings into recurring cues. FiftyOne-free (numpy,
scipy and scikit-learn, which FiftyOne itself depends on); the groundwork
of cue discovery (issue 15)."""

from dataclasses import dataclass

import numpy as np


@dataclass
class Hotspot:
    """One connected high-attention region of a map.

    Attributes:
        box: ``[x, y, width, height]`` in [0, 1] of the map's frame (the
            full image frame for the plugin's maps), FiftyOne's box format
        share: the share of the map's mass in the region
        mean_attention: the region's mean value, relative to the map's
            maximum (in (0, 1])
        inside: the share of the region's mass on the labelled region
        mask: the region, an (h, w) bool array of the map's grid
    """

    box: list
    share: float
    mean_attention: float
    inside: float
    mask: np.ndarray


def find_hotspots(heat, region=None, fraction=0.5, min_share=0.05, max_inside=0.5):
    """The hotspots of one map that lie mostly outside the labelled region.

    Args:
        heat: an (h, w) array of non-negative attention
        region: an (h, w) bool array of the labelled objects on the same
            grid, or None (all of the map counts as outside)
        fraction (0.5): a pixel is hot from this fraction of the map's
            maximum
        min_share (0.05): the least share of the map's mass a hotspot holds
        max_inside (0.5): the largest share of a hotspot's mass that may
            lie on the region

    Returns:
        the hotspots, the largest share first (empty for a map that is
        zero everywhere)
    """
    from scipy import ndimage

    heat = np.asarray(heat, dtype=np.float64)
    if heat.ndim != 2:
        raise ValueError(f"a map must be 2-D, got shape {heat.shape}")
    if not np.isfinite(heat).all():
        raise ValueError("the map holds NaN or infinite values")
    heat = np.clip(heat, 0, None)
    peak, total = heat.max(initial=0.0), heat.sum()
    if peak <= 0:
        return []
    if region is None:
        region = np.zeros(heat.shape, dtype=bool)
    region = np.asarray(region, dtype=bool)
    if region.shape != heat.shape:
        raise ValueError(f"a region of shape {region.shape} for a map of shape {heat.shape}")

    # 8-connected: a diagonal step keeps one place one hotspot
    labels, count = ndimage.label(heat >= fraction * peak, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    mass = ndimage.sum(heat, labels, index)
    inside = ndimage.sum(heat * region, labels, index)
    sizes = ndimage.sum(np.ones_like(heat), labels, index)
    slices = ndimage.find_objects(labels)
    h, w = heat.shape
    found = []
    for i, (m, on, size, where) in enumerate(zip(mass, inside, sizes, slices), start=1):
        share, on_share = m / total, (on / m if m > 0 else 0.0)
        if share < min_share or on_share > max_inside:
            continue
        rows, cols = where
        found.append(
            Hotspot(
                box=[cols.start / w, rows.start / h, (cols.stop - cols.start) / w, (rows.stop - rows.start) / h],
                share=float(share),
                mean_attention=float(m / size / peak),
                inside=float(on_share),
                mask=labels == i,
            )
        )
    found.sort(key=lambda s: -s.share)
    return found


def group_embeddings(embeddings, num_groups=None, max_groups=12, sample=5000, seed=0):
    """Groups embeddings (one row each) by k-means; without ``num_groups``
    the number of groups is the one of 2 ... ``max_groups`` with the best
    silhouette on a subsample of ``sample`` rows (the silhouette costs the
    square of the rows it looks at).

    Returns:
        ``(labels, k)``: an int array of group indices and the number of
        groups
    """
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics import silhouette_score

    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be one row each, got shape {x.shape}")
    n = len(x)
    if num_groups is not None:
        if not 1 <= num_groups <= n:
            raise ValueError(f"num_groups must be between 1 and the {n} embeddings, not {num_groups}")
        candidates = [num_groups]
    else:
        candidates = list(range(2, min(max_groups, n - 1) + 1)) or [1]

    rng = np.random.default_rng(seed)
    probe = x[rng.choice(n, size=min(sample, n), replace=False)] if n > sample else x
    best = None
    for k in candidates:
        model = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096).fit(x)
        if len(candidates) == 1:
            return model.labels_.astype(int), k
        probe_labels = model.predict(probe)
        if len(set(probe_labels.tolist())) < 2:
            continue
        score = silhouette_score(probe, probe_labels)
        if best is None or score > best[0]:
            best = (score, k, model)
    if best is None:
        return np.zeros(n, dtype=int), 1
    return best[2].labels_.astype(int), best[1]
