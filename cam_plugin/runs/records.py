"""The records runs keep on a dataset: registered with FiftyOne's run
registry (so they list, clone and delete with the dataset) and updated in
place, one key at a time, with atomic MongoDB updates of the run's own
document, so shards and concurrent runs never overwrite each other's state.

A record holds the run's configuration (its identity), ``status``,
``counts``, ``fields``, ``files_dir``, ``dataset_id`` (the dataset that owns
the files) and ``shards``: per shard, its ``status`` (``running``, ``done``,
``failed``), the worker holding it (host, pid, process start time), a claim
``token`` and a ``heartbeat``.
"""

import os
import socket
import uuid
from datetime import datetime, timedelta, timezone

import fiftyone as fo
import fiftyone.core.odm as foo
import fiftyone.core.sample as fos

from ..store import faults

CAM_RUN = "cam_plugin.compute_cams"
ATTENTION_RUN = "cam_plugin.compute_attention"
RELIANCE_RUN = "cam_plugin.compute_reliance"
CONTEXT_RUN = "cam_plugin.compute_context"
CUES_RUN = "cam_plugin.discover_cues"
# (listed here, not only when their modules are imported: a dataset's runs
# are listed and deleted by processes that never ran one of them)
RUN_METHODS = [CAM_RUN, ATTENTION_RUN, RELIANCE_RUN, CONTEXT_RUN, CUES_RUN]

#: a running shard whose heartbeat is older than this is stale (its worker
#: died or lost the database); on the worker's own host a dead process is
#: recognised at once
STALE_AFTER_S = float(os.environ.get("CAM_PLUGIN_STALE_AFTER_S", 60))
HEARTBEAT_S = min(10.0, STALE_AFTER_S / 4)

# config entries that describe state, not what is computed
STATE_KEYS = (
    "status",
    "counts",
    "fields",
    "files_dir",
    "output_root",
    "depends_on",
    "dataset_id",
    "uid",
    "shards",
    "num_shards",
    "error",
    "foreign_files_dirs",
    "inherited_files_dirs",
    "done_fields",
    "error_field",
    "candidate_field",
    "key",
    "timestamp",
    "cls",
    "type",
    "method",
    # how the heatmaps are drawn (cam_plugin.scale), not what is computed
    "heatmap_scale",
    # what a cue run's grouping made (cam_plugin.runs.cues)
    "groups",
    "saved_views",
    "brain_keys",
    "grouping",
)


class RunError(ValueError):
    """A run that cannot start as asked, with what to do instead."""


def register_method(method):
    """Makes a run type's method name known to the registry."""
    if method not in RUN_METHODS:
        RUN_METHODS.append(method)


def list_runs(samples, method=None):
    """Keys of this plugin's runs on the dataset, optionally of one method
    (read fresh: another process may have registered one)."""
    dataset = samples._root_dataset
    dataset.reload()
    keys = []
    for m in (method,) if method else RUN_METHODS:
        keys.extend(dataset.list_runs(method=m))
    return sorted(keys)


def _runs_collection():
    return foo.get_db_conn().runs


def _doc_id(dataset, key):
    dataset.reload()
    run_doc = dataset._doc.runs.get(key)
    if run_doc is None:
        raise RunError(f"Dataset '{dataset.name}' has no run '{key}'")
    return run_doc.id


def multilabel_run(samples, heatmap_field):
    """The record of the multi-label CAM run given ``heatmap_field``
    (whose ``class_fields`` maps each class to its heatmap field), or None."""
    for key in list_runs(samples, CAM_RUN):
        config = get_run(samples, key, derive=False)
        if config.get("multilabel") and config.get("heatmap_field") == heatmap_field:
            return config
    return None


def label_class(config, heatmap_field):
    """The class whose maps ``heatmap_field`` holds, when ``config`` is the
    record of the multi-label CAM run that made it; None otherwise."""
    if not config.get("multilabel"):
        return None
    return next((c for c, f in (config.get("class_fields") or {}).items() if f == heatmap_field), None)


def get_run(samples, key, derive=True):
    """A run's configuration and state, read fresh from the database, as a
    plain dict with ``key``, ``method``, ``timestamp``, ``status``,
    ``counts``, ``files_dir`` and ``shards`` (each with its ``state``:
    ``running``, ``stale``, ``done`` or ``failed``).

    ``counts`` and ``status`` are derived from the data of the run's view at
    the time of the call (``derive=False`` gives the stored ones): they
    follow samples added or deleted since, and a killed run's record tells
    what is stored."""
    dataset = samples._root_dataset
    doc = _runs_collection().find_one({"_id": _doc_id(dataset, key)})
    if doc is None:
        raise RunError(f"Dataset '{dataset.name}' has no run '{key}'")
    config = dict(doc.get("config") or {})
    config.pop("cls", None)
    config.pop("type", None)
    config["key"] = key
    config["timestamp"] = doc["timestamp"].isoformat() if doc.get("timestamp") else None
    if config.get("dataset_id") is not None and str(config["dataset_id"]) != str(dataset._doc.id):
        # a clone's copy of another dataset's run: those shards and their
        # workers are the other dataset's, not this one's
        config["shards"] = {}
    now = datetime.utcnow()
    for shard in (config.get("shards") or {}).values():
        shard["state"] = shard_state(shard, now)
    if derive and config.get("done_fields"):
        view = run_view(dataset, doc)
        if view is not None and view.media_type == "group" and config.get("group_slice"):
            # the slice the run processed, whichever slice is active here
            view = view.select_group_slices(config["group_slice"])
        if view is not None:
            counts = data_counts(
                view, config["done_fields"], config.get("error_field"), config.get("candidate_field")
            )
            config["counts"] = counts
            live = any(s["state"] == "running" for s in (config.get("shards") or {}).values())
            config["status"] = "completed" if counts["todo"] == 0 and not live else "running"
    return config


def run_view(dataset, doc):
    """The view a run was last called on (None if it cannot be rebuilt, say
    a field its stages use was deleted)."""
    import fiftyone.core.view as fov
    from bson import json_util

    stages = doc.get("view_stages")
    if not stages:
        return dataset.view()
    try:
        return fov.DatasetView._build(dataset, [json_util.loads(s) for s in stages])
    except Exception:
        return None


def serialize_view(samples):
    """The view's stages as FiftyOne stores them on run documents."""
    from bson import json_util

    if samples is samples._root_dataset:
        return None
    return [json_util.dumps(s) for s in samples._serialize(include_uuids=False)]


def data_counts(view, done_fields, error_field=None, candidate_field=None):
    """Counts derived from the data: ``samples`` the run applies to in the
    view, ``processed`` (done), ``failed``, ``todo`` and ``errors`` (failure
    reasons, from the stored ``"<reason>: <detail>"`` messages)."""
    from collections import Counter

    if candidate_field:
        view = view.exists(candidate_field)
    total = view.count()
    missing = view
    for name in done_fields:
        missing = missing.exists(name, False)
    not_done = missing.count()
    failed = view.exists(error_field).count() if error_field else 0
    errors = Counter()
    if failed:
        for message, n in view.count_values(error_field).items():
            if message is not None:
                errors[message.split(": ", 1)[0]] += n
    return {
        "samples": total,
        "processed": total - not_done,
        "failed": failed,
        "todo": max(0, not_done - failed),
        "errors": dict(errors),
    }


def shard_state(shard, now=None):
    """``running``, ``stale`` (running, but its worker is gone), ``done`` or
    ``failed``."""
    status = shard.get("status")
    if status != "running":
        return status
    return "running" if worker_alive(shard, now) else "stale"


def _naive_utc(moment):
    # with fo.config.timezone set, FiftyOne's client reads datetimes back
    # timezone-aware; the plugin compares them in naive UTC
    if moment is not None and moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def worker_alive(shard, now=None):
    now = _naive_utc(now) or datetime.utcnow()
    beat = _naive_utc(shard.get("heartbeat"))
    if beat is None or now - beat > timedelta(seconds=STALE_AFTER_S):
        return False
    worker = shard.get("worker") or {}
    if worker.get("host") == socket.gethostname():
        return _process_alive(worker.get("pid"), worker.get("started"))
    return True


def this_worker():
    """The calling process: host, pid and process start time (a pid alone
    can be reused)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}


def _start_time(pid):
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, TypeError):
        return None


def _process_alive(pid, started):
    import psutil

    if pid is None:
        return False
    try:
        process = psutil.Process(pid)
        # a killed process its parent has not reaped yet is a zombie: dead
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        now_started = process.create_time()
    except (psutil.Error, TypeError):
        return False
    return started is None or abs(now_started - started) < 1e-3


class RunRecord:
    """A handle on one registered run's document."""

    def __init__(self, dataset, key, doc_id):
        self.dataset = dataset
        self.key = key
        self.doc_id = doc_id

    @classmethod
    def of(cls, samples, key):
        dataset = samples._root_dataset
        return cls(dataset, key, _doc_id(dataset, key))

    def read(self):
        doc = _runs_collection().find_one({"_id": self.doc_id})
        return None if doc is None else dict(doc.get("config") or {})

    def set_view(self, samples):
        """Records the view of the latest call: the samples whose being done
        makes the run ``completed``."""
        _runs_collection().update_one(
            {"_id": self.doc_id}, {"$set": {"view_stages": serialize_view(samples)}}
        )

    def exists(self):
        return _runs_collection().count_documents({"_id": self.doc_id}, limit=1) > 0

    def update(self, unless_status=None, **values):
        """Sets config entries (dotted names reach into ``shards``); with
        ``unless_status``, only if the run's status is not that one."""
        condition = {"_id": self.doc_id}
        if unless_status is not None:
            condition["config.status"] = {"$ne": unless_status}
        _runs_collection().update_one(
            condition, {"$set": {f"config.{k}": v for k, v in values.items()}}
        )
        faults.database_write("record")

    def claim(self, shard, token):
        """Takes a shard unless a live worker holds it; atomic, so two
        workers never both hold one.

        Returns:
            None when claimed, else the holder's shard entry
        """
        path = f"config.shards.{shard}"
        doc = _runs_collection().find_one({"_id": self.doc_id}, {path: 1})
        if doc is None:
            raise RunError(f"Run '{self.key}' was deleted")
        current = ((doc.get("config") or {}).get("shards") or {}).get(str(shard))
        if current and current.get("status") == "running" and worker_alive(current):
            return current

        # the update applies only if the shard is still as we read it
        condition = {"_id": self.doc_id}
        if current is None:
            condition[path] = {"$exists": False}
        else:
            condition[f"{path}.token"] = current.get("token")
        entry = {
            "status": "running",
            "token": token,
            "worker": this_worker(),
            "heartbeat": datetime.utcnow(),
            "claimed": datetime.utcnow(),
            "taken_over": current.get("worker") if current and current.get("status") == "running" else None,
        }
        result = _runs_collection().update_one(condition, {"$set": {path: entry}})
        faults.database_write("claim")
        if result.modified_count == 1:
            return None
        doc = _runs_collection().find_one({"_id": self.doc_id}, {path: 1})
        return ((doc or {}).get("config") or {}).get("shards", {}).get(str(shard)) or {}

    def holds(self, shard, token):
        """Whether the run still exists and this token still holds the shard."""
        doc = _runs_collection().find_one(
            {"_id": self.doc_id, f"config.shards.{shard}.token": token}, {"_id": 1}
        )
        return doc is not None

    def heartbeat(self, shard, token, **extra):
        """Refreshes a held shard's heartbeat; False if it is no longer held
        (taken over as stale, or the run deleted)."""
        path = f"config.shards.{shard}"
        values = {f"{path}.heartbeat": datetime.utcnow()}
        values.update({f"{path}.{k}": v for k, v in extra.items()})
        result = _runs_collection().update_one(
            {"_id": self.doc_id, f"{path}.token": token}, {"$set": values}
        )
        return result.matched_count == 1

    def release(self, shard, token, status, **extra):
        """Ends a held shard with ``status`` (``done`` or ``failed``)."""
        path = f"config.shards.{shard}"
        values = {f"{path}.status": status, f"{path}.ended": datetime.utcnow()}
        values.update({f"{path}.{k}": v for k, v in extra.items()})
        result = _runs_collection().update_one(
            {"_id": self.doc_id, f"{path}.token": token}, {"$set": values}
        )
        faults.database_write("release")
        return result.matched_count == 1


def register(samples, key, method, config):
    """Registers a new run atomically: of two processes registering the same
    key at once, exactly one succeeds (the dataset's run entry is set only
    if absent), so they never compute the same run under two records.

    Returns:
        its :class:`RunRecord`, or None when another process registered the
        key first
    """
    from copy import deepcopy

    import fiftyone.constants as foc
    from fiftyone.core.odm.runs import RunDocument

    dataset = samples._root_dataset
    run_config = dataset.init_run(method=method, **config)
    doc = RunDocument(
        dataset_id=dataset._doc.id,
        key=key,
        version=foc.VERSION,
        timestamp=datetime.utcnow(),
        config=deepcopy(run_config.serialize()),
        view_stages=serialize_view(samples),
        results=None,
    )
    doc.save(upsert=True)
    result = foo.get_db_conn().datasets.update_one(
        {"_id": dataset._doc.id, f"runs.{key}": {"$exists": False}},
        {"$set": {f"runs.{key}": doc.id}},
    )
    faults.database_write("register")
    if result.modified_count != 1:
        doc.delete()
        return None
    dataset.reload()
    return RunRecord(dataset, key, doc.id)


def new_uid():
    return uuid.uuid4().hex[:10]


def new_token():
    return uuid.uuid4().hex


def field_owners(samples):
    """Maps every field produced by this plugin's runs to its run key."""
    owners = {}
    for key in list_runs(samples):
        config = get_run(samples, key, derive=False)
        for field in config.get("fields") or []:
            owners[field] = key
    return owners


def check_fields(samples, key, fields):
    """Refuses output fields that are invalid names or belong to someone
    else: a run writes only fields it creates (or its own earlier run with
    the same key created), whatever ``overwrite`` says.

    Args:
        samples: the collection
        key: the run key that will write the fields
        fields: a dict mapping field names to ``(ftype, embedded_doc_type)``

    Raises:
        RunError: naming the field and the conflict
    """
    dataset = samples._root_dataset
    schema = dataset.get_field_schema(include_private=True)
    reserved = set(fos.get_default_sample_fields(include_private=True))
    owners = field_owners(samples)

    for name, (ftype, doc_type) in fields.items():
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise RunError(
                f"'{name}' is not a valid field name: use letters, digits and "
                "underscores, starting with a letter"
            )
        if name in reserved:
            raise RunError(f"'{name}' is one of FiftyOne's own sample fields; choose another name")

        owner = owners.get(name)
        if owner is not None and owner != key:
            raise RunError(
                f"Field '{name}' belongs to run '{owner}'; choose another field "
                "name or delete that run first"
            )

        field = schema.get(name)
        if field is None:
            continue
        if not _same_type(field, ftype, doc_type):
            expected = doc_type.__name__ if doc_type else ftype.__name__
            raise RunError(
                f"Field '{name}' already exists with type {_type_name(field)}, "
                f"but this run writes {expected}; choose another field name"
            )
        if owner is None:
            raise RunError(
                f"Field '{name}' already exists and was not made by this "
                "plugin; a run never writes to fields it did not create, so "
                "choose another field name"
            )


def _same_type(field, ftype, doc_type):
    if doc_type is not None:
        return isinstance(field, fo.EmbeddedDocumentField) and issubclass(
            field.document_type, doc_type
        )
    return isinstance(field, ftype)


def _type_name(field):
    if isinstance(field, fo.EmbeddedDocumentField):
        return field.document_type.__name__
    return type(field).__name__


def ensure_fields(dataset, fields):
    """Declares fields on the dataset, re-adding any that a concurrent schema
    update of another process dropped."""
    dataset.reload()
    schema = dataset.get_field_schema()
    for name, (ftype, doc_type) in fields.items():
        if name in schema:
            continue
        if doc_type is not None:
            dataset.add_sample_field(name, ftype, embedded_doc_type=doc_type)
        else:
            dataset.add_sample_field(name, ftype)
        faults.database_write("schema")


# config entries added after records were first written, with the value a
# record without them stands for, so that such a run still continues
LATER_KEYS = {"store_logits": False, "label_class": None}


def comparable(config):
    """The part of a config that decides whether two runs compute the same
    thing."""
    result = {k: v for k, v in config.items() if k not in STATE_KEYS}
    for key, default in LATER_KEYS.items():
        if result.get(key) is None:
            result[key] = default
    return result


def config_diff(old, new):
    a, b = comparable(old), comparable(new)
    diffs = [_difference(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs[:4]) or "unknown difference"


def _difference(key, old, new, limit=5):
    # a list of 1000 class names is summarised, not printed
    lists = isinstance(old, list) and isinstance(new, list)
    if lists and len(old) == len(new) and len(old) > limit:
        i = next(i for i, (x, y) in enumerate(zip(old, new)) if x != y)
        return f"{key}[{i}]: {old[i]!r} -> {new[i]!r}"
    return f"{key}: {_short(old, limit)} -> {_short(new, limit)}"


def _short(value, limit):
    if isinstance(value, (list, tuple)) and len(value) > limit:
        head = ", ".join(repr(v) for v in value[:limit])
        return f"[{len(value)} items: {head}, ...]"
    return repr(value)


def live_shards(config):
    """The shards of a run that a live worker holds now."""
    now = datetime.utcnow()
    return {
        k: s for k, s in (config.get("shards") or {}).items() if shard_state(s, now) == "running"
    }


def delete_run(samples, key, cleanup_files=True):
    """Deletes a run: the runs that depend on it, its fields, the files it
    owns, then its record. Nothing else is touched.

    Files are deleted only where this dataset owns them: a clone's copy of a
    run points at the files of the dataset it was cloned from and deletes
    none of them; when the owner deletes a run whose files a clone still
    uses, the files stay and pass to the clone.

    Returns:
        the number of files removed
    """
    from ..store.files import RunFiles

    dataset = samples._root_dataset
    config = get_run(samples, key, derive=False)
    if config.get("method") not in RUN_METHODS:
        raise RunError(f"Run '{key}' was not made by this plugin")

    removed = 0
    for other in list_runs(samples):
        if other != key and key in (get_run(samples, other, derive=False).get("depends_on") or []):
            removed += delete_run(samples, other, cleanup_files=cleanup_files)

    schema = dataset.get_field_schema()
    owned = [f for f in config.get("fields") or [] if f in schema]
    if owned:
        dataset.delete_sample_fields(owned)

    if cleanup_files and str(config.get("dataset_id")) == str(dataset._doc.id):
        owned_dirs = [config.get("files_dir")] + list(config.get("inherited_files_dirs") or [])
        for files_dir in [d for d in owned_dirs if d and os.path.isdir(d)]:
            heir = _other_user_of(files_dir, dataset._doc.id)
            if heir is None:
                removed += RunFiles(files_dir, files_owner(config)).remove()
            else:
                _hand_over(files_dir, config, heir)

    delete_saved_outputs(dataset, config)

    dataset.delete_run(key)
    dataset.reload()
    return removed


def delete_saved_outputs(dataset, config):
    """Deletes the saved views and brain runs a run made (a cue run's
    groups), as its record lists them."""
    for name in config.get("saved_views") or []:
        if dataset.has_saved_view(name):
            dataset.delete_saved_view(name)
    for brain_key in config.get("brain_keys") or []:
        if brain_key in dataset.list_brain_runs():
            dataset.delete_brain_run(brain_key)


def files_owner(config):
    """Who owns a run's file directory: the dataset and the run's uid."""
    return {"dataset_id": str(config.get("dataset_id")), "uid": config.get("uid")}


def _other_user_of(files_dir, dataset_id):
    """A run document of another dataset (a clone) whose samples still point
    at files in this directory, or None."""
    return _runs_collection().find_one(
        {
            "$or": [
                {"config.files_dir": files_dir},
                {"config.foreign_files_dirs": files_dir},
                {"config.inherited_files_dirs": files_dir},
            ],
            "_dataset_id": {"$ne": dataset_id},
        }
    )


def _hand_over(files_dir, config, heir):
    """Passes files a clone still uses to that clone: the directory's marker
    names it, and its record lists the directory as its own (its
    ``files_dir``, or an inherited one), so deleting its run removes them."""
    import json

    from ..store.files import MARKER

    heir_config = heir.get("config") or {}
    heir_id = str(heir.get("_dataset_id"))
    if heir_config.get("files_dir") == files_dir:
        # a clone that never continued the run: the directory becomes its own
        update = {"$set": {"config.dataset_id": heir_id}}
        owner = {"dataset_id": heir_id, "uid": heir_config.get("uid")}
    else:
        update = {
            "$addToSet": {"config.inherited_files_dirs": files_dir},
            "$pull": {"config.foreign_files_dirs": files_dir},
        }
        owner = files_owner(dict(heir_config, dataset_id=heir_id))
    _runs_collection().update_one({"_id": heir["_id"]}, update)
    with open(os.path.join(files_dir, MARKER), "w") as f:
        json.dump(owner, f, sort_keys=True)
