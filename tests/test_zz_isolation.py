"""The suite's database is its own (issue 12): a FiftyOne database the user
has running beside it (an App open on ``~/.fiftyone``, say) is neither used
nor touched by the tests. Named to run last, after the whole suite has had
its chance to do harm; ``users_database`` (conftest) started with it."""

import subprocess
import sys

import fiftyone as fo

_CHECK = """
import fiftyone as fo

names = fo.list_datasets()
dataset = fo.load_dataset("users_own_dataset")
print("DATASETS", sorted(names))
print("NOTES", dataset.values("note"))
"""


def test_the_users_own_database_survives_the_suite(users_database, tmp_path):
    assert "env" in users_database, users_database.get("error")
    # the suite never saw the user's dataset ...
    assert "users_own_dataset" not in fo.list_datasets()

    # ... and the user's database, still served beside the suite, holds its
    # dataset as it was and nothing of the tests
    # output to a file: a database service the check might start would hold
    # a pipe open
    out = tmp_path / "check.log"
    with open(out, "w") as log:
        check = subprocess.run(
            [sys.executable, "-c", _CHECK], env=users_database["env"], stdout=log,
            stderr=subprocess.STDOUT, timeout=300,
        )
    text = out.read_text()
    assert check.returncode == 0, text[-2000:]
    lines = dict(line.split(" ", 1) for line in text.splitlines() if line.startswith(("DATASETS", "NOTES")))
    assert lines["DATASETS"] == "['users_own_dataset']", lines
    assert lines["NOTES"] == "['mine 0', 'mine 1', 'mine 2']", lines
