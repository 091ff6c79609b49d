"""The groundwork of cue discovery (cam_plugin.hotspots): hotspots of a
map against a per-pixel reference, and the grouping of embeddings that
recovers planted groups and their number."""

import numpy as np
import pytest

from cam_plugin.hotspots import find_hotspots, group_embeddings


def _map():
    """A 40x60 map: a blob on the object (a box), a strong blob off it and
    a faint one off it."""
    yy, xx = np.mgrid[0:40, 0:60]

    def blob(cy, cx, r, v):
        return v * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))

    heat = blob(20, 15, 3, 1.0) + blob(8, 48, 2.5, 0.9) + blob(32, 50, 2, 0.3)
    region = np.zeros((40, 60), bool)
    region[12:28, 6:24] = True
    return heat, region


def test_hotspots_off_the_object_with_their_boxes_and_shares():
    heat, region = _map()
    spots = find_hotspots(heat, region, fraction=0.5, min_share=0.01)
    # the blob on the object is left out, the faint one is below half the
    # maximum: one hotspot, the strong blob off the object
    assert len(spots) == 1
    spot = spots[0]
    hot = heat >= 0.5 * heat.max()
    ys, xs = np.nonzero(spot.mask)
    assert spot.mask.sum() == (hot & (np.arange(60)[None, :] > 35)).sum()
    assert spot.box == pytest.approx([xs.min() / 60, ys.min() / 40, (xs.max() + 1 - xs.min()) / 60, (ys.max() + 1 - ys.min()) / 40])
    assert spot.share == pytest.approx(heat[spot.mask].sum() / heat.sum())
    assert spot.mean_attention == pytest.approx(heat[spot.mask].mean() / heat.max())
    assert spot.inside == 0.0
    # without a region, the object's blob is a hotspot too, the largest
    spots = find_hotspots(heat, None, fraction=0.5, min_share=0.01)
    assert len(spots) == 2 and spots[0].box[0] < 0.5 and spots[0].share > spots[1].share
    # min_share and max_inside filter
    assert find_hotspots(heat, region, fraction=0.5, min_share=0.5) == []
    assert len(find_hotspots(heat, region, fraction=0.5, min_share=0.01, max_inside=1.0)) == 2
    assert find_hotspots(np.zeros((4, 4))) == []
    with pytest.raises(ValueError, match="NaN"):
        find_hotspots(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="region of shape"):
        find_hotspots(heat, region[:10])


def test_grouping_recovers_planted_groups_and_their_number():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 64)) * 4
    truth = rng.integers(0, 3, size=3000)
    x = centres[truth] + rng.normal(size=(3000, 64))
    labels, k = group_embeddings(x)
    assert k == 3
    # each planted group is one found group (up to renaming)
    for g in range(3):
        found = labels[truth == g]
        assert (found == np.bincount(found).argmax()).mean() > 0.99
    labels, k = group_embeddings(x, num_groups=5)
    assert k == 5 and set(labels.tolist()) == set(range(5))
    with pytest.raises(ValueError, match="num_groups"):
        group_embeddings(x[:3], num_groups=4)
