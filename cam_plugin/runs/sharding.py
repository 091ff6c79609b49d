"""Running a run here, shard by shard, or queueing its shards as FiftyOne
delegated operations that any ``fiftyone delegated launch`` worker sharing
the database and the output directory can claim.

Open-source FiftyOne runs one delegated operation in one process; a run
scales out by being several operations, one per shard. Each operation
claims its shard in the run's record (atomically; a live holder is never
displaced), keeps a heartbeat while it works, and the run is ``completed``
when the data says every sample is done, whichever worker finishes last.
"""

import os

import fiftyone.operators as foo

from . import records
from .base import _open_record, _todo_filter, iter_execute, shard_of
from .records import RunError

PLUGIN = "@cam-plugin/cam"


def steps(run_type, options):
    """Executes a run here (all its free shards, or ``options['shard']``)
    as a generator of ``(done, total)`` returning its summary."""
    return (yield from iter_execute(run_type, **options))


def queue(run_cls, operator, samples, model_or_args, params, options):
    """Validates and registers the run, then queues one delegated operation
    per shard that has samples to do and no live worker.

    Returns:
        a :class:`~cam_plugin.runs.base.RunSummary` whose ``queued`` lists
        the operation ids
    """
    from .base import RunSummary

    num_shards = options.get("num_shards", 1)  # checked when the run is opened
    if options.get("shard") is not None:
        raise RunError("Pass shard= or delegate=True, not both: delegation queues every shard")
    if params.get("transforms") is not None:
        raise RunError(
            "Custom transforms cannot be delegated: a worker in another process "
            "cannot receive a Python callable. Use the model's own transforms, "
            "or run it here (delegate=False)"
        )
    if params.get("trust_checkpoint"):
        raise RunError("trust_checkpoint cannot be delegated: workers never unpickle files")

    if run_cls.method == records.CAM_RUN:
        model = model_or_args
        if not isinstance(model, (str, os.PathLike)):
            raise RunError(
                f"A model given as an in-memory {type(model).__name__} cannot be "
                "delegated: workers load it again by name or path. Pass a "
                "torchvision name, a TorchScript or .pt2 file, "
                "'<architecture>:<checkpoint>', 'zoo:<name>', a Hugging Face "
                "'hf:<repo id>' or a 'timm:<name>'"
            )
        run_type = run_cls(samples, model, **params)
        # the run's resolved targets, in the library's terms: the operator's
        # form only knows pred/gt/both, so they travel as `target_list`
        op_params = dict(params, model=os.fspath(model), targets=None)
        op_params["target_list"] = [t.spec or t.name for t in run_type.targets]
        if isinstance(params.get("classes"), (str, os.PathLike)):
            # "imagenet" or a file, resolved here: the names travel as a list
            op_params["classes"] = list(run_type.classifier.classes)
        if params.get("class_map") is not None:
            # a dict, a ClassMap or a file, resolved here: the map travels
            # as the run records it
            op_params["class_map"] = run_type.class_map.to_record()
    else:
        model = params.get("model")
        if model is not None and not isinstance(model, (str, os.PathLike)):
            raise RunError(
                f"A model given as an in-memory {type(model).__name__} cannot be "
                "delegated: workers load it again by name or path (or leave model "
                "out to use the CAM run's)"
            )
        run_type = run_cls(samples, *model_or_args, **params)
        op_params = dict(params, **dict(zip(run_cls.positional, model_or_args)))
        if model is not None:
            op_params["model"] = os.fspath(model)
    try:
        record, config, resumed = _open_record(
            run_type, options.get("overwrite", False), num_shards, options.get("output_root")
        )
        todo = _todo_filter(run_type, samples, options.get("retry_failed", False)).values("id")
    finally:
        run_type.close()

    live = records.live_shards(config)
    pending = sorted({shard_of(i, num_shards) for i in todo} - {int(k) for k in live})
    op_params.pop("transforms", None)
    op_params.pop("trust_checkpoint", None)
    op_params.update(
        num_shards=num_shards,
        retry_failed=bool(options.get("retry_failed", False)),
        output_dir=config.get("output_root"),
        overwrite=False,
        delegate=True,
    )

    summary = RunSummary(
        key=run_type.key,
        fields=list(run_type.fields()),
        files_dir=config.get("files_dir") or "",
        resumed=resumed,
        status=records.get_run(samples, run_type.key)["status"],
        busy_shards=sorted(int(k) for k in live),
        warnings=list(run_type.warnings),
    )
    for shard in pending:
        try:
            op_id = _queue_operation(f"{PLUGIN}/{operator}", samples, dict(op_params, shard=shard))
        except Exception as e:
            if not resumed and not summary.queued:
                # nothing was queued: the run registered for it goes again
                records.delete_run(samples, run_type.key)
            raise RunError(f"Queueing shard {shard} of run '{run_type.key}' failed: {e}") from e
        summary.queued.append(op_id)
        summary.shards.append(shard)
    return summary


def _queue_operation(uri, samples, params):
    """Queues one delegated operation; returns its id.

    Called from an operator (the App's "Shards" choice), this runs inside
    FiftyOne's event loop, where ``execute_operator`` only schedules a task;
    a thread of its own, without a loop, gets the result."""
    from concurrent.futures import ThreadPoolExecutor

    def queue():
        result = foo.execute_operator(
            uri, ctx=dict(view=samples.view()), params=params, request_delegation=True
        )
        if result.error:
            raise RuntimeError(result.error_message or result.error)
        return str(result.result["id"])

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(queue).result()
