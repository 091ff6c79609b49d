"""What the model relies on, in the App, in a real headless Chromium: the
"Attention by class" panel draws the background-reliance chart and the
class-by-context matrix beside the attention summary, a matrix cell opens
its samples, and ``cam_context`` filters in the sidebar like any label.

Fixtures (the demo dataset, which the demo processed with compute_reliance
and compute_context, the App in Chromium, screenshots) are in conftest.py.
"""

import time
from contextlib import contextmanager

from fiftyone import ViewField as F

import browser
import cam_plugin
import demo
import forms


@contextmanager
def _fresh_page(chromium_browser, session, dataset):
    session.spaces = None
    url = f"http://127.0.0.1:{session.server_port}/datasets/{dataset.name}"
    with browser.page_at(chromium_browser, url) as page:
        yield page


def _plots(page, count, timeout=60):
    deadline = time.time() + timeout
    plots = page.locator(".js-plotly-plot:visible")
    while plots.count() < count:
        if time.time() > deadline:
            raise AssertionError(f"{plots.count()} plots on screen, expected {count}")
        time.sleep(1)
    return [plots.nth(i) for i in range(count)]


def _ticks_in_order(plot, axis):
    """An axis's tick labels on screen, left to right (x) or top down (y)."""
    ticks = plot.locator(f".{axis}tick text")
    boxes = [(ticks.nth(i).bounding_box(), ticks.nth(i).text_content().strip()) for i in range(ticks.count())]
    # (Plotly keeps hidden copies of some labels)
    return [text for box, text in sorted((b for b in boxes if b[0]), key=lambda b: b[0][axis])]


def _wait_for_ticks(plot, axis, expected, timeout=20):
    deadline = time.time() + timeout
    while (drawn := set(_ticks_in_order(plot, axis))) != expected:
        if time.time() > deadline:
            raise AssertionError(f"{axis} tick labels on screen {sorted(drawn)}, expected {sorted(expected)}")
        time.sleep(0.5)


def test_the_panel_shows_reliance_and_context_and_a_cell_opens_its_samples(app, chromium_browser, demo_dataset, shots):
    session, _ = app
    test = demo_dataset.match_tags("test")
    rows = cam_plugin.context_summary(demo_dataset)
    trace = forms.context_traces(rows)[0]
    with _fresh_page(chromium_browser, session, demo_dataset) as page:
        page.get_by_text(f"{len(test)} samples").first.wait_for(timeout=60_000)
        browser.open_panel(page, "Attention by class")
        summary, reliance, context = _plots(page, 3)
        # one reliance bar per class (and one background-gap bar each)
        reliance.locator(".bars .point").nth(len(demo.CLASSES) - 1).wait_for(timeout=60_000)
        ticks = {t.strip() for t in reliance.locator(".xtick text").all_text_contents()}
        assert ticks == set(demo.CLASSES)
        # the matrix: classes down, context classes across, as summarised
        context.locator(".hm").first.wait_for(timeout=60_000)
        context.scroll_into_view_if_needed()
        # what Plotly drew: context classes left to right by attention,
        # classes top down as ranked (the y axis runs downwards)
        x_ticks, y_ticks, reversed_y = context.evaluate(
            "el => [el.data[0].x, el.data[0].y, el._fullLayout.yaxis.range[0] > el._fullLayout.yaxis.range[1]]"
        )
        assert x_ticks == trace["x"] and y_ticks == trace["y"] and reversed_y, (x_ticks, y_ticks)
        # Plotly draws the tick labels after the cells and may redraw them
        # once the panel settles: wait for every class's label on screen
        _wait_for_ticks(context, "y", set(y_ticks))
        page.get_by_text("of the attention falls on", exact=False).first.wait_for(timeout=15_000)
        context.scroll_into_view_if_needed()
        time.sleep(1)
        page.screenshot(path=str(shots / "app-relies-on-panel.png"), full_page=True)

        # a click on the top class's brightest cell opens those samples,
        # most attention on that context class first
        class_name = y_ticks[0]
        context_class = next(r for r in rows if r.class_name == class_name).top[0]
        column = x_ticks.index(context_class)
        expected = len(cam_plugin.context_view(demo_dataset, class_name, context_class))
        assert 0 < expected < len(test), "the click must change the count"
        # Plotly clicks the point it hovers: hover first (its hover is
        # throttled, so a click at once may find none), then click; again
        # with fresh geometry if the panel re-laid itself out meanwhile
        for attempt in range(3):
            area = context.locator(".nsewdrag").first.bounding_box()
            cell_w, cell_h = area["width"] / len(x_ticks), area["height"] / len(y_ticks)
            x, y = area["x"] + (column + 0.5) * cell_w, area["y"] + cell_h / 2
            page.mouse.move(x - 2, y)
            page.mouse.move(x, y, steps=3)
            time.sleep(0.5)
            page.mouse.click(x, y)
            try:
                page.get_by_text(f"{expected} samples").first.wait_for(timeout=20_000)
                break
            except Exception:
                if attempt == 2:
                    raise
    session.view = test


def test_context_shares_filter_in_the_sidebar(app, demo_dataset, shots):
    session, page = app
    test = demo_dataset.match_tags("test")
    session.view = test
    page.get_by_text(f"{len(test)} samples").first.wait_for(timeout=30_000)
    browser.close_menus(page)
    page.locator('[data-cy="sidebar-field-arrow-enabled-cam_context"]').first.click(timeout=15_000)
    filters = page.locator('[data-cy="categorical-filter-cam_context.classifications.label"]')
    filters.wait_for(timeout=30_000)
    time.sleep(1)
    page.screenshot(path=str(shots / "app-context-sidebar.png"))

    # a cue's box: only some samples' maps reach it
    label = "circle cue"
    expected = test.match(F("cam_context.classifications").filter(F("label") == label).length() > 0).count()
    assert 0 < expected < len(test)
    filters.locator(f'[data-cy="checkbox-{label}"]').first.click(timeout=15_000)
    try:
        # the grid keeps the samples whose maps reach the cue's box
        page.get_by_text(f"{expected} of {len(test)} samples").first.wait_for(timeout=30_000)
        filters.scroll_into_view_if_needed()
        time.sleep(1)
        page.screenshot(path=str(shots / "app-context-sidebar-filtered.png"))
    finally:
        # the sidebar's filter is the App's state, not the view's
        filters.get_by_text("Reset", exact=True).first.click(timeout=15_000)
        page.get_by_text(f"{len(test)} samples").first.wait_for(timeout=30_000)
        session.view = test
