"""The heatmaps' colours in the App, read off the pixels of a real headless
Chromium: the predicted-class maps are drawn in jet and the ground-truth
maps in viridis (the colorscales the plugin chose), the sidebar's field
tooltip says what the colours mean, and the dataset-wide scale draws a
weaker map with weaker colours.

Each map is blended over its image at the color scheme's opacity, so the
colour the App painted is recovered from a screenshot with the map and one
without: ``painted = (shot - (1 - opacity) * image) / opacity``, and is
then matched against the colorscales' own colour tables.

Fixtures (the demo dataset, the App in Chromium, screenshots) are in
conftest.py.
"""

import time

import fiftyone.core.plots.plotly as fop
import numpy as np
from PIL import Image

import browser
import cam_plugin

JET = np.array(fop.get_colormap("jet"), dtype=float)
VIRIDIS = np.array(fop.get_colormap("viridis"), dtype=float)
HEATMAPS = ("cam", "cam_gt")


def _settled(page, path, timeout=60):
    """A screenshot of the grid once it has stopped changing (overlays
    loaded and painted), as an array."""
    previous = browser.grid(page, path)
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(1)
        page.locator('[data-cy="fo-grid"]').screenshot(path=str(path))
        shot = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        if np.array_equal(shot, previous):
            return shot
        previous = shot
    raise AssertionError(f"the grid kept changing for {timeout} s ({path.name})")


def _show_only(page, fields):
    for field in HEATMAPS:
        box = page.locator(f'[data-cy="checkbox-{field}"] input')
        if box.is_checked() != (field in fields):
            page.locator(f'[data-cy="checkbox-{field}"]').click()
            assert box.is_checked() == (field in fields)


def _opacity(session):
    opacity = session.color_scheme.opacity
    return 0.7 if opacity is None else opacity


def _painted(shot, plain, opacity):
    """The colours the App painted where the heatmap shows (the pixels that
    differ from the shot without it), unblended from the image."""
    shot, plain = shot.astype(float), plain.astype(float)
    drawn = np.abs(shot - plain).max(axis=2) > 30
    colours = (shot[drawn] - (1 - opacity) * plain[drawn]) / opacity
    return colours, drawn


def _nearest(colours, table):
    """Distance to, and index of, each colour's nearest colour in a table."""
    distances = ((colours[:, None, :] - table[None]) ** 2).sum(axis=2)
    return np.sqrt(distances.min(axis=1)), distances.argmin(axis=1)


def _red(colours):
    r, g, b = colours.T
    return (r - g > 100) & (r - b > 100)  # jet's top; viridis has no red


def _purple(colours):
    r, g, b = colours.T
    return (r - g > 25) & (b - g > 25)  # viridis's bottom; jet has none


def _tooltip(page, field, text):
    """Rests the pointer on a field's name in the sidebar until its tooltip
    shows ``text``."""
    page.mouse.move(700, 40)
    time.sleep(0.5)
    box = page.locator(f'[data-cy="sidebar-field-{field}"] > span').first.bounding_box()
    page.mouse.move(box["x"] + 5, box["y"] + box["height"] / 2, steps=5)
    page.get_by_text(text, exact=False).first.wait_for(timeout=15_000)


def _painted_grid(page, path, plain, timeout=90):
    """A settled screenshot of the grid once every tile shows its heatmap
    (every test sample has both maps): a grid can look settled while the
    maps' images are still being fetched, one tile after the other (CI
    once caught it with an eighth of them drawn)."""
    deadline = time.time() + timeout
    while True:
        shot = _settled(page, path)
        origin = page.locator('[data-cy="fo-grid"]').bounding_box()
        lookers = page.locator('[data-cy="looker"]')
        unpainted = 0
        tiles = 0
        for i in range(lookers.count()):
            box = lookers.nth(i).bounding_box()
            if box is None:
                continue
            x0, y0 = int(box["x"] - origin["x"]) + 2, int(box["y"] - origin["y"]) + 2
            x1, y1 = x0 + int(box["width"]) - 4, y0 + int(box["height"] * 0.8)
            if x0 < 0 or y0 < 0 or x1 > shot.shape[1] or y1 > shot.shape[0] or shot.shape != plain.shape:
                continue  # a tile only partly on screen
            tiles += 1
            region = (slice(y0, y1), slice(x0, x1))
            if (np.abs(shot[region] - plain[region]).max(axis=2) > 30).mean() < 0.005:
                unpainted += 1
        if tiles and not unpainted:
            return shot
        if time.time() > deadline:
            raise AssertionError(f"{unpainted} of {tiles} tiles still showed no heatmap after {timeout} s ({path.name})")
        time.sleep(2)


def _shots_over_one_grid(page, shots, attempts=3):
    """Screenshots of the grid without a heatmap, with ``cam`` and with
    ``cam_gt``, taken over the very same grid: the shot without a heatmap
    is taken again at the end, and the series is retaken when the two
    differ (a busy machine can still be loading or laying out tiles when
    the grid first looks settled, and a moved tile would read as paint)."""
    for _ in range(attempts):
        try:
            _show_only(page, [])
            plain = _settled(page, shots / "app-colours-none.png")
            _show_only(page, ["cam"])
            cam = _painted_grid(page, shots / "app-colours-cam.png", plain)
            _show_only(page, ["cam_gt"])
            gt = _painted_grid(page, shots / "app-colours-cam-gt.png", plain)
            _show_only(page, [])
            again = _settled(page, shots / "app-colours-none-again.png")
        finally:
            _show_only(page, ["cam"])
        if plain.shape != again.shape:
            print("the grid was resized under the heatmaps: again")
            continue
        changed = (np.abs(plain - again).max(axis=2) > 30).mean()
        if changed < 0.001:
            return plain, cam, gt
        print(f"the grid changed under the heatmaps ({changed:.1%} of its pixels): again")
    raise AssertionError(f"the grid kept changing between screenshots ({attempts} tries)")


def test_each_map_is_drawn_in_its_own_colorscale(app, demo_dataset, shots):
    session, page = app
    opacity = _opacity(session)
    plain, cam, gt = _shots_over_one_grid(page, shots)

    figures = {}
    for name, shot in (("cam", cam), ("cam_gt", gt)):
        colours, drawn = _painted(shot, plain, opacity)
        to_jet, _ = _nearest(colours, JET)
        to_viridis, _ = _nearest(colours, VIRIDIS)
        figures[name] = dict(
            drawn=float(drawn.mean()),
            jet=float((to_jet < to_viridis).mean()),
            red=float(_red(colours).mean()),
            purple=float(_purple(colours).mean()),
            fit=float(np.median(np.minimum(to_jet, to_viridis))),
        )
    print("colour figures:", figures)

    for name in HEATMAPS:
        assert figures[name]["drawn"] > 0.05, f"{name}: hardly any heatmap drawn"
        # the painted colours are the tables' colours (rounding aside)
        assert figures[name]["fit"] < 12, figures[name]
    # cam: jet (red peaks, no viridis purple); cam_gt: viridis (no red)
    assert figures["cam"]["jet"] > 0.9, figures["cam"]
    assert figures["cam"]["red"] > 0.03 and figures["cam"]["purple"] < 0.03, figures["cam"]
    assert figures["cam_gt"]["jet"] < 0.1, figures["cam_gt"]
    # (jet paints 20% red here; a busy machine catches a few blended pixels
    # of a frame still settling)
    assert figures["cam_gt"]["red"] < 0.01 and figures["cam_gt"]["purple"] > 0.05, figures["cam_gt"]

    # the sidebar's field tooltip says what the colours mean
    _tooltip(page, "cam", "jet: blue = weak, red = the map's own maximum")
    page.screenshot(path=str(shots / "app-colours-tooltip.png"))
    page.mouse.move(700, 40)


def _tiles(page, path, count=2, plain=None, timeout=60):
    """Screenshots of the grid's ``count`` tiles, left to right, as arrays,
    once settled; with ``plain`` (the tiles without heatmaps), once every
    tile shows its heatmap."""
    deadline = time.time() + timeout
    while True:
        lookers = page.locator('[data-cy="looker"]')
        grid = _settled(page, path)
        boxes = [lookers.nth(i).bounding_box() for i in range(lookers.count())]
        tiles = _cut(page, grid, boxes)
        ready = len(tiles) == count and all(t.shape == tiles[0].shape for t in tiles)
        if ready and plain is not None:
            # each map shown, over its image (not a tile still loading)
            ready = all(0.005 < _painted(t, p, 0.7)[1].mean() < 0.9 for t, p in zip(tiles, plain))
        if ready:
            return tiles
        if time.time() > deadline:
            raise AssertionError(f"the grid did not show {count} tiles with their maps ({path.name})")
        time.sleep(2)


def _cut(page, grid, boxes):
    origin = page.locator('[data-cy="fo-grid"]').bounding_box()
    boxes = sorted((b for b in boxes if b), key=lambda b: b["x"])
    tiles = []
    for box in boxes:
        x, y = int(box["x"] - origin["x"]) + 2, int(box["y"] - origin["y"]) + 2
        # the lower part holds the labels' tags: left out
        tiles.append(grid[y : y + int(box["height"] * 0.8), x : x + int(box["width"]) - 4])
    return tiles


def _heat(tile, plain, opacity):
    """How much of a tile the heatmap covers (``drawn``), and where its
    colours sit on jet (0: first colour, 1: last): the share of them past
    0.75 (``top``: orange to red) and the highest (``peak``, the 99th
    percentile, so a stray pixel does not count)."""
    colours, drawn = _painted(tile, plain, opacity)
    _, index = _nearest(colours, JET)
    position = index / (len(JET) - 1) if len(index) else np.zeros(1)
    return dict(
        drawn=round(float(drawn.mean()), 4),
        top=round(float((position > 0.75).mean()), 4),
        peak=round(float(np.percentile(position, 99)), 3),
    )


def test_the_dataset_scale_draws_a_weaker_map_weaker(app, demo_dataset, shots):
    session, page = app
    opacity = _opacity(session)
    test = demo_dataset.match_tags("test")
    ids, raw_maxes = test.values(["id", "cam.raw_max"])
    peak = max(raw_maxes)
    strongest = ids[int(np.argmax(raw_maxes))]
    # a map whose maximum is about half the dataset's
    weak = ids[int(np.argmin([abs(r - 0.5 * peak) for r in raw_maxes]))]
    ratio = raw_maxes[ids.index(weak)] / peak
    assert 0.3 < ratio < 0.7, ratio

    two = demo_dataset.select([strongest, weak], ordered=True)
    try:
        session.view = two
        page.get_by_text("2 samples").first.wait_for(timeout=30_000)
        _show_only(page, [])
        plain = _tiles(page, shots / "app-colours-scale-none.png")
        _show_only(page, ["cam"])
        per_map = _tiles(page, shots / "app-colours-scale-map.png", plain=plain)

        cam_plugin.set_heatmap_scale(demo_dataset, "cam", "dataset")
        session.refresh()
        page.get_by_text("2 samples").first.wait_for(timeout=30_000)
        dataset_wide = _tiles(page, shots / "app-colours-scale-dataset.png", plain=plain)
        _tooltip(page, "cam", "the same colour is the same value on every image")
        page.screenshot(path=str(shots / "app-colours-scale-tooltip.png"))
        page.mouse.move(700, 40)
    finally:
        cam_plugin.set_heatmap_scale(demo_dataset, "cam", "map")
        _show_only(page, ["cam"])
        session.view = test
        page.get_by_text(f"{len(test)} samples").first.wait_for(timeout=30_000)

    assert len(plain) == len(per_map) == len(dataset_wide) == 2
    figures = {
        scale: [_heat(tile, base, opacity) for tile, base in zip(tiles, plain)]
        for scale, tiles in (("map", per_map), ("dataset", dataset_wide))
    }
    print(f"raw_max ratio {ratio:.2f}; heat figures (strongest, weak): {figures}")

    (strong_map, weak_map), (strong_ds, weak_ds) = figures["map"], figures["dataset"]
    # the dataset's strongest map looks the same on both scales, red peak
    # and all
    assert abs(strong_ds["drawn"] - strong_map["drawn"]) < 0.01, (strong_map, strong_ds)
    assert abs(strong_ds["top"] - strong_map["top"]) < 0.01, (strong_map, strong_ds)
    assert abs(strong_ds["peak"] - strong_map["peak"]) < 0.03, (strong_map, strong_ds)
    assert strong_ds["peak"] > 0.8, strong_ds
    # per map, the weak map reaches red too (its peak sits at the tile's
    # bottom edge, partly under the label chips, whose width depends on the
    # browser's fonts: 0.75 is orange-red, far above the dataset scale's) ...
    assert weak_map["top"] > 0.01 and weak_map["peak"] > 0.7, weak_map
    # ... on the dataset scale it stops where its maximum lies on the
    # dataset's scale (no red), and its weakest parts (below 10% of the
    # dataset's maximum) are left out: it covers less of its image
    highest = (ratio - 0.1) / 0.9
    assert weak_ds["top"] < 0.002, weak_ds
    assert 0.15 < weak_ds["peak"] < highest + 0.08, (highest, weak_ds)
    # (how much less depends on the map's shape: 24% less on this machine's
    # demo map, which the label chips also partly cover)
    assert weak_ds["drawn"] < 0.85 * weak_map["drawn"], (weak_map, weak_ds)
