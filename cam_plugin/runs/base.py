"""The run-type contract and the driver every kind of run goes through.

A run type (after fiftyone-brain's ``BrainMethodConfig`` / ``BrainMethod``)
is a small class that validates its inputs on construction and declares:

-   :attr:`RunType.method`: its name in FiftyOne's run registry
-   :meth:`RunType.config`: what it computes, the identity used to resume
    (stable across processes) and, with the driver's state, its record
-   :meth:`RunType.fields`: the fields it owns (created, written, deleted by
    it and nothing else); :attr:`RunType.done_fields` /
    :attr:`RunType.error_field`: when a sample counts as done
-   :attr:`RunType.file_targets`: the subfolders of its own file directory
-   :meth:`RunType.depends_on`: the runs whose outputs it reads
-   :meth:`RunType.outputs`: the only real work, batches of
    :class:`~cam_plugin.store.writer.SampleOutput` for the samples to do
    (a failed sample's output carries its typed error)

The driver (:func:`iter_execute`) does the rest for all of them: register or
resume the record, claim shards, pick the samples not yet done, write each
sample's outputs in one update after its files, heartbeat, stop if the run
is deleted or its shard taken over, and derive the status from the data.
Cleanup is :func:`cam_plugin.runs.records.delete_run`: owned fields, owned
files, dependent runs.
"""

import hashlib
import inspect
import logging
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

import fiftyone as fo
import fiftyone.core.utils as fou

from ..heatmaps import PngWriter
from ..store.files import FilesError, RunFiles, run_dir
from ..store.writer import SampleOutput, SampleWriter
from . import records
from .records import RunError

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What one call of a run did.

    Attributes:
        key: the run key
        processed: samples completed in this call
        failed: samples that failed in this call (see ``errors``)
        skipped: samples of the view already done before this call
        errors: counts of failure reasons in this call
        fields: the fields the run owns
        files_dir: where its files are
        resumed: whether this call continued an existing run
        seconds: wall time of this call
        status: the run's status afterwards (``completed`` when every
            sample of the view is done)
        shards: the shards this call ran
        busy_shards: shards skipped because a live worker holds them
        queued: the delegated operation ids, when the call queued shards
        group_slice: of a grouped dataset, the slice that was processed
        warnings: what the run warned about when it started (a model
            without class names, say), also issued with ``warnings.warn``
    """

    key: str
    processed: int = 0
    failed: int = 0
    skipped: int = 0
    errors: dict = field(default_factory=dict)
    fields: list = field(default_factory=list)
    files_dir: str = ""
    resumed: bool = False
    seconds: float = 0.0
    status: str = ""
    shards: list = field(default_factory=list)
    busy_shards: list = field(default_factory=list)
    queued: list = field(default_factory=list)
    group_slice: str = None
    warnings: list = field(default_factory=list)

    def __str__(self):
        if self.queued:
            return f"Run '{self.key}': {len(self.queued)} shard(s) queued for delegated workers"
        text = (
            f"Run '{self.key}': {self.processed} processed, {self.failed} "
            f"failed, {self.skipped} already done ({self.seconds:.1f} s), {self.status}"
        )
        if self.group_slice:
            text += f"; slice '{self.group_slice}' of the grouped dataset"
        if self.busy_shards:
            text += f"; shards {self.busy_shards} are held by other live workers"
        for reason, count in sorted(self.errors.items(), key=lambda x: -x[1]):
            text += f"\n  {count} x {reason}"
        for warning in self.warnings:
            text += f"\n  warning: {warning}"
        return text


class RunType:
    """The contract of a kind of run; see the module docstring.

    Subclasses set :attr:`method`, :attr:`key`, :attr:`samples` and the
    attributes below in their constructor (which validates everything, so
    that a refused run has written nothing).
    """

    method = None
    #: the arguments its compute_* function takes by position (after the
    #: samples), named as the operator that runs a delegated shard takes them
    positional = ()

    def __init_subclass__(cls, **kwargs):
        # a new kind of run is listed, resumed and deleted like the others
        super().__init_subclass__(**kwargs)
        if cls.method:
            records.register_method(cls.method)

    #: a sample is done when one of these fields is set
    done_fields = ()
    #: the field holding why a sample failed, or None
    error_field = None
    #: subfolders of the run's file directory (empty: the run writes no files)
    file_targets = ()
    #: the run applies to the samples that have this field (None: to all)
    candidate_field = None
    #: messages the run warned about on construction (also ``warnings.warn``)
    warnings = ()

    def config(self):
        """The run's identity: a JSON-serialisable dict of what it computes."""
        raise NotImplementedError

    def fields(self):
        """The fields the run owns: name -> ``(ftype, embedded_doc_type)``."""
        raise NotImplementedError

    def depends_on(self):
        """Keys of the runs whose outputs this run reads."""
        return []


    def outputs(self, ids, files):
        """Computes the samples ``ids``; yields lists of
        :class:`~cam_plugin.store.writer.SampleOutput`, one list per batch.
        ``files`` is the run's :class:`~cam_plugin.store.files.RunFiles`
        (None when it writes no files)."""
        raise NotImplementedError

    def failure(self, sample_id, error):
        """The output recording a sample's :class:`SampleError`."""
        return SampleOutput(sample_id, {self.error_field: error.message}, error=error)

    def finish(self, dataset):
        """Called once a call has run its shards (App settings and the like)."""

    def close(self):
        """Releases what the run holds (the model's device, ...)."""


def stable_identity(obj):
    """A description of a callable or transform that is the same in every
    process: functions by qualified name and a hash of their source (a
    lambda's ``repr`` holds its address), objects by their ``repr`` with
    addresses replaced the same way."""
    import functools
    import types

    if obj is None or isinstance(obj, (str, int, float, bool)):
        return repr(obj)
    if isinstance(obj, functools.partial):
        args = ", ".join(stable_identity(a) for a in obj.args)
        kwargs = ", ".join(f"{k}={stable_identity(v)}" for k, v in sorted(obj.keywords.items()))
        return f"partial({stable_identity(obj.func)}, {args}, {kwargs})"
    if isinstance(obj, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', obj)}#{_source_hash(obj)}"
    transforms = getattr(obj, "transforms", None)
    if isinstance(transforms, (list, tuple)) and type(obj).__name__ == "Compose":
        return f"Compose({', '.join(stable_identity(t) for t in transforms)})"
    lambd = getattr(obj, "lambd", None)
    if callable(lambd):
        return f"{type(obj).__qualname__}({stable_identity(lambd)})"
    text = repr(obj)
    if re.search(r" at 0x[0-9a-fA-F]+", text):
        cls = type(obj)
        state = {k: v for k, v in sorted(getattr(obj, "__dict__", {}).items())}
        inner = ", ".join(f"{k}={stable_identity(v)}" for k, v in state.items())
        return f"{cls.__module__}.{cls.__qualname__}#{_source_hash(cls)}({inner})"
    return text


def _source_hash(obj):
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        source = getattr(getattr(obj, "__code__", None), "co_code", b"") or repr(obj)
    if isinstance(source, str):
        source = source.encode()
    return hashlib.sha1(source).hexdigest()[:12]


@dataclass
class RunModel:
    """The model a run that measures a CAM run's outputs uses, resolved.

    Attributes:
        classifier: the :class:`cam_plugin.models.Classifier`
        spec: the name or path it was loaded from (None: given in memory)
        warnings: how it differs from the CAM run's model, if it does
    """

    classifier: object
    spec: object
    warnings: list


def cam_run_model(cam_key, cam_config, model, classes, transforms, trust_checkpoint, error_type, outputs, missing):
    """The model of a run over CAM run ``cam_key``'s outputs: ``model``, or
    the CAM run's own loaded again (its class names too); warns when it
    differs from the CAM run's (``outputs`` names what then describes it).

    Args:
        missing: why there is no CAM run to take the model from, for the
            error when ``model`` is None and there is none
    """
    import warnings

    from ..models import load_classifier

    if model is None:
        model = cam_config.get("model_spec")
        if model is None:
            raise error_type(
                "Pass model=...: "
                + (
                    f"the CAM run '{cam_key}' was given an in-memory model, which cannot be loaded again"
                    if cam_key
                    else missing
                )
            )
    if classes is None and cam_config.get("classes"):
        classes = cam_config["classes"]
    spec = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    classifier = load_classifier(model, transforms=transforms, classes=classes, trust_checkpoint=trust_checkpoint)
    found = []
    if cam_config:
        if cam_config.get("model_fingerprint") not in (None, classifier.fingerprint):
            found.append(
                f"The model differs from the one CAM run '{cam_key}' used "
                f"({cam_config.get('model')}): {outputs} describe this model"
            )
        if cam_config.get("transforms") != stable_identity(classifier.transforms):
            found.append(
                f"The transforms differ from those of CAM run '{cam_key}': {outputs} "
                "describe this preprocessing"
            )
    for message in found:
        warnings.warn(message, stacklevel=4)
    return RunModel(classifier, spec, found)


def run_device(device, batch_size=None, num_workers=None):
    """``(device, batch size, loader workers)`` of a model run: the GPU when
    there is one, larger batches there, half the CPUs (at most 8) decoding."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = batch_size or (64 if device.type == "cuda" else 16)
    workers = num_workers if num_workers is not None else min(8, max(1, (os.cpu_count() or 2) // 2))
    return device, batch_size, workers


def model_outputs(run, outcomes_by_batch, ids, output_of, error_type):
    """A run's batches of outputs from the engine's per-batch outcomes
    (:func:`cam_plugin.engine.run_loader`): ``output_of(sample_id, result)``
    for each computed sample, the run's failure record for each failed one.
    Stops with ``error_type`` when the first samples all failed the same
    way (:func:`cam_plugin.engine.errors.systematic_failure`)."""
    from ..engine import SampleError
    from ..engine.errors import systematic_failure

    failures = []
    succeeded = 0
    for outcomes in outcomes_by_batch:
        batch = []
        for index, result in outcomes:
            sample_id = ids[index]
            if isinstance(result, SampleError):
                failures.append(result)
                batch.append(run.failure(sample_id, result))
            else:
                succeeded += 1
                batch.append(output_of(sample_id, result))
        yield batch
        failure = None if succeeded else systematic_failure(failures)
        if failure is not None:
            raise error_type(
                f"The first {len(failures)} samples all failed with the same error, "
                f"which points at the model or configuration: {failure.detail}"
            )


def shard_of(sample_id, num_shards):
    """The shard a sample belongs to: a hash of its id, so shards are
    disjoint, deterministic and independent of the view's order."""
    if num_shards <= 1:
        return 0
    return int(hashlib.sha1(str(sample_id).encode()).hexdigest()[:8], 16) % num_shards


def check_collection(samples):
    """The collection a run works on: refuses those whose samples are not
    the dataset's own images (patches, frames and clips views: results would
    be stored on a generated dataset and never reach yours), and drops
    ``select_fields``/``exclude_fields`` stages (same samples, and the run
    must see the fields it writes)."""
    import fiftyone.core.stages as fost

    if getattr(samples, "_is_patches", False):
        raise RunError(
            "This is a patches view: its samples are generated crops whose "
            "fields are not stored on your dataset. Run on the dataset of "
            "images (for per-object maps, export the patches as images first)"
        )
    if getattr(samples, "_is_frames", False) or getattr(samples, "_is_clips", False):
        raise RunError(
            "Frames and clips views are not supported: run on an image dataset"
        )
    if samples.media_type == "video":
        raise RunError("Video datasets are not supported: run on an image dataset")
    stages = getattr(samples, "_stages", None)
    if stages and any(isinstance(s, (fost.SelectFields, fost.ExcludeFields)) for s in stages):
        view = samples._root_dataset.view()
        for stage in stages:
            if not isinstance(stage, (fost.SelectFields, fost.ExcludeFields)):
                view = view.add_stage(stage)
        return view
    return samples


def group_slice_of(samples):
    """The slice of a grouped dataset that is processed (None otherwise)."""
    if samples.media_type == "group":
        return samples.group_slice
    return None


def _todo_filter(run, view, retry_failed):
    if run.candidate_field:
        view = view.exists(run.candidate_field)
    for name in run.done_fields:
        view = view.exists(name, False)
    if run.error_field and not retry_failed:
        view = view.exists(run.error_field, False)
    return view


def values_by_id(samples, ids, fields, chunk=20000):
    """``{id: (value of each field)}`` for the samples ``ids`` that still
    exist, read in chunks (a shard may hold millions)."""
    rows = {}
    for start in range(0, len(ids), chunk):
        values = samples.select(ids[start : start + chunk]).values(["id"] + list(fields))
        for sample_id, *row in zip(*values):
            rows[sample_id] = row
    return rows


def count_state(run, view):
    """Counts derived from the data (see :func:`records.data_counts`)."""
    return records.data_counts(view, run.done_fields, run.error_field, run.candidate_field)


def _open_record(run, overwrite, num_shards, output_root):
    """Registers the run or continues the existing one with its key.

    Returns:
        ``(record, config, resumed)``
    """
    samples = run.samples
    dataset = samples._root_dataset
    key = run.key
    if not isinstance(key, str) or not key.isidentifier():
        raise RunError(
            f"Invalid run key '{key}': use letters, digits and underscores, "
            "not starting with a digit"
        )

    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
        raise RunError(f"num_shards must be a positive whole number, got {num_shards!r}")

    identity = dict(run.config(), group_slice=group_slice_of(samples), method=run.method)
    dataset.reload()
    replaced = None
    if key in dataset.list_runs():
        existing = records.get_run(samples, key)
        if existing.get("method") not in records.RUN_METHODS:
            raise RunError(
                f"Run key '{key}' is used by another tool's run "
                f"({existing.get('method')}); choose another key"
            )
        same = existing.get("method") == run.method and records.comparable(
            existing
        ) == records.comparable(identity)
        live = records.live_shards(existing)
        if overwrite or not same:
            if not overwrite:
                raise RunError(
                    f"Run '{key}' already exists with a different configuration "
                    f"({records.config_diff(existing, identity)}); choose another "
                    "key, or pass overwrite=True to replace it"
                )
            if live:
                raise RunError(_live_message(key, live, "cannot be replaced"))
            if existing.get("method") != run.method or key in run.depends_on():
                raise RunError(
                    f"Run '{key}' is a {existing.get('method')} run"
                    + (" whose outputs this run reads" if key in run.depends_on() else "")
                    + "; overwrite only replaces a run of the same kind: choose another run_key"
                )
            # replaced once the new run's directory is known to be usable
            replaced = key
        else:
            record = records.RunRecord.of(samples, key)
            return record, _continue(record, existing, run, num_shards, output_root, live), True

    uid = records.new_uid()
    root = output_root or default_output_root()
    config = dict(
        run.config(),
        status="running",
        counts={},
        fields=list(run.fields()),
        depends_on=run.depends_on(),
        dataset_id=str(dataset._doc.id),
        uid=uid,
        num_shards=num_shards,
        shards={},
        group_slice=group_slice_of(samples),
        output_root=os.path.abspath(os.path.expanduser(root)) if run.file_targets else None,
        files_dir=run_dir(root, dataset.name, dataset._doc.id, key, uid) if run.file_targets else None,
    )
    config.update(
        done_fields=list(run.done_fields),
        error_field=run.error_field,
        candidate_field=run.candidate_field,
    )
    _prepare_files(run, config)
    if replaced is not None:
        records.delete_run(samples, replaced)
    record = records.register(samples, key, run.method, config)
    if record is None:
        # another process registered this key a moment ago: continue its run
        if run.file_targets:
            _run_files(config).remove()
        return _open_record(run, False, num_shards, output_root)
    return record, record.read(), False


def _continue(record, existing, run, num_shards, output_root, live):
    """Checks that a call may continue an existing run and adapts the
    record: a clone gets files of its own; another shard count re-shards
    when no worker is live."""
    dataset = run.samples._root_dataset
    updates = {}
    if output_root is not None and run.file_targets:
        root = os.path.abspath(os.path.expanduser(output_root))
        kept = existing.get("output_root") or ""
        if os.path.realpath(root) != os.path.realpath(kept):
            raise RunError(
                f"Run '{run.key}' keeps its files under {existing.get('output_root')}; "
                f"to continue it, leave output_dir out or pass that directory (got "
                f"{root}); to start over elsewhere, pass overwrite=True"
            )

    if str(existing.get("dataset_id")) != str(dataset._doc.id):
        # a clone's copy of the run: the files it points to are the other
        # dataset's; new ones go to a directory of this dataset's own
        uid = records.new_uid()
        root = existing.get("output_root") or default_output_root()
        updates.update(
            dataset_id=str(dataset._doc.id),
            uid=uid,
            shards={},
            foreign_files_dirs=(existing.get("foreign_files_dirs") or [])
            + ([existing["files_dir"]] if existing.get("files_dir") else []),
        )
        if run.file_targets:
            updates["files_dir"] = run_dir(root, dataset.name, dataset._doc.id, run.key, uid)
        live = {}

    if num_shards != existing.get("num_shards", 1):
        if live:
            raise RunError(_live_message(run.key, live, f"cannot be re-sharded into {num_shards}"))
        updates.update(num_shards=num_shards, shards={})

    if updates:
        record.update(**updates)
    record.set_view(run.samples)
    config = record.read()
    _prepare_files(run, config)
    return config


def _prepare_files(run, config):
    if not run.file_targets:
        return
    files = _run_files(config)
    files.prepare()
    files.make_target_dirs(run.file_targets)


def _run_files(config):
    return RunFiles(config["files_dir"], records.files_owner(config))


def _live_message(key, live, what):
    holders = ", ".join(
        f"shard {k} ({s['worker'].get('host')} pid {s['worker'].get('pid')})" for k, s in sorted(live.items())
    )
    return f"Run '{key}' {what} while workers run it: {holders}; wait for them or stop them first"


def default_output_root():
    return os.path.join(fo.config.default_dataset_dir, "cam_plugin_files")


class _Heartbeat(threading.Thread):
    """Refreshes a held shard's heartbeat in the background, so a long
    batch never makes a live worker look dead; notices when the shard is
    lost (the run deleted, or the shard taken over as stale)."""

    def __init__(self, record, shard, token):
        super().__init__(daemon=True, name=f"cam-plugin-heartbeat-{shard}")
        self.record, self.shard, self.token = record, shard, token
        self.lost = False
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(records.HEARTBEAT_S):
            try:
                if not self.record.heartbeat(self.shard, self.token):
                    self.lost = True
                    return
            except Exception:  # a database hiccup: try again next beat
                logger.warning("heartbeat of shard %s failed", self.shard, exc_info=True)

    def stop(self):
        self._stop_event.set()


#: the longest time results wait in memory before they are written (a kill
#: loses at most this much work)
FLUSH_SECONDS = float(os.environ.get("CAM_PLUGIN_FLUSH_SECONDS", 2.0))


def iter_execute(run, *, shard=None, num_shards=1, overwrite=False, retry_failed=False,
                 output_root=None, progress=None, flush_seconds=None):
    """Executes a run as a generator that yields ``(done, total)`` after
    each batch and returns a :class:`RunSummary`.

    Args:
        run: a :class:`RunType`
        shard (None): run only this shard; None runs every shard no live
            worker holds, one after the other
        num_shards (1): into how many disjoint shards the view is split
        overwrite (False): replace an existing run with this key (its
            fields and files) instead of continuing it
        retry_failed (False): compute the samples that failed before again
        output_root (None): where run directories go (default under
            FiftyOne's default dataset dir)
        progress (None): a progress bar (True/False) or a callback
        flush_seconds (None): the longest time results wait in memory;
            default :data:`FLUSH_SECONDS`
    """
    if flush_seconds is None:
        flush_seconds = FLUSH_SECONDS
    started = time.time()
    if shard is not None and not 0 <= shard < num_shards:
        raise RunError(f"shard must be in [0, {num_shards}), got {shard}")
    samples = run.samples
    dataset = samples._root_dataset
    record, config, resumed = _open_record(run, overwrite, num_shards, output_root)
    fields = run.fields()
    records.ensure_fields(dataset, fields)

    files = _run_files(config) if run.file_targets else None
    if files is not None:
        files.remove_temporary()

    summary = RunSummary(
        key=run.key,
        fields=list(fields),
        files_dir=config.get("files_dir") or "",
        resumed=resumed,
        group_slice=group_slice_of(samples),
        warnings=list(run.warnings),
    )
    if summary.group_slice:
        logger.info("Run '%s' processes slice '%s' of the grouped dataset", run.key, summary.group_slice)
    todo = _todo_filter(run, samples, retry_failed)
    summary.skipped = count_state(run, samples)["samples"] - todo.count()
    errors = Counter()

    shards = [shard] if shard is not None else list(range(num_shards))
    try:
        for s in shards:
            token = records.new_token()
            holder = record.claim(s, token)
            if holder is not None:
                if shard is not None:
                    raise RunError(_live_message(run.key, {s: holder}, f"shard {s} is held"))
                summary.busy_shards.append(s)
                continue
            summary.shards.append(s)
            # read once the shard is held: another worker may have done it
            ids = [i for i in todo.values("id") if shard_of(i, num_shards) == s]
            if ids:
                record.update(status="running")
            yield from _run_shard(run, record, s, token, ids, files, summary, errors, progress, flush_seconds)
        run.finish(dataset)
    finally:
        run.close()
        summary.errors = dict(errors)
        summary.seconds = time.time() - started
        if record.exists():
            summary.status = _record_status(run, record, samples)
            records.ensure_fields(dataset, fields)
    return summary


def _record_status(run, record, samples):
    """Writes the status and counts derived from the data: ``completed``
    when no sample is left and no worker is live. Two shards ending at once
    may each see the other still live; ``running`` is therefore never written
    over ``completed``, which the last of them writes (a call that has work
    to do sets ``running`` when it claims a shard)."""
    counts = count_state(run, samples)
    live = records.live_shards(records.get_run(samples, run.key, derive=False))
    if counts["todo"] == 0 and not live:
        record.update(status="completed", counts=counts)
        return "completed"
    record.update(unless_status="completed", status="running", counts=counts)
    return records.get_run(samples, run.key, derive=False)["status"]


def _run_shard(run, record, shard, token, ids, files, summary, errors, progress, flush_seconds):
    heartbeat = _Heartbeat(record, shard, token)
    heartbeat.start()

    def check_held():
        # before every write: a worker whose shard was taken over (or whose
        # run was deleted) must not write again
        if heartbeat.lost or not record.holds(shard, token):
            raise _lost(run, record, shard)

    status = "failed"
    base_done = summary.processed + summary.failed
    try:
        with PngWriter(num_threads=max(1, min(8, (os.cpu_count() or 2) // 2))) as png:
            writer = SampleWriter(
                run.samples._root_dataset,
                run.fields(),
                png,
                flush_seconds=flush_seconds,
                before_write=check_held,
            )
            try:
                with fou.ProgressBar(total=len(ids), progress=progress) as pb:
                    done = 0
                    for batch in run.outputs(ids, files):
                        for output in batch:
                            writer.add(output)
                        done += len(batch)
                        pb.update(count=len(batch))
                        yield base_done + done, base_done + len(ids)
            finally:
                # keep what is done, even when interrupted
                try:
                    writer.flush()
                finally:
                    summary.processed += writer.processed
                    summary.failed += writer.failed
                    errors.update(writer.errors)
        status = "done"
    except FilesError as e:
        if not record.exists():
            raise _lost(run, record, shard) from e
        raise RunError(f"Run '{run.key}' stopped: {e}") from e
    finally:
        heartbeat.stop()
        if record.exists():
            record.release(shard, token, status)


def _lost(run, record, shard):
    if not record.exists():
        return RunError(
            f"Run '{run.key}' was deleted while it was running (delete_run or "
            "another process); this worker stopped without writing further results"
        )
    return RunError(
        f"Shard {shard} of run '{run.key}' was taken over by another worker "
        "(this one's heartbeat had gone stale); this worker stopped so that "
        "no two write the same samples"
    )
