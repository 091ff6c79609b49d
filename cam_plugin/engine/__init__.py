"""The FiftyOne-free run engine: sample ids and image paths in, results out,
batch by batch, with decoding in worker processes, CUDA out-of-memory
halving and per-sample failure isolation under typed errors."""

from .batching import BatchRunner, run_loader
from .errors import ErrorKind, SampleError
from .loading import Group, LoadedBatch, SampleImages, Variants, collate_groups, image_loader

__all__ = [
    "BatchRunner",
    "ErrorKind",
    "Group",
    "LoadedBatch",
    "SampleError",
    "SampleImages",
    "Variants",
    "collate_groups",
    "image_loader",
    "run_loader",
]
