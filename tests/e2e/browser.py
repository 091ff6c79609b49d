"""Driving the FiftyOne App in a headless Chromium (helpers of the App
tests)."""

import contextlib
import os
import shutil
import socket
import time

import numpy as np
import pytest
from PIL import Image

import fiftyone as fo

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium():
    path = os.environ.get("CAM_PLUGIN_CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.skip(
            "the browser test needs Chromium: apt-get install chromium "
            "(or set CAM_PLUGIN_CHROMIUM to its path)"
        )
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launch():
    """A headless Chromium (Playwright's sync API: one per thread, so the
    session shares one, see conftest.py)."""
    from playwright.sync_api import sync_playwright

    path = chromium()
    with sync_playwright() as p:
        # a fresh profile per browser (Playwright's default): no state of
        # another test or of the user's own Chromium
        browser = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def page_at(browser, url, wait_for='[data-cy="looker"]'):
    """A page (1400x900) of ``browser`` opened at ``url``, once ``wait_for``
    shows; closed afterwards."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_selector(wait_for, timeout=120_000)
        dismiss_popups(page)
        yield page
    finally:
        page.close()


@contextlib.contextmanager
def open_app(browser, view):
    """``(session, page)``: an App server on ``view`` and a page showing it."""
    port = free_port()
    session = fo.launch_app(view, port=port, address="127.0.0.1", remote=True, auto=False)
    try:
        with page_at(browser, f"http://127.0.0.1:{port}/datasets/{view._root_dataset.name}") as page:
            yield session, page
    finally:
        session.close()


def visible_plot(page):
    """The Plotly chart on screen (panels closed or behind another tab keep
    theirs in the page)."""
    return page.locator(".js-plotly-plot:visible").first


def dismiss_popups(page):
    try:
        page.get_by_text("Dismiss", exact=True).click(timeout=3000)
    except Exception:
        pass  # no promotional popup this time


def close_menus(page):
    page.keyboard.press("Escape")
    page.mouse.click(700, 40)


def grid(page, path):
    """A screenshot of the samples grid, after the overlays have settled, as
    an (H, W, 3) int16 array."""
    time.sleep(4)
    page.locator('[data-cy="fo-grid"]').screenshot(path=str(path))
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def open_operator(page, query, label):
    """Opens an operator's form from the operator browser."""
    close_menus(page)
    page.keyboard.press("`")
    search = page.get_by_placeholder("Search operations by name...")
    search.wait_for(timeout=15_000)
    search.fill(query)
    page.get_by_text(label, exact=True).first.click(timeout=15_000)


def open_panel(page, label):
    close_menus(page)
    page.locator('[data-cy="new-panel-btn"]').first.click()
    page.get_by_text(label, exact=True).first.click(timeout=15_000)
