"""The sample writer against a real database: what happens when someone
else changes a sample between the writer's check and its write."""

import fiftyone as fo
import pytest

from cam_plugin.heatmaps import PngWriter
from cam_plugin.store.writer import SampleOutput, SampleWriter


class Lost(Exception):
    pass


def _dataset(name, count=3):
    dataset = fo.Dataset(name)
    dataset.add_samples([fo.Sample(filepath=f"/tmp/writer-test-{i}.jpg") for i in range(count)])
    # a run declares its fields before it writes
    dataset.add_sample_field("score", fo.FloatField)
    return dataset


def _write(dataset, before_write, value=1.0):
    with PngWriter() as png:
        writer = SampleWriter(
            dataset, {"score": (fo.FloatField, None)}, png, flush_seconds=1e9, before_write=before_write
        )
        for sample_id in dataset.values("id"):
            writer.add(SampleOutput(sample_id, {"score": value}))
        writer.flush()
    return writer


def test_a_sample_the_user_edits_between_check_and_write_keeps_the_edit_and_gets_the_field(dataset_name):
    dataset = _dataset(dataset_name)
    edited = dataset.first()
    calls = []

    def before_write():
        calls.append(1)
        if len(calls) == 1:
            # the user tags a sample in the App in the gap
            edited.tags.append("checked")
            edited.save()

    writer = _write(dataset, before_write)
    assert writer.processed == 3 and writer.unwritten == 0
    assert len(calls) == 2  # the edited sample was written after a second check
    dataset.reload()
    assert dataset.values("score") == [1.0, 1.0, 1.0]
    assert dataset.first().tags == ["checked"]


def test_a_writer_that_lost_its_shard_in_the_gap_overwrites_nothing_its_successor_wrote(dataset_name):
    dataset = _dataset(dataset_name)
    calls = []

    def before_write():
        calls.append(1)
        if len(calls) == 1:
            # the check passed; meanwhile another worker took the shard over
            # and wrote the samples
            _write(dataset, None, value=2.0)
        else:
            raise Lost

    with pytest.raises(Lost):
        _write(dataset, before_write)
    dataset.reload()
    assert dataset.values("score") == [2.0, 2.0, 2.0]


def test_a_sample_deleted_in_the_gap_is_not_written_or_counted(dataset_name):
    dataset = _dataset(dataset_name)
    gone = dataset.last().id

    def before_write():
        if gone in dataset.values("id"):
            dataset.delete_samples([gone])

    writer = _write(dataset, before_write)
    assert writer.processed == 2
    assert dataset.count("score") == 2
