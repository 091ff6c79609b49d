"""A fault-injection point for tests: with ``CAM_PLUGIN_KILL_AFTER_WRITES=k``
in the environment, the process kills itself (SIGKILL, as ``kill -9`` would)
right after its k-th database write of a run. Unset, it does nothing."""

import os
import signal

_ENV = "CAM_PLUGIN_KILL_AFTER_WRITES"
_count = 0


def database_write(kind):
    """Counts one database write of a run (``kind`` names it, for logs)."""
    global _count
    limit = os.environ.get(_ENV)
    if not limit:
        return
    _count += 1
    if _count >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)
