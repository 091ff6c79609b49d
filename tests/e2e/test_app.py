"""The FiftyOne App on a dataset processed by the plugin, in a real headless
Chromium: the grid renders the heatmaps over the images, and the plugin's
operators are in the operator browser, where the per-class summary runs; the
per-class panel draws its bars and opens a class's samples on a click.

Needs Debian's ``chromium`` (``.ci/run`` installs it). Screenshots go to
``$CAM_PLUGIN_SCREENSHOTS`` (default: the test's temporary directory);
``make screenshots`` writes them to ``docs/`` for the README.
"""

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fiftyone as fo

import demo  # examples/demo.py, put on the path by conftest.py

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium():
    path = os.environ.get("CAM_PLUGIN_CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.skip(
            "the browser test needs Chromium: apt-get install chromium "
            "(or set CAM_PLUGIN_CHROMIUM to its path)"
        )
    return path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    out = os.environ.get("CAM_PLUGIN_SCREENSHOTS")
    path = Path(out) if out else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory):
    """The demo's dataset (a smaller one), processed by the plugin: CAMs,
    attention metrics and views."""
    config = demo.DemoConfig(n_train=400, n_test=48)
    root = tmp_path_factory.mktemp("demo")
    dataset, info = demo.run_demo(root, seed=0, config=config, name="e2e-cam-demo", progress=False, log=lambda *a: None)
    assert info["cam_summary"].processed == config.n_test
    yield dataset
    fo.delete_dataset(dataset.name)


@pytest.fixture(scope="module")
def app(demo_dataset):
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    port = _free_port()
    view = demo_dataset.match_tags("test")
    session = fo.launch_app(view, port=port, address="127.0.0.1", remote=True, auto=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/datasets/{demo_dataset.name}", wait_until="domcontentloaded")
            page.wait_for_selector('[data-cy="looker"]', timeout=90_000)
            _dismiss_popups(page)
            yield session, page
            browser.close()
    finally:
        session.close()


def _dismiss_popups(page):
    try:
        page.get_by_text("Dismiss", exact=True).click(timeout=3000)
    except Exception:
        pass  # no promotional popup this time


def _grid(page, path):
    """A screenshot of the samples grid, after the overlays have settled."""
    time.sleep(4)
    page.locator('[data-cy="fo-grid"]').screenshot(path=str(path))
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


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
    with_maps = _grid(page, shots / "app-grid.png")

    page.locator('[data-cy="checkbox-cam"]').click()
    assert not checkbox.is_checked()
    without = _grid(page, shots / "app-grid-no-heatmaps.png")
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
    _grid(page, shots / "app-misclassified-background.png")
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
    page.locator(".js-plotly-plot .bars .point").nth(len(demo.CLASSES) - 1).wait_for(timeout=15_000)
    for name in demo.CLASSES:
        page.locator(".js-plotly-plot .xtick text", has_text=name).first.wait_for(timeout=15_000)
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

    bars = page.locator(".js-plotly-plot .bars .point")
    bars.nth(len(demo.CLASSES) - 1).wait_for(timeout=60_000)
    time.sleep(1)
    page.screenshot(path=str(shots / "app-attention-by-class-panel.png"))

    ticks = [t.strip() for t in page.locator(".js-plotly-plot .xtick text").all_text_contents()]
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
