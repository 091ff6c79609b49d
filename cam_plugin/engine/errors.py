"""Typed per-sample failures: what went wrong with one sample, never an
exception that stops the run."""

import enum
from dataclasses import dataclass


class ErrorKind(enum.Enum):
    """Why a sample failed; the value is the short reason shown in summaries
    and at the start of the stored message."""

    IMAGE = "image could not be read"
    PREPROCESS = "preprocessing failed"
    COMPUTE = "computation failed"
    OUT_OF_MEMORY = "out of GPU memory"
    INPUT = "input missing"


@dataclass(frozen=True)
class SampleError:
    """One sample's failure.

    Attributes:
        index: the sample's position in the run's input lists
        kind: an :class:`ErrorKind`
        detail: what exactly failed (names the file where there is one)
        cause: for computation failures, the exception's type name
    """

    index: int
    kind: ErrorKind
    detail: str
    cause: str = None  # the exception type of a computation failure

    @property
    def reason(self):
        return self.kind.value

    @property
    def message(self):
        """``"<reason>: <detail>"``, the text stored on the sample."""
        return f"{self.kind.value}: {self.detail}"


def systematic_failure(failures, at_least=16):
    """The first failure when the first ``at_least`` samples all failed to
    compute with one and the same exception type: that points at the model
    or the configuration, not the data, and a run should stop rather than
    fail a whole dataset sample by sample. None otherwise."""
    causes = {(f.kind, f.cause) for f in failures}
    if len(failures) >= at_least and len(causes) == 1:
        ((kind, _),) = causes
        if kind is ErrorKind.COMPUTE:
            return failures[0]
    return None
