"""A MongoDB server of the test session's own: FiftyOne's bundled mongod on a
free port with a temporary database dir, reached through ``database_uri``.

FiftyOne joins any database service already running for the user whatever
``FIFTYONE_DATABASE_DIR`` says, so a dir alone isolates nothing: a second
test session (or the App open on ``~/.fiftyone``) would share its server.
A server started here, on its own port, is used by this session alone.
"""

import importlib.util
import os
import socket
import subprocess
import time


def mongod_path():
    spec = importlib.util.find_spec("fiftyone")
    root = list(spec.submodule_search_locations)[0]
    return os.path.join(root, "db", "bin", "mongod")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(dbpath, timeout=60):
    """Starts mongod on a free port with ``dbpath``; returns ``(process,
    uri)``."""
    os.makedirs(dbpath, exist_ok=True)
    for _ in range(5):
        port = _free_port()
        proc = subprocess.Popen(
            [mongod_path(), "--dbpath", str(dbpath), "--port", str(port), "--bind_ip", "127.0.0.1",
             "--nounixsocket", "--quiet", "--logpath", os.path.join(dbpath, "mongod.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return proc, f"mongodb://127.0.0.1:{port}/?directConnection=true"
            except OSError:
                time.sleep(0.1)
        proc.kill()
        proc.wait()
    raise RuntimeError(f"mongod did not start; see {dbpath}/mongod.log")


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
