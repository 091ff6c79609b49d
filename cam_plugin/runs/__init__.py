"""The plugin's runs: the run-type contract and its driver
(:mod:`~cam_plugin.runs.base`), the records they keep on the dataset
(:mod:`~cam_plugin.runs.records`), and one module per kind of run
(:mod:`~cam_plugin.runs.cams`, :mod:`~cam_plugin.runs.attention`)."""

from .records import (
    ATTENTION_RUN,
    CAM_RUN,
    RUN_METHODS,
    RunError,
    delete_run,
    field_owners,
    get_run,
    list_runs,
    multilabel_run,
)

__all__ = [
    "ATTENTION_RUN",
    "CAM_RUN",
    "RUN_METHODS",
    "RunError",
    "delete_run",
    "field_owners",
    "get_run",
    "list_runs",
    "multilabel_run",
]
