"""Generic asyncio micro-batching. Standard library only: no model, no web framework."""

from batching.errors import BatchFailed, BatchingError, DeadlineExceeded, QueueFull, Stopped
from batching.processor import (
    BatchConfig,
    BatchHandler,
    BatchObserver,
    BatchPolicy,
    BatchPreparer,
    BatchProcessor,
    NullObserver,
    Outcome,
    Priority,
    timeout_at_deadline,
)

__all__ = [
    "BatchConfig",
    "BatchFailed",
    "BatchHandler",
    "BatchObserver",
    "BatchPolicy",
    "BatchPreparer",
    "BatchProcessor",
    "BatchingError",
    "DeadlineExceeded",
    "NullObserver",
    "Outcome",
    "Priority",
    "QueueFull",
    "Stopped",
    "timeout_at_deadline",
]
