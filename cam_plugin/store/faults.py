"""Fault-injection points for tests: with ``CAM_PLUGIN_KILL_AFTER_WRITES=k``
in the environment, the process kills itself (SIGKILL, as ``kill -9`` would)
right after its k-th database write of a run; with
``CAM_PLUGIN_STOP_AFTER_CHECKS=k`` it stops itself (SIGSTOP, as a hung
process) right after its k-th passed before-write check, before that write.
Unset, they do nothing."""

import os
import signal

_ENV = "CAM_PLUGIN_KILL_AFTER_WRITES"
_STOP_ENV = "CAM_PLUGIN_STOP_AFTER_CHECKS"
_count = 0
_checks = 0


def database_write(kind):
    """Counts one database write of a run (``kind`` names it, for logs)."""
    global _count
    limit = os.environ.get(_ENV)
    if not limit:
        return
    _count += 1
    if _count >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


def write_checked():
    """Counts one passed check that a write may go ahead."""
    global _checks
    limit = os.environ.get(_STOP_ENV)
    if not limit:
        return
    _checks += 1
    if _checks == int(limit):
        os.kill(os.getpid(), signal.SIGSTOP)
