"""A run's own file directory: paths built from sanitised names and checked
to lie inside it, atomic writes, and removal of exactly the files it wrote.

The directory is ``<output root>/<dataset name>-<dataset id>/<run key>-<run
uid>``: the dataset id and a uid drawn when the run is registered make it
belong to exactly one (dataset, run). A clone, another dataset given the
same ``output_dir``, or a dataset deleted and re-created under the same name
never share it. A marker file, :data:`MARKER`, records the owner; nothing is
ever deleted from a directory whose marker names another owner.
"""

import glob
import json
import os
import re
import socket
import threading
import time

import numpy as np
from PIL import Image

MARKER = ".cam_plugin_run.json"
TMP_MARK = ".tmp-"
# the names of the files runs write: <sample id>.png, and their temporary names
_RUN_FILE = re.compile(r"^[0-9a-f]{24}\.png(\.tmp-.*)?$")
_SAFE = re.compile(r"[^A-Za-z0-9_-]+")
_HOST = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()) or "host"


class FilesError(OSError):
    """A run file that cannot be written or a directory that is not the
    run's, naming the path and the problem."""


def safe_name(name, fallback="x"):
    """A file-system-safe form of a name: letters, digits, ``_`` and ``-``;
    never ``.``, ``..`` or a path separator."""
    safe = _SAFE.sub("_", str(name)).strip("_")
    return safe or fallback


def run_dir(output_root, dataset_name, dataset_id, key, uid):
    """The directory of one run of one dataset (see the module docstring)."""
    root = os.path.abspath(os.path.expanduser(os.fspath(output_root)))
    owner = f"{safe_name(dataset_name, 'dataset')}-{dataset_id}"
    return os.path.join(root, owner, f"{safe_name(key, 'run')}-{uid}")


class RunFiles:
    """The files of one run, all under ``root``.

    Args:
        root: the run's directory
        owner: a JSON-serialisable dict naming the owner (dataset id, run
            key and uid); written to :data:`MARKER` by :meth:`prepare`
    """

    def __init__(self, root, owner):
        self.root = os.path.abspath(root)
        self.owner = dict(owner)

    def prepare(self):
        """Creates the directory and its marker, or checks that an existing
        one is this run's.

        Raises:
            FilesError: the directory cannot be created (a file is in the
                way, no permission, ...) or belongs to another run
        """
        marker = os.path.join(self.root, MARKER)
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise FilesError(
                f"Cannot create the run's file directory {self.root}: "
                f"{e.strerror or e}; choose another output_dir"
            ) from None

        existing = read_marker(self.root)
        if existing is None:
            try:
                _write_atomic(marker, json.dumps(self.owner, sort_keys=True).encode())
            except OSError as e:
                raise FilesError(
                    f"Cannot write in {self.root}: {e.strerror or e}; choose "
                    "another output_dir"
                ) from None
        elif not self.owns(existing):
            raise FilesError(
                f"{self.root} belongs to another run ({existing}); choose another output_dir"
            )

    def owns(self, marker):
        return all(marker.get(k) == v for k, v in self.owner.items())

    def path(self, target, sample_id):
        """The path of a sample's file for a target (a sanitised name), checked
        to lie inside the run's directory."""
        if not re.fullmatch(r"[0-9a-f]{24}", str(sample_id)):
            raise FilesError(f"'{sample_id}' is not a sample id")
        path = os.path.join(self.root, safe_name(target), f"{sample_id}.png")
        real_root = os.path.realpath(self.root)
        if not os.path.realpath(path).startswith(real_root + os.sep):
            raise FilesError(f"{path} would lie outside the run's directory {self.root}")
        return path

    def make_target_dirs(self, targets):
        for target in targets:
            directory = os.path.join(self.root, safe_name(target))
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as e:
                raise FilesError(f"Cannot create {directory}: {e.strerror or e}") from None

    def remove_temporary(self):
        """Removes temporary files that killed writers left (never those of a
        live process on this host, which may be writing them now); returns
        how many."""
        removed = 0
        pattern = os.path.join(glob.escape(self.root), "*", f"*{TMP_MARK}*")
        for path in glob.glob(pattern):
            name = os.path.basename(path)
            if _RUN_FILE.match(name) and not _writer_alive(path):
                try:
                    os.remove(path)
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def remove(self):
        """Removes the files the run wrote and the directories left empty;
        anything else a user put there stays. Refuses a directory whose
        marker names another owner.

        Returns:
            the number of files removed
        """
        if not os.path.isdir(self.root):
            return 0
        marker = read_marker(self.root)
        if marker is not None and not self.owns(marker):
            raise FilesError(f"{self.root} belongs to another run ({marker}); not removed")
        removed = 0
        for entry in os.scandir(self.root):
            if not entry.is_dir(follow_symlinks=False):
                continue
            for name in os.listdir(entry.path):
                if _RUN_FILE.match(name):
                    os.remove(os.path.join(entry.path, name))
                    removed += 1
            _remove_if_empty(entry.path)
        if marker is not None:
            os.remove(os.path.join(self.root, MARKER))
        if _remove_if_empty(self.root):
            # the per-dataset directory goes when its last run does
            _remove_if_empty(os.path.dirname(self.root))
        return removed


def _remove_if_empty(directory):
    # a concurrent writer may have just added a file: then it stays
    try:
        os.rmdir(directory)
        return True
    except OSError:
        return False


def read_marker(directory):
    try:
        with open(os.path.join(directory, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _tmp_path(path):
    # host and pid name the writer, so a cleanup can tell a dead writer's
    # leftovers from a live one's file in progress (even on a shared folder)
    return f"{path}{TMP_MARK}{_HOST}.{os.getpid()}.{threading.get_ident()}"


def _writer_alive(tmp_path):
    try:
        host, pid, _ = tmp_path.rsplit(TMP_MARK, 1)[1].rsplit(".", 2)
        pid = int(pid)
    except ValueError:
        return False
    if host != _HOST:
        # another machine's writer: only an old file is surely abandoned
        try:
            return time.time() - os.path.getmtime(tmp_path) < 3600
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_atomic(path, data):
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_png_atomic(path, levels):
    """Writes a uint16 (h, w) array as a 16-bit grayscale PNG under a
    temporary name renamed into place, so a reader or a killed process never
    sees a partial file.

    Raises:
        FilesError: naming the path and the cause (a full disk, a removed
            directory, ...)
    """
    tmp = _tmp_path(path)
    img = Image.fromarray(np.ascontiguousarray(levels, dtype=np.uint16))
    try:
        img.save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise FilesError(f"Cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        _discard(tmp)
        raise


def _discard(path):
    try:
        os.remove(path)
    except OSError:
        pass
