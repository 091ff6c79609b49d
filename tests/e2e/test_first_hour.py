"""A new user's first hour in the App, in a real headless Chromium: the App
that ``make app`` opens has the plugin; the per-class panel opens on a
dataset whose first run has no ground truth and lets the user switch runs;
the views form offers a field without ground truth the views that need
none; the summary runs on the chosen
target and says so; the runs table shows its counts and every field; the
panel's bars carry their counts.

Fixtures (the demo dataset, the App in Chromium, screenshots) are in
conftest.py.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fiftyone as fo

import browser
import cam_plugin
import demo  # examples/demo.py, put on the path by tests/conftest.py
from builders import two_cam_runs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def first_runs(cifar_dir, resnet20_path):
    """A dataset with a CAM run without ground truth (``cam``) and one with
    it (``withgt``), both measured."""
    dataset = two_cam_runs("e2e-first-runs", cifar_dir, resnet20_path)
    yield dataset
    fo.delete_dataset(dataset.name)


@contextlib.contextmanager
def _fresh_page(chromium_browser, session, dataset):
    """A new tab on the App, its panels back to the default layout: a page
    shared with earlier tests keeps their panels and dialogs."""
    session.spaces = None
    url = f"http://127.0.0.1:{session.server_port}/datasets/{dataset.name}"
    with browser.page_at(chromium_browser, url) as page:
        yield page


@pytest.fixture
def on_first_runs(app, chromium_browser, first_runs, demo_dataset):
    """The App switched to ``first_runs``, in a tab of its own; back to the
    demo afterwards."""
    session, _ = app
    session.dataset = first_runs
    try:
        with _fresh_page(chromium_browser, session, first_runs) as page:
            page.get_by_text(f"{len(first_runs)} samples").first.wait_for(timeout=60_000)
            yield session, page
    finally:
        session.spaces = None
        session.dataset = demo_dataset
        session.view = demo_dataset.match_tags("test")


def _execute(page):
    """Clicks Execute once the form has validated (the App re-resolves a
    dynamic form after every change, and a slow machine takes a while)."""
    from playwright.sync_api import expect

    button = page.get_by_role("button", name="Execute")
    expect(button).to_be_enabled(timeout=120_000)
    button.click(timeout=30_000)


def _no_operator_error(page):
    text = page.locator("body").inner_text()
    assert "Operator Error" not in text and "Error occurred" not in text, text[-2000:]


def test_make_app_opens_the_app_with_the_plugin(chromium_browser, tmp_path, shots):
    """The README's `make app`, as a user runs it (no FIFTYONE_* settings of
    the tests), opens an App whose operator browser and panel menu have the
    plugin."""
    venv = Path(sys.prefix)
    if not (venv / ".runtime-installed").is_file():
        pytest.skip(f"`make app` needs the project's virtual environment; {venv} is not one (run `make test`)")
    port = browser.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIFTYONE_")}
    # no desktop browser tab from launch_app, no usage tracking
    env.update(BROWSER="true", FIFTYONE_DO_NOT_TRACK="true")
    log = tmp_path / "make-app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["make", "-C", str(REPO), "app", f"VENV={venv}", f"DEMO_DIR={tmp_path / 'demo'}",
             f"ARGS=--small --port {port}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.time() + 600
        while "The App is at" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        # the demo's own database, never the tests' (nor the user's)
        assert not (tmp_path / "demo" / "db").is_dir() or any((tmp_path / "demo" / "db").iterdir())

        url = f"http://127.0.0.1:{port}/datasets/{demo.DATASET_NAME}"
        with browser.page_at(chromium_browser, url) as page:
            browser.open_operator(page, "class activation", "Compute class activation maps")
            page.get_by_text("Model", exact=True).first.wait_for(timeout=30_000)
            browser.close_menus(page)
            page.keyboard.press("`")
            search = page.get_by_placeholder("Search operations by name...")
            search.fill("CAM runs")
            page.get_by_text("Manage CAM runs: list", exact=True).wait_for(timeout=15_000)
            page.screenshot(path=str(shots / "app-make-app-operators.png"))
            browser.open_panel(page, "Attention by class")
            browser.visible_plot(page).locator(".bars .point").first.wait_for(timeout=60_000)
            _no_operator_error(page)
            page.screenshot(path=str(shots / "app-make-app-panel.png"))
    finally:
        # Ctrl+C, as in a terminal: the demo stops its own database server
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_panel_opens_when_the_first_run_has_no_ground_truth(on_first_runs, first_runs, shots):
    """Before: "Uncaught Operator Error: The views need the ground-truth
    field..." on load. Now the panel picks the run it can use, names the
    other with its reason, and lets the user switch between usable runs."""
    session, page = on_first_runs
    browser.open_panel(page, "Attention by class")
    plot = browser.visible_plot(page)
    bars = plot.locator(".bars .point")
    bars.first.wait_for(timeout=60_000)
    _no_operator_error(page)
    page.get_by_text("Not offered", exact=False).first.wait_for(timeout=30_000)
    assert "without ground truth" in page.locator("body").inner_text()
    ticks = {t.strip() for t in plot.locator(".xtick text").all_text_contents()}
    assert ticks == set(first_runs.distinct("ground_truth.label"))
    time.sleep(1)
    page.screenshot(path=str(shots / "app-panel-first-run-without-ground-truth.png"))

    # switch to the ground-truth maps' run, as a user would
    page.get_by_role("combobox").filter(has_text="withgt").first.click()
    page.get_by_role("option", name="withgt_gt", exact=True).click(timeout=30_000)
    page.get_by_text("withgt_gt on the whole dataset", exact=False).first.wait_for(timeout=30_000)
    bars.first.wait_for(timeout=30_000)
    _no_operator_error(page)


def test_views_form_offers_only_usable_fields_and_runs(on_first_runs, first_runs, shots):
    session, page = on_first_runs
    browser.open_operator(page, "wrong place", "Find where the model looked at the wrong place")
    # "cam" has boxes but no ground truth: offered, with the views that need none
    page.get_by_text("Without ground truth: only qa_unlabelled_attention", exact=False).first.wait_for(
        timeout=30_000
    )
    assert page.get_by_text("Not offered", exact=False).count() == 0
    page.screenshot(path=str(shots / "app-views-form.png"))
    _execute(page)
    page.get_by_text("Samples per view", exact=True).first.wait_for(timeout=60_000)
    page.get_by_text("cam_border_attention", exact=True).first.wait_for(timeout=15_000)
    assert page.get_by_text("cam_misclassified_background", exact=True).count() == 0
    page.get_by_text(f"the whole dataset ({len(first_runs)} samples)", exact=True).first.wait_for(timeout=15_000)
    _no_operator_error(page)


def test_summary_runs_on_the_current_view_when_chosen(on_first_runs, first_runs, shots):
    session, page = on_first_runs
    view = first_runs.match(fo.ViewField("ground_truth.label").is_in(["cat", "dog", "ship"]))
    session.view = view
    page.get_by_text(f"{len(view)} samples").first.wait_for(timeout=30_000)
    browser.open_operator(page, "background", "Which classes look at the background")
    page.get_by_role("dialog").get_by_text("Current view", exact=True).first.click(timeout=30_000)
    _execute(page)
    page.get_by_text(f"the current view ({len(view)} samples)", exact=True).first.wait_for(timeout=60_000)
    for name in ("cat", "dog", "ship"):
        page.get_by_role("cell", name=name, exact=True).first.wait_for(timeout=15_000)
    assert page.get_by_role("cell", name="airplane", exact=True).count() == 0
    page.screenshot(path=str(shots / "app-summary-current-view.png"))


_CLIPPED_CELLS = """
() => Array.from(document.querySelectorAll('td, th'))
    .filter(c => c.offsetParent !== null && c.scrollWidth > c.clientWidth + 1)
    .map(c => c.innerText)
"""

# tables wider than the dialog they are in: their right columns are cut off
_WIDE_TABLES = """
() => {
    const dialog = document.querySelector('[role="dialog"]');
    const right = dialog.getBoundingClientRect().right;
    return Array.from(dialog.querySelectorAll('table'))
        .filter(t => t.getBoundingClientRect().right > right + 1 || t.scrollWidth > t.parentElement.clientWidth + 1)
        .map(t => t.innerText.slice(0, 80));
}
"""


def test_runs_table_shows_counts_and_every_field(on_first_runs, first_runs, shots):
    session, page = on_first_runs
    browser.open_operator(page, "CAM runs", "Manage CAM runs: list")
    try:
        page.get_by_role("button", name="Execute").click(timeout=5_000)
    except Exception:
        pass  # no inputs: the App may run it at once
    n = len(first_runs)
    page.get_by_text(f"{n} done, 0 failed, 0 to do", exact=True).first.wait_for(timeout=60_000)
    page.get_by_text("What each run computed and owns", exact=True).first.wait_for(timeout=15_000)
    for field in ("withgt_prediction", "withgt_gt", "withgt_object_energy"):
        page.get_by_text(field, exact=False).first.wait_for(timeout=15_000)
    clipped = page.evaluate(_CLIPPED_CELLS)
    assert not clipped, f"cells cut off: {json.dumps(clipped)[:500]}"
    wide = page.evaluate(_WIDE_TABLES)
    assert not wide, f"tables wider than the dialog: {json.dumps(wide)[:500]}"
    page.screenshot(path=str(shots / "app-runs.png"), full_page=True)


def test_panel_bars_show_their_counts(app, chromium_browser, demo_dataset, shots):
    session, _ = app
    with _fresh_page(chromium_browser, session, demo_dataset) as page:
        _bars_show_their_counts(page, demo_dataset, shots)


def _bars_show_their_counts(page, demo_dataset, shots):
    browser.open_panel(page, "Attention by class")
    plot = browser.visible_plot(page)
    plot.locator(".bars .point").nth(len(demo.CLASSES) - 1).wait_for(timeout=60_000)
    texts = [t.strip() for t in plot.locator(".bars .point text").all_text_contents()]
    assert len(texts) == len(demo.CLASSES)
    assert all("/" in t for t in texts), texts
    # the counts add up to the measured samples
    assert sum(int(t.split("/")[1]) for t in texts) <= len(demo_dataset.match_tags("test"))
    page.get_by_text("ranked by the interval", exact=False).first.wait_for(timeout=15_000)
    time.sleep(1)
    page.screenshot(path=str(shots / "app-attention-by-class-panel.png"))


def test_background_reliance_runs_from_the_operator_browser(on_first_runs, first_runs, shots):
    """The intervention run from the App: the form picks the CAM run's model
    and the regions its maps were measured against, the run streams its
    progress and reports its counts; its fields are then on every sample."""
    session, page = on_first_runs
    try:
        browser.open_operator(page, "reliance", "Test background reliance")
        page.get_by_text("Model: cifar10_resnet20:", exact=False).first.wait_for(timeout=30_000)
        page.screenshot(path=str(shots / "app-reliance-form.png"))
        _execute(page)
        # the run's output: its key, status and counts
        page.get_by_text("cam_reliance", exact=True).first.wait_for(timeout=180_000)
        page.get_by_text("completed", exact=True).first.wait_for(timeout=15_000)
        page.get_by_text(f"the whole dataset ({len(first_runs)} samples)", exact=True).first.wait_for(timeout=15_000)
        _no_operator_error(page)
        first_runs.reload()
        assert first_runs.count("cam_bg_reliance") == len(first_runs)
        assert cam_plugin.get_run(first_runs, "cam_reliance")["region_field"] == "objects"
        page.screenshot(path=str(shots / "app-reliance-output.png"))
    finally:
        page.keyboard.press("Escape")
        if "cam_reliance" in cam_plugin.list_runs(first_runs):
            cam_plugin.delete_run(first_runs, "cam_reliance")
