"""The FiftyOne App on a dataset processed by the plugin, in a real headless
Chromium: the grid renders the heatmaps over the images, and the plugin's
operators are in the operator browser, where the per-class summary runs; the
per-class panel draws its bars and opens a class's samples on a click.

Fixtures (the demo dataset, the App in Chromium, screenshots) are in
conftest.py.
"""

import time

import numpy as np

import browser
import demo  # examples/demo.py, put on the path by tests/conftest.py


def _vivid(pixels):
    """Share of strongly coloured pixels: the demo images are muted apart
    from their small cue markers; the jet colorscale is not."""
    spread = pixels.max(axis=2) - pixels.min(axis=2)
    return float((spread > 90).mean())


def test_grid_renders_heatmaps_over_the_images(app, shots):
    _, page = app
    checkbox = page.locator('[data-cy="checkbox-cam"] input')
    # the predicted-class heatmap is shown by default (the plugin's choice)
    assert checkbox.is_checked()
    with_maps = browser.grid(page, shots / "app-grid.png")

    page.locator('[data-cy="checkbox-cam"]').click()
    assert not checkbox.is_checked()
    without = browser.grid(page, shots / "app-grid-no-heatmaps.png")
    page.locator('[data-cy="checkbox-cam"]').click()

    changed = float((np.abs(with_maps - without).max(axis=2) > 40).mean())
    assert changed > 0.10, f"only {changed:.1%} of the grid changed with the heatmaps"
    # the change is colour: the colorscale, over muted images
    assert _vivid(with_maps) > _vivid(without) + 0.02


def test_operators_are_in_the_operator_browser(app, shots):
    _, page = app
    page.keyboard.press("`")
    search = page.get_by_placeholder("Search operations by name...")
    search.wait_for(timeout=15_000)

    search.fill("class activation")
    page.get_by_text("Compute class activation maps").wait_for(timeout=15_000)
    page.screenshot(path=str(shots / "app-operators.png"))

    for query, label in [
        ("attention", "Compute attention metrics"),
        ("wrong place", "Find where the model looked at the wrong place"),
        ("background", "Which classes look at the background"),
        ("CAM runs", "Manage CAM runs: delete"),
    ]:
        search.fill(query)
        page.get_by_text(label).wait_for(timeout=15_000)

    page.keyboard.press("Escape")


def test_attention_views_are_saved_views_in_the_app(app, demo_dataset, shots):
    session, page = app
    page.locator('[data-cy="saved-views-selection"]').click()
    for name in ("cam_misclassified_background", "cam_correct_background"):
        page.get_by_text(name, exact=True).first.wait_for(timeout=15_000)
    page.keyboard.press("Escape")

    view = demo_dataset.load_saved_view("cam_misclassified_background")
    session.view = view
    page.get_by_text(f"{len(view)} samples").wait_for(timeout=30_000)
    browser.grid(page, shots / "app-misclassified-background.png")
    session.view = demo_dataset.match_tags("test")


def test_class_summary_runs_from_the_operator_browser(app, shots):
    """The per-class summary, executed in the App: its table lists every
    class of the demo with its share of samples looking off the object."""
    _, page = app
    page.mouse.click(700, 40)  # close any open menu
    page.keyboard.press("`")
    search = page.get_by_placeholder("Search operations by name...")
    search.wait_for(timeout=15_000)
    search.fill("background")
    page.get_by_text("Which classes look at the background").click()

    page.get_by_role("button", name="Execute").click(timeout=30_000)
    page.get_by_text("Share off", exact=True).first.wait_for(timeout=60_000)
    for name in demo.CLASSES:
        page.get_by_role("cell", name=name, exact=True).first.wait_for(timeout=15_000)
    # the bar chart drew one bar per class, labelled with the class names
    browser.visible_plot(page).locator(".bars .point").nth(len(demo.CLASSES) - 1).wait_for(timeout=15_000)
    for name in demo.CLASSES:
        browser.visible_plot(page).locator(".xtick text", has_text=name).first.wait_for(timeout=15_000)
    time.sleep(1)
    page.screenshot(path=str(shots / "app-class-summary.png"))
    page.keyboard.press("Escape")


def test_attention_by_class_panel_opens_a_class_on_click(app, demo_dataset, shots):
    """The panel draws one bar per class; clicking a bar loads that class's
    samples whose attention is off the object."""
    from cam_plugin.views import class_view

    session, page = app
    page.mouse.click(700, 40)  # close any open menu
    page.locator('[data-cy="new-panel-btn"]').first.click()
    page.get_by_text("Attention by class", exact=True).first.click(timeout=15_000)

    bars = browser.visible_plot(page).locator(".bars .point")
    bars.nth(len(demo.CLASSES) - 1).wait_for(timeout=60_000)
    time.sleep(1)
    page.screenshot(path=str(shots / "app-attention-by-class-panel.png"))

    ticks = [t.strip() for t in browser.visible_plot(page).locator(".xtick text").all_text_contents()]
    first_class = ticks[0]
    assert set(ticks) == set(demo.CLASSES)
    expected = len(class_view(demo_dataset, "cam", None, None, first_class))
    assert 0 < expected < len(demo_dataset.match_tags("test")), "the click must change the count"
    # Plotly takes clicks on its drag layer above the bars: a real mouse
    # click at the bar, as a user would
    box = bars.first.bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.get_by_text(f"{expected} samples").first.wait_for(timeout=30_000)
    session.view = demo_dataset.match_tags("test")
