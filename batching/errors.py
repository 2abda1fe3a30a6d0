"""Errors raised to callers of ``BatchProcessor.submit``."""

from __future__ import annotations


class BatchingError(Exception):
    """Base class for every error the batch processor raises to a caller."""


class QueueFull(BatchingError):
    """The item's lane already holds ``max_queue`` items; try again later."""


class DeadlineExceeded(BatchingError):
    """The caller's deadline passed before its output was ready.

    ``batch_size`` is the size of the batch the item was being run in when it passed;
    None when it had not reached the handler.
    """

    def __init__(self, message: str, batch_size: int | None = None) -> None:
        super().__init__(message)
        self.batch_size = batch_size


class Stopped(BatchingError):
    """The processor is not accepting work (not started, or shutting down)."""


class BatchFailed(BatchingError):
    """The handler failed on the batch that held this item.

    ``batch_size`` is the size of the batch it failed in; None when it is not known.
    """

    def __init__(self, message: str, batch_size: int | None = None) -> None:
        super().__init__(message)
        self.batch_size = batch_size
