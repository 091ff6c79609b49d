"""One update per sample document, written after its files.

A run hands the writer one :class:`SampleOutput` per sample: every field it
owns for that sample (values to set, the rest unset) and the files they
point to. On :meth:`SampleWriter.flush` the files are made durable first,
then all samples go to MongoDB in one ``bulk_write`` whose operations each
update one document atomically. A sample is thus either wholly written or
not at all; a kill loses at most the samples since the last flush, which
happens every ``flush_seconds``. A sample deleted while it was computed is
not written, and its files are removed; the writer counts what it wrote.
Each update is a compare-and-set on the sample's ``last_modified_at`` as read
just before the ``before_write`` check, so a worker that lost its shard
between the check and the write overwrites nothing its successor wrote.
"""

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from bson import ObjectId
from pymongo import UpdateOne

from . import faults


@dataclass
class SampleOutput:
    """All that a run writes for one sample.

    Attributes:
        sample_id: the sample's id
        values: field name -> value (a label, a scalar or None) for every
            field the run owns; None unsets the field
        files: ``(path, array)`` pairs to write before the document
        error: a :class:`cam_plugin.engine.SampleError` when the sample
            failed (``values`` then records why)
    """

    sample_id: str
    values: dict
    files: list = field(default_factory=list)
    error: object = None


class SampleWriter:
    """Buffers sample outputs and writes them in flushes.

    Args:
        dataset: the root ``fo.Dataset`` whose samples are updated
        fields: the fields the run owns: name -> ``(ftype,
            embedded_doc_type)``
        png_writer: a :class:`cam_plugin.heatmaps.PngWriter` for the files
        flush_seconds (2.0): flush when this long has passed since the last
        max_pending (512): flush when this many samples wait
        before_write (None): called before each database write; raising
            stops the write (used to stop when the run was deleted or its
            shard taken over)
    """

    def __init__(
        self,
        dataset,
        fields,
        png_writer,
        flush_seconds=2.0,
        max_pending=512,
        before_write=None,
    ):
        self.dataset = dataset
        self.fields = dict(fields)
        self.png_writer = png_writer
        self.flush_seconds = flush_seconds
        self.max_pending = max_pending
        self.before_write = before_write
        self.processed = 0
        self.failed = 0
        self.errors = Counter()
        self.unwritten = 0
        self._pending = []
        self._last_flush = time.monotonic()
        self._field_objects = None

    def add(self, output):
        for path, array in output.files:
            self.png_writer.submit(path, array)
        self._pending.append(output)
        if len(self._pending) >= self.max_pending or (
            time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()

    def flush(self):
        """Writes the files, then the documents, of every pending sample."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        # files first: a field must never point at a file not yet written
        self.png_writer.wait()
        pending, self._pending = self._pending, []
        fields = self._fields()
        coll = self.dataset._sample_collection
        for _ in range(_WRITE_ROUNDS):
            # Each update applies only if the sample is unchanged since just
            # before the check. A check and a write are two operations: a
            # worker stopped between them (SIGSTOP, a stall) may have lost its
            # shard meanwhile, and the new holder's writes change
            # last_modified_at, so the stale worker's updates then match
            # nothing (a compare-and-set; no clocks are compared).
            ids = [ObjectId(o.sample_id) for o in pending]
            seen = {
                str(d["_id"]): d.get("last_modified_at")
                for d in coll.find({"_id": {"$in": ids}}, {"last_modified_at": 1})
            }
            if self.before_write is not None:
                self.before_write()
            faults.write_checked()
            # samples deleted while they were computed: their files go too
            for output in pending:
                if output.sample_id not in seen:
                    for path, _ in output.files:
                        _remove(path)
            pending = [o for o in pending if o.sample_id in seen]
            if not pending:
                return
            now = datetime.utcnow()
            ops = [
                UpdateOne(
                    {"_id": ObjectId(o.sample_id), "last_modified_at": seen[o.sample_id]},
                    self._update(o, fields, now),
                )
                for o in pending
            ]
            result = coll.bulk_write(ops, ordered=False)
            faults.database_write("samples")
            if result.matched_count == len(ops):
                for output in pending:
                    self._count(output)
                return
            # someone changed (or deleted) some of them meanwhile; which, the
            # result does not say: write them all again after a new check
            # (those already written match again and get the same values)
        # samples edited faster than they can be written stay to do: a resume
        # computes them again (their files are rewritten then)
        self.unwritten += len(pending)

    def _update(self, output, fields, now):
        sets = {"last_modified_at": now}
        unsets = {}
        for name in self.fields:
            value = output.values.get(name)
            if value is None:
                unsets[name] = ""
            else:
                sets[name] = fields[name].to_mongo(value)
        update = {"$set": sets}
        if unsets:
            update["$unset"] = unsets
        return update

    def _count(self, output):
        if output.error is None:
            self.processed += 1
        else:
            self.failed += 1
            self.errors[output.error.reason] += 1

    def _fields(self):
        # field objects built from their types serialise values without the
        # dataset's schema, which another process may be rewriting right now
        if self._field_objects is None:
            self._field_objects = {
                name: ftype(doc_type) if doc_type is not None else ftype()
                for name, (ftype, doc_type) in self.fields.items()
            }
        return self._field_objects


# rounds of check-and-write before a sample that others keep changing is
# left for a resume
_WRITE_ROUNDS = 5



def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
