"""Browser fixtures shared by the App tests of a module: one demo dataset,
one App server and one headless Chromium page, closed when the module ends
(an App server left running through the rest of the suite would outlive
what it serves).

Needs Debian's ``chromium`` (``.ci/run`` installs it). Screenshots go to
``$CAM_PLUGIN_SCREENSHOTS`` (default: a temporary directory); ``make
screenshots`` writes them to ``docs/`` for the README.
"""

import os
from pathlib import Path

import pytest

import fiftyone as fo

import browser  # tests/e2e/browser.py
import demo  # examples/demo.py, put on the path by tests/conftest.py


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
    dataset, info = demo.run_demo(
        root, seed=0, config=config, name="e2e-cam-demo", progress=False, log=lambda *a: None
    )
    assert info["cam_summary"].processed == config.n_test
    yield dataset
    fo.delete_dataset(dataset.name)


@pytest.fixture(scope="module")
def chromium_browser():
    """The session's headless Chromium."""
    with browser.launch() as b:
        yield b


@pytest.fixture(scope="module")
def app(chromium_browser, demo_dataset):
    """``(session, page)``: the App on the demo's test samples, in Chromium.
    Tests that change the view or dataset put the test samples back."""
    with browser.open_app(chromium_browser, demo_dataset.match_tags("test")) as (session, page):
        yield session, page
