"""Test set-up: an isolated FiftyOne database and plugins dir, shared data.

The environment is set before FiftyOne is imported anywhere, so every test
(and every subprocess a test starts) talks to the session's own mongod, on
its own port and temporary database dir (:mod:`cam_plugin.private_db`), never the
user's ``~/.fiftyone`` database or another session's server.
"""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_TMP = Path(tempfile.mkdtemp(prefix="cam_plugin_tests_"))
_PLUGINS = _TMP / "plugins"
_PLUGINS.mkdir()
# FiftyOne finds plugins by their fiftyone.yml; the repository is the plugin
(_PLUGINS / "cam_plugin").symlink_to(REPO, target_is_directory=True)

for var in ("FIFTYONE_DATABASE_URI", "FIFTYONE_DATABASE_NAME"):
    os.environ.pop(var, None)

from cam_plugin import private_db  # noqa: E402  (imports no FiftyOne)

_MONGOD, _DATABASE_URI = private_db.start(_TMP / "db")
atexit.register(private_db.stop, _MONGOD)

os.environ.update(
    {
        "FIFTYONE_DATABASE_URI": _DATABASE_URI,
        "FIFTYONE_DATABASE_DIR": str(_TMP / "unused_db"),
        "FIFTYONE_DEFAULT_DATASET_DIR": str(_TMP / "datasets"),
        "FIFTYONE_PLUGINS_DIR": str(_PLUGINS),
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_SHOW_PROGRESS_BARS": "false",
        # mongod 6.0 (the Debian fallback) is supported; skip the nag
        "FIFTYONE_DATABASE_VALIDATION": "false",
    }
)
# cam_plugin itself is an installed package (`make setup-test`); only the
# examples, which are not part of it, are put on the tests' path
# (``import demo`` is examples/demo.py)
EXAMPLES = REPO / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import pytest  # noqa: E402

SHARED_DATA = Path(
    os.environ.get("CAM_PLUGIN_SHARED_DATA", REPO.parent / "shared" / "data")
)


def pytest_sessionfinish(session, exitstatus):
    # stop this session's mongod before removing its database dir
    database = sys.modules.get("fiftyone.core.odm.database")
    if database is not None:
        # FiftyOne's own exit hook would reconnect to a stopped server
        atexit.unregister(database._delete_non_persistent_datasets_if_allowed)
        database._disconnect()
    private_db.stop(_MONGOD)
    shutil.rmtree(_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def tmp_root():
    return _TMP


@pytest.fixture(scope="session")
def shared_data():
    """The read-only shared data folder (``../shared/data``)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"shared data not found at {SHARED_DATA}; place the shared folder "
            "beside the checkout or set CAM_PLUGIN_SHARED_DATA"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def resnet20_path(shared_data):
    path = shared_data / "cifar10_resnet20" / "resnet20-12fca82f.th"
    if not path.is_file():
        pytest.skip(f"CIFAR-10 ResNet-20 checkpoint not found at {path}")
    return path


@pytest.fixture(scope="session")
def cifar_dir(shared_data):
    path = shared_data / "cifar10_test_sample"
    if not path.is_dir():
        pytest.skip(f"CIFAR-10 test sample not found at {path}")
    return path


@pytest.fixture(scope="session")
def coco_dir(shared_data):
    path = shared_data / "coco128_train"
    if not path.is_dir():
        pytest.skip(f"COCO128 not found at {path}")
    return path


@pytest.fixture
def dataset_name(request):
    """A unique dataset name per test; the dataset is deleted afterwards."""
    import fiftyone as fo

    name = "t_" + request.node.name.replace("[", "_").replace("]", "_")[:60]
    if fo.dataset_exists(name):
        fo.delete_dataset(name)

    yield name

    if fo.dataset_exists(name):
        fo.delete_dataset(name)


# A FiftyOne database of the user's own, running beside the whole session
# the way an App open on ~/.fiftyone does (FiftyOne's own database service,
# found by its directory); tests/test_zz_isolation.py checks at the end of
# the session that nothing of the tests reached it.
_USERS_SCRIPT = """
import sys
import fiftyone as fo

dataset = fo.Dataset("users_own_dataset", persistent=True)
dataset.add_samples([fo.Sample(filepath=f"/data/user/{i}.jpg", note=f"mine {i}") for i in range(3)])
print("READY", flush=True)
sys.stdin.readline()
"""


def _users_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIFTYONE_")}
    env.update(
        FIFTYONE_DATABASE_DIR=str(_TMP / "users_database"),
        FIFTYONE_DO_NOT_TRACK="true",
        FIFTYONE_DATABASE_VALIDATION="false",
    )
    return env


@pytest.fixture(scope="session", autouse=True)
def users_database():
    """The user's own FiftyOne database, served while the suite runs; yields
    its environment, or an error message when it could not be started."""
    import subprocess
    import time

    # output to a file, not a pipe: FiftyOne's database service, a process
    # of its own, inherits the descriptors and would hold a pipe open
    log_path = _TMP / "users_database.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _USERS_SCRIPT],
            env=_users_env(),
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and "READY" not in log_path.read_text():
        time.sleep(0.2)
    ready = "READY" in log_path.read_text()
    state = {"env": _users_env()} if ready else {"error": log_path.read_text()[-2000:]}
    try:
        yield state
    finally:
        if proc.poll() is None:
            try:
                proc.stdin.write("quit\n")
                proc.stdin.close()
                proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
