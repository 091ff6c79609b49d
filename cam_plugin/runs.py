"""The plugin's runs on a dataset: registered with FiftyOne's run registry so
they can be listed, inspected, resumed and deleted together with the fields
and files they produced.

A run's record holds its configuration plus a ``status`` (``running`` or
``completed``) and ``counts``; status updates touch only the run's own
document, so concurrent runs with different keys never overwrite each
other's records.
"""

import os
import re

import fiftyone as fo

CAM_RUN = "cam_plugin.compute_cams"
ATTENTION_RUN = "cam_plugin.compute_attention"
RUN_METHODS = (CAM_RUN, ATTENTION_RUN)

# Config entries that describe progress, not what is computed
_STATE_KEYS = ("status", "counts", "fields", "files_dir", "depends_on")


class RunError(ValueError):
    """A run that cannot start as asked, with what to do instead."""


def list_runs(samples, method=None):
    """Keys of this plugin's runs on the dataset, optionally of one method
    (:data:`CAM_RUN` or :data:`ATTENTION_RUN`)."""
    dataset = samples._root_dataset
    keys = []
    for m in (method,) if method else RUN_METHODS:
        keys.extend(dataset.list_runs(method=m))
    return sorted(keys)


def get_run(samples, key):
    """A run's configuration and state as a plain dict (with ``key``,
    ``method`` and ``timestamp``)."""
    dataset = samples._root_dataset
    if key not in dataset.list_runs():
        raise RunError(f"Dataset '{dataset.name}' has no run '{key}'")

    info = dataset.get_run_info(key)
    config = info.config.serialize()
    config.pop("cls", None)
    config.pop("type", None)
    config["key"] = key
    config["timestamp"] = info.timestamp.isoformat() if info.timestamp else None
    return config


def _is_ours(config):
    return config.get("method") in RUN_METHODS


def comparable(config):
    """The part of a config that decides whether two runs compute the same
    thing."""
    return {
        k: v
        for k, v in config.items()
        if k not in _STATE_KEYS and k not in ("key", "timestamp", "cls", "type")
    }


def field_owners(samples):
    """Maps every field produced by this plugin's runs to its run key."""
    owners = {}
    for key in list_runs(samples):
        try:
            config = get_run(samples, key)
        except Exception:
            continue
        for field in config.get("fields") or []:
            owners[field] = key
    return owners


def check_new_fields(samples, key, fields, overwrite=False):
    """Refuses output fields that would overwrite something the user has.

    Args:
        samples: the collection
        key: the run key that will write the fields
        fields: a dict mapping field names to the ``fo.Field``-describing
            tuple ``(ftype, embedded_doc_type)`` the run will write
        overwrite (False): whether fields the user created may be replaced

    Raises:
        RunError: naming the field and the conflict
    """
    dataset = samples._root_dataset
    schema = dataset.get_field_schema()
    owners = field_owners(samples)

    for name, (ftype, doc_type) in fields.items():
        if not name or not name.isidentifier():
            raise RunError(
                f"'{name}' is not a valid field name: use letters, digits and "
                "underscores, not starting with a digit"
            )

        owner = owners.get(name)
        if owner is not None and owner != key:
            raise RunError(
                f"Field '{name}' belongs to run '{owner}'; choose another field "
                f"name or delete that run first"
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

        if owner is None and not overwrite:
            raise RunError(
                f"Field '{name}' already exists and was not made by this "
                "plugin; choose another field name, or pass overwrite=True to "
                "replace its values"
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


def start_run(samples, key, method, config, overwrite=False):
    """Registers a run, or finds the unfinished run to resume.

    Args:
        samples: the collection
        key: the run key (a valid identifier)
        method: :data:`CAM_RUN` or :data:`ATTENTION_RUN`
        config: a JSON-serialisable dict describing the run, including
            ``fields`` (the fields it writes) and optionally ``files_dir``
        overwrite (False): whether to replace a finished run or one with a
            different configuration

    Returns:
        True if an unfinished run with the same configuration is resumed,
        False if a new run was registered
    """
    if not isinstance(key, str) or not key.isidentifier():
        raise RunError(
            f"Invalid run key '{key}': use letters, digits and underscores, "
            "not starting with a digit"
        )

    dataset = samples._root_dataset
    dataset.reload()
    if key in dataset.list_runs():
        existing = get_run(samples, key)
        if not _is_ours(existing):
            raise RunError(
                f"Run key '{key}' is used by another tool's run "
                f"({existing.get('method')}); choose another key"
            )

        same = existing.get("method") == method and comparable(existing) == comparable(
            dict(config, method=method)
        )
        if not overwrite:
            if not same:
                raise RunError(
                    f"Run '{key}' already exists with a different configuration "
                    f"({_config_diff(existing, dict(config, method=method))}); "
                    "choose another key, or pass overwrite=True to replace it"
                )
            if existing.get("status") == "completed":
                raise RunError(
                    f"Run '{key}' already finished; pass overwrite=True to "
                    "compute it again, or choose another key"
                )
            return True

        delete_run(samples, key)

    run_config = dataset.init_run(method=method, status="running", counts={}, **config)
    dataset.register_run(key, run_config)
    return False


def _config_diff(old, new):
    a, b = comparable(old), comparable(new)
    diffs = [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    return "; ".join(diffs[:4]) or "unknown difference"


def update_run(samples, key, **updates):
    """Updates a run's recorded state (``status``, ``counts``, ...)."""
    dataset = samples._root_dataset
    info = dataset.get_run_info(key)
    config = info.config
    for name, value in updates.items():
        setattr(config, name, value)
    dataset.update_run_config(key, config)


def delete_run(samples, key, cleanup_files=True):
    """Deletes a run: its fields, its heatmap files, the runs that depend on
    it (attention metrics computed from its heatmaps), then its record.

    Nothing outside the run's own fields and files directory is touched.
    """
    dataset = samples._root_dataset
    config = get_run(samples, key)
    if not _is_ours(config):
        raise RunError(f"Run '{key}' was not made by this plugin")

    for other in list_runs(samples):
        if other != key and key in (get_run(samples, other).get("depends_on") or []):
            delete_run(samples, other, cleanup_files=cleanup_files)

    schema = dataset.get_field_schema()
    owned = [f for f in config.get("fields") or [] if f in schema]
    if owned:
        dataset.delete_sample_fields(owned)

    files_dir = config.get("files_dir")
    if cleanup_files and files_dir and os.path.isdir(files_dir):
        remove_run_files(files_dir)

    dataset.delete_run(key)
    dataset.reload()


# the names the pipeline gives heatmap files: <sample id>.png, and the
# temporary names they are written under
_RUN_FILE = re.compile(r"^[0-9a-f]{24}\.png(\.tmp-.*)?$")


def remove_run_files(files_dir):
    """Removes the heatmap files a run wrote (``<files_dir>/<target>/<sample
    id>.png``) and the directories left empty; anything else a user put
    there stays."""
    for target_dir in [os.path.join(files_dir, d) for d in os.listdir(files_dir)]:
        if not os.path.isdir(target_dir):
            continue
        for name in os.listdir(target_dir):
            if _RUN_FILE.match(name):
                os.remove(os.path.join(target_dir, name))
        if not os.listdir(target_dir):
            os.rmdir(target_dir)
    if not os.listdir(files_dir):
        os.rmdir(files_dir)


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
