"""A MongoDB server of a process's own: FiftyOne's bundled mongod on a free
port with a database dir of its own, reached through ``database_uri``, for
the tests, the demo and the benchmarks.

FiftyOne joins any database service already running for the user whatever
``FIFTYONE_DATABASE_DIR`` says, so a dir alone isolates nothing: the demo or
a test session would write into the database of an App open on
``~/.fiftyone``, or of another test session. A server started here, on its
own port, serves its caller alone. Start it before FiftyOne is imported
(FiftyOne reads ``FIFTYONE_DATABASE_URI`` once, at import).
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


def use(dbpath):
    """Starts a server on ``dbpath``, points this process (and the processes
    it starts) at it, and stops it when the process exits; returns its
    URI."""
    import atexit

    proc, uri = start(dbpath)
    atexit.register(stop, proc)
    os.environ["FIFTYONE_DATABASE_URI"] = uri
    # FiftyOne's check of the server's version would warn on every run
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    return uri


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
