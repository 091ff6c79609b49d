"""Cue discovery in the App, in a real headless Chromium: the Cues panel
lists the groups the demo's cue run found (names, numbers, thumbnails of
typical hotspots) and its buttons open a group's samples; FiftyOne's
Embeddings panel shows the hotspot points of the run's visualization,
coloured by group.

Fixtures (the demo dataset, which the demo processed with discover_cues,
the App in Chromium, screenshots) are in conftest.py.
"""

import time
from contextlib import contextmanager

import numpy as np
from PIL import Image

import browser
import cam_plugin


def _hues(pixels, bins=24, min_pixels=15):
    """The hue bins (of ``bins``) that at least ``min_pixels`` saturated
    pixels of an RGB image fall in."""
    import colorsys

    rgb = pixels.reshape(-1, 3).astype(float) / 255
    # (the panel is grey; its points, even dark ones, are not)
    saturated = rgb[(rgb.max(axis=1) - rgb.min(axis=1)) > 0.1]
    counts = {}
    for r, g, b in saturated:
        h = int(colorsys.rgb_to_hsv(r, g, b)[0] * bins) % bins
        counts[h] = counts.get(h, 0) + 1
    return sorted(h for h, n in counts.items() if n >= min_pixels)


@contextmanager
def _fresh_page(chromium_browser, session, dataset):
    session.spaces = None
    url = f"http://127.0.0.1:{session.server_port}/datasets/{dataset.name}"
    with browser.page_at(chromium_browser, url) as page:
        yield page


def _color_by(page, path, attempts=3):
    """Chooses the Embeddings panel's colour field: opens its menu (a
    combobox), types the field to filter its long list, clicks the option;
    again if the menu opened before the run's fields were loaded."""
    for attempt in range(attempts):
        try:
            page.locator('.emb-colorby button[aria-label="Color by"]').first.click(timeout=30_000)
            page.locator("input.emb-colorby-input").first.fill(path, timeout=15_000)
            page.locator('.emb-colorby-panel [role="option"]').filter(has_text=path).first.click(timeout=15_000)
            return
        except Exception:
            page.keyboard.press("Escape")
            if attempt == attempts - 1:
                raise
            time.sleep(2)


def test_the_cues_panel_lists_the_groups_and_opens_one(app, chromium_browser, demo_dataset, shots):
    session, _ = app
    test = demo_dataset.match_tags("test")
    groups = cam_plugin.cue_groups(test)
    assert groups
    with _fresh_page(chromium_browser, session, demo_dataset) as page:
        page.get_by_text(f"{len(test)} samples").first.wait_for(timeout=60_000)
        browser.open_panel(page, "Cues")
        for g in groups:
            page.get_by_text(f"{g.group}. {g.name}", exact=True).first.wait_for(timeout=60_000)
            assert g.strip and len(g.thumbnails) == len(g.typical) > 0
            page.get_by_text(f"{g.size} hotspots in {g.samples} samples", exact=False).first.wait_for(timeout=15_000)
        # the typical hotspots' thumbnails load (the App serves them as media)
        tiles = page.locator('img[alt^="hotspots of"]')
        expected = sum(1 for g in groups if g.strip)
        deadline = time.time() + 60
        while time.time() < deadline:
            loaded = tiles.evaluate_all("els => els.filter(e => e.complete && e.naturalWidth > 0).length")
            if loaded == expected:
                break
            time.sleep(0.5)
        assert loaded == expected > 0, f"{loaded} of {expected} thumbnails loaded"
        page.locator('[data-cy="looker"]').first.wait_for(timeout=60_000)
        time.sleep(2)
        page.screenshot(path=str(shots / "app-cues-panel.png"), full_page=True)

        # a group's button opens its samples (only its hotspots shown)
        first = groups[0]
        page.get_by_text("Show its samples", exact=True).first.click()
        page.get_by_text(f"{first.samples} samples").first.wait_for(timeout=30_000)
    session.view = test


def test_the_embeddings_panel_colours_the_hotspots_by_group(app, chromium_browser, demo_dataset, shots, tmp_path):
    session, _ = app
    test = demo_dataset.match_tags("test")
    groups = cam_plugin.cue_groups(test)
    brain_key = cam_plugin.get_run(test, "cam_cues")["brain_keys"][0]
    with _fresh_page(chromium_browser, session, demo_dataset) as page:
        page.get_by_text(f"{len(test)} samples").first.wait_for(timeout=60_000)
        browser.open_panel(page, "Embeddings")
        page.get_by_text(brain_key, exact=True).first.click(timeout=60_000)
        page.locator(".emb-plot").first.wait_for(timeout=60_000)
        _color_by(page, f"{cam_plugin.hotspots_field('cam')}.detections.label")
        # the legend: one entry per group, with its number of points
        for g in groups:
            entry = page.get_by_text(g.name, exact=True).last
            entry.wait_for(timeout=60_000)
        plot = page.locator(".emb-plot").first
        legend = plot.inner_text()
        for g in groups:
            assert g.name in legend and str(g.size) in legend, legend
        time.sleep(2)
        page.screenshot(path=str(shots / "app-cues-embeddings.png"))
        # the points are drawn in one colour per group
        plot.screenshot(path=str(tmp_path / "plot.png"))
        hues = _hues(np.asarray(Image.open(tmp_path / "plot.png").convert("RGB")))
        assert len(hues) >= len(groups), hues
    session.view = test
