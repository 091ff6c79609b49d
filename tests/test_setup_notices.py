"""What a user sees when a process of theirs connects to the MongoDB the
set-up installed: not FiftyOne's "oldest supported major version" notice
on every run (issue 12, point 10)."""

import os
import subprocess
import sys

import pytest

NOTICE = "oldest supported major version of MongoDB"


def _connect(code):
    """Runs ``code`` in a fresh process on this session's database with
    FiftyOne's version check on, as a user's process has it."""
    env = dict(os.environ)
    env.pop("FIFTYONE_DATABASE_VALIDATION", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout + result.stderr


def test_the_oldest_mongodb_notice_is_not_shown_to_plugin_users():
    plain = _connect("import fiftyone as fo; fo.list_datasets()")
    if NOTICE not in plain:
        pytest.skip("this machine's mongod is not the oldest supported version: FiftyOne has nothing to say")

    quiet = _connect("import fiftyone as fo; import cam_plugin; print('datasets', len(fo.list_datasets()))")
    assert NOTICE not in quiet
    assert "datasets" in quiet
