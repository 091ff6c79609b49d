"""Running a computation over loaded batches: on CUDA out-of-memory the
batch halves and is retried (and later batches stay at the smaller size);
a batch that fails otherwise is split down to the sample that breaks it, so
one bad sample fails alone, as a typed :class:`SampleError`."""

import logging

import torch

from .errors import ErrorKind, SampleError

logger = logging.getLogger(__name__)


class BatchRunner:
    """Applies ``compute(group) -> list of results`` (one per item) to
    groups of loaded samples.

    Args:
        compute: the computation of a :class:`cam_plugin.engine.Group`
        max_batch: the largest number of samples given to ``compute`` at once;
            lowered for the rest of the run after an out-of-memory error
    """

    def __init__(self, compute, max_batch):
        self.compute = compute
        self.max_batch = max(1, int(max_batch))

    def __call__(self, group):
        """Returns ``[(item, result or SampleError)]`` for every item."""
        outcomes = []
        start = 0
        while start < len(group):
            size = self.max_batch
            outcomes += self._run(group.split(start, start + size))
            start += size
        return outcomes

    def _run(self, chunk):
        try:
            results = self.compute(chunk)
        except torch.cuda.OutOfMemoryError:
            _release_cuda_cache()
            if len(chunk) == 1:
                item = chunk.items[0]
                return [(item, SampleError(item.index, ErrorKind.OUT_OF_MEMORY, "even alone"))]
            self.max_batch = max(1, min(self.max_batch, len(chunk) // 2))
            logger.warning("GPU out of memory; batch size now %d", self.max_batch)
            return self(chunk)
        except Exception as e:
            if len(chunk) > 1:
                # isolate the sample(s) that break the batch
                outcomes = []
                for i in range(len(chunk)):
                    outcomes += self._run(chunk.split(i, i + 1))
                return outcomes
            item = chunk.items[0]
            error = SampleError(item.index, ErrorKind.COMPUTE, f"{type(e).__name__}: {e}", type(e).__name__)
            return [(item, error)]
        return list(zip(chunk.items, results))


def _release_cuda_cache():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_loader(loader, runner):
    """Yields, per loader batch, the list of ``(index, result or
    SampleError)`` outcomes of its samples, load failures included."""
    for batch in loader:
        outcomes = [(error.index, error) for error in batch.failed]
        for group in batch.groups:
            outcomes += [(item.index, result) for item, result in runner(group)]
        yield outcomes
